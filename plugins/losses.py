"""Default losses."""

from workbench import hookimpl


@hookimpl
def register_losses(register):
    register("elbo", elbo)


def elbo(
    num_particles: int = 1,
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
):
    """Pyro's Trace_ELBO: the evidence lower bound by Monte Carlo (Ranganath et al. 2014)."""
    from pyro.infer import Trace_ELBO

    if num_particles < 1:
        raise ValueError("num_particles must be >= 1")
    return Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles and num_particles > 1,
        max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
    )
