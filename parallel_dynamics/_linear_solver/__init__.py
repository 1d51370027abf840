from .scan import (
    AbstractScanSolver as AbstractScanSolver,
    ChunkedScan as ChunkedScan,
    dense_blocks_from_operator as dense_blocks_from_operator,
    ParallelScan as ParallelScan,
    SequentialScan as SequentialScan,
)
