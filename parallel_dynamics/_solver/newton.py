from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import optimistix as optx
from jaxtyping import PRNGKeyArray, PyTree, Scalar

from .._blocks import map_time
from .._jacobian import (
    AbstractJacobian,
    BlockDiagonalJacobian,
    DenseJacobian,
    DiagonalFunctionJacobian,
    ExactDiagonalJacobian,
    StochasticDiagonalJacobian,
)
from .._linear_solver.iterative import IterativeScan
from .._linear_solver.matrix_free import MatrixFreeScan
from .._linear_solver.scan_solvers import AbstractScanSolver, AutoScan
from .._linear_solver.sharding import TimeSharding
from .._operator import BlockBidiagonalOperator
from .base import (
    AbstractRecurrenceSolver,
    all_finite,
    as_recurrence,
    at_rounding_level,
    IterationState,
    print_progress,
    time_sharding_of,
)


# The library's scans (every `AbstractScanSolver`: parallel, sequential, chunked,
# automatic, sharded; and the iterative and matrix-free ones) add the residual into
# the update at every step ($\Delta_t = A_t \Delta_{t-1} + F_t$; the iterative scan
# starts from the scan of $F$ and only adds corrections to it), so a non-finite
# residual makes the update non-finite. A generic Lineax solver need not: CG on the
# normal equations returns zero for a NaN right-hand side.
_SCANS = (AbstractScanSolver, IterativeScan, MatrixFreeScan)


def finite_or_zero(x):
    return jnp.where(jnp.isfinite(x), x, 0)


class AbstractNewton(AbstractRecurrenceSolver):
    """Newton-type iteration over the whole trajectory.

    Each iteration linearises the step around the current trajectory $Y$ with blocks
    $A_t \\approx J_t = \\partial f / \\partial y\\,(y_{t-1}, x_t)$ (the `jacobian`
    structure) and solves the block bidiagonal system

    $$\\Delta_t = A_t \\Delta_{t-1} + F(Y)_t, \\qquad \\Delta_0 = 0,$$

    with `linear_solver` (a parallel, chunked or sequential scan), then sets
    $Y \\leftarrow Y - \\Delta$. With $A_t = J_t$ this is Newton's method (DEER); with
    the diagonal of $J_t$, quasi-Newton (quasi-DEER); with $A_t = I$ Picard iteration and
    with $A_t = 0$ Jacobi iteration.

    Whatever $A_t$ is, after $i$ iterations the first $i$ states are exact, so at most
    $T$ iterations are needed. The solve stops when the error left after the update,
    estimated from the size of the update
    $d = \\lVert \\Delta / (\\text{atol} + \\text{rtol}\\,|Y|)\\rVert$ and the observed
    contraction rate $\\theta$ as $d\\,\\theta / (1 - \\theta)$, is below 1 (see
    [`parallel_dynamics.AbstractRecurrenceSolver`][]). A non-finite
    update is never accepted: the solve stops with `RESULTS.nonfinite` and keeps the
    last finite iterate. Non-finite entries of $A_t$ (a derivative that is infinite
    where the step is finite, as for $\\sqrt{y}$ at $0$) are taken as zero: any $A_t$
    gives a valid iteration.
    """

    jacobian: eqx.AbstractVar[AbstractJacobian]
    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]
    verbose: eqx.AbstractVar[bool]

    @property
    def time_sharding(self) -> TimeSharding | None:
        return time_sharding_of(self.linear_solver)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        self.check_tolerances()
        return self.init_state(y)

    def step(self, fn, y, args, options, state: IterationState, tags):
        del fn, options, tags
        recurrence = as_recurrence(args, self)
        previous = recurrence.previous(y)
        values, blocks = self.jacobian.linearise(recurrence, previous, state.step)
        # A_1 multiplies the zero Delta_0 (inf * 0 would make the scans NaN), and any
        # A_t gives a valid iteration: a derivative that is infinite where the step is
        # finite (sqrt at 0) becomes 0 instead of failing the solve.
        blocks = map_time(finite_or_zero, blocks)
        residual = y - values
        operator = BlockBidiagonalOperator(blocks)
        update = lx.linear_solve(operator, residual, self.linear_solver, throw=False)
        new_y = y - update.value
        diffsize, finite = self.scaled_size_and_finite(y, update.value, new_y)
        if not isinstance(self.linear_solver, _SCANS):
            # With a scan a non-finite residual already makes `new_y` non-finite.
            finite = finite & all_finite(residual)
        # Only the stopping test's rules for small updates read it.
        rounding = at_rounding_level(residual, y, values, when=diffsize < 1)
        new_state = IterationState(
            step=state.step + 1,
            diffsize=diffsize,
            diffsize_prev=state.diffsize,
            rounding=rounding,
            # Only printed.
            residual_norm=self.norm(residual) if self.verbose else state.residual_norm,
            result=optx.RESULTS.where(
                finite, optx.RESULTS.successful, optx.RESULTS.nonfinite
            ),
        )
        if self.verbose:
            print_progress(type(self).__name__, new_state)
        # = where(finite, new_y, y), in one pass with the finiteness reduction.
        return y - jnp.where(finite, update.value, 0), new_state, None


