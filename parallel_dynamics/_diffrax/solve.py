"""The Diffrax bridge: fixed-step ODE and SDE solves, parallel over time.

A fixed-step solver step $\\Phi(t_n, t_{n+1}, y_n)$ of any Diffrax solver is a
discrete map with inputs $x_n = (t_n, t_{n+1})$, so the whole discrete solution is the
trajectory of a recurrence, which [`parallel_dynamics.solve`][] evaluates in parallel
over time. [`parallel_dynamics.diffeqsolve`][] mirrors `diffrax.diffeqsolve` for fixed
step sizes and returns the same `diffrax.Solution`.
"""

from typing import Any

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, PyTree, Real

from ._adjoint import ImplicitAdjoint
from ._coarse import coarse_guess, CoarseGuess
from ._linear_solver import shard_time
from ._linear_solver.sharded import time_mesh
from ._slices import fill_slices, num_slices, slice_ends, slice_inputs, SliceStep
from ._solve import check_recurrence_solver, checked_token, solve
from ._solver import TrustDEER


# Three Diffrax internals, so that the solvers see exactly what `diffrax.diffeqsolve`
# shows them and the arguments are checked as it checks them: its time-reversal wrapper
# of the terms, the marker of implicit solvers whose tolerances would come from an
# adaptive controller, and its check that the terms suit the solver.
try:
    from diffrax._term import WrapTerm as _WrapTerm
except ImportError:  # pragma: no cover
    _WrapTerm = None
try:
    from diffrax._root_finder import use_stepsize_tol as _use_stepsize_tol
except ImportError:  # pragma: no cover
    _use_stepsize_tol = object()
try:
    from diffrax._integrate import _assert_term_compatible
except ImportError:  # pragma: no cover
    _assert_term_compatible = None


# Solvers whose state carries more than a cache of the vector field at (t_n, y_n): their
# step is not a function of (t_n, t_{n+1}, y_n) alone, so it is not a recurrence in y.
_STATEFUL_SOLVERS = (dfx.ReversibleHeun, dfx.LeapfrogMidpoint)
# Solvers that evaluate their Brownian path over parts of a step.
_SUBSTEPPING_SOLVERS = (dfx.HalfSolver,)


def _is_term(x) -> bool:
    return isinstance(x, dfx.AbstractTerm) and not isinstance(x, dfx.MultiTerm)


def _is_none(x) -> bool:
    return x is None


def _is_subsaveat(x) -> bool:
    return isinstance(x, dfx.SubSaveAt)


def _is_a(x, types) -> bool:
    """`isinstance` that does not see through `diffrax.AbstractWrappedSolver`s (for
    which Diffrax's `isinstance` also answers for the wrapped solver)."""
    return issubclass(type(x), types)


def _solver_nodes(solver: dfx.AbstractSolver, types) -> list:
    """The solvers within `solver` (itself included) of the given types, also inside
    wrappers such as `diffrax.HalfSolver`."""
    is_leaf = lambda x: _is_a(x, types)
    return [x for x in jtu.tree_leaves(solver, is_leaf=is_leaf) if is_leaf(x)]


def _differentiable_solver(solver: dfx.AbstractSolver) -> dfx.AbstractSolver:
    """Makes the stage loops of Runge--Kutta solvers differentiable in both modes.

    By default Diffrax runs the stages of a Runge--Kutta step in a checkpointed loop,
    which supports reverse mode only; the Jacobians of the parallel solvers are forward
    mode (`jax.jacfwd`, JVPs) and their gradients reverse mode. A `"bounded"` stage loop
    (`AbstractRungeKutta`) or a `lax.scan` (`AbstractSRK`) supports both and computes
    the same numbers. Nested solvers (e.g. inside `diffrax.HalfSolver`) are handled too.
    """

    def fix(node):
        if _is_a(node, dfx.AbstractRungeKutta) and node.scan_kind != "bounded":
            return eqx.tree_at(lambda s: s.scan_kind, node, "bounded", is_leaf=_is_none)
        if _is_a(node, dfx.AbstractSRK) and node.scan_kind != "lax":
            return eqx.tree_at(lambda s: s.scan_kind, node, "lax", is_leaf=_is_none)
        return node

    is_solver = lambda x: _is_a(x, (dfx.AbstractRungeKutta, dfx.AbstractSRK))
    return jtu.tree_map(fix, solver, is_leaf=is_solver)


def _check_solver(solver) -> None:
    if isinstance(solver, type):
        raise TypeError(
            f"`solver` must be a Diffrax solver instance, got the class "
            f"`{solver.__name__}`: construct one, e.g. `{solver.__name__}()`."
        )
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(
            f"`solver` must be a Diffrax solver such as `diffrax.Tsit5()`, got "
            f"{type(solver).__name__}."
        )
    stateful = _solver_nodes(solver, _STATEFUL_SOLVERS)
    if stateful:
        raise ValueError(
            f"`solver={type(stateful[0]).__name__}()` carries state from one step to "
            "the next besides y (it is a multistep or reversible method), so its step "
            "is not a map y_{n+1} = Phi(t_n, t_{n+1}, y_n) and cannot be parallelised "
            "over time. Use a one-step solver such as `diffrax.Heun()` or "
            "`diffrax.Tsit5()`."
        )


def _check_terms(terms, solver, t0, y0, args) -> None:
    """Diffrax's own check that `terms` suit `solver` (e.g. an SDE solver needs
    `MultiTerm(ODETerm, ControlTerm)`), with its error messages."""
    if _assert_term_compatible is None:  # pragma: no cover
        return
    _assert_term_compatible(
        t0,
        y0,
        args,
        terms,
        solver.term_structure,
        solver.term_compatible_contr_kwargs,
    )


def _is_brownian(x) -> bool:
    return isinstance(x, dfx.AbstractBrownianPath)


def _brownian_paths(terms: PyTree) -> list[dfx.AbstractBrownianPath]:
    return [x for x in jtu.tree_leaves(terms, is_leaf=_is_brownian) if _is_brownian(x)]


def _path_interval(tprev, tnext, direction):
    """The interval over which the step from `tprev` to `tnext` (original time) reads
    its Brownian path: as `WrapTerm.contr` computes it, in increasing order."""
    forwards = jnp.asarray(direction) == 1
    return jnp.where(forwards, tprev, tnext), jnp.where(forwards, tnext, tprev)


