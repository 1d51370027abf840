from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._linear_solver.scan_solvers import AbstractScanSolver
from .._linear_solver.sharding import TimeSharding
from .._linear_solver.smoother import AbstractKalmanSolver
from .._problem import Recurrence
from .._scan import on_cpu
from .._stopping import (
    at_rounding_level as at_rounding_level,
    converged as converged,
    default_tolerance as default_tolerance,
    scaled,
)


def time_sharding_of(linear_solver: lx.AbstractLinearSolver) -> TimeSharding | None:
    """The time sharding that `linear_solver` declares: that of a scan solver or a
    Kalman smoother or filter; `None` for any other Lineax solver."""
    if isinstance(linear_solver, AbstractScanSolver | AbstractKalmanSolver):
        return linear_solver.time_sharding
    return None


def as_recurrence(args: PyTree, solver: eqx.Module) -> Recurrence:
    if not isinstance(args, Recurrence):
        raise TypeError(
            f"`{type(solver).__name__}` solves recurrences: call it through "
            "`parallel_dynamics.solve`, or build `fn, args` for `optimistix.root_find` "
            "with `parallel_dynamics.root_find_problem` (`args` is a "
            "`parallel_dynamics.Recurrence`), not with args of type "
            f"{type(args).__name__}."
        )
    return args


def state_at(x: Array, index, *, sharded: bool) -> Array:
    """`x[index]` along the time axis. When `x` is sharded along time, as a masked
    sum: a reduction, which stays local per device (plus an all-reduce of one row),
    where a dynamic index would make XLA gather the whole array."""
    if not sharded or not jnp.issubdtype(x.dtype, jnp.number):
        return x[index]
    mask = (jnp.arange(x.shape[0]) == index).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype)), axis=0, dtype=x.dtype)


def all_finite(*arrays: Array) -> Bool[Array, ""]:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


class IterationState(eqx.Module):
    """What every iterative recurrence solver tracks between iterations."""

    step: Int[Array, ""]
    diffsize: Scalar  # scaled norm of the last update
    diffsize_prev: Scalar  # and of the one before
    # Unscaled norm of the residual the last update solved for; the Newton-type
    # solvers only compute it when `verbose` (it is only printed) and otherwise keep
    # the initial inf.
    residual_norm: Scalar
    result: optx.RESULTS
    # Whether the residual the last update solved for was at the rounding level of the
    # trajectory (see `at_rounding_level`); checked only once the update is small.
    rounding: Bool[Array, ""] = eqx.field(default_factory=lambda: jnp.array(False))


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
    def time_sharding(self) -> TimeSharding | None:
        """The [`parallel_dynamics.TimeSharding`][] of the time axis across devices
        that the solver's linear solver declares, or `None` when the solve runs on
        one device."""
        return None

    @property
    def superlinear(self) -> bool:
        """Whether the iteration converges superlinearly (Newton with the true
        Jacobian), which lets the stopping test save the last iteration."""
        jacobian = getattr(self, "jacobian", None)
        return jacobian is not None and jacobian.exact

    def default_max_steps(self, length: int) -> int:
        """The iteration limit when `pdyn.solve` is given none: $T$, after which every
        Newton-type iteration is exact."""
        return length

    def tolerances(self, dtype) -> tuple[float, float]:
        rtol = default_tolerance(dtype) if self.rtol is None else self.rtol
        atol = default_tolerance(dtype) if self.atol is None else self.atol
        return rtol, atol

    def check_tolerances(self):
        """Raises if `rtol` or `atol` is negative. Traced tolerances (under `jit` or
        `vmap`) are not checked: `pdyn.solve` checks concrete ones before tracing."""
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is None or isinstance(value, jax.core.Tracer):
                continue
            if not value >= 0:
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
            rounding=state.rounding,
        )
        return done | exact | failed, state.result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, options, tags, result
        recurrence = as_recurrence(args, self)
        # In batches of time steps: one `vmap` over all T would hold the step's
        # intermediates for every t at once (gigabytes for a GRU at T = 10^6).
        final_residual = self.norm(recurrence.residual(y, bounded=True))
        return y, aux, {"residual_norm": final_residual}

    def defect(self, y: Array, residual: Array) -> Array:
        """The componentwise residual relative to the tolerance; zero where the
        residual is zero, also where the tolerance is (`atol = 0` and $y = 0$)."""
        rtol, atol = self.tolerances(y.dtype)
        return jnp.abs(scaled(residual, y, rtol, atol))

    def scaled_size(self, y: Array, update: Array) -> Scalar:
        """$\\lVert \\Delta / (\\text{atol} + \\text{rtol}\\,|Y|) \\rVert$, each
        entry zero where $\\Delta$ is (also where the scale is: `atol = 0` and a
        component of $Y$ that is exactly zero)."""
        return self._scaled(y, update, None)[0]

    def scaled_size_and_finite(
        self, y: Array, update: Array, new_y: Array
    ) -> tuple[Scalar, Bool[Array, ""]]:
        """`scaled_size(y, update)` and whether `new_y` is finite.

        On CPU, with the default max-norm and narrow states, both come out of one
        pass over the arrays (see `_rowwise_max_abs`), and the size is then not
        differentiated (it only feeds the stopping test)."""
        return self._scaled(y, update, new_y)

    def _scaled(self, y, update, new_y):
        rtol, atol = self.tolerances(y.dtype)
        # 0 / 0 would be NaN: a component that neither moves nor has a scale.
        relative = scaled(update, y, rtol, atol)
        if self.norm is optx.max_norm and on_cpu() and _rowwise(relative):
            return _rowwise_max_abs(relative, new_y)
        size = self.norm(relative)
        return size, None if new_y is None else all_finite(new_y)


