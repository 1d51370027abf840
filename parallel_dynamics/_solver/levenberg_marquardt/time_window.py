"""The trust region in time of Levenberg–Marquardt: the stretch of the trajectory after
the converged prefix on which each damped step works."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Scalar


class TimeWindow(eqx.Module):
    """A window $[k + 1, k + W]$ after the first unconverged state $k$.

    On long chaotic or nearly neutral trajectories the residuals far ahead of the
    converged prefix are large and meaningless, and in a least-squares step over the
    whole trajectory they pull on every earlier state. The window keeps them out: the
    damped step solves the least-squares problem of the window alone. Its size $W$ is
    a trust region in time, grown and shrunk by the outcome of each step.
    """

    grow_ratio: float = 0.25

    def init(self, length: int) -> Int[Array, ""]:
        """The first window covers the whole trajectory."""
        return jnp.array(length)

    def active(
        self,
        times: Int[Array, " T"],
        start: Int[Array, ""],
        end: Int[Array, ""],
        size: Int[Array, ""],
    ) -> Bool[Array, " T"]:
        """The times in the window after `start` (exclusive) that come before `end`
        (exclusive), the first time at which the step cannot be evaluated."""
        return (times > start) & (times <= start + size) & (times < end)

    def update(
        self,
        size: Int[Array, ""],
        length: int,
        accepted: Bool[Array, ""],
        ratio: Scalar,
        damping: Scalar,
    ) -> Int[Array, ""]:
        """The window doubles after a good step (gain ratio above `grow_ratio`) and
        halves after a rejected one, but only once even a strongly damped step
        ($\\lambda \\geq 1$, a step shorter than the residual) fails: the damping is
        the first line of defence."""
        grown = jnp.minimum(2 * size, length)
        shrunk = jnp.where(damping >= 1, jnp.maximum(size // 2, 1), size)
        return jnp.where(
            accepted, jnp.where(ratio > self.grow_ratio, grown, size), shrunk
        )


TimeWindow.__init__.__doc__ = """**Arguments:**

- `grow_ratio`: the gain ratio $\\rho$ above which an accepted step doubles the window.
"""
