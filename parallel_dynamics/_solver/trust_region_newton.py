from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Int, PRNGKeyArray, PyTree, Scalar

from .._blocks import map_time
from .._jacobian import AbstractJacobian, DenseJacobian
from .._linear_solver.scan_solvers import AutoScan
from .._linear_solver.sharding import TimeSharding
from .._operator import BlockBidiagonalOperator
from .base import (
    AbstractRecurrenceSolver,
    all_finite,
    as_recurrence,
    at_rounding_level,
    converged,
    first_unconverged,
    time_sharding_of,
)
from .horizon import (
    continue_beyond,
    hold_beyond,
    squared_residual_beyond,
    trusted_horizon,
)
from .newton import diagonal_jacobian, finite_or_zero


class _TrustRegionState(eqx.Module):
    step: Int[Array, ""]
    # Consecutive steps taken over the whole trajectory: the stopping test's rate
    # needs two of them.
    full_steps: Int[Array, ""]
    diffsize: Scalar
    diffsize_prev: Scalar
    rounding: Bool[Array, ""]
    horizon: Int[Array, ""]
    residual_norm: Scalar
    result: optx.RESULTS


class AbstractTrustRegionNewton(AbstractRecurrenceSolver):
    """Newton-type iteration with a trust region in time.

    Each iteration computes the (quasi-)Newton step of [`parallel_dynamics.Newton`][],
    $\\Delta_t = A_t \\Delta_{t-1} + F(Y)_t$, and evaluates the residual $F'$ at the
    trial $Y - \\Delta$. The linear model behind the step predicts $F' = 0$; it is
    trusted up to the first time $s$ at which the trial is non-finite or, with $k$ the
    first state that does not satisfy the recurrence to tolerance, the gain ratio

    $$\\rho_s = \\frac{\\sum_{k \\le t \\le s} \\lVert F_t \\rVert^2 -
    \\lVert F'_t \\rVert^2}{\\sum_{k \\le t \\le s} \\lVert F_t \\rVert^2}$$

    falls below $\\rho_{\\min}$ (`min_ratio`, default 0) and the trial does not
    satisfy the recurrence to tolerance at $s$ (on the scale of the current iterate).
    Up to that horizon the trial is taken. Beyond it the new iterate is, with
    $\\Phi$ the sum of $\\lVert F_t \\rVert^2$ over the times from the horizon on:

    1. the trial, where its $\\Phi$ is smaller than the continuation's: from a good
        initial guess Newton's step converges although its residual grows somewhere
        on the way;
    2. otherwise the continuation, the current iterate shifted by the correction at
        the last trusted state, so that the next linearisation beyond the horizon is
        taken around where the trajectory has got to, not around the initial guess;
    3. but where the continuation's $\\Phi$ exceeds the current iterate's (or it
        overflows), the last trusted state at every later time.

    This costs one evaluation of the step more than DEER's per iteration (the
    residual at the trial), and one more in iterations whose horizon ends before $T$
    (the residual at the continuation). There is no damping parameter.

    Where every Newton step decreases the residual on every interval this *is* DEER,
    with DEER's iteration counts. Where undamped Newton overflows or diverges
    (oscillators and orbits from a constant initial guess, stretches along which the
    linearisation at a wrong state amplifies), the iteration advances like a
    time-stepping scheme whose steps are as long as the linearisation is right. On
    nearly neutral maps driven by inputs (a trained autoregressive RNN) those steps
    can be short: see the documentation's "How to choose a solver".

    The horizon is past $k$, so the first unconverged state is made exact at every
    iteration and at most $T$ iterations are needed. The solve stops as
    [`parallel_dynamics.Newton`][] does, on the sizes of consecutive steps over the
    whole trajectory. A non-finite $f(y_{k-1}, x_k)$ is the recurrence's own
    trajectory failing and fails the solve with `RESULTS.nonfinite`; non-finite
    trials after $k$ only end the horizon.
    """

    jacobian: eqx.AbstractVar[AbstractJacobian]
    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]
    min_ratio: eqx.AbstractVar[float]
    max_growth: eqx.AbstractVar[float]
    verbose: eqx.AbstractVar[bool]

    @property
    def time_sharding(self) -> TimeSharding | None:
        return time_sharding_of(self.linear_solver)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        self.check_tolerances()
        inf = jnp.array(jnp.inf, y.dtype)
        return _TrustRegionState(
            step=jnp.array(0),
            full_steps=jnp.array(0),
            diffsize=inf,
            diffsize_prev=inf,
            rounding=jnp.array(False),
            horizon=jnp.array(y.shape[0]),
            residual_norm=inf,
            result=optx.RESULTS.successful,
        )

    def step(self, fn, y, args, options, state: _TrustRegionState, tags):
        del fn, options, tags
        recurrence = as_recurrence(args, self)
        length = recurrence.length
        values, blocks = self.jacobian.linearise(
            recurrence, recurrence.previous(y), state.step
        )
        blocks = map_time(finite_or_zero, blocks)
        residual = y - values
        operator = BlockBidiagonalOperator(blocks)
        update = lx.linear_solve(
            operator, residual, self.linear_solver, throw=False
        ).value
        trial = y - update
        trial_residual = recurrence.residual(trial)
        start = first_unconverged(self.defect(y, residual))
        # The trial's defects are measured against the scale of the current iterate:
        # a trial far off the trajectory can satisfy the recurrence relative to its
        # own size (where the step is linear in a huge state).
        horizon = trusted_horizon(
            residual,
            trial_residual,
            jnp.max(self.defect(y, trial_residual), axis=1) < 1,
            start,
            self.min_ratio,
            self.max_growth,
        )
        # Where every earlier state satisfies the recurrence, a non-finite
        # f(y_{k-1}, x_k) is the recurrence's own trajectory failing.
        times = jnp.arange(length)
        finite_values = jnp.all(jnp.isfinite(values), axis=1)
        recurrence_finite = ~jnp.any((times == start) & ~finite_values)
        # Beyond the horizon: the trial where it leaves a smaller residual there than
        # the continuation. From a good initial guess the trial is usually better
        # (Newton converges although the residual grows somewhere on the way); from a
        # poor one, where the trial has left the trajectory, the continuation.
        continued = continue_beyond(y, trial, horizon)
        # Only iterations whose horizon ends before T evaluate the continuation.
        continued_merit = lax.cond(
            horizon < length,
            lambda: squared_residual_beyond(recurrence.residual(continued), horizon),
            lambda: jnp.zeros((), y.dtype),
        )
        trial_beyond = (
            squared_residual_beyond(trial_residual, horizon) < continued_merit
        )
        # A continuation that increases the residual beyond the horizon (a shifted
        # guess that has left the trajectory) is replaced by the last trusted state.
        held = continued_merit > squared_residual_beyond(residual, horizon)
        new_y = jnp.where(
            trial_beyond,
            trial,
            jnp.where(held, hold_beyond(trial, horizon), continued),
        )
        accepted = recurrence_finite & all_finite(new_y)
        new_y = jnp.where(accepted, new_y, y)
        full = recurrence_finite & ((horizon == length) | trial_beyond)
        diffsize = jnp.where(
            full, self.scaled_size(y, update), jnp.array(jnp.inf, y.dtype)
        )
        new_state = _TrustRegionState(
            step=state.step + 1,
            full_steps=jnp.where(full, state.full_steps + 1, 0),
            diffsize=diffsize,
            diffsize_prev=state.diffsize,
            rounding=at_rounding_level(residual, y, values, when=diffsize < 1),
            horizon=horizon,
            residual_norm=self.norm(residual) if self.verbose else state.residual_norm,
            result=optx.RESULTS.where(
                accepted, optx.RESULTS.successful, optx.RESULTS.nonfinite
            ),
        )
        if self.verbose:
            jax.debug.print(
                type(self).__name__ + " step {step}: residual norm {res:.3e}, "
                "trusted horizon {horizon}, scaled step {diff:.3e}",
                step=new_state.step,
                res=new_state.residual_norm,
                horizon=horizon,
                diff=diffsize,
            )
        return new_y, new_state, None

    def terminate(self, fn, y, args, options, state: _TrustRegionState, tags):
        del fn, y, options, tags
        recurrence = as_recurrence(args, self)
        # The prefix property: after T iterations the trajectory is exact.
        exact = state.step >= recurrence.length
        failed = state.result != optx.RESULTS.successful
        done = converged(
            state.full_steps,
            state.diffsize,
            state.diffsize_prev,
            superlinear=self.superlinear,
            rounding=state.rounding,
        )
        return done | exact | failed, state.result


