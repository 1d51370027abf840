from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import ArrayLike, PyTree

from ._adjoint import ImplicitAdjoint
from ._problem import Recurrence, recurrence_residual, StateLayout


def _check_state(y0: PyTree) -> None:
    leaves = jtu.tree_leaves(y0)
    if len(leaves) == 0:
        raise ValueError("`y0` must contain at least one array.")
    for path, leaf in jtu.tree_leaves_with_path(y0):
        where = jtu.keystr(path) or "(the root)"
        if not eqx.is_array(leaf):
            raise TypeError(
                f"Every leaf of `y0` must be a JAX or NumPy array; the leaf at {where} "
                f"is a {type(leaf).__name__}. Wrap scalars with `jnp.asarray`."
            )
        dtype = leaf.dtype
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"Complex states are not supported: the leaf of `y0` at {where} has "
                f"dtype {dtype}. Split it into real and imaginary parts."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Every leaf of `y0` must have a floating dtype; the leaf at {where} "
                f"has dtype {dtype}."
            )


def _sequence_length(inputs: PyTree, length: int | None) -> int:
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
            raise TypeError(f"`length` must be a Python int, got {length!r}.")
        length = int(length)
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


def _describe(struct: PyTree) -> str:
    return str(jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", struct))


def _check_step_output(out_struct: PyTree, y0: PyTree) -> None:
    y0_struct = jax.eval_shape(lambda: y0)
    if jtu.tree_structure(out_struct) != jtu.tree_structure(y0_struct):
        raise ValueError(
            "`step` must return a PyTree with the structure of `y0`; got "
            f"{_describe(out_struct)} for `y0` = {_describe(y0_struct)}."
        )
    for out, ref in zip(jtu.tree_leaves(out_struct), jtu.tree_leaves(y0_struct)):
        if out.shape != ref.shape:
            raise ValueError(
                "`step` must return arrays with the shapes of `y0`; got "
                f"{_describe(out_struct)} for `y0` = {_describe(y0_struct)}."
            )
        if out.dtype != ref.dtype:
            raise TypeError(
                "`step` must return arrays with the dtypes of `y0` (a float32 state "
                "must stay float32, also under `jax_enable_x64`); got "
                f"{_describe(out_struct)} for `y0` = {_describe(y0_struct)}."
            )


def _initial_guess(init: PyTree | None, y0: PyTree, layout: StateLayout, length: int):
    flat_y0 = layout.flatten(y0)
    if init is None:
        return jnp.broadcast_to(flat_y0, (length, layout.size))
    expected = jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct((length,) + x.shape, x.dtype), y0
    )
    got = jax.eval_shape(lambda: init)
    if jtu.tree_structure(got) != jtu.tree_structure(expected) or any(
        (g.shape, g.dtype) != (e.shape, e.dtype)
        for g, e in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected))
    ):
        raise ValueError(
            "`init` must have the layout of the solution (the structure of `y0` with a "
            f"leading time axis of length {length}): expected {_describe(expected)}, "
            f"got {_describe(got)}."
        )
    return jax.lax.stop_gradient(layout.flatten_trajectory(init))


@eqx.filter_jit
def solve(
    step: Callable,
    solver: optx.AbstractRootFinder,
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
    - `max_steps`: the maximum number of iterations. Defaults to $T$ (every
        Newton-type solver is exact after $T$ iterations: the first $i$ states are
        exact after $i$ iterations), and to $2T + 10$ for the Levenberg–Marquardt
        solvers (whose final steps verify convergence). Keyword only.
    - `adjoint`: how to differentiate: [`parallel_dynamics.ImplicitAdjoint`][] (the
        default) uses the implicit function theorem with a reverse parallel scan, never
        backpropagating through the iterations. Keyword only.
    - `throw`: if `True`, a failed solve (maximum steps reached, non-finite values)
        raises an error that says what happened and what to try, as
        `optimistix.root_find` does. If `False`, the failure is
        reported in `sol.result` and `sol.value` holds the last finite iterate.
        Keyword only.

    **Returns:**

    An `optimistix.Solution`: `sol.value` is $y_1, \\dots, y_T$ with the structure of
    `y0` and a leading time axis $T$; `sol.result` an `optimistix.RESULTS`;
    `sol.stats` has `num_steps`, `max_steps` and `residual_norm` (the norm of the
    residual at the returned trajectory).

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
    if not isinstance(
        solver,
        (
            optx.AbstractRootFinder,
            optx.AbstractLeastSquaresSolver,
            optx.AbstractMinimiser,
        ),
    ):
        raise TypeError(
            "`solver` must be an Optimistix root finder such as `pdyn.DEER()`, got "
            f"{type(solver).__name__}."
        )
    if not isinstance(adjoint, optx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be an `optimistix.AbstractAdjoint`, got {adjoint!r}."
        )
    if not callable(step):
        raise TypeError(f"`step` must be callable, got {type(step).__name__}.")
    _check_state(y0)
    length = _sequence_length(inputs, length)
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
            raise TypeError(f"`max_steps` must be a positive int, got {max_steps!r}.")
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {max_steps}.")
        max_steps = int(max_steps)
    else:
        max_steps = solver.default_max_steps(length)

    x_struct = jax.eval_shape(lambda: jtu.tree_map(lambda x: x[0], inputs))
    closed_step = eqx.filter_closure_convert(step, y0, x_struct, args)
    _check_step_output(closed_step.out_struct, y0)  # pyright: ignore

    layout = StateLayout.of(y0)
    guess = _initial_guess(init, y0, layout, length)
    recurrence = Recurrence(
        step=closed_step,
        layout=layout,
        y0=layout.flatten(y0),
        inputs=inputs,
        args=args,
        length=length,
    )
    sol = optx.root_find(
        recurrence_residual,
        solver,
        guess,
        args=recurrence,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=False,
    )
    if throw:
        sol = _raise_on_failure(sol)
    return eqx.tree_at(lambda s: s.value, sol, layout.unflatten_trajectory(sol.value))


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
    "iterations. Every Newton-type solver is exact after T iterations, so "
    "`max_steps=None` (the default, T) always suffices; slow convergence usually means "
    "a chaotic or weakly contracting map (see `pdyn.lyapunov_exponent`). Try "
    "`pdyn.DEER` or `pdyn.ELK` instead of a quasi or fixed-point method, looser "
    "tolerances, or `pdyn.Sequential()`; pass `throw=False` to inspect the result."
)


def _raise_on_failure(sol: optx.Solution) -> optx.Solution:
    result = sol.result
    sol = eqx.error_if(sol, result == optx.RESULTS.nonfinite, _NONFINITE_MESSAGE)
    sol = eqx.error_if(
        sol, result == optx.RESULTS.nonlinear_max_steps_reached, _MAX_STEPS_MESSAGE
    )
    return result.error_if(sol, result != optx.RESULTS.successful)
