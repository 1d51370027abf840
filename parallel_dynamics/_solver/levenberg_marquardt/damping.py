"""The damping $\\lambda$ of Levenberg–Marquardt: how it evolves from step to step and
which trial steps it accepts, given the gain ratio $\\rho$ of the actual to the predicted
decrease of $\\lVert F \\rVert^2$."""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Scalar


class AbstractDamping(eqx.Module):
    """How the Levenberg–Marquardt damping $\\lambda$ evolves and which steps are
    accepted.

    `accepts_every_step` says that the strategy never rejects a finite step, so
    rejections cannot signal the rounding floor: the stopping test then counts every
    step that does not improve the merit, verification steps included.
    """

    accepts_every_step: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, dtype) -> tuple[Scalar, Scalar]:
        """The initial damping and the strategy's own scalar state."""

    @abc.abstractmethod
    def update(
        self, damping: Scalar, memory: Scalar, ratio: Scalar
    ) -> tuple[Bool[Array, ""], Scalar, Scalar]:
        """Given the ratio $\\rho$ of actual to predicted decrease of $\\lVert F\\rVert^2$
        for a finite trial step, whether to accept it, the next damping and the next
        state."""


class FixedDamping(AbstractDamping):
    """A constant damping $\\lambda$ and every finite step accepted: the behaviour of
    the ELK paper's reference code (which writes $\\lambda = 1/\\sigma^2$ with a prior
    variance $\\sigma^2$), kept for comparison. It must be tuned by hand per problem.
    """

    damping: float

    def __check_init__(self):
        if not 0 < self.damping < np.inf:
            raise ValueError(
                f"`damping` must be positive and finite, got {self.damping}."
            )

    accepts_every_step: ClassVar[bool] = True

    def init(self, dtype):
        return jnp.array(self.damping, dtype), jnp.array(1.0, dtype)

    def update(self, damping, memory, ratio):
        del ratio
        return jnp.array(True), damping, memory


class AdaptiveDamping(AbstractDamping):
    """Nielsen's rule (Nielsen 1999; Madsen, Nielsen & Tingleff 2004): accept a step
    when $\\rho > $ `accept_ratio`; then $\\lambda \\leftarrow \\lambda
    \\max(\\tfrac13, 1 - (2\\rho - 1)^3)$ and $\\nu \\leftarrow 2$, otherwise
    $\\lambda \\leftarrow \\nu \\lambda$ and $\\nu \\leftarrow 2 \\nu$. Good steps shrink
    $\\lambda$ towards Newton's method; each rejection grows it ever faster.
    """

    initial: float = 1.0
    accept_ratio: float = 1e-4
    max_damping: float = 1e16

    def __check_init__(self):
        if not 0 < self.initial < np.inf:
            raise ValueError(
                f"`initial` must be positive and finite, got {self.initial}."
            )
        # The damping is clipped to `max_damping`: a negative or infinite one makes
        # the Kalman weights 1 / (1 + λ) and λ / (1 + λ) infinite or NaN.
        if not self.initial <= self.max_damping < np.inf:
            raise ValueError(
                "`max_damping` must be finite and at least `initial` "
                f"({self.initial}), got {self.max_damping}."
            )
        if not 0 <= self.accept_ratio < 1:
            raise ValueError(
                f"`accept_ratio` must lie in [0, 1), got {self.accept_ratio}."
            )

    def init(self, dtype):
        return jnp.array(self.initial, dtype), jnp.array(2.0, dtype)

    def update(self, damping, memory, ratio):
        accept = ratio > self.accept_ratio
        tiny = np.finfo(damping.dtype).tiny ** 0.5
        shrink = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        new_damping = jnp.where(accept, damping * shrink, damping * memory)
        new_damping = jnp.clip(new_damping, tiny, self.max_damping)
        new_memory = jnp.where(accept, 2.0, jnp.minimum(2 * memory, 2.0**30))
        return accept, new_damping, new_memory.astype(memory.dtype)


FixedDamping.__init__.__doc__ = """**Arguments:**

- `damping`: the constant $\\lambda > 0$ (the paper's $1/\\sigma^2$).
"""
AdaptiveDamping.__init__.__doc__ = """**Arguments:**

- `initial`: the initial damping $\\lambda_0$.
- `accept_ratio`: the smallest ratio $\\rho$ of actual to predicted decrease for which a
    step is accepted.
- `max_damping`: the largest damping (the damping is clipped there).
"""