def _check_trust_options(min_ratio, max_growth):
    if not -np.inf < min_ratio < 1:
        raise ValueError(f"`min_ratio` must lie in (-inf, 1), got {min_ratio}.")
    if not max_growth >= 1:
        raise ValueError(f"`max_growth` must be at least 1, got {max_growth}.")


class TrustRegionNewton(AbstractTrustRegionNewton):
    """Newton-type iteration with a trust region in time, with any Jacobian structure
    and any scan: the general point of which [`parallel_dynamics.TrustDEER`][] and
    [`parallel_dynamics.QuasiTrustDEER`][] are named points.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        step = lambda y, x, args: jnp.tanh(0.5 * y + x)
        solver = pdyn.TrustRegionNewton(jacobian=pdyn.BlockDiagonalJacobian(2))
        sol = pdyn.solve(step, solver, jnp.zeros(4), jnp.ones((100, 4)))
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobian = DenseJacobian()
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    min_ratio: float = 0.0
    max_growth: float = np.inf
    verbose: bool = False

    def __check_init__(self):
        _check_trust_options(self.min_ratio, self.max_growth)


class TrustDEER(AbstractTrustRegionNewton):
    """DEER with a trust region in time: Newton's method on the trajectory with the
    dense Jacobian blocks, each step taken as far along the trajectory as its linear
    model is trusted (see [`parallel_dynamics.AbstractTrustRegionNewton`][]).

    Where DEER converges this is DEER; where DEER overflows or diverges (oscillators,
    orbits, unstable stretches) it converges in a number of iterations set by how far
    the linearisation reaches rather than by $T$. The robust default for dynamics you
    know nothing about, at DEER's cost per iteration ($O(T D^3)$ work, $O(T D^2)$
    memory) plus one or two more evaluations of the step.

    !!! Example

        ```python
        import diffrax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def lotka_volterra(t, y, args):
            prey, predator = y
            return jnp.stack([1.5 * prey - prey * predator, predator * (prey - 3.0)])

        sol = pdyn.diffeqsolve(
            diffrax.ODETerm(lotka_volterra), diffrax.Tsit5(), 0.0, 20.0, 0.01,
            jnp.array([10.0, 1.0]), parallel=pdyn.TrustDEER(),
        )  # DEER ends in overflow here
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    min_ratio: float = 0.0
    max_growth: float = np.inf
    verbose: bool = False

    def __check_init__(self):
        _check_trust_options(self.min_ratio, self.max_growth)

    @property
    def jacobian(self) -> AbstractJacobian:
        return DenseJacobian()


class QuasiTrustDEER(AbstractTrustRegionNewton):
    """Quasi-DEER with a trust region in time: the diagonal of the Jacobian (chosen as
    in [`parallel_dynamics.QuasiDEER`][]), each step taken as far along the trajectory
    as its linear model is trusted (see
    [`parallel_dynamics.AbstractTrustRegionNewton`][]). $O(T D)$ work and memory per
    iteration.
    """

    rtol: float | None
    atol: float | None
    norm: Callable[[PyTree], Scalar]
    jacobian: AbstractJacobian
    linear_solver: lx.AbstractLinearSolver
    min_ratio: float
    max_growth: float
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
        min_ratio: float = 0.0,
        max_growth: float = np.inf,
        verbose: bool = False,
    ):
        _check_trust_options(min_ratio, max_growth)
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.jacobian = diagonal_jacobian(
            diagonal, num_probes, jr.key(0) if key is None else key
        )
        self.linear_solver = linear_solver
        self.min_ratio = min_ratio
        self.max_growth = max_growth
        self.verbose = verbose


_args = """**Arguments:**

- `rtol`, `atol`: tolerances of the stopping test (default $\\varepsilon^{0.7}$ of the
    state's dtype).
- `norm`: the norm used in the stopping test; `optimistix.max_norm` by default.
"""
_tail = """- `linear_solver`: the Lineax solver of each step's block bidiagonal system;
    [`parallel_dynamics.AutoScan`][] by default.
- `min_ratio`: $\\rho_{\\min}$, the smallest gain ratio on a prefix of time for which
    the step is trusted there (default 0: the trial must not increase the squared
    residual on any interval from the first unconverged state).
- `max_growth`: the factor by which the trial may increase the residual at a single
    time where it is trusted (default: no bound).
- `verbose`: print the residual norm, the trusted horizon and the scaled step at every
    iteration.
"""
TrustRegionNewton.__init__.__doc__ = (
    _args
    + "- `jacobian`: what $A_t$ is (an [`parallel_dynamics.AbstractJacobian`][]).\n"
    + _tail
)
TrustDEER.__init__.__doc__ = _args + _tail
QuasiTrustDEER.__init__.__doc__ = (
    _args
    + """- `diagonal`, `num_probes`, `key`: the diagonal of the Jacobian, as in
    [`parallel_dynamics.QuasiDEER`][].
"""
    + _tail
)
