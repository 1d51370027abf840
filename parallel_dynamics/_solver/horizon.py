"""The trust region in time of [`parallel_dynamics.TrustRegionNewton`][]: how far along
the trajectory a trial step is taken, and what the iterate becomes beyond that."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Int

from .base import state_at


def first_false(flags: Bool[Array, " T"]) -> Int[Array, ""]:
    """The first index at which `flags` is false ($T$ if none is)."""
    return jnp.where(jnp.all(flags), flags.shape[0], jnp.argmin(flags))


def trusted_horizon(
    residual: Inexact[Array, "T D"],
    trial_residual: Inexact[Array, "T D"],
    trial_converged: Bool[Array, " T"],
    start: Int[Array, ""],
    min_ratio: float,
    max_growth: float,
) -> Int[Array, ""]:
    """The first time index at which the linear model of a Newton-type step is no
    longer trusted: at least `start + 1` (at most $T$), $T$ if it is trusted
    everywhere.

    Before `start` (the first state that does not satisfy the recurrence to
    tolerance) the step only polishes, and it is trusted where the trial is finite.
    From `start` on, the model predicts that the step removes the residual $F$; on
    $[\\text{start}, s]$ the gain ratio of actual to predicted decrease of the squared
    residual is

    $$\\rho_s = \\frac{\\sum_{t} \\lVert F_t \\rVert^2 - \\lVert F'_t \\rVert^2}
    {\\sum_{t} \\lVert F_t \\rVert^2},$$

    with $F'$ the residual at the trial. Time $s$ is trusted when the trial is finite
    there and either $\\rho_s \\geq$ `min_ratio` and $\\lVert F'_s \\rVert \\leq$
    `max_growth` $\\lVert F_s \\rVert$, or the trial satisfies the recurrence to
    tolerance at $s$ (`trial_converged`). The ratio on intervals follows the causal
    structure of the step (an error at $t$ is carried to every later state); the
    bound on the growth at single times stops a large decrease early on from paying
    for a trial that has left the trajectory later.
    """
    times = jnp.arange(residual.shape[0])
    after = times >= start
    old = jnp.sum(residual**2, axis=1)
    finite = jnp.all(jnp.isfinite(trial_residual), axis=1)
    new = jnp.where(finite, jnp.sum(trial_residual**2, axis=1), jnp.inf)
    actual = jnp.cumsum(jnp.where(after, old - new, 0))
    predicted = jnp.cumsum(jnp.where(after, old, 0))
    gain = (actual >= min_ratio * predicted) & (new <= max_growth**2 * old)
    trusted = finite & (~after | gain | trial_converged)
    return jnp.clip(first_false(trusted), start + 1, residual.shape[0])


def continue_beyond(
    y: Inexact[Array, "T D"], trial: Inexact[Array, "T D"], horizon: Int[Array, ""]
) -> Inexact[Array, "T D"]:
    """The trial before `horizon`; after it, the current iterate shifted by the trial's
    correction at the last trusted time, so that the new iterate is continuous there.

    From the default initial guess (the initial state at every time) this continues
    the trajectory by the last trusted state: the next linearisation beyond the
    horizon is taken around where the trajectory is, not where it started. A
    user's initial guess keeps its shape, unless the shifted states overflow (they
    can have grown huge beyond the horizon): then every later state is the last
    trusted one.
    """
    # The trajectories may be sharded along time: read single states by masked sums.
    trusted = state_at(trial, horizon - 1, sharded=True)
    shifted = y + (trusted - state_at(y, horizon - 1, sharded=True))
    beyond = jnp.where(jnp.all(jnp.isfinite(shifted)), shifted, trusted)
    return jnp.where((jnp.arange(y.shape[0]) < horizon)[:, None], trial, beyond)


def hold_beyond(
    trial: Inexact[Array, "T D"], horizon: Int[Array, ""]
) -> Inexact[Array, "T D"]:
    """The trial before `horizon`, and its last trusted state at every later time."""
    trusted = state_at(trial, horizon - 1, sharded=True)
    return jnp.where((jnp.arange(trial.shape[0]) < horizon)[:, None], trial, trusted)


def squared_residual_beyond(
    residual: Inexact[Array, "T D"], horizon: Int[Array, ""]
) -> Inexact[Array, ""]:
    """$\\sum_{t \\geq \\text{horizon}} \\lVert F_t \\rVert^2$, infinite where any
    term is not finite."""
    beyond = (jnp.arange(residual.shape[0]) >= horizon)[:, None]
    squares = jnp.where(beyond, residual**2, 0)
    return jnp.where(jnp.all(jnp.isfinite(squares)), jnp.sum(squares), jnp.inf)
