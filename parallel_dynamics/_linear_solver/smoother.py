from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jax.sharding import Mesh
from jaxtyping import Array, Inexact, PyTree, Scalar

from .. import _scan
from .._blocks import AbstractBlocks
from .._operator import DampedBidiagonalOperator
from .scan_solvers import AbstractScanSolver, AutoScan, ParallelScan, SequentialScan
from .sharded_scan import scan_chunk, ShardedScan
from .sharding import pad_time, shard_map_time, time_padding, TimeSharding


def _scan_solver(parallel: bool | None) -> AbstractScanSolver:
    """The single-device scan that matches `parallel` of a Kalman smoother."""
    if parallel is None:
        return AutoScan()
    return ParallelScan() if parallel else SequentialScan()


def kalman_smooth(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T D"],
    observations: Inexact[Array, "T D"],
    damping: Scalar,
    *,
    parallel: bool = True,
    smooth: bool = True,
    radix: int | None = None,
    mesh: Mesh | None = None,
    axis_name: str = "time",
) -> Inexact[Array, "T D"]:
    """The smoother mean of $x_t = A_t x_{t-1} + b_t + w_t$ ($x_0 = 0$, unit noise),
    observed as $o_t = x_t + v_t$ with precision $\\lambda$ (a scalar, or one value per
    step, shape `(T,)`), for any block structure, with the transitions that
    [`parallel_dynamics.AbstractBlocks.kalman_blocks`][] gives:
    dense blocks use the $D$-dimensional smoother (ELK), diagonal (identity, zero)
    blocks $D$ independent scalar smoothers (quasi-ELK), block-diagonal blocks
    independent $k$-dimensional smoothers, and other structures by default the dense
    smoother. With `smooth=False`, the filtering means
    $\\mathbb{E}[x_t \\mid o_{1:t}]$ instead. With a `mesh`, the time axis is sharded
    over its axis `axis_name` ([`parallel_dynamics.KalmanSmoother`][])."""
    if mesh is not None:
        return sharded_kalman_smooth(
            blocks,
            offsets,
            observations,
            damping,
            mesh=mesh,
            axis_name=axis_name,
            parallel=parallel,
            smooth=smooth,
            radix=radix,
        )
    return blocks.kalman_blocks().smooth(
        offsets, observations, damping, parallel=parallel, smooth=smooth, radix=radix
    )


def sharded_kalman_smooth(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T D"],
    observations: Inexact[Array, "T D"],
    damping,
    *,
    mesh: Mesh,
    axis_name: str = "time",
    parallel: bool = True,
    smooth: bool = True,
    radix: int | None = None,
) -> Inexact[Array, "T D"]:
    """The Kalman smoother (or filter) mean of
    [`parallel_dynamics.KalmanSmoother`][] with the time axis sharded over the devices
    of `mesh.shape[axis_name]`, inside `jax.shard_map`.

    Device $p$ holds a contiguous chunk of the time axis.

    1. **Filter.** Each device builds the associative filtering elements of its steps
       (Särkkä & García-Fernández 2021) and combines them with a local prefix scan.
       The $P$ chunk totals (one element each: $D(3D + 2)$ numbers dense, $5D$
       diagonal, $D(3k + 2)$ for $k \\times k$ blocks) are all-gathered; each device
       combines those of the devices before it into its carry-in element and combines
       it with each of its prefixes: the filtering means and covariances of its steps.
    2. **Smoother.** The smoothing elements $x_t = E_t x_{t+1} + g_t$ need the next
       step's transition and offset: the last step of each chunk receives them from the
       right neighbour (one `jax.lax.ppermute` of one block and one vector). They form
       a reverse affine recurrence, solved like [`parallel_dynamics.internal.sharded_scan`][]:
       the $P$ chunk summaries ($D^2 + D$ numbers dense, $2D$ diagonal, $Dk + D$
       block-diagonal) are all-gathered and each device applies its carry-in.

    The trajectory, the blocks and the observations never leave their devices. When
    $T$ is not divisible by $P$ the time axis is padded at its end with zero blocks,
    offsets and observations: a step with a zero transition is independent of the
    past, so it changes neither the filter of the steps before it nor (its smoothing
    gain being zero) their smoothed means.
    """
    sharding = TimeSharding(mesh, axis_name)
    num_devices = sharding.num_devices
    length = offsets.shape[0]
    dtype = offsets.dtype
    damping = jnp.broadcast_to(jnp.asarray(damping, dtype), (length,))
    transitions = jax.tree.map(lambda x: x.astype(dtype), blocks.kalman_blocks())
    pad = time_padding(sharding, length)
    transitions, offsets, observations = pad_time(
        (transitions, offsets, observations), pad
    )
    damping = pad_time(damping, pad, fill=1)
    local = _scan_solver(parallel)

    def body(transitions, offsets, observations, damping):
        index = lax.axis_index(axis_name)
        combine = transitions.combine
        identity = transitions.filter_identity(dtype)
        # The first step of the whole trajectory absorbs the known x_0 = 0.
        first = jax.tree.map(
            lambda x: x.at[0].set(jnp.where(index == 0, 0, x[0])), transitions
        )
        elements = first.filter_elements(offsets, observations, damping)
        if parallel is False:

            def step(carry, element):
                carry = combine(carry, element)
                return carry, carry

            _, elements = lax.scan(step, identity, elements)
        else:
            elements = _scan.inclusive_scan(
                jax.vmap(combine), elements, identity, radix
            )
        totals = lax.all_gather(elements[-1], axis_name)

        def exclusive(carry, total):
            return combine(carry, total), carry

        _, entering = lax.scan(exclusive, identity, totals)
        elements = jax.vmap(combine, in_axes=(None, 0))(entering[index], elements)
        if not smooth:
            return transitions.filtered_means(elements)
        # Step t's smoothing element needs A_{t+1} and b_{t+1}; the last device gets
        # zeros (a zero gain: x_T is its filtering mean).
        shift = [(p, p - 1) for p in range(1, num_devices)]
        transitions_next, offsets_next = jax.tree.map(
            lambda x: jnp.concatenate([x[1:], lax.ppermute(x[:1], axis_name, shift)]),
            (transitions, offsets),
        )
        gains, means = transitions_next.smoothing(elements, offsets_next)
        return scan_chunk(gains, means, axis_name=axis_name, local=local, reverse=True)

    inputs = sharding.shard((transitions, offsets, observations, damping))
    out = shard_map_time(body, sharding, 4)(*inputs)
    return out[:length] if pad else out


