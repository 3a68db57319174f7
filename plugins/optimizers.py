"""Default optimizers. Each factory's keyword options are the settings every parameter gets,
unless the recipe's optim_args give a parameter its own; vibench folds both into
``optim_args``."""

from workbench import hookimpl


@hookimpl
def register_optimizers(register):
    register("adam", adam)


def adam(
    optim_args,
    lr: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
):
    """Adam (Kingma & Ba 2015), a fresh torch Adam per parameter as Pyro makes it."""
    import pyro.optim

    return pyro.optim.Adam(lambda name: _tuples(optim_args(name)))


def _tuples(settings: dict) -> dict:
    """YAML has no tuples; torch wants betas as one."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
