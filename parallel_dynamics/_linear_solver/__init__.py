from .iterative import IterativeScan as IterativeScan
from .matrix_free import MatrixFreeScan as MatrixFreeScan
from .scan_solvers import (
    AbstractScanSolver as AbstractScanSolver,
    AutoScan as AutoScan,
    ChunkedScan as ChunkedScan,
    dense_blocks_from_operator as dense_blocks_from_operator,
    ParallelScan as ParallelScan,
    SequentialScan as SequentialScan,
)
from .sharded_scan import sharded_scan as sharded_scan, ShardedScan as ShardedScan
from .sharding import shard_time as shard_time, TimeSharding as TimeSharding
from .smoother import (
    kalman_smooth as kalman_smooth,
    KalmanFilter as KalmanFilter,
    KalmanSmoother as KalmanSmoother,
)
