import abc
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree

from .._blocks import AbstractBlocks, BlockDiagonalBlocks, DenseBlocks
from .._operator import BlockBidiagonalOperator, successor_blocks
from .._scan import chunked_scan, parallel_scan, sequential_scan


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
    return DenseBlocks(matrices)


class AbstractScanSolver(lx.AbstractLinearSolver[_ScanState]):
    """Abstract base class for Lineax solvers of block bidiagonal systems by a scan.

    `init` accepts a [`parallel_dynamics.BlockBidiagonalOperator`][], or any other
    operator on `(T, D)` arrays with that (lower) structure, whose dense blocks are then
    recovered by [`parallel_dynamics.dense_blocks_from_operator`][]. `transpose` turns a
    forward scan into the reverse scan of the transposed system, which is how gradients
    are computed.
    """

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
    """Solves a block bidiagonal system by a chunked scan: sequential inside chunks of
    `chunk_size` steps (vectorised across chunks), a parallel scan over the chunk
    summaries, then each chunk's carry-in. $O(T)$ work and $O(T/C + \\log C)$ depth;
    how ParaRNN's kernels are organised.
    """

    chunk_size: int | None = None

    def __check_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be positive, got {self.chunk_size}.")

    def _solve(self, blocks, offsets, reverse):
        return chunked_scan(
            blocks, offsets, chunk_size=self.chunk_size, reverse=reverse
        )


class AutoScan(AbstractScanSolver):
    """Chooses the scan by the block structure and the backend.

    On accelerators, always the parallel scan. On CPU, where there is little
    parallelism to exploit, dense and block-diagonal blocks use the sequential scan (a
    parallel scan composes $D \\times D$ blocks, $O(D^3)$ work per step, to save depth a
    CPU cannot use), while diagonal, identity and zero blocks keep the parallel scan,
    which vectorises well even on a CPU.
    """

    def _solve(self, blocks, offsets, reverse):
        on_cpu = jax.default_backend() == "cpu"
        if on_cpu and isinstance(blocks, (DenseBlocks, BlockDiagonalBlocks)):
            return sequential_scan(blocks, offsets, reverse=reverse)
        return parallel_scan(blocks, offsets, reverse=reverse)


AutoScan.__init__.__doc__ = """**Arguments:** Nothing."""
ParallelScan.__init__.__doc__ = """**Arguments:** Nothing."""
SequentialScan.__init__.__doc__ = """**Arguments:** Nothing."""
ChunkedScan.__init__.__doc__ = """**Arguments:**

- `chunk_size`: the number of time steps per chunk. Defaults to about $\\sqrt{T}$.
"""
