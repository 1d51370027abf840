import abc
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from .. import _scan
from .._blocks import AbstractBlocks, DenseBlocks
from .._operator import BlockBidiagonalOperator, successor_blocks
from .._scan import chunked_scan, parallel_scan, sequential_scan
from .._validation import check_count
from .sharding import TimeSharding


_ScanState: TypeAlias = tuple[AbstractBlocks, bool]


def dense_blocks_from_operator(operator: lx.AbstractLinearOperator) -> DenseBlocks:
    """Recovers the dense blocks $A_t$ of an operator with the structure of a
    [`parallel_dynamics.BlockBidiagonalOperator`][] (lower), from $D$ matrix-vector
    products.

    Probing with $v_t = e_j$ at every $t$ gives $(L v)_t = e_j - A_t e_j$, i.e. column
    $j$ of every $A_t$ at once. This is how the solvers here handle a generic operator,
    such as the `lineax.JacobianLinearOperator` of a recurrence residual that
    `optimistix.ImplicitAdjoint` hands them. Memory $O(T D^2)$.
    """
    structure = operator.in_structure()
    if not isinstance(structure, jax.ShapeDtypeStruct) or len(structure.shape) != 2:
        raise ValueError(
            "A scan solver needs an operator on `(T, D)` arrays (time-major, flat "
            f"state); got input structure {structure}."
        )
    length, size = structure.shape
    eye = jnp.eye(size, dtype=structure.dtype)
    probes = jnp.broadcast_to(eye[:, None, :], (size, length, size))
    columns = jax.vmap(operator.mv)(probes)  # [j, t, i] = (L e_j)_t[i]
    matrices = eye - jnp.transpose(columns, (1, 2, 0))
    # A_1 meets no probe and comes out zero, or NaN when the operator multiplies an
    # infinite Jacobian by the zero v_0 (sqrt at y0 = 0).
    return DenseBlocks(matrices.at[0].set(0))


