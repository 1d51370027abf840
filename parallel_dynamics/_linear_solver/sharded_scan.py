"""Sequence parallelism: a scan whose time axis is sharded across devices.

The recurrence $v_t = A_t v_{t-1} + b_t$ is split into $P$ contiguous chunks, one per
device of a 1-D `jax.sharding.Mesh` axis, and solved like a chunked scan
(ALGORITHMS.md §7) whose chunks live on different devices: each device summarises its
chunk as one affine map, the $P$ summaries are all-gathered and combined, and each
device reruns its chunk from its carry-in. Only the summaries cross devices.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jax.sharding import Mesh
from jaxtyping import Array, Inexact

from .. import _scan
from .._blocks import AbstractBlocks, map_time
from .scan_solvers import AbstractScanSolver, AutoScan, SequentialScan
from .sharding import (
    MESH_ARGUMENTS,
    pad_time,
    shard_map_time,
    time_padding,
    TimeSharding,
)


def _take(blocks: AbstractBlocks, index) -> AbstractBlocks:
    return map_time(lambda x: x[index], blocks)


def _summarise_tree(blocks, offsets, reverse):
    """The chunk's affine map $v \\mapsto P v + e$ by a pairwise tree reduction:
    $O(\\log L)$ depth, $L$ compositions."""
    while offsets.shape[0] > 1:
        # Neighbours are composed pairwise; an odd last step waits for the next level.
        paired = offsets.shape[0] - offsets.shape[0] % 2
        even, odd, left = slice(0, paired, 2), slice(1, paired, 2), slice(paired, None)
        if reverse:
            # v_s = A_s (A_{s+1} v + b_{s+1}) + b_s: the odd step acts first.
            first, then = odd, even
        else:
            first, then = even, odd
        then_blocks = _take(blocks, then)
        composed = then_blocks.compose(_take(blocks, first))
        composed_offsets = then_blocks.apply(offsets[first]) + offsets[then]
        blocks = jax.tree.map(
            lambda x, y: jnp.concatenate([x, y], axis=0),
            composed,
            _take(blocks, left),
        )
        offsets = jnp.concatenate([composed_offsets, offsets[left]], axis=0)
    return _take(blocks, 0), offsets[0]


def _summarise(blocks, offsets, reverse, local: AbstractScanSolver):
    """The chunk's affine map $v \\mapsto P v + e$: accumulated in one `lax.scan`
    when the `local` scan is sequential, otherwise by a tree reduction."""
    solution = blocks.closed_form(offsets, reverse=reverse)
    if solution is not None:
        # Such a structure (identity, zero) is its own composition.
        return blocks, solution[0 if reverse else -1]
    sequential = isinstance(local, SequentialScan) or (
        isinstance(local, AutoScan) and _scan.on_cpu()
    )
    if sequential:
        return _scan.summarise(blocks, offsets, reverse=reverse)
    return _summarise_tree(blocks, offsets, reverse)


def scan_chunk(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "L D"],
    *,
    axis_name: str,
    local: AbstractScanSolver,
    reverse: bool,
) -> Inexact[Array, "L D"]:
    """Inside `jax.shard_map`: solves this device's chunk of the recurrence with the
    `local` scan, given the chunks of the other devices along `axis_name` (summary,
    all-gather, carry-in)."""
    index = lax.axis_index(axis_name)
    size = offsets.shape[-1]
    product, end = _summarise(blocks, offsets, reverse, local)
    products, ends = lax.all_gather((product, end), axis_name)
    # The state leaving every device's chunk; P is small, so a sequential scan
    # over the gathered summaries is the cheapest way to combine them.
    leaving = _scan.sequential_scan(products, ends, reverse=reverse)
    zero = jnp.zeros((1, size), offsets.dtype)
    if reverse:
        entering = jnp.concatenate([leaving[1:], zero], axis=0)
        position = -1
    else:
        entering = jnp.concatenate([zero, leaving[:-1]], axis=0)
        position = 0
    carry = entering[index]
    edge = map_time(lambda x: x[position], blocks)
    offsets = offsets.at[position].add(edge.apply(carry))
    return local._solve(blocks, offsets, reverse)


def sharded_scan(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T D"],
    *,
    mesh: Mesh,
    axis_name: str = "time",
    local: AbstractScanSolver = AutoScan(),
    reverse: bool = False,
    successor: bool = False,
) -> Inexact[Array, "T D"]:
    """Solves the recurrence with its time axis sharded over the devices of
    `mesh.shape[axis_name]` (sequence parallelism), inside `jax.shard_map`.

    Let $P$ be the number of devices along `axis_name`. Device $p$ holds the
    contiguous chunk $\\mathcal{T}_p$ of $T / P$ time steps.

    1. **Chunk summary** (local). Device $p$ composes its blocks and runs its
       recurrence from zero: its chunk is the affine map $v \\mapsto M_p v + e_p$ with
       $M_p = A_{\\text{last}} \\cdots A_{\\text{first}}$.
    2. **Combine** (the only communication). The $P$ summaries are all-gathered
       ($P$ blocks and $P$ vectors: $P(D^2 + D)$ numbers for dense blocks,
       $2PD$ for diagonal ones, $P(Dk + D)$ for $k \\times k$ block-diagonal
       ones) and every device runs the tiny recurrence $c_p = M_p c_{p-1} + e_p$ over
       them to find the state $c_{p-1}$ entering its chunk.
    3. **Fix-up** (local). Device $p$ solves its chunk again with the carry-in,
       i.e. with $b_{\\text{first}} + A_{\\text{first}} c_{p-1}$ as first offset,
       using the `local` scan.

    Work is that of two local scans plus $O(P)$ block applications; the trajectory,
    the blocks and the offsets never leave their devices. When $T$ is not divisible
    by $P$ the time axis is padded at its end with zero blocks and offsets (the padded
    steps leave the state at zero in a reverse scan, and their outputs are dropped in
    a forward one); the padding itself makes XLA re-lay the arrays out, so $T$
    divisible by $P$ is the efficient case.

    **Arguments:**

    - `blocks`: the blocks $A_1, \\dots, A_T$, of any structure (an
        [`parallel_dynamics.AbstractBlocks`][]).
    - `offsets`: the `(T, D)` right-hand sides $b_t$.
    - `mesh`: a `jax.sharding.Mesh` with an axis named `axis_name`.
    - `axis_name`: the mesh axis that the time axis is sharded over.
    - `local`: the [`parallel_dynamics.AbstractScanSolver`][] each device runs on its
        chunk (default [`parallel_dynamics.AutoScan`][]).
    - `reverse`: solve $v_t = A_t v_{t+1} + b_t$, $v_{T+1} = 0$ instead.
    - `successor`: with `reverse=True`, use the blocks $A_{t+1}^\\top$ at step $t$,
        i.e. solve the transposed system $g_t = A_{t+1}^\\top g_{t+1} + b_t$ of a
        [`parallel_dynamics.BlockBidiagonalOperator`][]. Each device then receives
        the first block of its right neighbour (one block per device, by
        `jax.lax.ppermute`).

    **Returns:**

    The `(T, D)` solution, sharded along time over `axis_name`.
    """
    if successor and not reverse:
        raise ValueError("`successor=True` needs `reverse=True`.")
    if successor:
        blocks = blocks.transpose()
    sharding = TimeSharding(mesh, axis_name)
    num_devices = sharding.num_devices
    length = offsets.shape[0]
    pad = time_padding(sharding, length)
    offsets = pad_time(offsets, pad)
    blocks = map_time(lambda x: pad_time(x, pad), blocks)

    def body(blocks, offsets):
        if successor:
            # Step t needs A_{t+1}: the last step of every chunk takes the first block
            # of the next device's chunk (the last device gets zeros, which only ever
            # multiply v_{T+1} = 0).
            shift = [(p, p - 1) for p in range(1, num_devices)]
            first = lax.ppermute(map_time(lambda x: x[:1], blocks), axis_name, shift)
            blocks = jax.tree.map(
                lambda x, y: jnp.concatenate([x[1:], y], axis=0), blocks, first
            )
        return scan_chunk(
            blocks, offsets, axis_name=axis_name, local=local, reverse=reverse
        )

    out = shard_map_time(body, sharding, 2)(*sharding.shard((blocks, offsets)))
    return out[:length] if pad else out


class ShardedScan(AbstractScanSolver):
    """Solves a block bidiagonal system with its time axis sharded across devices
    (sequence parallelism), by [`parallel_dynamics.internal.sharded_scan`][].

    Each device of the mesh axis `axis_name` scans its own contiguous chunk of the time
    axis with the `local` scan; only the $P$ chunk summaries (one affine map per
    device: $O(P D^2)$ numbers for dense blocks, $O(P D)$ for diagonal ones) are
    all-gathered. The transposed (upper) system, which gradients solve, is the
    reverse scan, sharded the same way. Pass it as the `linear_solver` of a
    Newton-type solver and of [`parallel_dynamics.ImplicitAdjoint`][], with the inputs
    sharded along time, to keep the whole solve sharded: see the "Sequence
    parallelism" guide.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn
        from jax.sharding import AxisType

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("time",), axis_types=(AxisType.Auto,))
        xs = pdyn.internal.shard_time(jnp.ones((256 * n, 4)), mesh)
        scan = pdyn.ShardedScan(mesh)
        step = lambda y, x, args: jnp.tanh(0.5 * y + x)
        sol = pdyn.solve(
            step,
            pdyn.QuasiDEER(linear_solver=scan),
            jnp.zeros(4),
            xs,
            adjoint=pdyn.ImplicitAdjoint(linear_solver=scan),
            throw=False,  # keeps `sol.value` sharded (see the guide)
        )
        ```
    """

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True, default="time")
    local: AbstractScanSolver = AutoScan()

    def __check_init__(self):
        TimeSharding(self.mesh, self.axis_name)  # checks the arguments
        if not isinstance(self.local, AbstractScanSolver) or isinstance(
            self.local, ShardedScan
        ):
            raise TypeError(
                "`local` must be a single-device scan solver (`pdyn.AutoScan()`, "
                f"`pdyn.SequentialScan()`, ...), got {self.local!r}."
            )

    @property
    def time_sharding(self) -> TimeSharding:
        return TimeSharding(self.mesh, self.axis_name)

    def _solve(self, blocks, offsets, reverse):
        return sharded_scan(
            blocks,
            offsets,
            mesh=self.mesh,
            axis_name=self.axis_name,
            local=self.local,
            reverse=reverse,
        )

    def compute(self, state, vector, options):
        del options
        blocks, lower = state
        # The transposed system is solved with the successor blocks shifted inside
        # the sharded scan (one block per device crosses a device boundary), rather
        # than by rolling the whole sharded block array.
        solution = sharded_scan(
            blocks,
            vector,
            mesh=self.mesh,
            axis_name=self.axis_name,
            local=self.local,
            reverse=not lower,
            successor=not lower,
        )
        return solution, lx.RESULTS.successful, {}


ShardedScan.__init__.__doc__ = f"""**Arguments:**

{MESH_ARGUMENTS}- `local`: the scan each device runs on its chunk: [`parallel_dynamics.AutoScan`][]
    (default), [`parallel_dynamics.SequentialScan`][],
    [`parallel_dynamics.ChunkedScan`][] or [`parallel_dynamics.ParallelScan`][]. With
    a sequential local scan the chunk summary is accumulated in one `lax.scan`,
    otherwise by a tree reduction of depth $O(\\log(T / P))$.
"""