class _StepIncrement(dfx.AbstractBrownianPath):
    """A Brownian path reduced to its increment over one step, computed in advance.

    One-step Diffrax solvers read their Brownian path once per step, as
    `path.evaluate(t_n, t_{n+1})` (with `use_levy=True` for the SRK solvers), so
    within a step this stands in for the path with the same numbers. An evaluation
    over any other interval returns NaN, so that a solver reading the path otherwise
    makes the solve fail (`RESULTS.nonfinite`) instead of silently using the wrong
    increment."""

    increment: PyTree[Array]
    start: Array  # the interval of `increment`
    end: Array
    path: dfx.AbstractBrownianPath  # for `t0`, `t1` and `levy_area`

    @property
    def t0(self):
        return self.path.t0

    @property
    def t1(self):
        return self.path.t1

    @property
    def levy_area(self):
        return self.path.levy_area

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if t1 is None:
            raise ValueError(
                "`parallel_dynamics.diffeqsolve` precomputes the Brownian increment of "
                "each step; the value of the path at a single time is not available."
            )
        same = (t0 == self.start) & (t1 == self.end)
        increment = self.increment if use_levy else self.increment.W
        return jtu.tree_map(lambda x: jnp.where(same, x, jnp.nan), increment)


class DiffraxStep(eqx.Module):
    """One step of a Diffrax solver as the step map of a recurrence,
    $y_{n+1} = \\Phi(t_n, t_{n+1}, y_n)$, with inputs $x_n = (t_n, t_{n+1})$.

    Every call starts from `solver.init` and treats the step as following a jump
    (`made_jump=True`), so that first-same-as-last solvers evaluate the vector field
    at $(t_n, y_n)$ instead of carrying it over from the previous step: the step is a
    function of $(t_n, t_{n+1}, y_n)$ alone, and its values are those of the
    sequential solve. Runge--Kutta stage loops are switched to a loop that supports
    forward-mode differentiation (the Jacobians of the parallel solvers are JVPs of
    this map); the numbers do not change.

    For SDEs, `inputs` evaluates the Brownian increment of every step once, in
    parallel, and passes it in $x_n$: the iterations of the parallel solver then never
    evaluate the Brownian path (a `diffrax.VirtualBrownianTree` is an expensive loop),
    with the same numbers. (Not for solvers that read the path over parts of a step,
    such as `diffrax.HalfSolver`: they evaluate the path itself.)

    This is what [`parallel_dynamics.diffeqsolve`][] solves. Use it directly to apply
    [`parallel_dynamics.solve`][] or [`parallel_dynamics.lyapunov_exponent`][] to a
    differential equation on a grid of your own.

    !!! Example

        ```python
        import diffrax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn
        from parallel_dynamics._diffrax import DiffraxStep

        term = diffrax.ODETerm(lambda t, y, args: -args * y)
        step = DiffraxStep(term, diffrax.Tsit5())
        inputs = step.inputs(jnp.linspace(0.0, 1.0, 101))  # (t_n, t_{n+1}, increments)
        sol = pdyn.solve(step, pdyn.DEER(), jnp.ones(3), inputs, 2.0)
        sol.value[-1]  # ≈ exp(-2)
        ```
    """

    terms: PyTree[dfx.AbstractTerm]
    solver: dfx.AbstractSolver
    direction: Any
    precompute_increments: bool = eqx.field(static=True)
    implicit: bool = eqx.field(static=True)

    def __init__(
        self,
        terms: PyTree[dfx.AbstractTerm],
        solver: dfx.AbstractSolver,
        direction: int | ArrayLike = 1,
    ):
        _check_solver(solver)
        self.terms = terms
        self.solver = _differentiable_solver(solver)
        self.direction = direction
        self.precompute_increments = not _solver_nodes(solver, _SUBSTEPPING_SOLVERS)
        self.implicit = bool(_solver_nodes(solver, dfx.AbstractImplicitSolver))

    def inputs(self, ts: Real[ArrayLike, " N+1"]) -> tuple:
        """The inputs $x_1, \\dots, x_N$ of the steps between the times `ts`
        ($t_0, \\dots, t_N$, increasing, or decreasing with `direction=-1`):
        `(ts[:-1], ts[1:], increments)`, where `increments` holds, for every Brownian
        path in the terms, its increments (with Lévy areas) over every step, evaluated
        once and in parallel. An empty tuple for an ODE.
        """
        ts = jnp.asarray(ts)
        tprev, tnext = ts[:-1], ts[1:]
        increments = ()
        if self.precompute_increments:
            start, end = _path_interval(tprev, tnext, self.direction)
            increments = tuple(
                jax.vmap(lambda a, b, p=path: p.evaluate(a, b, use_levy=True))(
                    start, end
                )
                for path in _brownian_paths(self.terms)
            )
        return tprev, tnext, increments

    def _wrapped_terms(self, tprev, tnext, increments):
        terms = self.terms
        paths = _brownian_paths(terms)
        if self.precompute_increments and paths:
            if len(paths) != len(increments):
                raise ValueError(
                    f"The terms hold {len(paths)} Brownian paths but the input has "
                    f"{len(increments)} increments: build the inputs with "
                    "`DiffraxStep.inputs(ts)`."
                )
            start, end = _path_interval(tprev, tnext, self.direction)
            replacements = [
                _StepIncrement(increment, start, end, path)
                for path, increment in zip(paths, increments)
            ]
            terms = eqx.tree_at(_brownian_paths, terms, replacements)
        if _WrapTerm is None:  # pragma: no cover
            return terms
        return jtu.tree_map(
            lambda term: _WrapTerm(term, self.direction), terms, is_leaf=_is_term
        )

    def full_step(self, y: PyTree, x: tuple, args: PyTree):
        """The whole solver step: `(y_next, dense_info, result)`, with the dense
        information in Diffrax's direction-normalised time ($t \\cdot$ `direction`)."""
        if len(x) == 3:
            tprev, tnext, increments = x
        else:
            (tprev, tnext), increments = x, ()
        terms = self._wrapped_terms(tprev, tnext, increments)
        tprev = tprev * self.direction
        tnext = tnext * self.direction
        if self.implicit:
            # An implicit step from a non-finite state is non-finite, without running
            # its root finder there: the derivative of a root find solves a linear
            # system, and Lineax raises on non-finite input even with `throw=False`
            # (a parallel solver's diverged iterate would then raise instead of
            # returning `RESULTS.nonfinite`).
            finite = jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(y)])
            )
            y = jtu.tree_map(lambda a: jnp.where(finite, a, jnp.zeros_like(a)), y)
        state = self.solver.init(terms, tprev, tnext, y, args)
        y1, _, dense_info, _, result = self.solver.step(
            terms, tprev, tnext, y, args, state, True
        )
        if self.implicit:
            y1 = jtu.tree_map(lambda a: jnp.where(finite, a, jnp.nan), y1)
        return y1, dense_info, result

    def __call__(self, y: PyTree, x: tuple, args: PyTree) -> PyTree:
        """**Arguments:**

        - `y`: the state $y_n$ at $t_n$.
        - `x`: $(t_n, t_{n+1})$, or $(t_n, t_{n+1}, \\text{increments})$ as made by
            `DiffraxStep.inputs`.
        - `args`: the `args` of the vector fields.

        **Returns:**

        $y_{n+1}$, the solver's value at $t_{n+1}$.
        """
        return self.full_step(y, x, args)[0]


