"""The hard posteriors as vibench components: per posterior a model and a data set of the
same name (``hard_funnel10``, ...).

Only ``hookimpl`` comes from vibench, and torch and pyro are imported inside the functions
that use them, so ``vibench list`` does not pay for importing them.
"""

from vibench_hardcases import models, reference
from workbench import hookimpl

# vibench name -> the model class (its docstring's first line is what `vibench list` shows).
MODELS = {
    "hard_funnel10": models.Funnel10,
    "hard_banana": models.Banana,
    "hard_mixture2": models.Mixture2,
    "hard_student_t": models.StudentT,
    "hard_hier_centred": models.HierCentred,
    "hard_latent_gp": models.LatentGP,
    "hard_hier_logistic": models.HierLogistic,
}

# vibench name -> what its data set holds (the keys of data.json), for `vibench list`.
DATA = {
    "hard_funnel10": "the funnel's constants: v_scale 3 and dim 10 (no observations)",
    "hard_banana": "the banana's constants: sigma1 10 and b 0.1 (no observations)",
    "hard_mixture2": "one observation y (2), the prior's scale 5, and the mixture "
                     "likelihood's weights (2), offsets (2 x 2) and covs (2 x 2 x 2)",
    "hard_student_t": "the Student-t's df 3, loc (4) and scale matrix (4 x 4) (no observations)",
    "hard_hier_centred": "62 synthetic binary outcomes y with a covariate x and their 0-based "
                         "group (10 groups), and J",
    "hard_latent_gp": "20 synthetic Poisson counts y at inputs x in (0, 10)",
    "hard_hier_logistic": "2,000 synthetic binary outcomes y, their predictors X (2,000 x 5) "
                          "and 0-based group g (10 groups)",
}


@hookimpl
def register_models(register):
    for name, model in MODELS.items():
        register(name, model)


@hookimpl
def register_datasets(register):
    for name, model in MODELS.items():
        register(name, _dataset(model.posterior, DATA[name]))


def _dataset(posterior, holds):
    """The factory of one posterior's data set: its data.json, as arrays."""

    def dataset():
        return reference.load_data(posterior)

    dataset.__name__ = f"dataset_{posterior}"
    dataset.__doc__ = f"vibench-hardcases {posterior}: {holds}."
    return dataset
