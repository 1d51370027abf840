"""Diagnostics for nonlinear recurrences: how hard is the trajectory to parallelise?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._validation import check_state, check_step_output, static_int


def _leading_length(tree: PyTree, name: str) -> int:
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves, so it has no time axis.")
    lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) > 0 else None for leaf in leaves}
    if None in lengths:
        raise ValueError(f"Every leaf of `{name}` needs a leading time axis.")
    if len(lengths) != 1:
        raise ValueError(
            f"The leaves of `{name}` disagree on the length of the leading time axis: "
            f"{sorted(lengths)}."
        )
    return lengths.pop()


def lyapunov_exponent(
    step: Callable[[PyTree, Any, Any], PyTree],
    y0: PyTree,
    inputs: PyTree | None = None,
    args: Any = None,
    *,
    length: int | None = None,
    trajectory: PyTree | None = None,
    num_exponents: int = 1,
) -> Array:
    r"""Estimate the Lyapunov exponents of the recurrence
    $y_t = f(y_{t-1}, x_t, \theta)$ along one trajectory.

    The exponents are measured from the Jacobians
    $J_t = \partial f / \partial y\,(y_{t-1}, x_t, \theta)$ by the QR (Benettin)
    iteration: starting from the first $k$ columns of the identity,
    $Q_0 = I_{D\times k}$, for $t = 1, \dots, T$

    $$Q_t R_t = J_t Q_{t-1} \quad\text{(thin QR)},\qquad
    \lambda_i \approx \frac{1}{T}\sum_{t=1}^{T} \log\left|(R_t)_{ii}\right|.$$

    The result is per step and in natural log: a perturbation along the leading
    direction grows (or shrinks) like $e^{\lambda_1 t}$. For a map that is the step
    of an ODE solver with step size $\Delta t$, divide by $\Delta t$ to get exponents
    per unit time. Each $J_t$ is computed inside a `jax.lax.scan` with `jax.jacfwd`
    ($D$ JVPs), so the memory is $O(D^2)$, not $O(T D^2)$, and the work is
    $O(T D^2 k)$.

    **Why it matters for parallel evaluation.** The largest Lyapunov exponent (LLE)
    predicts how many iterations DEER/ELK-type solvers need (Gonzalez, Kozachkov,
    Zoltowski, Clarkson, Linderman, *Predictability enables parallelization of
    nonlinear state space models*, NeurIPS 2025, arXiv 2508.16817). A negative LLE
    means the dynamics contract: the residual problem is well conditioned and Newton
    converges in few iterations (roughly $O(\log T)$). A positive LLE means chaos: the
    conditioning degrades exponentially in $T$, errors in early states are amplified
    along the sequence, and the solvers may need up to $T$ iterations (the worst case
    guaranteed by the prefix property), no better than a sequential loop. An LLE close
    to 0 is the marginal regime.

    **Arguments:**

    - `step`: the step map, called as `step(y_prev, x_t, args)` and returning the
        next state with the PyTree structure and shapes of `y0` (its dtypes are cast
        to those of `y0`).
    - `y0`: the initial state, any PyTree of float32 or float64 arrays (or Python
        floats). It is flattened (with `jax.flatten_util.ravel_pytree`) to a vector of
        size $D$.
    - `inputs`: the inputs $x_1, \dots, x_T$ as a PyTree whose leaves all have a
        leading time axis of length $T$, or `None` (then `step` receives `None` as
        `x_t` and `length` must be given).
    - `args`: passed unchanged to every call of `step`.
    - `length`: the number of steps $T$. Required when `inputs` (and `trajectory`)
        are `None`; otherwise it must agree with their leading axis.
    - `trajectory`: optional precomputed states $y_1, \dots, y_T$ in the layout of a
        solution (the structure of `y0`, each leaf with a leading axis $T$). When
        given, the trajectory is not recomputed; the Jacobians are evaluated at
        $(y_{t-1}, x_t)$ with $y_0$ = `y0` and $y_{t-1}$ taken from `trajectory`.
    - `num_exponents`: how many exponents $k$ to estimate, $1 \le k \le D$.

    Wrong arguments (a state that is not a PyTree of float32 or float64 arrays, a step
    whose output differs from `y0` in structure or shape, a `trajectory` with another
    layout, conflicting lengths, ...) raise a `TypeError` or `ValueError` naming the
    argument.

    **Returns:**

    The estimated exponents per step: a scalar array when `num_exponents=1`, otherwise
    an array of shape `(num_exponents,)` sorted in descending order. A direction the
    map annihilates exactly (a singular $J_t$) gives `-inf`.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        M = jnp.array([[0.9, 1.0], [0.0, 0.5]])  # eigenvalues 0.9 and 0.5
        step = lambda y, x, M: M @ y + x
        pdyn.lyapunov_exponent(step, jnp.ones(2), jnp.zeros((2000, 2)), M)
        # ≈ log(0.9) = -0.105: contracting, so easy to parallelise
        autonomous = lambda y, x, M: M @ y  # no inputs: x is None
        pdyn.lyapunov_exponent(
            autonomous, jnp.ones(2), None, M, length=2000, num_exponents=2
        )
        # ≈ [log(0.9), log(0.5)] = [-0.105, -0.693]
        ```
    """
    if not callable(step):
        raise TypeError(f"`step` must be callable, got {type(step).__name__}.")
    # Python scalars are accepted as leaves; `ravel_pytree` would also promote integer
    # leaves into the flat state, where their derivative vanishes.
    y0 = jtu.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (int, float)) else x, y0
    )
    check_state(y0)
    flat_y0, unravel = ravel_pytree(y0)
    dim = flat_y0.shape[0]
    try:
        count = static_int("num_exponents", num_exponents)
    except TypeError:
        count = None
    if count is None or not 1 <= count <= dim:
        raise ValueError(
            f"`num_exponents` must be an integer in [1, D] = [1, {dim}]; "
            f"got {num_exponents!r}."
        )
    num_exponents = count

    num_steps = static_int("length", length)
    for name, tree in (("inputs", inputs), ("trajectory", trajectory)):
        if tree is None:
            continue
        tree_length = _leading_length(tree, name)
        if num_steps is None:
            num_steps = tree_length
        elif tree_length != num_steps:
            raise ValueError(
                f"The leading axis of `{name}` has length {tree_length}, but the "
                f"number of steps is {num_steps} (from `length` or `inputs`)."
            )
    if num_steps is None:
        raise ValueError(
            "Pass either `inputs` (with a leading time axis) or `length` (the number "
            "of steps when there are no inputs)."
        )
    if num_steps < 1:
        raise ValueError(f"`length` must be at least 1; got {num_steps}.")

    out_struct = eqx.filter_eval_shape(
        lambda y, x: step(y, jtu.tree_map(lambda leaf: leaf[0], x), args), y0, inputs
    )
    # The output is cast to the dtype of the state, so only the layout must match.
    check_step_output(out_struct, y0, dtypes=False)
    if trajectory is not None:
        expected = jtu.tree_map(lambda x: (num_steps,) + jnp.shape(x), y0)
        got = jtu.tree_map(jnp.shape, trajectory)
        same_structure = jtu.tree_structure(expected) == jtu.tree_structure(got)
        if not same_structure or jtu.tree_leaves(expected) != jtu.tree_leaves(got):
            raise ValueError(
                "`trajectory` must have the structure of `y0` with a leading time axis "
                f"of length T = {num_steps}: expected shapes {expected}, got {got}."
            )

    def flat_step(flat_y, x_t):
        y_next = step(unravel(flat_y), x_t, args)
        flat_next, _ = ravel_pytree(y_next)
        return flat_next.astype(flat_y.dtype)

    def with_aux(flat_y, x_t):
        y_next = flat_step(flat_y, x_t)
        return y_next, y_next

    jac_and_next = jax.jacfwd(with_aux, has_aux=True)

    def qr_update(q, log_sum, jac):
        q_new, r = jnp.linalg.qr(jac @ q)
        return q_new, log_sum + jnp.log(jnp.abs(jnp.diagonal(r)))

    q0 = jnp.eye(dim, num_exponents, dtype=flat_y0.dtype)
    log0 = jnp.zeros((num_exponents,), dtype=flat_y0.dtype)

    if trajectory is None:

        def body(carry, x_t):
            y_prev, q, log_sum = carry
            jac, y_next = jac_and_next(y_prev, x_t)
            q, log_sum = qr_update(q, log_sum, jac)
            return (y_next, q, log_sum), None

        (_, _, log_sum), _ = jax.lax.scan(
            body, (flat_y0, q0, log0), inputs, length=num_steps
        )
    else:
        flat_traj = jax.vmap(lambda y: ravel_pytree(y)[0])(trajectory)
        flat_prev = jnp.concatenate(
            [flat_y0[None], flat_traj[:-1].astype(flat_y0.dtype)], axis=0
        )

        def body(carry, xs):
            y_prev, x_t = xs
            q, log_sum = carry
            jac, _ = jac_and_next(y_prev, x_t)
            return qr_update(q, log_sum, jac), None

        (_, log_sum), _ = jax.lax.scan(
            body, (q0, log0), (flat_prev, inputs), length=num_steps
        )

    exponents = jnp.sort(log_sum / num_steps)[::-1]
    if num_exponents == 1:
        return exponents[0]
    return exponents
