"""Parallel-in-time evaluation of nonlinear recurrences."""

import importlib.metadata

from ._adjoint import ImplicitAdjoint as ImplicitAdjoint
from ._blocks import (
    AbstractBlocks as AbstractBlocks,
    BlockDiagonalBlocks as BlockDiagonalBlocks,
    DenseBlocks as DenseBlocks,
    DiagonalBlocks as DiagonalBlocks,
    IdentityBlocks as IdentityBlocks,
    ZeroBlocks as ZeroBlocks,
)
from ._diagnostics import lyapunov_exponent as lyapunov_exponent
from ._jacobian import (
    AbstractJacobian as AbstractJacobian,
    BlockDiagonalJacobian as BlockDiagonalJacobian,
    DenseJacobian as DenseJacobian,
    DiagonalFunction as DiagonalFunction,
    ExactDiagonal as ExactDiagonal,
    IdentityJacobian as IdentityJacobian,
    StochasticDiagonal as StochasticDiagonal,
    ZeroJacobian as ZeroJacobian,
)
from ._linear_solver import (
    AbstractScanSolver as AbstractScanSolver,
    AutoScan as AutoScan,
    ChunkedScan as ChunkedScan,
    dense_blocks_from_operator as dense_blocks_from_operator,
    IterativeScan as IterativeScan,
    ParallelScan as ParallelScan,
    SequentialScan as SequentialScan,
)
from ._operator import BlockBidiagonalOperator as BlockBidiagonalOperator
from ._problem import Recurrence as Recurrence, StateLayout as StateLayout
from ._scan import (
    chunked_scan as chunked_scan,
    parallel_scan as parallel_scan,
    sequential_scan as sequential_scan,
)
from ._solve import solve as solve
from ._solver import (
    AbstractNewton as AbstractNewton,
    AbstractRecurrenceSolver as AbstractRecurrenceSolver,
    BlockQuasiDEER as BlockQuasiDEER,
    DEER as DEER,
    Jacobi as Jacobi,
    Newton as Newton,
    Picard as Picard,
    QuasiDEER as QuasiDEER,
    Sequential as Sequential,
)


__version__ = importlib.metadata.version("parallel_dynamics")