class AbstractKalmanSolver(lx.AbstractLinearSolver):
    parallel: eqx.AbstractVar[bool | None]
    radix: eqx.AbstractVar[int | None]
    mesh: eqx.AbstractVar[Mesh | None]
    axis_name: eqx.AbstractVar[str]
    smooth: eqx.AbstractClassVar[bool]

    def __check_init__(self):
        radix = self.radix
        if radix is not None and (
            isinstance(radix, bool) or not isinstance(radix, int) or radix < 2
        ):
            raise ValueError(f"`radix` must be None or an int >= 2, got {radix!r}.")
        if self.mesh is not None:
            TimeSharding(self.mesh, self.axis_name)  # checks the arguments

    @property
    def time_sharding(self) -> TimeSharding | None:
        """The [`parallel_dynamics.TimeSharding`][] of the time axis across devices
        when the smoother has a `mesh`, otherwise `None`."""
        if self.mesh is None:
            return None
        return TimeSharding(self.mesh, self.axis_name)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not isinstance(operator, DampedBidiagonalOperator):
            raise ValueError(
                f"`{type(self).__name__}` solves `DampedBidiagonalOperator`s, got "
                f"{type(operator).__name__}."
            )
        return operator.bidiagonal.blocks, operator.damping

    def compute(
        self, state, vector, options: dict[str, Any]
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        del options
        blocks, damping = state
        residual, damped = vector
        root = jnp.sqrt(damping)
        root = root[:, None] if jnp.ndim(root) == 1 else root
        # Zero damping: no observation at all (its value is irrelevant).
        observations = damped / jnp.where(root > 0, root, 1)
        parallel = self.parallel
        if parallel is None:
            # As `AutoScan`: a CPU has little parallelism to exploit, and the parallel
            # dense elements cost O(D^3) per combination to save depth.
            on_cpu = jax.default_backend() == "cpu"
            parallel = not (on_cpu and blocks.kalman_blocks().matrix_elements)
        solution = kalman_smooth(
            blocks,
            residual,
            observations,
            damping,
            parallel=parallel,
            smooth=self.smooth,
            radix=self.radix,
            mesh=self.mesh,
            axis_name=self.axis_name,
        )
        return solution, lx.RESULTS.successful, {}

    def transpose(self, state, options: dict[str, Any]):
        raise NotImplementedError(
            f"`{type(self).__name__}` solves least-squares problems and cannot be "
            "transposed; differentiate through `pdyn.solve` with an implicit adjoint "
            "instead."
        )

    def conj(self, state, options: dict[str, Any]):
        blocks, damping = state
        return (blocks.conj(), damping), options

    def assume_full_rank(self):
        return True

    def undamped(self) -> lx.AbstractLinearSolver:
        """The scan that solves the same system without damping ($\\lambda = 0$, no
        observations) with the same configuration: sharded over the same mesh,
        parallel or sequential as `parallel` says."""
        if self.mesh is not None:
            return ShardedScan(self.mesh, self.axis_name)  # pyright: ignore
        return _scan_solver(self.parallel)


class KalmanSmoother(AbstractKalmanSolver):
    """Solves the damped least-squares problem of a
    [`parallel_dynamics.DampedBidiagonalOperator`][] exactly, by Kalman smoothing.

    The minimiser of $\\lVert L\\Delta - r\\rVert^2 + \\lVert\\sqrt\\lambda\\,\\Delta -
    s\\rVert^2$ is the posterior mean of the linear-Gaussian model
    $\\Delta_t = A_t \\Delta_{t-1} + r_t + w_t$, $w_t \\sim \\mathcal N(0, I)$, observed as
    $s_t / \\sqrt\\lambda = \\Delta_t + v_t$, $v_t \\sim \\mathcal N(0, \\lambda^{-1} I)$.
    With `parallel=True` the filter and the smoother are both associative scans
    (Särkkä & García-Fernández, IEEE TAC 2021): $O(\\log T)$ depth. With
    `parallel=False` they are a Kalman filter and a Rauch–Tung–Striebel pass with
    `lax.scan`: the reference, and the cheaper choice on CPU for dense blocks. The
    default, `parallel=None`, chooses as [`parallel_dynamics.AutoScan`][] does: the
    sequential passes for dense and block-diagonal blocks on CPU, the parallel ones
    otherwise.

    This is a Lineax solver rather than an Optimistix descent because it is pure
    linear algebra: the same exact damped step serves every damping strategy
    (adaptive or fixed) of [`parallel_dynamics.LevenbergMarquardt`][], and it can be
    used on its own with `lineax.linear_solve`.

    !!! Example

        ```python
        import jax.numpy as jnp
        import lineax as lx
        import parallel_dynamics as pdyn

        blocks = pdyn.DiagonalBlocks(1.5 * jnp.ones((100, 2)))  # unstable
        operator = pdyn.DampedBidiagonalOperator(
            pdyn.BlockBidiagonalOperator(blocks), damping=1.0
        )
        r, s = jnp.ones((100, 2)), jnp.zeros((100, 2))
        step = lx.linear_solve(operator, (r, s), pdyn.KalmanSmoother()).value
        ```
    """

    parallel: bool | None = None
    radix: int | None = None
    mesh: Mesh | None = eqx.field(static=True, default=None)
    axis_name: str = eqx.field(static=True, default="time")
    smooth: ClassVar[bool] = True


class KalmanFilter(AbstractKalmanSolver):
    """The causal counterpart of [`parallel_dynamics.KalmanSmoother`][]: the Kalman
    *filter* means $\\mathbb{E}[\\Delta_t \\mid s_{1:t}]$ of the same model, instead of
    the smoother means.

    This is **not** the least-squares solution of the
    [`parallel_dynamics.DampedBidiagonalOperator`][] (so not a Levenberg–Marquardt
    step): $\\Delta_t$ is the last component of the least-squares solution of the
    problem truncated at $t$, so it uses the residuals up to $t$ only. It is the step
    of the ELK paper's reference code. Being causal, it keeps the prefix property of
    Newton's method (residuals far ahead, which on unstable or chaotic trajectories are
    large and meaningless, cannot pull earlier states), and on such problems it often
    needs far fewer iterations than the exact step. Half the work of the smoother (no
    backward pass).
    """

    parallel: bool | None = None
    radix: int | None = None
    mesh: Mesh | None = eqx.field(static=True, default=None)
    axis_name: str = eqx.field(static=True, default="time")
    smooth: ClassVar[bool] = False


_kalman_args = """**Arguments:**

- `parallel`: `True` for the parallel (associative-scan) passes, `False` for the
    sequential ones (`lax.scan`), `None` (default) to choose by block structure and
    backend as [`parallel_dynamics.AutoScan`][] does.
- `radix`: for the parallel passes, `None` (default) for `lax.associative_scan`
    (smallest depth), or an integer $r \\geq 2$ for a tree with $r$ children per node:
    the same work, $O(r \\log_r T)$ depth, and several times faster to compile.
- `mesh`: `None` (default) for a single-device smoother, or a `jax.sharding.Mesh`
    whose axis `axis_name` is `AxisType.Auto` to shard the time axis over its devices
    (sequence parallelism, as [`parallel_dynamics.ShardedScan`][]): every device runs
    the filter and the smoother on its own chunk and only per-device summaries (one
    filtering element and one affine smoothing map per device) are all-gathered. See
    the "Sequence parallelism" guide.
- `axis_name`: the mesh axis that the time axis is sharded over (default `"time"`).
"""
KalmanSmoother.__init__.__doc__ = _kalman_args
KalmanFilter.__init__.__doc__ = _kalman_args
