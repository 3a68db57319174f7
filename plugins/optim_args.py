"""Default optimizer-argument rules (Pyro's per-parameter ``optim_args``)."""

import fnmatch

from workbench import hookimpl


@hookimpl
def register_optim_args(register):
    register("per_param", PerParam)
    register("lr_by_size", LrBySize)


class PerParam:
    """Settings for parameters matched by name or glob pattern, e.g. {log_alpha_q: {lr: 0}}."""

    def __init__(self, rules: dict[str, dict] | None = None):
        self.rules = dict(rules or {})
        for pattern, settings in self.rules.items():
            if not isinstance(settings, dict):
                raise ValueError(f"rule {pattern!r}: expected a mapping of settings, "
                                 f"got {settings!r}")

    def __call__(self, param_name: str) -> dict:
        settings = {}
        for pattern, given in self.rules.items():
            if fnmatch.fnmatchcase(param_name, pattern):
                settings.update(given)
        return settings

    def check(self, param_names):
        """A rule that matches no parameter is a typo, the seed's own bug: refuse it."""
        for pattern in self.rules:
            if not fnmatch.filter(param_names, pattern):
                raise ValueError(
                    f"rule {pattern!r} matches no parameter; the parameters are "
                    + ", ".join(sorted(param_names))
                )


class LrBySize:
    """Learning rate lr * (reference / size)**power: large tensors take smaller steps."""

    def __init__(self, defaults, power: float = 0.5, reference: int = 1):
        if "lr" not in defaults:
            raise ValueError("the optimizer has no lr to scale")
        if reference < 1:
            raise ValueError("reference must be >= 1")
        self.lr, self.power, self.reference = defaults["lr"], power, reference

    def __call__(self, param_name: str) -> dict:
        import pyro

        size = pyro.get_param_store()[param_name].numel()
        return {"lr": self.lr * (self.reference / size) ** self.power}
