"""The trust region in time of [`parallel_dynamics.TrustRegionNewton`][]: how far along
the trajectory a trial step is taken, and what the iterate becomes beyond that."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Int


def first_false(flags: Bool[Array, " T"]) -> Int[Array, ""]:
    """The first index at which `flags` is false ($T$ if none is)."""
    return jnp.where(jnp.all(flags), flags.shape[0], jnp.argmin(flags))


def trusted_horizon(
    residual: Inexact[Array, "T D"],
    trial_residual: Inexact[Array, "T D"],
    trial_converged: Bool[Array, " T"],
    min_ratio: float,
) -> Int[Array, ""]:
    """The first time index at which the linear model of a Newton-type step is no
    longer trusted (at least 1; $T$ if it is trusted everywhere).

    The model predicts that the trial step removes the residual $F$, so on the prefix
    $t \\le s$ the gain ratio of actual to predicted decrease of the squared residual is

    $$\\rho_s = \\frac{\\sum_{t \\le s} \\lVert F_t \\rVert^2 - \\lVert F'_t \\rVert^2}
    {\\sum_{t \\le s} \\lVert F_t \\rVert^2},$$

    with $F'$ the residual at the trial. Time $s$ is trusted when the trial is finite
    there and either $\\rho_s \\geq$ `min_ratio` or the trial satisfies the recurrence to
    tolerance at $s$ (`trial_converged`). Measured on prefixes rather than at single
    times, the test follows the causal structure of the step: an error at $t$ is
    carried to every later state.
    """
    old = jnp.sum(residual**2, axis=1)
    finite = jnp.all(jnp.isfinite(trial_residual), axis=1)
    new = jnp.where(finite, jnp.sum(trial_residual**2, axis=1), jnp.inf)
    actual = jnp.cumsum(old - new)
    predicted = jnp.cumsum(old)
    trusted = finite & ((actual >= min_ratio * predicted) | trial_converged)
    return jnp.maximum(first_false(trusted), 1)


def continue_beyond(
    y: Inexact[Array, "T D"], trial: Inexact[Array, "T D"], horizon: Int[Array, ""]
) -> Inexact[Array, "T D"]:
    """The trial before `horizon`; after it, the current iterate shifted by the trial's
    correction at the last trusted time, so that the new iterate is continuous there.

    From the default initial guess (the initial state at every time) this continues
    the trajectory by the last trusted state: the next linearisation beyond the
    horizon is taken around where the trajectory is, not where it started. A
    user's initial guess keeps its shape.
    """
    times = jnp.arange(y.shape[0])
    # A masked sum rather than a dynamic index, which stays local when the time axis
    # is sharded across devices.
    last = (times == horizon - 1)[:, None]
    shift = jnp.sum(jnp.where(last, trial - y, 0), axis=0, dtype=y.dtype)
    return jnp.where((times < horizon)[:, None], trial, y + shift)
