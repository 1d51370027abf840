from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoint import ImplicitAdjoint
from ._failure import raise_on_failure
from ._problem import Recurrence, recurrence_residual, StateLayout
from ._solver import AbstractRecurrenceSolver, Sequential
from ._stopping import rounding_scale, scaled
from ._validation import check_state, check_step_output, describe, static_int


def _sequence_length(inputs: PyTree, length: int | None) -> int:
    input_lengths = set()
    for path, leaf in jtu.tree_leaves_with_path(inputs):
        where = jtu.keystr(path) or "(the root)"
        if not eqx.is_array(leaf):
            raise TypeError(
                f"Every leaf of `inputs` must be an array with a leading time axis; the "
                f"leaf at {where} is a {type(leaf).__name__}."
            )
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"Every leaf of `inputs` needs a leading time axis; the leaf at {where} "
                "is a scalar."
            )
        input_lengths.add(jnp.shape(leaf)[0])
    if len(input_lengths) > 1:
        raise ValueError(
            "All leaves of `inputs` must share the length of their leading (time) axis; "
            f"got lengths {sorted(input_lengths)}."
        )
    if input_lengths:
        (input_length,) = input_lengths
        if length is not None and length != input_length:
            raise ValueError(
                f"`length={length}` disagrees with the time axis of `inputs` "
                f"({input_length})."
            )
        length = input_length
    elif length is None:
        raise ValueError(
            "Give the sequence length: either `inputs` with a leading time axis, or "
            "`length=T` when the step takes no inputs."
        )
    if length < 1:
        raise ValueError(f"The sequence length must be at least 1, got {length}.")
    return length


def check_recurrence_solver(name: str, solver) -> None:
    """Raises unless `solver` (the argument `name`) is an instance of a recurrence
    solver with non-negative tolerances (checked here, before `jit`, where array
    tolerances are still concrete)."""
    if isinstance(solver, type):
        raise TypeError(
            f"`{name}` must be a solver instance, got the class `{solver.__name__}`: "
            f"construct one, e.g. `{solver.__name__}()`."
        )
    if not isinstance(solver, AbstractRecurrenceSolver):
        cls = type(solver)
        raise TypeError(
            f"`{name}` must be a recurrence solver (a "
            "`parallel_dynamics.AbstractRecurrenceSolver` such as `pdyn.DEER()`, "
            "`pdyn.QuasiDEER()`, `pdyn.ELK()` or `pdyn.Sequential()`), got "
            f"`{cls.__module__.split('.')[0]}.{cls.__name__}`. Generic Optimistix "
            "root finders do not exploit the structure of the recurrence."
        )
    solver.check_tolerances()


def _initial_guess(init: PyTree | None, y0: PyTree, layout: StateLayout, length: int):
    flat_y0 = layout.flatten(y0)
    if init is None:
        return jnp.broadcast_to(flat_y0, (length, layout.size))
    expected = jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct((length,) + x.shape, x.dtype), y0
    )
    for path, leaf in jtu.tree_leaves_with_path(init):
        if not eqx.is_array(leaf):
            where = jtu.keystr(path) or "(the root)"
            raise TypeError(
                "`init` must be a PyTree of arrays laid out like the solution "
                f"({describe(expected)}); the leaf at {where} is a "
                f"{type(leaf).__name__}."
            )
    got = jax.eval_shape(lambda: init)
    if jtu.tree_structure(got) != jtu.tree_structure(expected) or any(
        (g.shape, g.dtype) != (e.shape, e.dtype)
        for g, e in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected))
    ):
        raise ValueError(
            "`init` must have the layout of the solution (the structure of `y0` with a "
            f"leading time axis of length {length}): expected {describe(expected)}, "
            f"got {describe(got)}."
        )
    return jax.lax.stop_gradient(layout.flatten_trajectory(init))