DiffraxStep.__init__.__doc__ = """**Arguments:**

- `terms`: the terms of the differential equation, as for `diffrax.diffeqsolve`
    (e.g. `diffrax.ODETerm(f)`, or `diffrax.MultiTerm(ODETerm(f), ControlTerm(g, bm))`
    for an SDE with a fixed Brownian path such as a `diffrax.VirtualBrownianTree`).
- `solver`: any one-step Diffrax solver. Implicit solvers use their own root finder,
    whose tolerances must be set explicitly (and tightly: the parallel solvers
    differentiate through it).
- `direction`: `1` to integrate forwards in time, `-1` backwards (then `t_n > t_{n+1}`),
    as Diffrax normalises time internally.
"""


# --- the time grid ------------------------------------------------------------------
#
# Diffrax normalises time to run forwards (`t -> t * direction`) and computes the step
# times inside its loop. The same expressions are evaluated here, in NumPy when the
# times are concrete (so that no JAX operation is dispatched or compiled for them, and
# argument errors are raised at once), or in JAX when they are traced (only possible
# with `StepTo`, whose number of steps is the static length of `ts`).


def _time_dtype(t0, t1, dt0, saveat: dfx.SaveAt):
    timelikes = [t0, t1, dt0] + [
        s.ts for s in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    ]
    timelikes = [x for x in timelikes if x is not None]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*timelikes)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError("`t0`, `t1`, `dt0` and `SaveAt(ts=...)` cannot be complex.")
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        dtype = jnp.result_type(float)  # the default floating dtype, as Diffrax
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"Unrecognised time dtype {dtype}.")
    return np.dtype(dtype)


def _as_time(x, dtype):
    """`x` as a NumPy array of `dtype` when it is concrete, else as a JAX array."""
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, dtype)
    return np.asarray(x).astype(dtype)


def _is_numpy(*xs) -> bool:
    return all(isinstance(x, (np.ndarray, np.generic)) for x in xs)


_CONCRETE_GRID = (
    "the number of steps of the grid from `dt0`, and so the length of the "
    "trajectory, must be known when tracing. Pass `t0`, `t1` and `dt0` as Python or "
    "NumPy numbers (e.g. mark them static), or pass the step times with "
    "`stepsize_controller=diffrax.StepTo(ts)`, whose values may be traced."
)


def _prevbefore(x):
    """The floating point number before `x` (as `equinox.internal.prevbefore`)."""
    if _is_numpy(x):
        before = np.nextafter(x, np.asarray(-np.inf, x.dtype))
        return np.where(x == 0, -np.finfo(x.dtype).tiny, before).astype(x.dtype)
    return eqxi.prevbefore(x)


def _clip_to_end(tnext, t1):
    """As `diffrax.diffeqsolve`: a step ending within 100 ULP of `t1` ends at `t1`."""
    floor = t1
    for _ in range(100):
        floor = _prevbefore(floor)
    xp = np if _is_numpy(tnext, t1) else jnp
    return xp.where(tnext > floor, t1, tnext)


def _constant_grid(t0: np.ndarray, t1: np.ndarray, dt0: np.ndarray) -> np.ndarray:
    """The step times of `diffrax.ConstantStepSize`, in normalised time (`t0 < t1`,
    `dt0 > 0`, NumPy scalars of the time dtype).

    The first step ends at `t0 + dt0`; step $k \\geq 2$ at
    `t0 + (t1 - t0) * (k / N)` with `N = ceil((t1 - t0) / nextafter(dt0))`, the last
    at `t1`; a step ending within 100 ULP of `t1` ends at `t1`; the solve stops after
    the first step that reaches `t1`. These are Diffrax's expressions, evaluated in
    the same dtype, here by NumPy: XLA evaluates them inside Diffrax's loop with its
    own contractions (fused multiply-adds, reciprocals), so a step time can differ
    from Diffrax's by an ULP or two, which moves the solution by rounding only."""
    dtype = t0.dtype
    dt0_after = np.where(
        dt0 == 0, np.finfo(dtype).tiny, np.nextafter(dt0, np.asarray(np.inf, dtype))
    ).astype(dtype)
    num_steps = int(np.ceil((t1 - t0) / dt0_after))
    if num_steps >= np.iinfo(np.int32).max:
        raise ValueError(
            f"`dt0={dt0}` gives {num_steps} steps from `t0` to `t1`, more than "
            "Diffrax's int32 step counter allows."
        )
    first = np.minimum(t0 + dt0, t1)
    k = np.arange(2, max(num_steps, 1) + 2)
    later = t0 + (t1 - t0) * (k.astype(dtype) / np.asarray(num_steps, dtype))
    later = np.where(k == num_steps, t1, later).astype(dtype)
    ends = np.concatenate([first[None], _clip_to_end(later, t1)])
    count = int(np.argmax(ends >= t1)) + 1
    return np.concatenate([t0[None], ends[:count]])


