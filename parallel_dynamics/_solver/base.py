from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._jacobian import DenseJacobian
from .._problem import Recurrence
from .._scan import on_cpu


def default_tolerance(dtype) -> float:
    """$\\varepsilon^{0.7}$ of the dtype: about `1.4e-5` in float32 and `1.1e-11` in
    float64."""
    return float(np.finfo(dtype).eps ** 0.7)


def as_recurrence(args: PyTree, solver: eqx.Module) -> Recurrence:
    if not isinstance(args, Recurrence):
        raise TypeError(
            f"`{type(solver).__name__}` solves recurrences: call it through "
            "`parallel_dynamics.solve` (or pass a `parallel_dynamics.Recurrence` as the "
            f"`args` of `optimistix.root_find`), not with args of type "
            f"{type(args).__name__}."
        )
    return args


def all_finite(*arrays: Array) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


class IterationState(eqx.Module):
    """What every iterative recurrence solver tracks between iterations."""

    step: Int[Array, ""]
    diffsize: Scalar  # scaled norm of the last update
    diffsize_prev: Scalar  # and of the one before
    residual_norm: Scalar  # unscaled norm of that residual
    result: optx.RESULTS


class AbstractRecurrenceSolver(optx.AbstractRootFinder):
    """Abstract base class for the root finders of [`parallel_dynamics.solve`][].

    They find the trajectory $Y = (y_1, \\dots, y_T)$ at which the residual
    $F(Y)_t = y_t - f(y_{t-1}, x_t)$ vanishes. They are Optimistix root finders: `fn`
    is the residual and `args` the [`parallel_dynamics.Recurrence`][] it belongs to,
    from which they take the structure they exploit.
    """

    rtol: eqx.AbstractVar[float | None]
    atol: eqx.AbstractVar[float | None]
    norm: eqx.AbstractVar[Callable[[PyTree], Scalar]]

    @property
    def superlinear(self) -> bool:
        """Whether the iteration converges superlinearly (Newton with the true
        Jacobian), which lets the stopping test save the last iteration."""
        return isinstance(getattr(self, "jacobian", None), DenseJacobian)

    def default_max_steps(self, length: int) -> int:
        """The iteration limit when `pdyn.solve` is given none: $T$, after which every
        Newton-type iteration is exact."""
        return length

    def tolerances(self, dtype) -> tuple[float, float]:
        rtol = default_tolerance(dtype) if self.rtol is None else self.rtol
        atol = default_tolerance(dtype) if self.atol is None else self.atol
        return rtol, atol

    def check_tolerances(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"`{name}` must be non-negative, got {value}.")

    def init_state(self, y: Array) -> IterationState:
        inf = jnp.array(jnp.inf, y.dtype)
        return IterationState(
            step=jnp.array(0),
            diffsize=inf,
            diffsize_prev=inf,
            residual_norm=inf,
            result=optx.RESULTS.successful,
        )

    def terminate(self, fn, y, args, options, state: IterationState, tags):
        del fn, options, tags
        recurrence = as_recurrence(args, self)
        # The prefix property: after i iterations the first i states are exact, for
        # every choice of A_t, so T iterations solve the recurrence.
        exact = state.step >= recurrence.length
        failed = state.result != optx.RESULTS.successful
        done = converged(
            state.step,
            state.diffsize,
            state.diffsize_prev,
            superlinear=self.superlinear,
        )
        return done | exact | failed, state.result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, options, tags, result
        recurrence = as_recurrence(args, self)
        # In batches of time steps: one `vmap` over all T would hold the step's
        # intermediates for every t at once (gigabytes for a GRU at T = 10^6).
        final_residual = self.norm(recurrence.residual(y, bounded=True))
        return y, aux, {"residual_norm": final_residual}

    def scaled_size(self, y: Array, update: Array) -> Scalar:
        """$\\lVert \\Delta / (\\text{atol} + \\text{rtol}\\,|Y|) \\rVert$."""
        rtol, atol = self.tolerances(y.dtype)
        scaled = update / (atol + rtol * jnp.abs(y))
        if self.norm is optx.max_norm and on_cpu():
            return max_abs(scaled)
        return self.norm(scaled)


# Up to this state size the stopping test's max-norm reduces each time step's state
# with a reduction XLA:CPU compiles itself (see `max_abs`).
_ROWWISE_MAX_SIZE = 32


def max_abs(x: Array) -> Scalar:
    """$\\max_i |x_i|$ of a `(T, D)` array, the value of `optimistix.max_norm(x)`,
    for the stopping test on CPU.

    `jnp.max` becomes a YNNPACK reduction on CPU, whose cost dominated the rest of a
    quasi-DEER iteration on narrow states. For $D \\leq 32$ each row is first reduced
    with a combining function that XLA compiles itself (a select: XLA does not hand
    that to YNNPACK), then the $T$ row maxima with `jnp.max`. A whole quasi-DEER
    solve (GRU, $T = 10^4$, 7 iterations) measured 1.2 to 1.4 times faster at
    $D = 4$ and 1.05 to 1.1 times at $D = 16$ (two runs); at $D = 64$ it was no
    faster, and that path is left as it was. The rows are never split across
    devices (states are sharded along time only), and the last reduction is a plain
    maximum, which a sharded program can combine across devices; it could not
    combine a select. Neither reduction is guaranteed to propagate NaNs; the solvers
    check finiteness separately.
    """
    if x.ndim != 2 or x.size == 0 or x.shape[1] > _ROWWISE_MAX_SIZE:
        return optx.max_norm(x)
    larger = lambda a, b: jax.lax.select(a > b, a, b)
    rows = jax.lax.reduce(jnp.abs(x), jnp.array(-jnp.inf, x.dtype), larger, (1,))
    return jnp.max(rows)


def converged(
    num_updates: Int[Array, ""],
    diffsize: Scalar,
    diffsize_prev: Scalar,
    *,
    superlinear: bool = True,
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
    reached the rounding floor when two in a row are below tolerance.
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
    floor = ~contracting & small & (diffsize_prev < 1)
    return (num_updates >= 1) & jnp.where(first, small, extrapolated | floor)


def print_progress(name: str, state: IterationState):
    jax.debug.print(
        name + " step {step}: residual norm {res:.3e}, scaled step {diff:.3e}",
        step=state.step,
        res=state.residual_norm,
        diff=state.diffsize,
    )
