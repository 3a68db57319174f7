"""Default losses: Pyro's ELBO family, and one plain-callable loss as an example of a
user-defined loss."""

from typing import Literal

from workbench import hookimpl


@hookimpl
def register_losses(register):
    register("elbo", elbo)
    register("mean_field_elbo", mean_field_elbo)
    register("graph_elbo", graph_elbo)
    register("renyi_elbo", renyi_elbo)
    register("iwae", iwae)
    register("tail_adaptive_elbo", tail_adaptive_elbo)
    register("enum_elbo", enum_elbo)
    register("analytic_kl_elbo", analytic_kl_elbo)


def elbo(num_particles: int = 1, vectorize_particles: bool = True,
         max_plate_nesting: int | None = None, jit: bool = False,
         estimator: Literal["reparam", "stl"] = "reparam"):
    """Pyro's Trace_ELBO: the evidence lower bound by Monte Carlo (Ranganath et al. 2014)."""
    from pyro.infer import JitTrace_ELBO, Trace_ELBO

    if estimator == "stl":
        from vibench_plugins.estimators import STLTrace_ELBO

        if jit:
            raise ValueError("estimator 'stl' does not run under jit; leave jit off")
        return _make(STLTrace_ELBO, num_particles, vectorize_particles, max_plate_nesting)
    return _make(JitTrace_ELBO if jit else Trace_ELBO, num_particles, vectorize_particles,
                 max_plate_nesting)


def mean_field_elbo(num_particles: int = 1, vectorize_particles: bool = True,
                    max_plate_nesting: int | None = None, jit: bool = False):
    """Pyro's TraceMeanField_ELBO: the KL term in closed form where one exists."""
    from pyro.infer import JitTraceMeanField_ELBO, TraceMeanField_ELBO

    return _make(JitTraceMeanField_ELBO if jit else TraceMeanField_ELBO, num_particles,
                 vectorize_particles, max_plate_nesting)


def graph_elbo(num_particles: int = 1, vectorize_particles: bool = True,
               max_plate_nesting: int | None = None, jit: bool = False):
    """Pyro's TraceGraph_ELBO: Rao-Blackwellised gradients for non-reparameterised sites."""
    from pyro.infer import JitTraceGraph_ELBO, TraceGraph_ELBO

    return _make(JitTraceGraph_ELBO if jit else TraceGraph_ELBO, num_particles,
                 vectorize_particles, max_plate_nesting)


def renyi_elbo(alpha: float = 0.0, num_particles: int = 2, vectorize_particles: bool = True,
               max_plate_nesting: int | None = None):
    """Pyro's RenyiELBO: the Renyi alpha-divergence bound (Li & Turner 2016); alpha 0 is IWAE."""
    from pyro.infer import RenyiELBO

    if alpha == 1:
        raise ValueError("alpha 1 is the ordinary ELBO: use loss 'elbo'")
    return _make(RenyiELBO, num_particles, vectorize_particles, max_plate_nesting, alpha=alpha)


def iwae(num_particles: int = 8, estimator: Literal["reparam", "dreg"] = "dreg",
         vectorize_particles: bool = True, max_plate_nesting: int | None = None):
    """The importance-weighted bound (Burda et al. 2016), by default with DReG gradients."""
    from pyro.infer import RenyiELBO

    if num_particles < 2:
        raise ValueError("num_particles must be >= 2: with 1 the bound is the ELBO")
    if estimator == "dreg":
        from vibench_plugins.estimators import DReGRenyiELBO

        return _make(DReGRenyiELBO, num_particles, vectorize_particles, max_plate_nesting)
    return _make(RenyiELBO, num_particles, vectorize_particles, max_plate_nesting, alpha=0.0)


def tail_adaptive_elbo(num_particles: int = 8, tail_adaptive_beta: float = -1.0,
                       max_plate_nesting: int | None = None):
    """Pyro's TraceTailAdaptive_ELBO (Wang et al. 2018), reporting the ELBO of its particles."""
    from pyro.infer import Trace_ELBO, TraceTailAdaptive_ELBO

    class TailAdaptive(TraceTailAdaptive_ELBO):
        """Pyro's version reports inf, as the tail-adaptive objective has no value of its own;
        the -ELBO of the same particles is what a user watches converge instead."""

        loss = Trace_ELBO.loss

        def _differentiable_loss_particle(self, model_trace, guide_trace):
            _, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            return -elbo.item(), surrogate

    if num_particles < 2:
        raise ValueError("num_particles must be >= 2 for the tail-adaptive weights")
    if tail_adaptive_beta >= 0:
        raise ValueError("tail_adaptive_beta must be < 0")
    loss = _make(TailAdaptive, num_particles, True, max_plate_nesting)
    loss.tail_adaptive_beta = tail_adaptive_beta
    return loss


def enum_elbo(num_particles: int = 1, vectorize_particles: bool = True,
              max_plate_nesting: int | None = None, jit: bool = False,
              strict_enumeration_warning: bool = True):
    """Pyro's TraceEnum_ELBO: sums out discrete latent sites the model marks for enumeration."""
    from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO

    return _make(JitTraceEnum_ELBO if jit else TraceEnum_ELBO, num_particles,
                 vectorize_particles, max_plate_nesting,
                 strict_enumeration_warning=strict_enumeration_warning)


def _make(cls, num_particles, vectorize_particles, max_plate_nesting, **extra):
    if num_particles < 1:
        raise ValueError("num_particles must be >= 1")
    if max_plate_nesting is not None and max_plate_nesting < 0:
        raise ValueError("max_plate_nesting must be >= 0")
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles and num_particles > 1,
        max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
        **extra,
    )


def analytic_kl_elbo(num_particles: int = 1):
    """ELBO with every KL term in closed form; a plain (model, guide, *args) -> loss callable."""

    def loss(model, guide, *args, **kwargs):
        from pyro import poutine
        from pyro.distributions import Delta
        from pyro.poutine.util import site_is_subsample
        from torch.distributions import kl_divergence

        total = 0.0
        for _ in range(num_particles):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
            model_trace.compute_log_prob()
            elbo = 0.0
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and name not in model_trace.nodes:
                    raise ValueError(f"the guide's auxiliary site {name!r} has no closed-form "
                                     "KL term; use loss 'elbo'")
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["is_observed"]:
                    elbo = elbo + site["log_prob_sum"]
                    continue
                q = guide_trace.nodes[name]["fn"]
                if isinstance(q, Delta):
                    raise ValueError(f"the guide's point mass at site {name!r} has no KL to "
                                     f"the model's {type(site['fn']).__name__}; use loss 'elbo'")
                try:
                    kl = kl_divergence(q, site["fn"])
                except NotImplementedError:
                    raise ValueError(
                        f"no closed-form KL from the guide's {type(q).__name__} to the model's "
                        f"{type(site['fn']).__name__} at site {name!r}; use loss 'elbo'"
                    ) from None
                elbo = elbo - site["scale"] * kl.sum()
            total = total - elbo
        return total / num_particles

    if num_particles < 1:
        raise ValueError("num_particles must be >= 1")
    return loss