# Up to this state size the stopping test's max-norm reduces each time step's state
# with a reduction XLA:CPU compiles itself (see `_rowwise_max_abs`).
_ROWWISE_MAX_SIZE = 32


def _rowwise(x: Array) -> bool:
    return x.ndim == 2 and x.size > 0 and x.shape[1] <= _ROWWISE_MAX_SIZE


def _larger(a, b):
    return jax.lax.select(a > b, a, b)


def _rowwise_max_abs(
    x: Array, finite_of: Array | None = None
) -> tuple[Scalar, Bool[Array, ""] | None]:
    """$\\max_i |x_i|$ of a `(T, D)` array, the value of `optimistix.max_norm(x)`,
    and, given `finite_of`, whether all its entries are finite.

    `jnp.max` becomes a YNNPACK reduction on CPU, whose cost dominated the rest of a
    quasi-DEER iteration on narrow states; `jnp.all(jnp.isfinite(.))` becomes an
    elementwise pass and two reduce-windows. Here each row is reduced once, with
    combining functions XLA compiles itself (a select, and a logical and, in one
    variadic reduction), then the $T$ row results with `jnp.max` and `jnp.all`. The
    rows are never split across devices (states are sharded along time only), and
    the last reductions are plain ones that a sharded program can combine across
    devices; it could not combine a select. The maximum is not guaranteed to
    propagate NaNs; the solvers check finiteness separately.

    With `finite_of` the maximum has a zero derivative: JAX's JVP of a variadic
    `lax.reduce` fails on the symbolic zero tangent of the boolean operand, and
    backpropagating through the iterations (`optimistix.RecursiveCheckpointAdjoint`)
    differentiates the stopping test's norm too, whose derivative nothing uses.
    """
    init = jnp.array(-jnp.inf, x.dtype)
    if finite_of is None:
        rows = jax.lax.reduce(jnp.abs(x), init, _larger, (1,))
        return jnp.max(rows), None

    def combine(a, b):
        return _larger(a[0], b[0]), jnp.logical_and(a[1], b[1])

    magnitudes = jax.lax.stop_gradient(jnp.abs(x))
    rows, finite = jax.lax.reduce(
        (magnitudes, jnp.isfinite(finite_of)), (init, jnp.array(True)), combine, (1,)
    )
    return jnp.max(rows), jnp.all(finite)


def first_unconverged(defect: Array) -> Int[Array, ""]:
    """The first time index whose scaled defect is not below one ($T$ if none is).
    A NaN defect is not below one."""
    bad = ~(jnp.max(defect, axis=1, initial=0) < 1)
    return jnp.where(jnp.any(bad), jnp.argmax(bad), bad.shape[0])


def print_progress(name: str, state: IterationState):
    jax.debug.print(
        name + " step {step}: residual norm {res:.3e}, scaled step {diff:.3e}",
        step=state.step,
        res=state.residual_norm,
        diff=state.diffsize,
    )
