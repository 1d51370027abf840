from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.sharding import Mesh
from jaxtyping import Array, Inexact, PyTree, Scalar

from .._blocks import AbstractBlocks
from .._operator import DampedBidiagonalOperator
from .scan import AutoScan, ParallelScan, SequentialScan
from .sharded import check_mesh, sharded_kalman_smooth, ShardedScan


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
            check_mesh(self.mesh, self.axis_name)

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
        if self.parallel is None:
            return AutoScan()
        return ParallelScan() if self.parallel else SequentialScan()


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