def _step_to_grid(ts, t0, t1):
    """The step times of `diffrax.StepTo(ts)`, from its normalised `ts`: the first
    step ends at `min(ts[1], t1)`, later ones are clipped to `t1` within 100 ULP."""
    xp = np if _is_numpy(ts, t0, t1) else jnp
    first = xp.minimum(ts[1], t1)
    return xp.concatenate([t0[None], first[None], _clip_to_end(ts[2:], t1)])


def _check(bad, message: str):
    """Raise a `ValueError` now if `bad` is concrete, else check it at run time.
    Returns the check to apply to an output (the identity when concrete)."""
    if _is_numpy(bad):
        if np.any(bad):
            raise ValueError(message)
        return lambda x: x
    return lambda x: eqx.error_if(x, bad, message)


def _promote_state(y0: PyTree, time_dtype) -> PyTree:
    """As Diffrax: time affects the state, so the state takes the time dtype if that
    is wider (e.g. an integer or float32 `y0` with float64 times)."""

    def promote(y):
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(y, time_dtype)
        return jnp.asarray(y, dtype)

    return jtu.tree_map(promote, y0)


class _Grid(eqx.Module):
    """The step times and saving times of a solve, in normalised time."""

    t0: Any
    t1: Any
    direction: Any  # a Python int, or a traced array with traced `StepTo(ts)`
    times: Any  # t_0, ..., t_N
    saveat: dfx.SaveAt


def _make_grid(t0, t1, dt0, saveat, stepsize_controller) -> _Grid:
    dtype = _time_dtype(t0, t1, dt0, saveat)
    t0 = _as_time(t0, dtype)
    t1 = _as_time(t1, dtype)
    if t0.ndim != 0 or t1.ndim != 0:
        raise ValueError("`t0` and `t1` must be scalars.")
    checks = []

    if isinstance(stepsize_controller, dfx.ConstantStepSize):
        dt0 = _as_time(dt0, dtype)
        for name, value in (("t0", t0), ("t1", t1), ("dt0", dt0)):
            if not _is_numpy(value):
                raise ValueError(
                    f"`{name}` must be a concrete value (not traced by `jax.jit` or "
                    f"`jax.vmap`): {_CONCRETE_GRID}"
                )
        if dt0.ndim != 0:
            raise ValueError("`dt0` must be a scalar.")
        if not (np.isfinite(t0) and np.isfinite(t1)):
            raise ValueError(
                "`t0` and `t1` must be finite: a parallel-in-time solve needs the "
                "whole grid of step times before it starts."
            )
        if (t1 - t0) * dt0 < 0:
            raise ValueError(
                f"Must have (t1 - t0) * dt0 >= 0, we instead got `t1` with value {t1}, "
                f"`t0` with value {t0}, and `dt0` with value {dt0}."
            )
        if dt0 == 0 and t0 != t1:
            raise ValueError("`dt0` must be nonzero when `t0 != t1`.")
        # As Diffrax: `direction = where(t0 < t1, 1, -1)`.
        direction = 1 if t0 < t1 else -1
        if t0 == t1:
            times = (t0 * direction)[None]
        else:
            times = _constant_grid(t0 * direction, t1 * direction, dt0 * direction)
    else:  # StepTo
        ts = _as_time(stepsize_controller.ts, dtype)
        if _is_numpy(t0, t1):
            direction = 1 if t0 < t1 else -1
        else:
            direction = jnp.where(t0 < t1, 1, -1)
        ts = ts * direction
        checks.append(
            _check(
                ts[1:] <= ts[:-1],
                "`StepTo(ts=...)` must be strictly increasing (or strictly decreasing "
                "if t0 > t1).",
            )
        )
        checks.append(
            _check(
                (t0 * direction != ts[0]) | (t1 * direction != ts[-1]),
                "Must have `t0==ts[0]` and `t1==ts[-1]`.",
            )
        )
        times = _step_to_grid(ts, t0 * direction, t1 * direction)

    def normalise_saveat_ts(ts):
        ts = _as_time(ts, dtype) * direction
        checks.append(
            _check(ts[1:] < ts[:-1], "saveat.ts must be increasing or decreasing.")
        )
        checks.append(
            _check(
                (ts > t1 * direction) | (ts < t0 * direction),
                "saveat.ts must lie between t0 and t1.",
            )
        )
        return ts

    def saveat_ts(saveat):
        out = [s.ts for s in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)]
        return [x for x in out if x is not None]

    saveat = eqx.tree_at(saveat_ts, saveat, replace_fn=normalise_saveat_ts)
    for check in checks:
        times = check(times)
    return _Grid(t0, t1, direction, times, saveat)


# --- results --------------------------------------------------------------------------


def _diffrax_result(result: optx.RESULTS) -> dfx.RESULTS:
    """Optimistix results of the parallel solve as Diffrax results: exhausting the
    iterations is Diffrax's `max_steps_reached` (our `max_steps` counts iterations);
    everything else (`successful`, `nonfinite`, ...) keeps its meaning."""
    promoted = dfx.RESULTS.promote(result)
    return dfx.RESULTS.where(
        result == optx.RESULTS.nonlinear_max_steps_reached,
        dfx.RESULTS.max_steps_reached,
        promoted,
    )


_MAX_STEPS_MESSAGE = (
    "parallel_dynamics.diffeqsolve: the parallel solver did not converge within "
    "`max_steps` iterations (here `max_steps` counts iterations over the whole "
    "trajectory, not solver steps). `max_steps=None` allows as many iterations as there "
    "are steps, which always suffices. Chaotic or stiff dynamics converge slowly (see "
    "`pdyn.lyapunov_exponent`): try `coarse=pdyn.CoarseGuess()` (a better initial "
    "guess), `parallel=pdyn.TrustDEER()` if this was a quasi or damped solver, "
    "`parallel=pdyn.Sequential()`, or `diffrax.diffeqsolve`; pass `throw=False` to "
    "inspect the result."
)
_NONFINITE_MESSAGE = (
    "parallel_dynamics.diffeqsolve: the solve produced non-finite values (inf or NaN), "
    "either in the solution itself (a blow-up, or a step size too large for the "
    "solver) or in the iterates of the parallel solver (Newton's method from a poor "
    "initial guess on oscillating, stiff-nonlinear or chaotic dynamics). Try "
    "`parallel=pdyn.TrustDEER()` (the default) if this was another solver, a better "
    "initial guess (`coarse=pdyn.CoarseGuess()`: a coarse sequential solve "
    "interpolated onto the steps), a shorter interval, or "
    "`parallel=pdyn.Sequential()`; pass `throw=False` to inspect the result."
)