class AbstractScanSolver(lx.AbstractLinearSolver[_ScanState]):
    """Abstract base class for Lineax solvers of block bidiagonal systems by a scan.

    `init` accepts a [`parallel_dynamics.BlockBidiagonalOperator`][], or any other
    operator on `(T, D)` arrays with that (lower) structure, whose dense blocks are then
    recovered by [`parallel_dynamics.internal.dense_blocks_from_operator`][]. `transpose` turns a
    forward scan into the reverse scan of the transposed system, which is how gradients
    are computed.
    """

    @property
    def time_sharding(self) -> TimeSharding | None:
        """The [`parallel_dynamics.TimeSharding`][] of the time axis across devices,
        or `None` for a scan on one device."""
        return None

    @abc.abstractmethod
    def _solve(self, blocks: AbstractBlocks, offsets: Array, reverse: bool) -> Array:
        """Solves $v_t = A_t v_{t-1} + b_t$ (or the reverse recurrence)."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if operator.in_structure() != operator.out_structure():
            raise ValueError("A scan solver needs a square operator.")
        if isinstance(operator, BlockBidiagonalOperator):
            return operator.blocks, operator.lower
        return dense_blocks_from_operator(operator), True

    def compute(
        self, state: _ScanState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        del options
        blocks, lower = state
        if lower:
            solution = self._solve(blocks, vector, reverse=False)
        else:
            solution = self._solve(successor_blocks(blocks), vector, reverse=True)
        return solution, lx.RESULTS.successful, {}

    def transpose(self, state: _ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks, not lower), options

    def conj(self, state: _ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks.conj(), lower), options

    def assume_full_rank(self):
        return True


class ParallelScan(AbstractScanSolver):
    """Solves a block bidiagonal system with a parallel prefix scan
    (`jax.lax.associative_scan`): depth $O(\\log T)$, the choice on accelerators.

    The associative operation composes affine maps,
    $(A_2, b_2) \\circ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)$, using the structure of the
    blocks (dense, diagonal, block-diagonal, identity, zero).
    """

    def _solve(self, blocks, offsets, reverse):
        return parallel_scan(blocks, offsets, reverse=reverse)


class SequentialScan(AbstractScanSolver):
    """Solves a block bidiagonal system with `jax.lax.scan`: depth $O(T)$ but the least
    work, often the fastest choice on CPU."""

    def _solve(self, blocks, offsets, reverse):
        return sequential_scan(blocks, offsets, reverse=reverse)


class ChunkedScan(AbstractScanSolver):
    """Solves a block bidiagonal system by a chunked scan (ALGORITHMS.md §7): one
    sequential sweep inside chunks of $L$ = `chunk_size` steps, vectorised across the
    $C = \\lceil T / L \\rceil$ chunks, that keeps only each chunk's summary (its
    composed blocks and end state); a parallel scan over the $C$ summaries for the state
    entering every chunk; and a second sweep that reruns every chunk from that state,
    applying blocks to vectors only. $O(T)$ work and $O(L + \\log C)$ depth; how
    ParaRNN's kernels are organised. Works for every block structure (diagonal,
    block-diagonal, dense; identity and zero need no scan) and for the transposed
    (reverse) system.

    With `chunk_size=None` the chunk size is chosen automatically, as in
    [`parallel_dynamics.internal.chunked_scan`][]: $L = 8$ with fully unrolled sweeps on
    accelerators (where it measured fastest), $L \\approx \\sqrt{T}$ on CPU.

    !!! Example

        ```python
        import jax.numpy as jnp
        import lineax as lx
        import parallel_dynamics as pdyn

        blocks = pdyn.DiagonalBlocks(jnp.full((100, 3), 0.5))
        operator = pdyn.BlockBidiagonalOperator(blocks)
        v = lx.linear_solve(operator, jnp.ones((100, 3)), pdyn.ChunkedScan(16)).value
        ```
    """

    chunk_size: int | None = None

    def __check_init__(self):
        check_count("chunk_size", self.chunk_size, optional=True)

    def _solve(self, blocks, offsets, reverse):
        return chunked_scan(
            blocks, offsets, chunk_size=self.chunk_size, reverse=reverse
        )


def auto_scan(
    blocks: AbstractBlocks, offsets: Array, *, reverse: bool = False
) -> Array:
    """The scan [`parallel_dynamics.AutoScan`][] runs: the sequential scan on CPU and
    the chunked scan (automatic chunk size) on accelerators, for every block
    structure."""
    if _scan.on_cpu():
        return sequential_scan(blocks, offsets, reverse=reverse)
    return chunked_scan(blocks, offsets, reverse=reverse)


class AutoScan(AbstractScanSolver):
    """Chooses the scan by the backend (the default of every solver).

    - **CPU**: [`parallel_dynamics.SequentialScan`][], for every block structure. A
      CPU has little parallelism to exploit, and the sequential scan does the least
      work and one pass over memory; the parallel scans of dense and block-diagonal
      blocks also compose $D \\times D$ or $k \\times k$ blocks.
    - **Accelerators**: [`parallel_dynamics.ChunkedScan`][] with its automatic chunk
      size ($L = 8$, sweeps unrolled): a sequential scan pays a kernel launch per
      step there, and the chunked scan does fewer block compositions than
      `jax.lax.associative_scan` (about $T + T/4$ against about $2T$).

    The measurements behind this choice are on the Benchmarks page of the
    documentation (`python -m benchmarks.run --only scans`).
    """

    def _solve(self, blocks, offsets, reverse):
        return auto_scan(blocks, offsets, reverse=reverse)


AutoScan.__init__.__doc__ = """**Arguments:** Nothing."""
ParallelScan.__init__.__doc__ = """**Arguments:** Nothing."""
SequentialScan.__init__.__doc__ = """**Arguments:** Nothing."""
ChunkedScan.__init__.__doc__ = """**Arguments:**

- `chunk_size`: the number of time steps per chunk. Defaults to the automatic rule of
    [`parallel_dynamics.internal.chunked_scan`][] ($8$ on accelerators, about $\\sqrt{T}$ on
    CPU).
"""