def solve(
    step: Callable,
    solver: AbstractRecurrenceSolver,
    y0: PyTree[ArrayLike],
    inputs: PyTree[ArrayLike] | None = None,
    args: PyTree = None,
    *,
    length: int | None = None,
    init: PyTree[ArrayLike] | None = None,
    max_steps: int | None = None,
    adjoint: optx.AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = True,
) -> optx.Solution:
    """Evaluates a nonlinear recurrence over a whole sequence, in parallel over time.

    Given a step map $f$, an initial state $y_0$ and inputs $x_1, \\dots, x_T$, this finds
    the trajectory $Y = (y_1, \\dots, y_T)$ with

    $$y_t = f(y_{t-1}, x_t, \\theta), \\qquad t = 1, \\dots, T,$$

    as the root of the residual $F(Y)_t = y_t - f(y_{t-1}, x_t, \\theta)$, which is
    evaluated with one `vmap` over time. The `solver` decides how: Newton
    ([`parallel_dynamics.DEER`][]), quasi-Newton ([`parallel_dynamics.QuasiDEER`][]),
    fixed-point iterations, or plain sequential evaluation
    ([`parallel_dynamics.Sequential`][]).

    **Arguments:**

    - `step`: the map `step(y_prev, x_t, args) -> y_t`. Its output must have the
        structure, shapes and dtypes of `y0`. It may close over arrays (they are
        differentiated like `args`).
    - `solver`: the root finder, e.g. `pdyn.DEER()` or `pdyn.QuasiDEER()`.
    - `y0`: the initial state $y_0$ (not part of the solution): any PyTree of floating
        arrays.
    - `inputs`: a PyTree of arrays sharing a leading time axis of length $T$; `x_t` is
        the slice `t - 1` of every leaf. `None` when the step takes no inputs (then
        `x_t` is `None` and `length` is required).
    - `args`: passed to every call of `step`, e.g. the parameters of a cell.
    - `length`: $T$, required when `inputs` is `None`; checked against `inputs`
        otherwise. Keyword only.
    - `init`: an initial guess for the trajectory, laid out like `sol.value`. Defaults
        to $y_0$ at every step. It receives no gradient. Keyword only.
    - `max_steps`: the maximum number of iterations, a positive int. Defaults to $T$
        (in exact arithmetic every Newton-type solver is exact after $T$ iterations:
        the first $i$ states are exact after $i$ iterations), and to $2T + 10$ for the
        Levenberg–Marquardt solvers (whose final steps verify convergence). Keyword
        only.
    - `adjoint`: how to differentiate: [`parallel_dynamics.ImplicitAdjoint`][] (the
        default) uses the implicit function theorem with a reverse parallel scan, never
        backpropagating through the iterations. `optimistix.ImplicitAdjoint()` with
        its default dense linear solver raises a `ValueError`. Keyword only.
    - `throw`: if `True`, a failed solve (maximum steps reached, non-finite values,
        divergence) raises an error that says what happened and what to try, as
        `optimistix.root_find` does. If `False`, the failure is reported in
        `sol.result` and `sol.value` holds the last finite iterate (for
        `pdyn.Sequential`, which has no iterates, the sequential trajectory as
        computed, non-finite from the first failing step on). An implicit adjoint
        then differentiates that trajectory as if it solved the recurrence: its
        derivatives are those of the sequential loop only where the trajectory is
        exact, so check `sol.result` before using them. Keyword only.

    **Returns:**

    An `optimistix.Solution`: `sol.value` is $y_1, \\dots, y_T$ with the structure of
    `y0` and a leading time axis $T$; `sol.result` an `optimistix.RESULTS`
    (`successful`, `nonfinite`, `nonlinear_max_steps_reached` or
    `nonlinear_divergence`, as listed in the documentation's "Failure modes" page);
    `sol.stats` has `num_steps`, `max_steps` and `residual_norm` (the norm of the
    residual at the returned trajectory).

    Wrong arguments (a state that is not a PyTree of float32 or float64 arrays, a step
    whose output differs from `y0` in structure, shape or dtype, inputs of different
    lengths, an `init` with the wrong layout, ...) raise a `TypeError` or `ValueError`
    naming the argument when the solve is traced.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def step(h, x, w):
            return jnp.tanh(w * h + x)

        xs = jax.random.normal(jax.random.key(0), (10_000, 8))
        sol = pdyn.solve(step, pdyn.QuasiDEER(), jnp.zeros(8), xs, 0.5)
        print(sol.value.shape, sol.stats["num_steps"])
        ```
    """
    # The static arguments are normalised before `jit` sees them: NumPy integers
    # would otherwise be traced. So are the solver's tolerances checked: array
    # tolerances are traced inside it.
    check_recurrence_solver("solver", solver)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be a bool, got {throw!r}.")
    return _solve(
        step,
        solver,
        y0,
        inputs,
        args,
        length=static_int("length", length),
        init=init,
        max_steps=static_int("max_steps", max_steps),
        adjoint=adjoint,
        throw=bool(throw),
    )


