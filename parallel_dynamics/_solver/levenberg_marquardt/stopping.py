"""When Levenberg–Marquardt on a trajectory stops: an undamped step that verifies a
trajectory whose defects are all below tolerance, or the rounding floor."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Scalar

from ..base import converged as converged_by_rate


# Damped steps in a row that fail to decrease the merit once every defect is below
# tolerance, after which the rounding floor is taken to be reached. With adaptive
# damping that many rejections multiply the damping by 2^55.
FLOOR_STEPS = 10


class StoppingState(eqx.Module):
    # The last verification failed: the next waits for a damped step that helps.
    newton_failed: Bool[Array, ""]
    # Accepted verification steps in a row, and the size of the last one.
    newton_steps: Int[Array, ""]
    newton_diffsize: Scalar
    # Damped steps in a row that made no progress with every defect below tolerance.
    floor_steps: Int[Array, ""]


def init_stopping(dtype) -> StoppingState:
    return StoppingState(
        newton_failed=jnp.array(False),
        newton_steps=jnp.array(0),
        newton_diffsize=jnp.array(jnp.inf, dtype),
        floor_steps=jnp.array(0),
    )


def verifies(state: StoppingState, all_converged: Bool[Array, ""]) -> Bool[Array, ""]:
    """Whether this step is the undamped verification step: every defect is below
    tolerance and the last verification did not fail."""
    return all_converged & ~state.newton_failed


def update_stopping(
    state: StoppingState,
    *,
    newton: Bool[Array, ""],
    accepted: Bool[Array, ""],
    progress: Bool[Array, ""],
    all_converged: Bool[Array, ""],
    now_converged: Bool[Array, ""],
    diffsize: Scalar,
    superlinear: bool,
    rounding: Bool[Array, ""],
) -> tuple[Bool[Array, ""], StoppingState]:
    """Whether the solve has converged after this step, and the next state.

    - `newton`: this step was the verification step; `accepted`: it was taken.
    - `progress`: the step was taken and decreased the merit.
    - `all_converged`, `now_converged`: every defect is below tolerance before and
        after the step.
    - `diffsize`: the size of the step relative to the tolerance.

    The verification succeeds as [`parallel_dynamics.DEER`][]'s stopping test does, on
    the sizes of consecutive undamped steps (the error estimate of Hairer & Wanner);
    small defects alone do not bound the error, for they add up along the trajectory.

    On chaotic maps the forward error of a trajectory whose defects are at tolerance
    can exceed the tolerance by the growth factor of the dynamics, and no iteration
    (nor `lax.scan` itself) does better: the verification keeps failing and damped
    steps stop decreasing the defects. After `FLOOR_STEPS` such steps every step
    satisfies the recurrence to tolerance, and that is what is returned.
    """
    newton_steps = jnp.where(newton & accepted, state.newton_steps + 1, 0)
    verified = (
        newton
        & accepted
        & now_converged
        & converged_by_rate(
            newton_steps,
            diffsize,
            state.newton_diffsize,
            superlinear=superlinear,
            rounding=rounding,
        )
    )
    floor_steps = jnp.where(
        all_converged & ~newton,
        jnp.where(progress, 0, state.floor_steps + 1),
        jnp.where(all_converged, state.floor_steps, 0),
    )
    at_floor = (floor_steps >= FLOOR_STEPS) & now_converged
    new_state = StoppingState(
        newton_failed=jnp.where(newton, ~accepted, state.newton_failed & ~progress),
        newton_steps=newton_steps,
        newton_diffsize=jnp.where(newton & accepted, diffsize, jnp.inf),
        floor_steps=floor_steps,
    )
    return verified | at_floor, new_state
