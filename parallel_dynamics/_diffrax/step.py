"""The step map: one step of a Diffrax solver as the step map of a recurrence.

A fixed-step solver step $\\Phi(t_n, t_{n+1}, y_n)$ of any Diffrax solver is a
discrete map with inputs $x_n = (t_n, t_{n+1})$, so the whole discrete solution is the
trajectory of a recurrence, which [`parallel_dynamics.solve`][] evaluates in parallel
over time.
"""

from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

# Diffrax's time-reversal wrapper of the terms, so that the solvers see exactly the
# terms `diffrax.diffeqsolve` shows them: some solvers recognise it by its type (the
# Runge--Kutta solvers' first-same-as-last cache, the underdamped Langevin solvers,
# which unwrap it), so a wrapper of our own would not do. A private name, imported
# without a fallback: the supported Diffrax versions are checked on import.
from diffrax._term import WrapTerm as _WrapTerm
from jaxtyping import Array, ArrayLike, PyTree, Real


# Solvers whose state carries more than a cache of the vector field at (t_n, y_n): their
# step is not a function of (t_n, t_{n+1}, y_n) alone, so it is not a recurrence in y.
_STATEFUL_SOLVERS = (dfx.ReversibleHeun, dfx.LeapfrogMidpoint)
# Solvers that evaluate their Brownian path over parts of a step.
_SUBSTEPPING_SOLVERS = (dfx.HalfSolver,)


def _is_term(x) -> bool:
    return isinstance(x, dfx.AbstractTerm) and not isinstance(x, dfx.MultiTerm)


def _is_none(x) -> bool:
    return x is None


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

        term = diffrax.ODETerm(lambda t, y, args: -args * y)
        step = pdyn.DiffraxStep(term, diffrax.Tsit5())
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
