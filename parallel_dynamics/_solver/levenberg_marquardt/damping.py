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

    `accepts_every_step` says that the strategy accepts finite steps that do not
    decrease the merit, so rejections cannot signal the rounding floor: the stopping
    test then counts every step that does not improve the merit, verification steps
    included.
    """

    accepts_every_step: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, dtype) -> tuple[Scalar, Scalar]:
        """The initial damping and the strategy's own scalar state."""

    @abc.abstractmethod
    def update(
        self,
        damping: Scalar,
        memory: Scalar,
        ratio: Scalar,
        merit: Scalar,
        trial_merit: Scalar,
    ) -> tuple[Bool[Array, ""], Scalar, Scalar]:
        """Given the ratio $\\rho$ of actual to predicted decrease of $\\lVert F\\rVert^2$
        for a trial step ($-\\infty$ where the trial is not finite), and
        $\\lVert F \\rVert^2$ over the step's window at the current iterate (`merit`)
        and at the trial (`trial_merit`), whether to accept it, the next damping and
        the next state."""


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

    def update(self, damping, memory, ratio, merit, trial_merit):
        del ratio, merit, trial_merit
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

    def update(self, damping, memory, ratio, merit, trial_merit):
        del merit, trial_merit
        accept = ratio > self.accept_ratio
        tiny = np.finfo(damping.dtype).tiny ** 0.5
        shrink = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        new_damping = jnp.where(accept, damping * shrink, damping * memory)
        new_damping = jnp.clip(new_damping, tiny, self.max_damping)
        new_memory = jnp.where(accept, 2.0, jnp.minimum(2 * memory, 2.0**30))
        return accept, new_damping, new_memory.astype(memory.dtype)


class NonmonotoneDamping(AbstractDamping):
    """Damping for steps that must be allowed to increase the merit on the way: accept
    a finite trial when its $\\lVert F \\rVert^2$ over the window is at most
    `max_increase` times the current iterate's and at most `max_excursion` times the
    smallest merit accepted since the last rejection; then $\\lambda \\leftarrow \\lambda /$
    `decrease` if the merit went down ($\\lambda \\leftarrow \\lambda /$ `collapse`
    if moreover $\\rho >$ `good_ratio`: the linear model is right, so the damping
    collapses at once), and $\\lambda$ is kept if it went up. A rejected trial
    multiplies $\\lambda$ by `increase`.

    This is the damping of the causal (Kalman filter) step on long nearly neutral
    maps. There the merit is dominated by the residuals far ahead of the converged
    part, which are meaningless until the states before them have converged: a step
    that corrects the early states moves every later one and can raise
    $\\lVert F \\rVert^2$ several-fold while the error of the trajectory falls. A
    monotone rule (Nielsen's, [`parallel_dynamics.AdaptiveDamping`][]) rejects those
    steps and stalls; no rule at all ([`parallel_dynamics.FixedDamping`][]) needs
    $\\lambda$ tuned by hand, because below a problem-dependent value the iterates
    run away (the merit grows by orders of magnitude within a few steps). This rule
    lets the damping fall geometrically towards Newton's method until the iterates
    start to run away, and catches that at the first step.

    The smallest merit is forgotten at a rejection: the window's merit also changes
    outside the damping's control (the converged prefix advances, and a rejected
    trial still contributes its converged prefix), and a bound set by a merit from an
    earlier window would reject every later step, even good ones.
    """

    accepts_every_step: ClassVar[bool] = True

    initial: float = 1e-3
    max_increase: float = 3.0
    max_excursion: float = 1e3
    decrease: float = 2.0
    increase: float = 10.0
    good_ratio: float = 0.9
    collapse: float = 1e6
    max_damping: float = 1e16

    def __check_init__(self):
        if not 0 < self.initial <= self.max_damping < np.inf:
            raise ValueError(
                "`initial` and `max_damping` must satisfy 0 < initial <= max_damping "
                f"< inf, got {self.initial} and {self.max_damping}."
            )
        names = ("max_increase", "max_excursion", "decrease", "increase", "collapse")
        for name in names:
            if not 1 <= getattr(self, name) < np.inf:
                raise ValueError(
                    f"`{name}` must be at least 1 and finite, got "
                    f"{getattr(self, name)}."
                )

    def init(self, dtype):
        # The state is the smallest merit accepted since the last rejection.
        return jnp.array(self.initial, dtype), jnp.array(jnp.inf, dtype)

    def update(self, damping, memory, ratio, merit, trial_merit):
        lowest = jnp.minimum(memory, merit)
        accept = (
            (ratio > -jnp.inf)
            & (trial_merit <= self.max_increase * merit)
            & (trial_merit <= self.max_excursion * lowest)
        )
        went_down = trial_merit < merit
        shrink = jnp.where(ratio > self.good_ratio, self.collapse, self.decrease)
        new_damping = jnp.where(
            accept,
            jnp.where(went_down, damping / shrink, damping),
            damping * self.increase,
        )
        tiny = np.finfo(damping.dtype).tiny ** 0.5
        new_damping = jnp.clip(new_damping, tiny, self.max_damping)
        new_memory = jnp.where(accept, jnp.minimum(lowest, trial_merit), merit)
        return accept, new_damping.astype(damping.dtype), new_memory


FixedDamping.__init__.__doc__ = """**Arguments:**

- `damping`: the constant $\\lambda > 0$ (the paper's $1/\\sigma^2$).
"""
AdaptiveDamping.__init__.__doc__ = """**Arguments:**

- `initial`: the initial damping $\\lambda_0$.
- `accept_ratio`: the smallest ratio $\\rho$ of actual to predicted decrease for which a
    step is accepted.
- `max_damping`: the largest damping (the damping is clipped there).
"""
NonmonotoneDamping.__init__.__doc__ = """**Arguments:**

- `initial`: the initial damping $\\lambda_0$.
- `max_increase`: the largest factor by which an accepted step may increase the merit.
- `max_excursion`: the largest factor by which an accepted step's merit may exceed the
    smallest merit accepted since the last rejection.
- `decrease`: the factor by which a step that lowers the merit divides $\\lambda$.
- `increase`: the factor by which a rejected step multiplies $\\lambda$.
- `good_ratio`: the gain ratio above which a step that lowers the merit divides
    $\\lambda$ by `collapse`.
- `collapse`: that factor.
- `max_damping`: the largest damping (the damping is clipped there).
"""