class Newton(AbstractNewton):
    """Newton-type iteration with any Jacobian structure and any scan: the general
    point of the grid (how to iterate $\\times$ what $A_t$ is $\\times$ how the
    recurrence is solved) of which [`parallel_dynamics.DEER`][],
    [`parallel_dynamics.QuasiDEER`][], [`parallel_dynamics.Picard`][] and
    [`parallel_dynamics.Jacobi`][] are named points.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        step = lambda y, x, args: jnp.tanh(0.5 * y + x)
        solver = pdyn.Newton(
            rtol=1e-6, atol=1e-6, jacobian=pdyn.BlockDiagonalJacobian(2)
        )
        sol = pdyn.solve(step, solver, jnp.zeros(4), jnp.ones((100, 4)))
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobian = DenseJacobian()
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    verbose: bool = False


class DEER(AbstractNewton):
    """DEER (Lim et al., ICLR 2024): Newton's method on the trajectory with the dense
    Jacobian blocks $A_t = J_t$.

    Quadratic convergence near the solution; $O(T D^3)$ work and $O(T D^2)$ memory per
    iteration. On unstable or chaotic maps the products $A_t \\cdots A_s$ inside the scan
    overflow in floating point: prefer [`parallel_dynamics.ELK`][] there.

    !!! Example

        ```python
        import jax
        import equinox as eqx
        import parallel_dynamics as pdyn

        cell = eqx.nn.GRUCell(2, 8, key=jax.random.key(0))
        step = lambda h, x, cell: cell(x, h)
        xs = jax.random.normal(jax.random.key(1), (1000, 2))
        sol = pdyn.solve(step, pdyn.DEER(), jax.numpy.zeros(8), xs, cell)
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    verbose: bool = False

    @property
    def jacobian(self) -> AbstractJacobian:
        return DenseJacobian()


_DIAGONALS = ("exact", "elementwise", "stochastic")


def diagonal_jacobian(
    diagonal: str | Callable | AbstractJacobian, num_probes: int, key: PRNGKeyArray
) -> AbstractJacobian:
    """The diagonal Jacobian structure named by the `diagonal` argument of the quasi
    solvers."""
    if isinstance(diagonal, AbstractJacobian):
        return diagonal
    if diagonal == "exact":
        return ExactDiagonalJacobian()
    if diagonal == "elementwise":
        return ExactDiagonalJacobian(elementwise=True)
    if diagonal == "stochastic":
        return StochasticDiagonalJacobian(num_probes=num_probes, key=key)
    if callable(diagonal):
        return DiagonalFunctionJacobian(diagonal)
    raise ValueError(
        f"`diagonal` must be one of {_DIAGONALS}, a callable "
        "`diagonal_fn(y_prev, x, args)` or a `parallel_dynamics.AbstractJacobian`; got "
        f"{diagonal!r}."
    )


class QuasiDEER(AbstractNewton):
    """Quasi-DEER (Gonzalez et al., NeurIPS 2024): quasi-Newton on the trajectory with
    diagonal blocks $A_t = \\operatorname{diag}(J_t)$.

    Linear convergence, but each iteration costs only $O(T D)$ work and memory beyond the
    diagonal itself, and the diagonal scan is elementwise. The diagonal is

    - `"exact"` (default): the exact diagonal of $J_t$;
    - `"elementwise"`: the exact diagonal from a single Jacobian-vector product, valid
      only for steps whose Jacobian is diagonal by construction;
    - `"stochastic"`: a Hutchinson estimate from `num_probes` Rademacher probes drawn
      from `key`;
    - a callable `diagonal_fn(y_prev, x_t, args)` returning the diagonal as a PyTree
      shaped like the state;
    - or any [`parallel_dynamics.AbstractJacobian`][] with diagonal blocks.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        step = lambda y, x, args: jnp.tanh(0.9 * y + x)
        xs = jax.random.normal(jax.random.key(0), (1000, 4))
        sol = pdyn.solve(step, pdyn.QuasiDEER(diagonal="elementwise"), jnp.zeros(4), xs)
        ```
    """

    rtol: float | None
    atol: float | None
    norm: Callable[[PyTree], Scalar]
    jacobian: AbstractJacobian
    linear_solver: lx.AbstractLinearSolver
    verbose: bool

    def __init__(
        self,
        rtol: float | None = None,
        atol: float | None = None,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        diagonal: str | Callable | AbstractJacobian = "exact",
        num_probes: int = 1,
        key: PRNGKeyArray | None = None,
        linear_solver: lx.AbstractLinearSolver = AutoScan(),
        verbose: bool = False,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.linear_solver = linear_solver
        self.verbose = verbose
        self.jacobian = diagonal_jacobian(
            diagonal, num_probes, jr.key(0) if key is None else key
        )


class BlockQuasiDEER(AbstractNewton):
    """Block quasi-Newton: $A_t$ = the $k \\times k$ diagonal blocks of $J_t$, between
    [`parallel_dynamics.QuasiDEER`][] ($k = 1$) and [`parallel_dynamics.DEER`][]
    ($k = D$). $O(T D k^2)$ work and $O(T D k)$ memory per iteration; `block_size` must
    divide the state size.
    """

    rtol: float | None
    atol: float | None
    norm: Callable[[PyTree], Scalar]
    jacobian: AbstractJacobian
    linear_solver: lx.AbstractLinearSolver
    verbose: bool

    def __init__(
        self,
        block_size: int,
        rtol: float | None = None,
        atol: float | None = None,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        linear_solver: lx.AbstractLinearSolver = AutoScan(),
        verbose: bool = False,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.jacobian = BlockDiagonalJacobian(block_size)
        self.linear_solver = linear_solver
        self.verbose = verbose


_newton_args = """
- `rtol`: relative tolerance on the update and the residual. Defaults to
    $\\varepsilon^{0.7}$ of the state's dtype (`1.4e-5` in float32, `1.1e-11` in
    float64).