def _bind(
    step: Callable, y0: PyTree, inputs: PyTree, args: PyTree, length: int
) -> Recurrence:
    """The [`parallel_dynamics.Recurrence`][] of a checked `y0` and `length`: the step
    closure-converted (arrays it closes over become leaves, differentiated like
    `args`) and its output checked against `y0`."""
    x_struct = jax.eval_shape(lambda: jtu.tree_map(lambda x: x[0], inputs))
    closed_step = eqx.filter_closure_convert(step, y0, x_struct, args)
    check_step_output(closed_step.out_struct, y0)  # pyright: ignore
    layout = StateLayout.of(y0)
    return Recurrence(
        step=closed_step,
        layout=layout,
        y0=layout.flatten(y0),
        inputs=inputs,
        args=args,
        length=length,
    )


def root_find_problem(
    step: Callable,
    y0: PyTree[ArrayLike],
    inputs: PyTree[ArrayLike] | None = None,
    args: PyTree = None,
    *,
    length: int | None = None,
) -> tuple[Callable[[Array, Recurrence], Array], Recurrence]:
    """The recurrence $y_t = f(y_{t-1}, x_t, \\theta)$ as a root-finding problem for
    `optimistix.root_find`, to be solved with any recurrence solver.

    [`parallel_dynamics.solve`][] wraps the same call, with the checks, the verification
    of exhausted solves and the PyTree layout of the result around it. Use this to
    call Optimistix yourself, e.g. with your own `max_steps`, `adjoint` or `throw`.

    **Arguments:**

    - `step`, `y0`, `inputs`, `args`, `length`: as for [`parallel_dynamics.solve`][].

    **Returns:**

    A pair `(fn, recurrence)`: `fn(y, recurrence)` is the residual
    $F(Y)_t = y_t - f(y_{t-1}, x_t, \\theta)$ of a flat trajectory `y` of shape
    `(T, D)` ($D$ the total size of the state's leaves), and `recurrence` the
    [`parallel_dynamics.Recurrence`][] to pass as `args`. The recurrence solvers
    require it as their `args`. `recurrence.layout.unflatten_trajectory` turns a flat
    trajectory into the PyTree layout of `y0` with a leading time axis.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import optimistix as optx
        import parallel_dynamics as pdyn

        def step(h, x, w):
            return jnp.tanh(w * h + x)

        xs = jax.random.normal(jax.random.key(0), (1000, 8))
        fn, args = pdyn.root_find_problem(step, jnp.zeros(8), xs, 0.5)
        init = jnp.zeros((1000, 8))  # the flat (T, D) trajectory
        sol = optx.root_find(fn, pdyn.DEER(), init, args, max_steps=1000)
        ```
    """
    if not callable(step):
        raise TypeError(f"`step` must be callable, got {type(step).__name__}.")
    check_state(y0)
    length = _sequence_length(inputs, static_int("length", length))
    return recurrence_residual, _bind(step, y0, inputs, args, length)


