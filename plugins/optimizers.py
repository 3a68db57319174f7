"""Default optimizers and learning-rate schedules.

An optimizer factory's keyword options are the settings every parameter gets unless the
recipe's optim_args give a parameter its own; vibench folds both into ``optim_args``, so each
factory only hands that to Pyro.
"""

from workbench import hookimpl

Betas = tuple[float, float]


@hookimpl
def register_optimizers(register):
    register("adam", adam)
    register("clipped_adam", clipped_adam)
    register("adamw", adamw)
    register("sgd", sgd)
    register("rmsprop", rmsprop)
    register("adagrad", adagrad)


@hookimpl
def register_schedules(register):
    register("step", step)
    register("exponential", exponential)
    register("cosine", cosine)
    register("reduce_on_plateau", reduce_on_plateau)


def adam(optim_args, lr: float = 0.001, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False):
    """Adam (Kingma & Ba 2015)."""
    import pyro.optim

    return pyro.optim.Adam(_torch_args(optim_args))


def clipped_adam(optim_args, lr: float = 0.001, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float = 10.0, lrd: float = 1.0):
    """Pyro's ClippedAdam: Adam with gradients clipped to clip_norm and lr decayed by lrd a step."""
    import pyro.optim

    return pyro.optim.ClippedAdam(_torch_args(optim_args))


def adamw(optim_args, lr: float = 0.001, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, amsgrad: bool = False):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""
    import pyro.optim

    return pyro.optim.AdamW(_torch_args(optim_args))


def sgd(optim_args, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False):
    """Stochastic gradient descent, with optional (Nesterov) momentum."""
    import pyro.optim

    return pyro.optim.SGD(_torch_args(optim_args))


def rmsprop(optim_args, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8,
            weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False):
    """RMSprop (Hinton's lecture 6e)."""
    import pyro.optim

    return pyro.optim.RMSprop(_torch_args(optim_args))


def adagrad(optim_args, lr: float = 0.01, lr_decay: float = 0.0, weight_decay: float = 0.0,
            eps: float = 1e-10):
    """Adagrad (Duchi et al. 2011)."""
    import pyro.optim

    return pyro.optim.Adagrad(_torch_args(optim_args))


def _torch_args(optim_args):
    """YAML has no tuples; torch wants betas as one."""
    return lambda param_name: {k: tuple(v) if isinstance(v, list) else v
                               for k, v in optim_args(param_name).items()}


def step(optimizer, step_size: int = 1000, gamma: float = 0.1):
    """Multiply the learning rate by gamma every step_size steps."""
    from pyro.optim import StepLR

    if step_size < 1:
        raise ValueError("step_size must be >= 1")
    return _schedule(StepLR, optimizer, step_size=step_size, gamma=gamma)


def exponential(optimizer, gamma: float = 0.999):
    """Multiply the learning rate by gamma every step."""
    from pyro.optim import ExponentialLR

    if not 0 < gamma <= 1:
        raise ValueError("gamma must be in (0, 1]")
    return _schedule(ExponentialLR, optimizer, gamma=gamma)


def cosine(optimizer, steps, eta_min: float = 0.0, period: int | None = None):
    """Cosine annealing from lr to eta_min over period steps (the whole run by default)."""
    from pyro.optim import CosineAnnealingLR

    return _schedule(CosineAnnealingLR, optimizer, T_max=period or steps, eta_min=eta_min)


def reduce_on_plateau(optimizer, factor: float = 0.5, patience: int = 500,
                      threshold: float = 1e-4, min_lr: float = 0.0):
    """Multiply the learning rate by factor when the loss has not improved for patience steps."""
    from pyro.optim import ReduceLROnPlateau

    if not 0 < factor < 1:
        raise ValueError("factor must be in (0, 1)")
    return _schedule(ReduceLROnPlateau, optimizer, factor=factor, patience=patience,
                     threshold=threshold, min_lr=min_lr)


def _schedule(scheduler, optimizer, **settings):
    """A Pyro scheduler over the same torch optimizer and per-parameter settings."""
    return scheduler({"optimizer": optimizer.pt_optim_constructor,
                      "optim_args": optimizer.pt_optim_args, **settings})