- `atol`: absolute tolerance, with the same default.
- `norm`: the norm used in the stopping test; `optimistix.max_norm` by default.
"""
_solver_args = """- `linear_solver`: the Lineax solver of the block bidiagonal system:
    [`parallel_dynamics.AutoScan`][] (default), [`parallel_dynamics.ParallelScan`][],
    [`parallel_dynamics.ChunkedScan`][] or [`parallel_dynamics.SequentialScan`][].
- `verbose`: print the residual norm and the scaled update at every iteration.
"""

Newton.__init__.__doc__ = (
    "**Arguments:**\n"
    + _newton_args
    + """- `jacobian`: what $A_t$ is: an [`parallel_dynamics.AbstractJacobian`][] such as
    [`parallel_dynamics.DenseJacobian`][] (default),
    [`parallel_dynamics.ExactDiagonalJacobian`][], [`parallel_dynamics.StochasticDiagonalJacobian`][],
    [`parallel_dynamics.DiagonalFunctionJacobian`][],
    [`parallel_dynamics.BlockDiagonalJacobian`][],
    [`parallel_dynamics.IdentityJacobian`][] or [`parallel_dynamics.ZeroJacobian`][].
"""
    + _solver_args
)
DEER.__init__.__doc__ = "**Arguments:**\n" + _newton_args + _solver_args
QuasiDEER.__init__.__doc__ = (
    "**Arguments:**\n"
    + _newton_args
    + """- `diagonal`: `"exact"`, `"elementwise"`, `"stochastic"`, a callable
    `diagonal_fn(y_prev, x_t, args)`, or an [`parallel_dynamics.AbstractJacobian`][].
- `num_probes`: the number of Rademacher probes for `diagonal="stochastic"`.
- `key`: the PRNG key of the stochastic diagonal (default `jax.random.key(0)`).
"""
    + _solver_args
)
BlockQuasiDEER.__init__.__doc__ = (
    "**Arguments:**\n\n- `block_size`: $k$, which must divide the state size $D$."
    + _newton_args
    + _solver_args
)