# --- diffeqsolve ----------------------------------------------------------------------


def diffeqsolve(
    terms: PyTree[dfx.AbstractTerm],
    solver: dfx.AbstractSolver,
    t0: ArrayLike,
    t1: ArrayLike,
    dt0: ArrayLike | None,
    y0: PyTree[ArrayLike],
    args: PyTree = None,
    *,
    saveat: dfx.SaveAt = dfx.SaveAt(t1=True),
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    parallel: optx.AbstractRootFinder = TrustDEER(),
    max_steps: int | None = None,
    init: PyTree[ArrayLike] | None = None,
    coarse: CoarseGuess | None = None,
    steps_per_slice: int = 1,
    adjoint: optx.AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = True,
) -> dfx.Solution:
    """Solves a differential equation with fixed steps, in parallel over time.

    This mirrors `diffrax.diffeqsolve` for fixed step sizes and returns the same
    `diffrax.Solution`. Each step of the Diffrax `solver`,
    $y_{n+1} = \\Phi(t_n, t_{n+1}, y_n)$, is one step of a recurrence with inputs
    $x_n = (t_n, t_{n+1})$ (the step map `parallel_dynamics._diffrax.DiffraxStep`,
    not yet public), and the whole
    discrete solution $y_1, \\dots, y_N$ is found at once by
    [`parallel_dynamics.solve`][] with the `parallel` root finder: the same numbers as
    the sequential solve, to that solver's tolerance. ODEs and SDEs alike: an SDE with
    a fixed Brownian path (e.g. a `diffrax.VirtualBrownianTree` with a fixed key) has
    deterministic steps.

    The step times are Diffrax's: from `dt0`, the first step is
    $[t_0, t_0 + \\Delta t_0]$ and step $k \\geq 2$ ends at
    $t_0 + (t_1 - t_0)\\,k / N$ with $N = \\lceil (t_1 - t_0) / \\Delta t_0 \\rceil$,
    exactly as `diffrax.ConstantStepSize` (so a $\\Delta t_0$ that does not divide
    $t_1 - t_0$ gives a first step of $\\Delta t_0$ and $N - 1$ equal steps after
    it); or the given times with `stepsize_controller=diffrax.StepTo(ts)`.

    **Arguments:**

    - `terms`: the terms of the differential equation, as for `diffrax.diffeqsolve`.
    - `solver`: any one-step Diffrax solver: explicit Runge--Kutta (`Euler`, `Heun`,
        `Tsit5`, `Dopri5`, `Dopri8`, ...), implicit (`ImplicitEuler`, `Kvaerno5`, ...,
        with the tolerances of their root finder set explicitly, as Diffrax requires
        for fixed steps, and set tightly: the parallel solver differentiates through
        the steps), and SDE solvers (`Euler`, `Heun`, `ShARK`, `SEA`, ...). Multistep
        and reversible solvers (`LeapfrogMidpoint`, `ReversibleHeun`) carry state
        between steps and are rejected.
    - `t0`, `t1`: the start and end of the integration; `t1 < t0` integrates backwards
        in time (with `dt0 < 0`), as in Diffrax.
    - `dt0`: the step size, or `None` with `stepsize_controller=diffrax.StepTo(ts)`.
        With `dt0`, the values of `t0`, `t1` and `dt0` must be concrete (not traced)
        since they fix the number of steps.
    - `y0`: the initial state: any PyTree of floating arrays.
    - `args`: passed to the vector fields (and differentiated like them).
    - `saveat`: a `diffrax.SaveAt` with any of `t0`, `t1`, `ts`, `steps`, `fn`, `subs`
        and `dense`. Values at `ts` between step times are interpolated with the
        solver's own dense output, exactly as Diffrax does. `steps=n` returns exactly
        the saved steps, i.e. what Diffrax returns with `max_steps` equal to the number
        of steps (Diffrax pads its output to `max_steps` with `inf`). `solver_state`,
        `controller_state` and `made_jump` are not supported (a parallel solve has no
        final solver state); `sol.interpolation` is `None` unless `dense=True`.
        Keyword only.
    - `stepsize_controller`: `None` or `diffrax.ConstantStepSize()` for the grid from
        `dt0`, or `diffrax.StepTo(ts)` for given step times. Parallel evaluation needs
        the grid before the solve starts, so adaptive controllers
        (`diffrax.PIDController`) are rejected. Keyword only.
    - `parallel`: the root finder of [`parallel_dynamics.solve`][]:
        [`parallel_dynamics.TrustDEER`][] (default: Newton's method with a trust
        region in time, which converges on oscillators and orbits from the default
        initial guess), [`parallel_dynamics.DEER`][],
        [`parallel_dynamics.QuasiTrustDEER`][] or [`parallel_dynamics.QuasiDEER`][]
        (cheaper iterations for large states), [`parallel_dynamics.ELK`][],
        [`parallel_dynamics.Sequential`][], ....
        Quasi-DEER keeps only the diagonal of each step's Jacobian, which suits
        dissipative, weakly coupled systems; for oscillators (whose components are
        coupled by rotation, e.g. Lotka--Volterra) its iterates can blow up, and
        DEER (Newton) is the one to use for small states. Keyword only.
    - `max_steps`: the maximum number of iterations of `parallel` (not of solver
        steps). `None` (default) allows as many iterations as there are steps, which
        always suffices. Keyword only.
    - `init`: an initial guess for the values $y_1, \\dots, y_N$ at the ends of the
        steps (the structure of `y0` with a leading axis $N$), e.g. the solution of a
        nearby problem. Defaults to the `coarse` guess if one is given, else to $y_0$
        everywhere. A given `init` is used as it is, and `coarse` is then ignored.
        Keyword only.
    - `coarse`: a [`parallel_dynamics.CoarseGuess`][] (or `True` for
        `pdyn.CoarseGuess()`): the initial guess from a sequential solve on every
        $k$-th time of the grid, interpolated onto the steps with the solver's dense
        output ($k$ chosen from the number of steps unless given; optionally
        multilevel). On oscillators and orbits it cuts Newton's iterations from tens
        to two or three, at the price of $N / k$ sequential steps. `None` (default):
        no coarse solve. Keyword only.
    - `steps_per_slice`: $m$, the number of steps grouped into one time slice
        (multiple shooting): the parallel solver solves for the states at the ends
        of the $\\lceil N/m \\rceil$ slices, each slice's step map running its $m$
        steps sequentially, and the states inside the slices follow from one more
        pass over every slice at once. $m = 1$ (default) is the fine-grained
        parallel solve, $m \\geq N$ the sequential one; in between, fewer and cheaper
        scans against $m$ sequential steps per iteration. Keyword only.
    - `adjoint`: how [`parallel_dynamics.solve`][] is differentiated;
        [`parallel_dynamics.ImplicitAdjoint`][] (default) differentiates the discrete
        solution by the implicit function theorem, which equals backpropagation
        through the sequential solve. Keyword only.
    - `throw`: if `True`, a failed solve raises; if `False`, `sol.result` says what
        happened. Keyword only.

    **Returns:**

    A `diffrax.Solution` with `ts` and `ys` as Diffrax saves them, `t0`, `t1`, `result`
    (a `diffrax.RESULTS`: `successful`; `max_steps_reached` when `parallel` ran out of
    iterations; `nonfinite` for inf/NaN; or the failure of an implicit solver's root
    finder in some step), `interpolation` (with `saveat.dense`) and `stats`:
    `num_steps` (solver steps, all accepted), `num_accepted_steps`,
    `num_rejected_steps` (0), `max_steps` (the iteration limit),
    `num_parallel_iterations` and `residual_norm` (of the recurrence at the returned
    trajectory; of the slices' recurrence with `steps_per_slice > 1`); with a
    `coarse` guess also `coarse_factor` ($k$), `num_coarse_steps` (the sequential
    steps of the coarsest level) and `coarse_parallel_iterations` (the iterations of
    the parallel solves of the intermediate levels, coarsest first; empty for one
    level).

    !!! Example

        ```python
        import diffrax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def lotka_volterra(t, y, args):
            alpha, beta, gamma, delta = args
            prey, predator = y
            return jnp.stack([
                alpha * prey - beta * prey * predator,
                delta * prey * predator - gamma * predator,
            ])

        sol = pdyn.diffeqsolve(
            diffrax.ODETerm(lotka_volterra), diffrax.Tsit5(), 0.0, 10.0, 0.01,
            jnp.array([1.0, 1.0]), (2 / 3, 4 / 3, 1.0, 1.0),
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 10.0, 11)),
            parallel=pdyn.DEER(),
        )
        sol.ys  # (11, 2), as diffrax.diffeqsolve with the same solver and dt0
        sol.stats["num_parallel_iterations"]
        ```
    """
    # --- arguments
    _check_solver(solver)
    check_recurrence_solver("parallel", parallel)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be a bool, got {throw!r}.")
    if isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint={type(adjoint).__name__}()` is a Diffrax adjoint; this solve is "
            "differentiated as a parallel root find. Pass an Optimistix adjoint such "
            "as `pdyn.ImplicitAdjoint()` (the default), which gives the gradients of "
            "the discrete solution, as backpropagation through `diffrax.diffeqsolve` "
            "does."
        )
    if not isinstance(adjoint, optx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be an `optimistix.AbstractAdjoint`, got {adjoint!r}."
        )
    if not isinstance(saveat, dfx.SaveAt):
        raise TypeError(f"`saveat` must be a `diffrax.SaveAt`, got {saveat!r}.")
    if saveat.solver_state or saveat.controller_state or saveat.made_jump:
        raise ValueError(
            "`SaveAt(solver_state=True)`, `SaveAt(controller_state=True)` and "
            "`SaveAt(made_jump=True)` are not supported: a parallel solve has no final "
            "solver or controller state to continue from. Continue a solve from its "
            "last `ys` instead."
        )
    if saveat.subs is None and not saveat.dense:
        raise ValueError(
            "`saveat` saves nothing: set `t0`, `t1`, `ts`, `steps` or `dense`."
        )
    if stepsize_controller is None:
        stepsize_controller = dfx.ConstantStepSize()
    if isinstance(stepsize_controller, dfx.AbstractAdaptiveStepSizeController):
        raise ValueError(
            f"`stepsize_controller={type(stepsize_controller).__name__}(...)` adapts "
            "its steps to the solution as it goes, but a parallel-in-time solve needs "
            "the whole grid of step times before it starts. Use fixed steps: "
            "`dt0=...` with `stepsize_controller=diffrax.ConstantStepSize()` (or "
            "`None`), or `stepsize_controller=diffrax.StepTo(ts)` with `dt0=None`, "
            "for instance with the step times that an adaptive `diffrax.diffeqsolve` "
            "chose on a cheaper version of the problem (`SaveAt(t0=True, steps=True)`, "
            "without the trailing `inf` padding of its `ts`)."
        )
    if not isinstance(stepsize_controller, (dfx.ConstantStepSize, dfx.StepTo)):
        raise ValueError(
            "`stepsize_controller` must be `None`, `diffrax.ConstantStepSize()` or "
            "`diffrax.StepTo(ts)`: a parallel-in-time solve needs a fixed grid of step "
            f"times; got {type(stepsize_controller).__name__}."
        )
    if isinstance(stepsize_controller, dfx.ConstantStepSize) and dt0 is None:
        raise ValueError(
            "Constant step size solvers cannot select step size automatically; please "
            "pass a value for `dt0` (or the step times with "
            "`stepsize_controller=diffrax.StepTo(ts)` and `dt0=None`)."
        )
    if isinstance(stepsize_controller, dfx.StepTo) and dt0 is not None:
        raise ValueError(
            "`dt0` should be `None`. Step location is already determined by "
            "StepTo(ts=...)."
        )
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
            raise TypeError(f"`max_steps` must be a positive int, got {max_steps!r}.")
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {max_steps}.")
        max_steps = int(max_steps)
    if coarse is True:
        coarse = CoarseGuess()
    elif coarse is False:
        coarse = None
    if coarse is not None and not isinstance(coarse, CoarseGuess):
        raise TypeError(
            "`coarse` must be a `pdyn.CoarseGuess(...)` (or True for "
            f"`pdyn.CoarseGuess()`), or None for no coarse guess; got {coarse!r}."
        )
    if coarse is not None and coarse.solver is not None:
        _check_solver(coarse.solver)
    if (
        isinstance(steps_per_slice, bool)
        or not isinstance(steps_per_slice, (int, np.integer))
        or steps_per_slice < 1
    ):
        raise ValueError(
            "`steps_per_slice` must be a positive int (the number of fine steps "
            f"grouped into one step of the parallel solve), got {steps_per_slice!r}."
        )
    coarse_solver = () if coarse is None or coarse.solver is None else (coarse.solver,)
    for implicit in _solver_nodes((solver, *coarse_solver), dfx.AbstractImplicitSolver):
        if any(
            getattr(implicit.root_finder, name, None) is _use_stepsize_tol
            for name in ("rtol", "atol", "norm")
        ):
            name = type(implicit).__name__
            raise ValueError(
                f"`solver={name}()` is implicit and its root finder takes its "
                "tolerances from an adaptive step size controller, which a "
                "parallel-in-time solve cannot use. Set them explicitly and tightly "
                "(the parallel solver differentiates through each step), e.g. "
                f"`diffrax.{name}(root_finder=optimistix.Newton(rtol=1e-10, "
                "atol=1e-10))` in float64, or `diffrax.VeryChord(rtol=1e-8, "
                "atol=1e-8, norm=optimistix.max_norm)` (which may report divergence at "
                "tolerances near rounding error)."
            )

    grid = _make_grid(t0, t1, dt0, saveat, stepsize_controller)
    y0 = _promote_state(y0, grid.t0.dtype)
    _check_terms(terms, solver, grid.t0, y0, args)
    step = DiffraxStep(terms, solver, grid.direction)
    return _diffeqsolve(
        step,
        grid,
        y0,
        args,
        parallel=parallel,
        max_steps=max_steps,
        init=init,
        coarse=coarse,
        steps_per_slice=int(steps_per_slice),
        adjoint=adjoint,
        throw=bool(throw),
    )


class _Saved(eqx.Module):
    ts: Array
    ys: PyTree[Array]


@eqx.filter_jit
def _diffeqsolve(
    step: DiffraxStep,
    grid: _Grid,
    y0,
    args,
    *,
    parallel,
    max_steps,
    init,
    coarse,
    steps_per_slice,
    adjoint,
    throw,
) -> dfx.Solution:
    direction = grid.direction
    t0, t1, saveat = grid.t0, grid.t1, grid.saveat
    grid = grid.times  # normalised
    all_infos = None
    num_steps = grid.shape[0] - 1
    tnext = grid[1:]

    if num_steps == 0:
        trajectory = jtu.tree_map(lambda y: y[None][:0], y0)
        result = dfx.RESULTS.successful
        stats = {"num_parallel_iterations": jnp.array(0)}
        max_steps = 0
    else:
        coarse_stats = {}
        if init is None and coarse is not None:
            init, coarse_stats = coarse_guess(
                coarse,
                step,
                parallel,
                grid,
                direction,
                y0,
                args,
                lambda solver: DiffraxStep(step.terms, solver, step.direction),
            )
        if steps_per_slice == 1:
            inputs = _shard_inputs(step.inputs(grid * direction), parallel, num_steps)
            sol = solve(
                step,
                parallel,
                y0,
                inputs,
                args,
                max_steps=max_steps,
                init=init,
                adjoint=adjoint,
                throw=False,
            )
            trajectory = sol.value
        else:
            inputs = step.inputs(grid * direction)
            slice_step = SliceStep(step)
            sliced = slice_inputs(inputs, num_steps, steps_per_slice)
            sliced = _shard_inputs(
                sliced, parallel, num_slices(num_steps, steps_per_slice)
            )
            if init is not None:
                init = slice_ends(init, num_steps, steps_per_slice)
            sol = solve(
                slice_step,
                parallel,
                y0,
                sliced,
                args,
                max_steps=max_steps,
                init=init,
                adjoint=adjoint,
                throw=False,
            )
            trajectory = fill_slices(slice_step, y0, sol.value, sliced, args, num_steps)
        result = _diffrax_result(sol.result)
        stats = {"num_parallel_iterations": sol.stats["num_steps"], **coarse_stats}
        if "residual_norm" in sol.stats:
            stats["residual_norm"] = sol.stats["residual_norm"]
        max_steps = sol.stats["max_steps"]

        def steps_at(indices):
            """(dense_info, result) of the steps with the given indices, recomputed at
            the solution."""
            previous = jtu.tree_map(
                lambda y_0, ys: jnp.concatenate([y_0[None], ys[:-1]])[indices],
                y0,
                trajectory,
            )
            x = jtu.tree_map(lambda u: u[indices], inputs)
            _, infos, results = jax.vmap(lambda y, x: step.full_step(y, x, args))(
                previous, x
            )
            return infos, results

        # Implicit solvers report the failure of their root finder per step (explicit
        # ones are successful by construction, and need no extra pass).
        x_first = jtu.tree_map(lambda u: u[0], inputs)
        traced_result = eqx.filter_eval_shape(
            lambda: step.full_step(y0, x_first, args)[2].is_traced()
        )
        if traced_result or saveat.dense:
            all_infos, all_results = steps_at(jnp.arange(num_steps))
            if traced_result:
                failed = all_results != dfx.RESULTS.successful
                first = jtu.tree_map(lambda r: r[jnp.argmax(failed)], all_results)
                result = dfx.RESULTS.where(
                    dfx.is_okay(result) & jnp.any(failed), first, result
                )

    def interpolate(ts):
        """Values at the (normalised) times `ts` by the solver's dense output, from the
        step that Diffrax saves them in: the first whose end is >= t."""
        if num_steps == 0:
            return jtu.tree_map(lambda y: jnp.broadcast_to(y, ts.shape + y.shape), y0)
        indices = jnp.clip(
            jnp.searchsorted(tnext, ts, side="left"), 0, num_steps - 1
        ).astype(jnp.int32)
        if all_infos is None:
            infos, _ = steps_at(indices)
        else:
            infos = jtu.tree_map(lambda x: x[indices], all_infos)

        def evaluate(t, a, b, info):
            return step.solver.interpolation_cls(t0=a, t1=b, **info).evaluate(t)

        return jax.vmap(evaluate)(ts, grid[indices], grid[indices + 1], infos)

    def save(sub: dfx.SubSaveAt):
        times = []
        values = []
        if sub.t0:
            times.append(t0[None] * direction)
            values.append(jtu.tree_map(lambda y: y[None], y0))
        middle_times = []
        middle_values = []
        middle_keys = []
        if sub.ts is not None:
            ts = sub.ts
            if num_steps == 0:
                middle_times.append(jnp.full_like(ts, t0 * direction))
            else:
                middle_times.append(ts)
            middle_values.append(interpolate(ts))
            # Saved during step j, before that step's own `steps` save.
            middle_keys.append(
                2 * jnp.clip(jnp.searchsorted(tnext, ts, side="left"), 0, num_steps - 1)
            )
        if sub.steps:
            saved = np.arange(sub.steps, num_steps + 1, sub.steps)
            middle_times.append(grid[saved])
            if sub.steps == 1:
                # Every state: the trajectory itself (no gather, so a trajectory
                # sharded along time stays sharded).
                middle_values.append(trajectory)
            else:
                middle_values.append(jtu.tree_map(lambda y: y[saved - 1], trajectory))
            middle_keys.append(jnp.asarray(2 * (saved - 1) + 1))
        if len(middle_times) == 2:
            order = jnp.argsort(jnp.concatenate(middle_keys), stable=True)
            middle_times = [jnp.concatenate(middle_times)[order]]
            middle_values = [
                jtu.tree_map(
                    lambda a, b: jnp.concatenate([a, b])[order], *middle_values
                )
            ]
        times += middle_times
        values += middle_values
        t1_via_steps = sub.steps != 0 and num_steps % sub.steps == 0
        if sub.t1 and not t1_via_steps:
            times.append(grid[-1:])
            values.append(
                jtu.tree_map(
                    lambda y_0, ys: jnp.concatenate([y_0[None], ys])[-1:],
                    y0,
                    trajectory,
                )
            )
        times = jnp.concatenate(times)
        values = jtu.tree_map(lambda *v: jnp.concatenate(v), *values)
        values = jax.vmap(lambda t, y: sub.fn(t * direction, y, args))(times, values)
        return _Saved(times * direction, values)

    saved = jtu.tree_map(save, saveat.subs, is_leaf=_is_subsaveat)
    is_saved = lambda x: isinstance(x, _Saved)
    ts = jtu.tree_map(lambda s: s.ts, saved, is_leaf=is_saved)
    ys = jtu.tree_map(lambda s: s.ys, saved, is_leaf=is_saved)

    if saveat.dense:
        if num_steps == 0:
            x = jtu.tree_map(
                lambda u: u[0], step.inputs(grid[jnp.array([0, 0])] * direction)
            )
            info_struct = eqx.filter_eval_shape(lambda: step.full_step(y0, x, args)[1])
            # Diffrax's interpolation reads one (unused) interval even when there is
            # none.
            all_infos = jtu.tree_map(
                lambda s: jnp.zeros((1,) + s.shape, s.dtype), info_struct
            )
        interpolation = dfx.DenseInterpolation(
            ts=grid if num_steps else jnp.concatenate([grid, grid]),
            ts_size=num_steps + 1,
            infos=all_infos,
            interpolation_cls=step.solver.interpolation_cls,
            direction=direction,
            t0_if_trivial=t0 * direction,
            y0_if_trivial=y0,
        )
    else:
        interpolation = None

    stats = {
        "num_steps": jnp.array(num_steps),
        "num_accepted_steps": jnp.array(num_steps),
        "num_rejected_steps": jnp.array(0),
        "max_steps": max_steps,
        **stats,
    }
    sol = dfx.Solution(
        t0=t0,
        t1=t1,
        ts=ts,
        ys=ys,
        interpolation=interpolation,
        stats=stats,
        result=result,
        solver_state=None,
        controller_state=None,
        made_jump=None,
        event_mask=None,
    )
    if throw:
        sol = _raise_on_failure(sol, time_mesh(parallel)[0])
    return sol


def _shard_inputs(inputs, parallel, num_steps: int):
    """Constrains the inputs of the steps to be sharded along time over the mesh of
    a sharded parallel solver, when the number of steps splits evenly over its
    devices.

    The inputs are computed from the time grid inside the (jitted) solve, so without
    a constraint XLA lays them out, and with them the trajectory, replicated.
    """
    mesh, axis_name = time_mesh(parallel)
    if mesh is None or mesh.shape[axis_name] == 1:
        return inputs
    if num_steps % mesh.shape[axis_name]:
        return inputs

    def constrain(x):
        if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == num_steps:
            return shard_time(x, mesh, axis_name)
        return x

    return jtu.tree_map(constrain, inputs)


def _failure_token(result: dfx.RESULTS) -> Array:
    """A scalar zero that raises (at run time) if `result` is a failure.

    Floating point, so that with `EQX_ON_ERROR=nan` the token, and through it the
    solution, becomes NaN as `equinox.error_if` on the solution would make it."""
    token = jnp.zeros((), jnp.float32)
    token = eqx.error_if(token, result == dfx.RESULTS.nonfinite, _NONFINITE_MESSAGE)
    token = eqx.error_if(
        token, result == dfx.RESULTS.max_steps_reached, _MAX_STEPS_MESSAGE
    )
    return result.error_if(token, jnp.invert(dfx.is_okay(result)))


def _raise_on_failure(sol: dfx.Solution, mesh: Mesh | None) -> dfx.Solution:
    """Raises (at run time) if `sol.result` is a failure.

    As `parallel_dynamics._solve._raise_on_failure`: the checks run on a scalar token
    computed from `sol.result` alone, and every floating-point array of the solution
    (`sol.result` is an integer code, left as it is) is tied to the token by an elementwise select that always picks the array, so
    nothing that uses the solution can run before the checks, and a trajectory
    sharded along time is not gathered onto one device for the host callback of
    `equinox.error_if`. With a `mesh` the check runs on every device of the mesh
    (inside `jax.shard_map`), so no device waits for a token from one that raised.
    """
    token = checked_token(sol.result, _failure_token, mesh)
    ok = token == 0

    def tie(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(ok, x, jnp.nan)
        return x

    return jtu.tree_map(tie, sol)
