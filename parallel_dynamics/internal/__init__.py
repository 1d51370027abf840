"""Building blocks under the public API, for advanced use: the functional scans that
the scan solvers run, the Kalman smoother function, the time-sharding helpers, the
flat state layout of a recurrence and the recovery of dense blocks from an operator.

Like `optimistix.internal` and `lineax.internal`, this namespace carries no promise of
stability between releases.
"""

from .._linear_solver import (
    dense_blocks_from_operator as dense_blocks_from_operator,
    kalman_smooth as kalman_smooth,
    shard_time as shard_time,
    sharded_scan as sharded_scan,
)
from .._problem import StateLayout as StateLayout
from .._scan import (
    chunked_scan as chunked_scan,
    parallel_scan as parallel_scan,
    sequential_scan as sequential_scan,
)