def jacobi_guess(
    step: Callable,
    y0: PyTree[ArrayLike],
    inputs: PyTree[ArrayLike] | None = None,
    args: PyTree = None,
    *,
    length: int | None = None,
) -> PyTree[Array]:
    """An initial guess for the `init` of [`parallel_dynamics.solve`][]: one Jacobi
    sweep from the default guess, that is one step from $y_0$ at every time,

    $$y^{(0)}_t = f(y_0, x_t, \\theta), \\qquad t = 1, \\dots, T,$$

    evaluated in parallel (one `vmap` over time).

    The default guess, $y_0$ at every time, ignores the inputs. On maps driven by their
    inputs whose state forgets where it started (a trained RNN, an autoregressive model
    driven by noise) this guess already carries each step's input, and a constant
    $y_0$ far from the typical state can make the linearisations of the first
    iterations, taken around it, expand strongly. See "How to choose a solver" for
    measured iteration counts. For ODEs, [`parallel_dynamics.CoarseGuess`][] is the
    better guess.

    **Arguments:**

    - `step`, `y0`, `inputs`, `args`, `length`: as for [`parallel_dynamics.solve`][].

    **Returns:**

    The guess, laid out like `sol.value`: the structure of `y0` with a leading time
    axis $T$.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def step(h, x, w):
            return jnp.tanh(w * h + x)

        xs = jax.random.normal(jax.random.key(0), (1000, 8))
        init = pdyn.jacobi_guess(step, jnp.zeros(8), xs, 0.5)
        sol = pdyn.solve(step, pdyn.ELK(), jnp.zeros(8), xs, 0.5, init=init)
        ```
    """
    _, recurrence = root_find_problem(step, y0, inputs, args, length=length)
    constant = jnp.broadcast_to(recurrence.y0, (recurrence.length, recurrence.size))
    return recurrence.layout.unflatten_trajectory(recurrence.evaluate(constant))


@eqx.filter_jit
def _solve(
    step: Callable,
    solver: AbstractRecurrenceSolver,
    y0: PyTree[ArrayLike],
    inputs: PyTree[ArrayLike] | None,
    args: PyTree,
    *,
    length: int | None,
    init: PyTree[ArrayLike] | None,
    max_steps: int | None,
    adjoint: optx.AbstractAdjoint,
    throw: bool,
) -> optx.Solution:
    if isinstance(adjoint, type):
        raise TypeError(
            f"`adjoint` must be an adjoint instance, got the class "
            f"`{adjoint.__name__}`: construct one, e.g. `{adjoint.__name__}()`."
        )
    if not isinstance(adjoint, optx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be an `optimistix.AbstractAdjoint`, got {adjoint!r}."
        )
    if isinstance(adjoint, optx.ImplicitAdjoint) and isinstance(
        adjoint.linear_solver, lx.AutoLinearSolver
    ):
        raise ValueError(
            "`adjoint=optimistix.ImplicitAdjoint()` solves the adjoint system with "
            "`lineax.AutoLinearSolver`, which materialises the dense (T D) x (T D) "
            "Jacobian of the residual. Use `pdyn.ImplicitAdjoint()`, which solves it "
            "with a reverse scan (or pass one of this library's scan solvers as "
            "`optimistix.ImplicitAdjoint(linear_solver=...)`)."
        )
    if not callable(step):
        raise TypeError(f"`step` must be callable, got {type(step).__name__}.")
    check_state(y0)
    length = _sequence_length(inputs, length)
    if max_steps is None:
        max_steps = solver.default_max_steps(length)
    elif max_steps < 1:
        raise ValueError(f"`max_steps` must be at least 1, got {max_steps}.")
    largest = np.iinfo(jax.dtypes.canonicalize_dtype(np.int64)).max
    if max_steps > largest:
        # Beyond the iteration counter's range JAX raises an OverflowError naming no
        # argument.
        raise ValueError(
            f"`max_steps` must be at most {largest} (the largest value of the "
            f"iteration counter's dtype), got {max_steps}."
        )

    recurrence = _bind(step, y0, inputs, args, length)
    layout = recurrence.layout
    guess = _initial_guess(init, y0, layout, length)
    sol = optx.root_find(
        recurrence_residual,
        solver,
        guess,
        args=recurrence,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=False,
    )
    sol = _check_exhausted(sol, solver, recurrence)
    if throw:
        value = raise_on_failure(
            sol.value, sol.result, _is_successful, _FAILURES, solver.time_sharding
        )
        sol = eqx.tree_at(lambda s: s.value, sol, value)
    return eqx.tree_at(lambda s: s.value, sol, layout.unflatten_trajectory(sol.value))


