"""Parallel-in-time evaluation of nonlinear recurrences."""

import importlib.metadata

from . import internal as internal
from ._adjoint import ImplicitAdjoint as ImplicitAdjoint
from ._blocks import (
    AbstractBlocks as AbstractBlocks,
    BlockDiagonalBlocks as BlockDiagonalBlocks,
    DenseBlocks as DenseBlocks,
    DiagonalBlocks as DiagonalBlocks,
    IdentityBlocks as IdentityBlocks,
    ZeroBlocks as ZeroBlocks,
)
from ._coarse import CoarseGuess as CoarseGuess
from ._diagnostics import lyapunov_exponent as lyapunov_exponent
from ._diffrax import diffeqsolve as diffeqsolve, DiffraxStep as DiffraxStep
from ._jacobian import (
    AbstractJacobian as AbstractJacobian,
    BlockDiagonalJacobian as BlockDiagonalJacobian,
    DenseJacobian as DenseJacobian,
    DiagonalFunction as DiagonalFunction,
    DiagonalFunctionJacobian as DiagonalFunctionJacobian,
    ExactDiagonal as ExactDiagonal,
    ExactDiagonalJacobian as ExactDiagonalJacobian,
    IdentityJacobian as IdentityJacobian,
    StochasticDiagonal as StochasticDiagonal,
    StochasticDiagonalJacobian as StochasticDiagonalJacobian,
    ZeroJacobian as ZeroJacobian,
)
from ._linear_solver import (
    AbstractScanSolver as AbstractScanSolver,
    AutoScan as AutoScan,
    ChunkedScan as ChunkedScan,
    IterativeScan as IterativeScan,
    KalmanFilter as KalmanFilter,
    KalmanSmoother as KalmanSmoother,
    MatrixFreeScan as MatrixFreeScan,
    ParallelScan as ParallelScan,
    SequentialScan as SequentialScan,
    ShardedScan as ShardedScan,
    TimeSharding as TimeSharding,
)
from ._operator import (
    BlockBidiagonalOperator as BlockBidiagonalOperator,
    DampedBidiagonalOperator as DampedBidiagonalOperator,
)
from ._problem import Recurrence as Recurrence
from ._solve import (
    jacobi_guess as jacobi_guess,
    root_find_problem as root_find_problem,
    solve as solve,
)
from ._solver import (
    AbstractDamping as AbstractDamping,
    AbstractLevenbergMarquardt as AbstractLevenbergMarquardt,
    AbstractNewton as AbstractNewton,
    AbstractRecurrenceSolver as AbstractRecurrenceSolver,
    AbstractTrustRegionNewton as AbstractTrustRegionNewton,
    AdaptiveDamping as AdaptiveDamping,
    BlockQuasiDEER as BlockQuasiDEER,
    DEER as DEER,
    ELK as ELK,
    FixedDamping as FixedDamping,
    Jacobi as Jacobi,
    LevenbergMarquardt as LevenbergMarquardt,
    Newton as Newton,
    NonmonotoneDamping as NonmonotoneDamping,
    Picard as Picard,
    QuasiDEER as QuasiDEER,
    QuasiELK as QuasiELK,
    QuasiTrustDEER as QuasiTrustDEER,
    Sequential as Sequential,
    TimeWindow as TimeWindow,
    TrustDEER as TrustDEER,
    TrustRegionNewton as TrustRegionNewton,
)


__version__ = importlib.metadata.version("parallel_dynamics")
