"""Tolerances and stopping tests, shared by every iterative solver and by the
verification of `pdyn.solve`: the default tolerance, the scaling of a residual or an
update by the tolerance, the rounding level of a solved recurrence, and the stopping
test on the sizes of consecutive updates."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, Scalar


# A residual within this many units in the last place of the step's values counts as
# rounding error: the trajectory satisfies the recurrence as well as its sequential
# evaluation does. At the exact trajectories of the test maps (GRU, LSTM, tanh RNN,
# Lorenz-96 with RK4; float32 and float64) it measured up to 36.
ROUNDING_ULPS = 256


def default_tolerance(dtype, exponent: float = 0.7) -> float:
    """$\\varepsilon^{0.7}$ of the dtype (`exponent`): about `1.4e-5` in float32 and
    `1.1e-11` in float64."""
    return float(np.finfo(dtype).eps ** exponent)


def scaled(x: Array, y: Array, rtol, atol, floor: Array | None = None) -> Array:
    """$x / (\\text{atol} + \\text{rtol}\\,|y|)$ componentwise, zero where $x$ is
    zero, also where the scale is (`atol = 0` and a component of $y$ that is exactly
    zero): a residual or an update measured in units of the tolerance. With `floor`
    (e.g. `rounding_scale`) the scale is at least `floor`."""
    scale = atol + rtol * jnp.abs(y)
    if floor is not None:
        scale = jnp.maximum(scale, floor)
    return jnp.where(x == 0, 0, x / scale)


def rounding_scale(y: Array, values: Array) -> Array:
    """`ROUNDING_ULPS` units in the last place of $\\max(|y_t|, |f(y_{t-1}, x_t)|)$,
    componentwise: the largest residual $y_t - f(y_{t-1}, x_t)$ that is rounding
    error."""
    eps = jnp.finfo(y.dtype).eps
    return ROUNDING_ULPS * eps * jnp.maximum(jnp.abs(y), jnp.abs(values))


def at_rounding_level(
    residual: Array, y: Array, values: Array, *, when: Bool[Array, ""]
) -> Bool[Array, ""]:
    """Whether $|y_t - f(y_{t-1}, x_t)|$ is within `rounding_scale` everywhere: the
    trajectory satisfies the recurrence as well as its sequential evaluation does.
    Computed only `when` the stopping test will read it (one pass over the
    trajectory); `False` otherwise."""

    def check():
        return jnp.all(jnp.abs(residual) <= rounding_scale(y, values))

    return jax.lax.cond(when, check, lambda: jnp.array(False))


def converged(
    num_updates: Int[Array, ""],
    diffsize: Scalar,
    diffsize_prev: Scalar,
    *,
    superlinear: bool = True,
    rounding: Bool[Array, ""] | bool = True,
) -> Bool[Array, ""]:
    """Whether the iterate *after* the last update is within tolerance.

    With the scaled update sizes $d_k$ and the observed contraction rate
    $\\theta = d_k / d_{k-1}$, the error left after the update is estimated as
    $d_k \\theta / (1 - \\theta)$ (Hairer & Wanner, *Solving ODEs II*, IV.8). It must be
    below 1, and so must $d_k$ itself unless the iteration is clearly superlinear
    ($\\theta < 0.1$ and $d_k < 100$, Newton near the root, where this saves the last
    iteration; `superlinear=False` turns this off for linearly convergent
    iterations, whose update sizes can also collapse when the converged prefix passes
    the sensitive part of a trajectory).
    Slowly contracting iterations ($\\theta \\to 1$) thereby need updates well below
    tolerance before they stop. Updates that no longer shrink ($\\theta \\geq 1$) have
    reached the rounding floor when two in a row are below tolerance and the residual
    is at the `rounding` level: a quasi-Newton or fixed-point iteration on a map that
    does not contract also makes updates of constant size, while the error it has not
    yet removed travels forward in time. For the same reason a single update, whose
    rate is unknown, is enough only for a superlinear iteration or at the rounding
    level (an initial guess that is already the answer).
    """
    first = num_updates <= 1
    rate = diffsize / diffsize_prev
    contracting = rate < 1
    predicted = diffsize * rate / jnp.where(contracting, 1 - rate, 1)
    small = diffsize < 1
    # The superlinear shortcut only for moderate updates: after an iterate has blown
    # up (d_{k-1} huge), any d_k looks like a tiny rate.
    shortcut = (rate < 0.1) & (diffsize < 100) if superlinear else False
    extrapolated = contracting & (predicted < 1) & (small | shortcut)
    floor = ~contracting & small & (diffsize_prev < 1) & rounding
    first_small = small & (rounding | superlinear)
    return (num_updates >= 1) & jnp.where(first, first_small, extrapolated | floor)
