from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Inexact, PyTree

from .. import _scan
from .._blocks import DenseBlocks
from .._operator import BlockBidiagonalOperator, successor_blocks
from .._problem import Recurrence
from .._scan import entering_chunks, from_chunks, parallel_scan, to_chunks
from .._validation import check_count
from .scan_solvers import auto_scan


# `apply(point, x, rows)`: the rows of `rows` (shape `(k, D)`) mapped by the Jacobian
# block at `(point, x)`, or by its transpose.
_Apply = Callable[[Array, PyTree, Array], Array]


def _is_recurrence(x) -> bool:
    return isinstance(x, Recurrence)


def recurrence_of(operator: lx.AbstractLinearOperator) -> Recurrence | None:
    """The [`parallel_dynamics.Recurrence`][] whose residual `operator` is the Jacobian
    of, when `operator` is the `lineax.JacobianLinearOperator` that implicit
    differentiation of [`parallel_dynamics.solve`][] builds (its arguments carry the
    recurrence); `None` otherwise."""
    if not isinstance(operator, lx.JacobianLinearOperator):
        return None
    found = [
        leaf
        for leaf in jtu.tree_leaves(operator.args, is_leaf=_is_recurrence)
        if _is_recurrence(leaf)
    ]
    if len(found) != 1:
        return None
    (recurrence,) = found
    structure = operator.in_structure()
    expected = (recurrence.length, recurrence.size)
    if not isinstance(structure, jax.ShapeDtypeStruct) or structure.shape != expected:
        return None
    return recurrence


def _tangent_apply(recurrence: Recurrence) -> _Apply:
    """Rows mapped by $A_t = \\partial f / \\partial y$ at $(y_{t-1}, x_t)$."""

    def apply(point, x, rows):
        _, linear = jax.linearize(lambda y: recurrence.flat_step(y, x), point)
        return jax.vmap(linear)(rows)

    return apply


def _cotangent_apply(recurrence: Recurrence) -> _Apply:
    """Rows mapped by $A_{t+1}^\\top$, with $A_{t+1}$ at $(y_t, x_{t+1})$."""

    def apply(point, x, rows):
        _, pullback = jax.vjp(lambda y: recurrence.flat_step(y, x), point)
        return jax.vmap(lambda row: pullback(row)[0])(rows)

    return apply


def default_matrix_free_chunk_size(length: int, size: int) -> int:
    """The chunk size $L$ of [`parallel_dynamics.MatrixFreeScan`][] when none is given.

    On CPU, $L = T$: one chunk, i.e. a sequential sweep of $T$ Jacobian-vector (or
    vector-Jacobian) products, which does the least work. On accelerators,
    $L = \\max(D, 16)$: many chunks to vectorise over, and $L \\geq D$ keeps the $C$
    chunk summaries ($C D^2$ numbers) within $O(T D)$ memory.
    """
    if _scan.on_cpu():
        return max(length, 1)
    return max(1, min(length, max(size, 16)))


def _matrix_free_solve(
    apply: _Apply,
    points: Inexact[Array, "T D"],
    xs: PyTree,
    coupled: Array,
    offsets: Inexact[Array, "T D"],
    chunk_size: int,
    reverse: bool,
) -> Inexact[Array, "T D"]:
    """Solves $v_t = B_t v_{t \\mp 1} + b_t$ (forward, or `reverse`), where
    $B_t r$ = `apply(points[t], xs[t], r)` where `coupled[t]`, else $0$."""
    length, size = offsets.shape
    chunk_size = max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk_size)
    # Padding sits after the end of time: uncoupled with zero offsets, it stays zero in
    # the reverse direction and is discarded in the forward one. Its points and inputs
    # are copies of the last step's, valid places to evaluate the step at.
    points = to_chunks(points, chunk_size, edge=True)
    xs = jtu.tree_map(lambda x: to_chunks(x, chunk_size, edge=True), xs)
    coupled, offsets = to_chunks(coupled, chunk_size), to_chunks(offsets, chunk_size)
    apply_chunks = jax.vmap(apply)

    def couple(rows, point, x, is_coupled):
        mapped = apply_chunks(point, x, rows)
        return jnp.where(is_coupled[:, None, None], mapped, 0)

    if num_chunks == 1:
        carry_in = jnp.zeros((1, size), offsets.dtype)
    else:
        # 1. Every chunk's summary: the affine map from the state entering it to the
        # state leaving it, run on the identity (as rows) and the offsets at once.
        def summarise(rows, step):
            point, x, is_coupled, offset = step
            rows = couple(rows, point, x, is_coupled)
            return rows.at[:, size].add(offset), None

        eye = jnp.eye(size + 1, size, dtype=offsets.dtype)
        rows = jnp.broadcast_to(eye, (num_chunks, size + 1, size))
        rows, _ = lax.scan(
            summarise, rows, (points, xs, coupled, offsets), reverse=reverse
        )
        # Rows j < D are the images of e_j: the columns of the chunk's matrix.
        matrices = jnp.swapaxes(rows[:, :size], 1, 2)
        # 2. The state leaving every chunk, by a parallel scan over the summaries.
        ends = parallel_scan(DenseBlocks(matrices), rows[:, size], reverse=reverse)
        carry_in = entering_chunks(ends, reverse)

    # 3. Rerun every chunk from the state entering it, mapping one vector per step.
    def sweep(state, step):
        point, x, is_coupled, offset = step
        state = couple(state[:, None], point, x, is_coupled)[:, 0] + offset
        return state, state

    _, out = lax.scan(sweep, carry_in, (points, xs, coupled, offsets), reverse=reverse)
    return from_chunks(out, length)