def _check_exhausted(
    sol: optx.Solution, solver: AbstractRecurrenceSolver, recurrence: Recurrence
) -> optx.Solution:
    """Verifies an iterative solve that stopped after $T$ or more iterations.

    In exact arithmetic $T$ iterations of every iterative solver of the library solve
    the recurrence (the first $i$ states are exact after $i$ Newton-type iterations;
    the converged prefix of the Levenberg–Marquardt solvers grows by at least one step
    per iteration), and they stop there whatever their last update was, or run out of
    `max_steps`. In floating point that fails when the iterates grew large on the way
    (Picard or a quasi method on an expanding or chaotic map): subtracting a huge
    update leaves a rounding error of the order of the huge value. So such a
    trajectory is reported successful exactly when every defect
    $|y_t - f(y_{t-1}, x_t)|$ is within $\\text{atol} + \\text{rtol}\\,|y_t|$ or at
    the rounding level of the step's values (`ROUNDING_ULPS` units in the last place
    of $\\max(|y_t|, |f(y_{t-1}, x_t)|)$, which matters only for tolerances near the
    rounding error): a solve that ran out of `max_steps` with such a trajectory is
    `successful`, and one that stopped as successful without it is
    `RESULTS.nonlinear_divergence`.
    """
    if isinstance(solver, Sequential):
        return sol
    ran_out = sol.result == optx.RESULTS.nonlinear_max_steps_reached
    exhausted = (sol.stats["num_steps"] >= recurrence.length) & (
        (sol.result == optx.RESULTS.successful) | ran_out
    )
    trajectory = jax.lax.stop_gradient(sol.value)
    rtol, atol = solver.tolerances(trajectory.dtype)

    def accurate():
        residual = recurrence.residual(trajectory, bounded=True)
        floor = rounding_scale(trajectory, trajectory - residual)
        defect = scaled(residual, trajectory, rtol, atol, floor)
        return jnp.all(jnp.abs(defect) <= 1)

    verified = jax.lax.cond(exhausted, accurate, lambda: jnp.array(False))
    result = optx.RESULTS.where(
        exhausted & verified,
        optx.RESULTS.successful,
        optx.RESULTS.where(
            exhausted & ~ran_out, optx.RESULTS.nonlinear_divergence, sol.result
        ),
    )
    return eqx.tree_at(lambda s: s.result, sol, result)


def _is_successful(result: optx.RESULTS) -> Array:
    return result == optx.RESULTS.successful


_NONFINITE_MESSAGE = (
    "parallel_dynamics.solve: the iteration produced non-finite values (inf or NaN), "
    "either from the step itself or because the linearised recurrence overflowed, as "
    "Newton's method (DEER) does on unstable or chaotic maps in floating point. The "
    "last finite iterate is kept. Try `pdyn.ELK`/`pdyn.QuasiELK` (damped steps that "
    "stay finite), float64, a better `init`, or `pdyn.Sequential()`; pass "
    "`throw=False` to inspect `sol.value` and `sol.result`."
)
_MAX_STEPS_MESSAGE = (
    "parallel_dynamics.solve: the solver did not converge within `max_steps` "
    "iterations. In exact arithmetic every Newton-type solver is exact after T "
    "iterations (the default `max_steps` is T, and 2T + 10 for ELK), so this usually "
    "means a `max_steps` below T with a chaotic or weakly contracting map (see "
    "`pdyn.lyapunov_exponent`), or ELK stalling on one. Try `pdyn.DEER` or `pdyn.ELK` "
    "instead of a quasi or fixed-point method, looser tolerances, or "
    "`pdyn.Sequential()`; pass `throw=False` to inspect the result."
)
_DIVERGENCE_MESSAGE = (
    "parallel_dynamics.solve: the solver used all T iterations (after which it is "
    "exact in exact arithmetic) but the returned trajectory violates the recurrence by "
    "more than `atol + rtol * |y|`: rounding errors swamped the solution, because the "
    "iterates grew very large on the way or because the map amplifies every rounding "
    "error (a fixed-point or quasi method on an expanding, unstable or chaotic map). "
    "Try `pdyn.DEER` or `pdyn.ELK`, float64, a better `init`, or "
    "`pdyn.Sequential()`; pass `throw=False` to inspect the result."
)


_FAILURES = (
    (optx.RESULTS.nonfinite, _NONFINITE_MESSAGE),
    (optx.RESULTS.nonlinear_max_steps_reached, _MAX_STEPS_MESSAGE),
    (optx.RESULTS.nonlinear_divergence, _DIVERGENCE_MESSAGE),
)
