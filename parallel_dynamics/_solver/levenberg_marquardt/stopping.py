"""When Levenberg–Marquardt on a trajectory stops: an undamped step that verifies a
trajectory whose defects are all below tolerance, or the rounding floor."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Scalar

from ..base import converged as converged_by_rate


# Steps in a row that fail to improve the merit once every defect is below
# tolerance, after which the rounding floor is taken to be reached. With adaptive
# damping that many rejections multiply the damping by 2^55.
FLOOR_STEPS = 10
# The relative decrease below the best merit so far that counts as an improvement. At
# the rounding floor the merit of accepted steps fluctuates; with a fixed damping,
# which accepts every step, a fluctuation downwards must not count as progress.
FLOOR_GAIN = 0.01


class StoppingState(eqx.Module):
    # The last verification failed: the next waits for a damped step that helps.
    newton_failed: Bool[Array, ""]
    # Some verification has failed: the next ones wait for every defect to be below
    # tolerance.
    newton_ever_failed: Bool[Array, ""]
    # Accepted verification steps in a row, and the size of the last one.
    newton_steps: Int[Array, ""]
    newton_diffsize: Scalar
    # Accepted steps of any kind in a row, and the size of the last one.
    accepted_steps: Int[Array, ""]
    last_diffsize: Scalar
    # Steps in a row that did not improve on the best merit of an iterate with every
    # defect below tolerance, and that best merit.
    floor_steps: Int[Array, ""]
    best_merit: Scalar


def init_stopping(dtype) -> StoppingState:
    return StoppingState(
        newton_failed=jnp.array(False),
        newton_ever_failed=jnp.array(False),
        newton_steps=jnp.array(0),
        newton_diffsize=jnp.array(jnp.inf, dtype),
        accepted_steps=jnp.array(0),
        last_diffsize=jnp.array(jnp.inf, dtype),
        floor_steps=jnp.array(0),
        best_merit=jnp.array(jnp.inf, dtype),
    )


def verifies(
    state: StoppingState, all_converged: Bool[Array, ""], early: Bool[Array, ""]
) -> Bool[Array, ""]:
    """Whether this step is the undamped verification step: the last verification did
    not fail, and every defect is below tolerance, or the iterate is ready for an
    `early` verification and none has failed yet."""
    ready = all_converged | (early & ~state.newton_ever_failed)
    return ready & ~state.newton_failed


def update_stopping(
    state: StoppingState,
    *,
    newton: Bool[Array, ""],
    accepted: Bool[Array, ""],
    progress: Bool[Array, ""],
    all_converged: Bool[Array, ""],
    now_converged: Bool[Array, ""],
    merit_before: Scalar,
    merit_after: Scalar,
    diffsize: Scalar,
    superlinear: bool,
    rounding: Bool[Array, ""],
    count_verifications: bool = False,
) -> tuple[Bool[Array, ""], StoppingState]:
    """Whether the solve has converged after this step, and the next state.

    - `newton`: this step was the verification step; `accepted`: it was taken.
    - `progress`: the step was taken and decreased the merit.
    - `all_converged`, `now_converged`: every defect is below tolerance before and
        after the step.
    - `merit_before`, `merit_after`: $\\lVert F \\rVert^2$ at the iterate before and
        after the step.
    - `diffsize`: the size of the step relative to the tolerance.

    The verification succeeds as [`parallel_dynamics.DEER`][]'s stopping test does, on
    the sizes of consecutive undamped steps (the error estimate of Hairer & Wanner);
    small defects alone do not bound the error, for they add up along the trajectory.
    For a superlinear iteration the rate may also be taken against the accepted step
    before, damped or not: a verification step taken as soon as the damping has
    collapsed can then stop the solve where DEER would stop. This is a heuristic (a
    damped or windowed step need not be shorter than the Newton step from the same
    point); for linearly convergent iterations, where it can stop early, the rate is
    taken between verification steps only.

    On chaotic maps the forward error of a trajectory whose defects are at tolerance
    can exceed the tolerance by the growth factor of the dynamics, and no iteration
    (nor `lax.scan` itself) does better: the verification keeps failing, and neither
    its steps nor damped ones decrease the defects (in single precision the sizes of
    consecutive verification steps stop contracting at the rounding level). After
    `FLOOR_STEPS` steps in a row, with every defect below tolerance, that do not bring
    the merit `FLOOR_GAIN` below its best value since every defect went below
    tolerance (verification steps count only where every defect is at the rounding
    level, `rounding`, or with `count_verifications`, for a damping that accepts
    every step), every step satisfies the recurrence to tolerance, and that is
    what is returned.
    """
    newton_steps = jnp.where(newton & accepted, state.newton_steps + 1, 0)
    accepted_steps = jnp.where(accepted, state.accepted_steps + 1, 0)
    rate_of_verifications = converged_by_rate(
        newton_steps,
        diffsize,
        state.newton_diffsize,
        superlinear=superlinear,
        rounding=rounding,
    )
    if superlinear:
        rate_of_verifications |= converged_by_rate(
            accepted_steps,
            diffsize,
            state.last_diffsize,
            superlinear=superlinear,
            rounding=rounding,
        )
    verified = accepted & now_converged & newton & rate_of_verifications
    # Counted from the first time every defect is below tolerance: a step at the floor
    # can push a defect back over tolerance, which is no progress either.
    counting = all_converged | jnp.isfinite(state.best_merit)
    best_before = jnp.where(
        all_converged, jnp.minimum(state.best_merit, merit_before), state.best_merit
    )
    improved = merit_after < (1 - FLOOR_GAIN) * best_before
    # A verification step counts only at the rounding level, or where no step is ever
    # rejected: otherwise undamped steps that leave the merit unchanged can still be
    # moving an error forward in time.
    stalled = ~improved & (~newton | rounding | count_verifications)
    floor_steps = jnp.where(counting, jnp.where(stalled, state.floor_steps + 1, 0), 0)
    best_merit = jnp.where(
        now_converged, jnp.minimum(best_before, merit_after), best_before
    )
    at_floor = (floor_steps >= FLOOR_STEPS) & now_converged
    new_state = StoppingState(
        newton_failed=jnp.where(newton, ~accepted, state.newton_failed & ~progress),
        newton_ever_failed=state.newton_ever_failed | (newton & ~accepted),
        newton_steps=newton_steps,
        newton_diffsize=jnp.where(newton & accepted, diffsize, jnp.inf),
        accepted_steps=accepted_steps,
        last_diffsize=jnp.where(accepted, diffsize, jnp.inf),
        floor_steps=floor_steps,
        best_merit=best_merit,
    )
    return verified | at_floor, new_state