def _successor_inputs(inputs: PyTree) -> PyTree:
    """$x_{t+1}$ at position $t$ (the last position repeats $x_T$; it is uncoupled)."""
    return jtu.tree_map(lambda x: jnp.concatenate([x[1:], x[-1:]], axis=0), inputs)


class MatrixFreeScan(lx.AbstractLinearSolver):
    """Solves the Jacobian system of a recurrence exactly in $O(T D)$ memory, without
    ever forming the $T$ Jacobian blocks: the memory-lean adjoint.

    For the residual $F(Y)_t = y_t - f(y_{t-1}, x_t)$ of [`parallel_dynamics.solve`][],
    $\\partial_Y F$ is block bidiagonal with the Jacobians
    $A_t = \\partial f / \\partial y\\,(y_{t-1}, x_t)$. Gradients need the transposed
    system $g_t = c_t + A_{t+1}^\\top g_{t+1}$ (forward mode the system itself). This
    solver runs a chunked scan (ALGORITHMS.md §7) in which every block is applied
    through a Jacobian-vector (or vector-Jacobian) product of the step, recomputed
    where it is needed:

    1. one sweep inside chunks of $L$ steps, vectorised across the $C = T / L$
       chunks, maps the $D$ unit vectors and the offsets through the chunk: the
       chunk's composed $D \\times D$ matrix and its end state ($D + 1$ products per
       step);
    2. a parallel scan over the $C$ chunk summaries gives the state entering every
       chunk;
    3. a second sweep reruns every chunk from that state (one product per step).

    Memory is $O(T D + C D^2)$, i.e. $O(T D)$ for $L \\geq D$; the result is exact to
    rounding, like a scan on the dense blocks, for every solver (the quasi solvers
    included: the products use the true Jacobian). With one chunk ($L = T$) it is
    backpropagation's own sweep: $T$ sequential vector-Jacobian products, the least
    work.

    It is the default adjoint of the solvers that do not store dense Jacobians
    ([`parallel_dynamics.QuasiDEER`][], [`parallel_dynamics.QuasiELK`][], ...; see
    [`parallel_dynamics.ImplicitAdjoint`][]). It needs the step: it solves systems
    with the `lineax.JacobianLinearOperator` that implicit differentiation of
    [`parallel_dynamics.solve`][] builds (a
    [`parallel_dynamics.BlockBidiagonalOperator`][], whose blocks are given, is solved
    by [`parallel_dynamics.AutoScan`][]'s scan instead).
    """

    chunk_size: int | None = None

    def __check_init__(self):
        check_count("chunk_size", self.chunk_size, optional=True)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if isinstance(operator, BlockBidiagonalOperator):
            return operator.blocks, None, operator.lower
        recurrence = recurrence_of(operator)
        if recurrence is None:
            raise ValueError(
                "`MatrixFreeScan` solves the Jacobian systems of a `pdyn.solve` "
                "residual (as `pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan())`), or a "
                f"`pdyn.BlockBidiagonalOperator`; got {type(operator).__name__}. Use "
                "a scan solver such as `pdyn.AutoScan()` for other operators."
            )
        assert isinstance(operator, lx.JacobianLinearOperator)
        return recurrence, operator.x, True

    def compute(
        self, state, vector: Array, options: dict[str, Any]
    ) -> tuple[Array, lx.RESULTS, dict[str, Any]]:
        del options
        first, trajectory, lower = state
        if trajectory is None:  # given blocks
            if lower:
                solution = auto_scan(first, vector)
            else:
                solution = auto_scan(successor_blocks(first), vector, reverse=True)
            return solution, lx.RESULTS.successful, {}
        recurrence: Recurrence = first
        length, size = vector.shape
        chunk_size = self.chunk_size
        if chunk_size is None:
            chunk_size = default_matrix_free_chunk_size(length, size)
        if lower:
            points = recurrence.previous(trajectory)
            xs = recurrence.inputs
            # A_1 only meets v_0 = 0, and may be non-finite (sqrt at y0 = 0).
            coupled = jnp.arange(length) > 0
            apply = _tangent_apply(recurrence)
        else:
            points = trajectory
            xs = _successor_inputs(recurrence.inputs)
            coupled = jnp.arange(length) < length - 1
            apply = _cotangent_apply(recurrence)
        solution = _matrix_free_solve(
            apply, points, xs, coupled, vector, chunk_size, reverse=not lower
        )
        return solution, lx.RESULTS.successful, {}

    def transpose(self, state, options: dict[str, Any]):
        first, trajectory, lower = state
        return (first, trajectory, not lower), options

    def conj(self, state, options: dict[str, Any]):
        return state, options

    def assume_full_rank(self):
        return True


MatrixFreeScan.__init__.__doc__ = """**Arguments:**

- `chunk_size`: the number of time steps per chunk, $L$. Defaults to $T$ (one
    sequential sweep) on CPU and $\\max(D, 16)$ on accelerators.
"""
