"""The posteriordb ports as vibench components: per posterior a model and a data set of the
same name (``pdb_kilpisjarvi``, ...).

Only ``hookimpl`` comes from vibench, and torch and pyro are imported inside the functions
that use them, so ``vibench list`` does not pay for importing them.
"""

from vibench_posteriordb import models, reference
from workbench import hookimpl

# vibench name -> the model class (its docstring's first line is what `vibench list` shows).
MODELS = {
    "pdb_kilpisjarvi": models.Kilpisjarvi,
    "pdb_earnings": models.Earnings,
    "pdb_nes": models.Nes,
    "pdb_diamonds": models.Diamonds,
    "pdb_arma11": models.Arma11,
    "pdb_garch11": models.Garch11,
    "pdb_gauss_mix": models.GaussMix,
    "pdb_hmm_drive": models.HmmDrive,
}


# vibench name -> what its data set holds (the keys of data.json), for `vibench list`.
DATA = {
    "pdb_kilpisjarvi": "62 values of a year-like x and temperatures y, the priors' pmualpha, "
                       "psalpha, pmubeta, psbeta, and N, xpred",
    "pdb_earnings": "earn, height and male of 1,192 people, and N",
    "pdb_nes": "partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete and year of "
               "476 respondents, and N",
    "pdb_diamonds": "log prices Y of 5,000 diamonds, their design matrix X (5,000 x 25), and "
                    "N, K, prior_only",
    "pdb_arma11": "a time series y of 200 values, and T",
    "pdb_garch11": "a time series y of 200 values, the first volatility sigma1, and T",
    "pdb_gauss_mix": "1,000 values y from two Normals, and N",
    "pdb_hmm_drive": "1/speed u and hoop distance v at 416 time steps, the transition prior "
                     "alpha (2 x 2), and N, K",
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

    dataset.__name__ = f"dataset_{posterior.replace('-', '_')}"
    dataset.__doc__ = f"posteriordb {posterior}'s data: {holds}."
    return dataset
