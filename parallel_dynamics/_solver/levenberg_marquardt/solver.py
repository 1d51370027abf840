import functools as ft
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Int, PRNGKeyArray, PyTree, Scalar

from ..._blocks import mask_time
from ..._jacobian import AbstractJacobian, DenseJacobian
from ..._linear_solver.sharding import TimeSharding
from ..._linear_solver.smoother import KalmanFilter, KalmanSmoother
from ..._operator import BlockBidiagonalOperator
from ..base import (
    AbstractRecurrenceSolver,
    all_finite,
    as_recurrence,
    at_rounding_level,
    first_unconverged,
    state_at,
    time_sharding_of,
)
from ..newton import diagonal_jacobian
from .damping import AbstractDamping, AdaptiveDamping, NonmonotoneDamping
from .gain_ratio import gain_ratio
from .linear_step import damped_step, newton_step
from .stopping import init_stopping, StoppingState, update_stopping, verifies
from .time_window import TimeWindow


# The largest scaled defect at which a verification step is tried once the damping
# has collapsed (the bound on the update size below which DEER's stopping test trusts
# the rate of a superlinear iteration, applied to the defects).
NEWTON_DEFECTS = 100


class _LevenbergMarquardtState(eqx.Module):
    step: Int[Array, ""]
    window: Int[Array, ""]
    converged: Bool[Array, ""]
    stopping: StoppingState
    converged_prefix: Int[Array, ""]
    residual_norm: Scalar
    damping: Scalar
    damping_memory: Scalar
    result: optx.RESULTS


def _restart_at(recurrence, y, values, start, *, sharded: bool):
    """Sets the first unconverged state exactly, $y_k = f(y_{k-1}, x_k)$, where that is
    finite ($y_{k-1}$ is unchanged), which changes only $F_k$ (to zero) and $F_{k+1}$.
    Returns the new iterate and residual, and whether $f(y_{k-1}, x_k)$ is non-finite:
    with $y_{k-1}$ exact or converged, that is the recurrence's own trajectory
    failing."""
    length = y.shape[0]
    times = jnp.arange(length)
    residual = y - values
    finite_values = jnp.all(jnp.isfinite(values), axis=1)
    step_nonfinite = jnp.any((times == start) & ~finite_values)
    exact = ((times == start) & finite_values)[:, None]
    y = jnp.where(exact, values, y)
    following = jnp.minimum(start + 1, length - 1)
    take = ft.partial(state_at, sharded=sharded)
    inputs = jtu.tree_map(lambda x: take(x, following), recurrence.inputs)
    residual_following = take(y, following) - recurrence.step_at(
        take(y, start % length), inputs
    )
    residual = jnp.where(exact, 0, residual)
    residual = jnp.where(
        ((times == start + 1) & (start < length))[:, None],
        residual_following,
        residual,
    )
    return y, residual, step_nonfinite


class AbstractLevenbergMarquardt(AbstractRecurrenceSolver):
    """Levenberg–Marquardt on the trajectory: each step minimises

    $$\\lVert F(Y) - L \\Delta \\rVert^2 + \\lambda \\lVert \\Delta \\rVert^2,$$

    with $L$ the block bidiagonal operator of the blocks $A_t \\approx J_t$ (the
    `jacobian` structure), and proposes $Y - \\Delta$. That is the posterior mean of a
    linear-Gaussian state-space model, so the exact step is a Kalman smoother
    ([`parallel_dynamics.KalmanSmoother`][]) — parallel over time, and finite even
    where the undamped (DEER) scan overflows, because the damping bounds the filter.
    The causal step, the filtered mean of the same model
    ([`parallel_dynamics.KalmanFilter`][]), is the one the ELK paper's reference code
    takes.

    A trial step is accepted or rejected by the `damping` strategy, from the merit
    $\\lVert F \\rVert^2$ at the trial and the ratio $\\rho$ of its actual decrease to
    the decrease the linear model predicts, and the damping adapts. A trial with
    non-finite values is always rejected, so the iterate stays finite.

    **The first iteration** (`jacobi_start`) is a Jacobi sweep, $y_t \\leftarrow
    f(y_{t-1}, x_t)$ at every $t$ in parallel, where that lowers the merit. From the
    default initial guess ($y_0$ at every time) this carries each step's input, so
    the first linearisations are taken around states the inputs have already moved:
    on a map driven by noise from a state far from its typical one (the AR-GRU's seed
    3 starts at $x = -3$) the damped steps from the constant guess run away, and from
    the sweep they converge.

    **Time windows and the prefix guarantee.** On long chaotic or nearly neutral
    trajectories $\\lVert F \\rVert^2$ is so ill-conditioned that plain
    Levenberg–Marquardt stalls: its smallest singular values shrink with $T$, and the
    residuals far ahead (large and meaningless before the iterate has converged there)
    pull every earlier state. So each step works on a window of time
    $[k, k + W)$: the converged prefix $t < k$ (every defect below tolerance) stays
    fixed, $y_k$ is set to $f(y_{k-1}, x_k)$ exactly, and the damped least-squares
    problem of the window alone (no residuals or coupling outside it) is solved
    exactly. $W$ is a trust region in time (`window`,
    [`parallel_dynamics.TimeWindow`][]): it doubles after a good step and halves after
    a rejected one. A rejected trial still contributes its
    converged prefix. The converged prefix grows by at least one step per iteration,
    so after at most $T$ iterations every step satisfies the recurrence to tolerance.

    **Stopping.** Small defects alone do not make a trajectory accurate: on a nearly
    neutral map defects just below tolerance add up along the trajectory. Once every
    defect is below tolerance, the next step is an undamped (Newton, $\\lambda = 0$)
    step over the whole trajectory (the scan of `linear_solver` without damping: sharded,
    parallel or sequential as it is), which estimates the remaining error; the solve
    stops when that step is finite, keeps every defect
    $|F(Y)_t| < \\text{atol} + \\text{rtol}\\,|y_t|$, and the error it leaves,
    estimated from its size and the rate at which the step sizes shrink
    ([`parallel_dynamics.DEER`][]'s test), is below the same tolerance. Until one
    fails, this verification is tried earlier, as soon as the damping has collapsed
    below $\\varepsilon^2$ and every defect is within a factor 100 of tolerance: where
    Newton converges, the solve then stops after DEER's iterations. If the Newton step
    overflows (chaotic maps in single
    precision), damped steps continue and the check is retried; a problem on which it
    never succeeds ends with `RESULTS.nonlinear_max_steps_reached`, never with a wrong trajectory
    marked successful. A step that is non-finite at the current iterate (undefined
    at the initial guess, say) only limits the window to the time before it; the
    solve fails with `RESULTS.nonfinite` when the step is non-finite after the
    converged prefix, where the recurrence's own trajectory is.

    **The step.** [`parallel_dynamics.KalmanFilter`][] takes the causal step: not a
    least-squares solution, but on long nearly neutral or chaotic problems much faster
    to converge, and half the work, because corrections are carried forward in time
    only (the smoother's backward pass lets the meaningless residuals far ahead pull
    on states that are already nearly right).
    [`parallel_dynamics.KalmanSmoother`][] takes the exact Levenberg–Marquardt step
    of the window.
    """

    jacobian: eqx.AbstractVar[AbstractJacobian]
    damping: eqx.AbstractVar[AbstractDamping]
    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]
    window: eqx.AbstractVar[TimeWindow]
    jacobi_start: eqx.AbstractVar[bool]
    verbose: eqx.AbstractVar[bool]

    @property
    def time_sharding(self) -> TimeSharding | None:
        return time_sharding_of(self.linear_solver)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        self.check_tolerances()
        damping, memory = self.damping.init(y.dtype)
        return _LevenbergMarquardtState(
            step=jnp.array(0),
            window=self.window.init(y.shape[0]),
            converged=jnp.array(False),
            stopping=init_stopping(y.dtype),
            converged_prefix=jnp.array(0),
            residual_norm=jnp.array(jnp.inf, y.dtype),
            damping=damping,
            damping_memory=memory,
            result=optx.RESULTS.successful,
        )

    def default_max_steps(self, length: int) -> int:
        return 2 * length + 10

    def step(self, fn, y, args, options, state: _LevenbergMarquardtState, tags):
        del fn, options, tags
        recurrence = as_recurrence(args, self)
        length = recurrence.length
        times = jnp.arange(length)
        values, blocks = self.jacobian.linearise(
            recurrence, recurrence.previous(y), state.step
        )
        residual = y - values
        merit = jnp.sum(residual**2)
        defect = self.defect(y, residual)
        start = first_unconverged(defect)
        all_converged = start == length
        # The verification step is taken once every defect is below tolerance, or, until
        # one fails, as soon as the damping has collapsed below eps^2 (the last steps
        # were good Newton steps) with every defect within a factor `NEWTON_DEFECTS` of
        # tolerance: then the solve can stop where DEER would. (Not earlier: on a nearly
        # neutral map an undamped step from large defects far ahead is amplified where
        # the damped filter step stays bounded.)
        early = (state.damping <= jnp.finfo(y.dtype).eps ** 2) & (
            jnp.max(defect, initial=0) <= NEWTON_DEFECTS
        )
        newton = verifies(state.stopping, all_converged, early)
        # Only the verification's stopping test reads it (for quasi-Newton checks).
        rounding = at_rounding_level(residual, y, values, when=newton)
        y, residual, step_nonfinite = _restart_at(
            recurrence, y, values, start, sharded=self.time_sharding is not None
        )
        # The window ends before the first non-finite residual after k: non-finite
        # values there (a step undefined at the initial guess) only wait.
        nonfinite = ~jnp.all(jnp.isfinite(residual), axis=1) & (times > start)
        end = jnp.min(jnp.where(nonfinite, times, length))
        # Once every defect is below tolerance, and for the verification step, the step
        # spans the whole trajectory, prefix included: the size of a verification step
        # then measures the error left everywhere.
        active = self.window.active(times, start, end, state.window)
        active = active | all_converged | newton
        # The window's least-squares problem on its own: outside it, no residual and
        # no coupling to the previous step. (A_{k+1} is still the Jacobian at the old
        # y_k: the model is approximate there, the acceptance test is not.)
        bidiagonal = BlockBidiagonalOperator(mask_time(blocks, active))
        vector = jnp.where(active[:, None], residual, 0)
        pinned = 1 / jnp.finfo(y.dtype).eps
        damping = jnp.where(active, state.damping, pinned)
        update = jax.lax.cond(
            newton,
            lambda: newton_step(bidiagonal, vector, self.linear_solver),
            lambda: damped_step(bidiagonal, vector, damping, self.linear_solver),
        )
        update = jnp.where(active[:, None], update, 0)

        trial = y - update
        trial_residual = recurrence.residual(trial)
        ratio, window_merit, trial_window_merit = gain_ratio(
            residual, residual - bidiagonal.mv(update), trial_residual, active
        )
        # Only the window moves; residuals after it wait for the next step.
        in_window = active[:, None]
        finite = all_finite(
            jnp.where(in_window, trial, 0), jnp.where(in_window, trial_residual, 0)
        )
        accept, new_damping, memory = self.damping.update(
            state.damping,
            state.damping_memory,
            jnp.where(finite, ratio, -jnp.inf),
            window_merit,
            jnp.where(finite, trial_window_merit, jnp.inf),
        )
        accept = accept & finite
        trial_defect = self.defect(trial, trial_residual)
        trial_defect = jnp.where(jnp.isfinite(trial_defect), trial_defect, jnp.inf)
        trial_start = first_unconverged(trial_defect)
        # A verification step is taken only where it keeps every defect below
        # tolerance, whatever the damping strategy would allow: near the solution the
        # decrease of the merit is lost in rounding and the ratio says nothing. It
        # leaves the damping as it was.
        accept = jnp.where(newton, finite & (trial_start == length), accept)
        new_damping = jnp.where(newton, state.damping, new_damping)
        memory = jnp.where(newton, state.damping_memory, memory)
        # A rejected damped trial still contributes its converged prefix (at least
        # y_k, which is exact) where that is longer than the iterate's; the rest of
        # the trajectory stays as it was. (Once every defect is below tolerance the
        # step spans the whole trajectory, and the prefix of a rejected trial would
        # replace converged states and break the trajectory after it.)
        keep = accept | ((times < trial_start) & (trial_start > start) & ~newton)
        new_y = jnp.where(keep[:, None], trial, y)
        converged, stopping = update_stopping(
            state.stopping,
            newton=newton,
            accepted=accept,
            progress=accept & (trial_window_merit < window_merit),
            all_converged=all_converged,
            now_converged=jnp.where(accept, trial_start == length, all_converged),
            merit_before=jnp.sum(residual**2),
            merit_after=jnp.sum(
                jnp.where(keep[:, None], trial_residual, residual) ** 2
            ),
            diffsize=jnp.max(self.defect(y, update), initial=0),
            superlinear=self.superlinear,
            rounding=rounding,
            count_verifications=self.damping.accepts_every_step,
        )
        window = self.window.update(state.window, length, accept, ratio, state.damping)
        result = optx.RESULTS.where(
            step_nonfinite, optx.RESULTS.nonfinite, optx.RESULTS.successful
        )
        new_state = _LevenbergMarquardtState(
            step=state.step + 1,
            window=jnp.where(newton, state.window, window),
            converged=converged,
            stopping=stopping,
            converged_prefix=jnp.maximum(trial_start, jnp.minimum(start + 1, length)),
            residual_norm=jnp.where(
                accept, self.norm(trial_residual), self.norm(residual)
            ),
            damping=new_damping,
            damping_memory=memory,
            result=result,
        )
        if self.jacobi_start:
            # The first iteration is a Jacobi sweep, y_t <- f(y_{t-1}, x_t) at every t,
            # where that lowers the merit: from a constant initial guess it carries each
            # step's input, and the first linearisations are taken around it.
            jacobi_residual = jax.lax.cond(
                state.step == 0,
                lambda: recurrence.residual(values),
                lambda: jnp.full_like(residual, jnp.inf),
            )
            jacobi = all_finite(values, jacobi_residual) & (
                jnp.sum(jacobi_residual**2) < merit
            )
            new_y = jnp.where(jacobi, values, new_y)
            jacobi_state = eqx.tree_at(
                lambda s: (s.step, s.residual_norm),
                state,
                (state.step + 1, self.norm(jacobi_residual)),
            )
            new_state = jtu.tree_map(
                lambda a, b: jnp.where(jacobi, a, b), jacobi_state, new_state
            )
        if self.verbose:
            _print_progress(type(self).__name__, new_state, newton, accept, ratio)
        return new_y, new_state, None

    def terminate(self, fn, y, args, options, state: _LevenbergMarquardtState, tags):
        del fn, y, args, options, tags
        failed = state.result != optx.RESULTS.successful
        return state.converged | failed, state.result


def _print_progress(name, state, newton, accept, ratio):
    jax.debug.print(
        name + " step {step}: residual norm {res:.3e}, newton {newton}, "
        "ratio {ratio:.3f}, accepted {accept}, damping {damping:.3e}, "
        "converged prefix {prefix}, window {window}",
        step=state.step,
        res=state.residual_norm,
        newton=newton,
        prefix=state.converged_prefix,
        window=state.window,
        ratio=ratio,
        accept=accept,
        damping=state.damping,
    )


class LevenbergMarquardt(AbstractLevenbergMarquardt):
    """Levenberg–Marquardt with any Jacobian structure, damping strategy and smoother:
    the general point of which [`parallel_dynamics.ELK`][] and
    [`parallel_dynamics.QuasiELK`][] are named points."""

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobian = DenseJacobian()
    damping: AbstractDamping = NonmonotoneDamping()
    linear_solver: lx.AbstractLinearSolver = KalmanFilter()
    window: TimeWindow = TimeWindow()
    jacobi_start: bool = True
    verbose: bool = False


class ELK(AbstractLevenbergMarquardt):
    """ELK (Gonzalez et al., NeurIPS 2024): Levenberg–Marquardt on the trajectory with
    the dense Jacobian blocks. Each step is the causal one of the paper's reference
    code, a parallel Kalman filter ([`parallel_dynamics.KalmanFilter`][]), with the
    damping adapted by [`parallel_dynamics.NonmonotoneDamping`][] instead of fixed by
    hand (pass `damping=pdyn.FixedDamping(λ)` for the paper's fixed damping, and
    `linear_solver=pdyn.KalmanSmoother(), damping=pdyn.AdaptiveDamping()` for the
    textbook Levenberg–Marquardt step and damping).

    Stable where DEER overflows (unstable and chaotic maps, long sequences); $O(T D^3)$
    work and $O(T D^2)$ memory per step. As $\\lambda \\to 0$ it becomes DEER.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        step = lambda y, x, args: jnp.tanh(3.0 * y) + x  # DEER's first scan overflows
        xs = 0.01 * jnp.ones((2000, 1), jnp.float32)
        sol = pdyn.solve(step, pdyn.ELK(), jnp.zeros(1, jnp.float32), xs)
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    damping: AbstractDamping = NonmonotoneDamping()
    linear_solver: lx.AbstractLinearSolver = KalmanFilter()
    window: TimeWindow = TimeWindow()
    jacobi_start: bool = True
    verbose: bool = False

    @property
    def jacobian(self) -> AbstractJacobian:
        return DenseJacobian()


class QuasiELK(AbstractLevenbergMarquardt):
    """Quasi-ELK (Gonzalez et al., NeurIPS 2024): Levenberg–Marquardt with the diagonal
    of the Jacobian, each step $D$ independent scalar Kalman smoothers: $O(T D)$ work
    and memory, with the stability of ELK's damping. The diagonal is chosen as in
    [`parallel_dynamics.QuasiDEER`][].

    It takes the exact step (a Kalman smoother) with
    [`parallel_dynamics.AdaptiveDamping`][] by default, and begins with a Jacobi sweep
    like ELK: with the diagonal of the Jacobian, ELK's causal step and
    [`parallel_dynamics.NonmonotoneDamping`][] do not converge on the trained AR-GRU
    of the ELK paper (see "How to choose a solver").
    """

    rtol: float | None
    atol: float | None
    norm: Callable[[PyTree], Scalar]
    jacobian: AbstractJacobian
    damping: AbstractDamping
    linear_solver: lx.AbstractLinearSolver
    window: TimeWindow
    jacobi_start: bool
    verbose: bool

    def __init__(
        self,
        rtol: float | None = None,
        atol: float | None = None,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        diagonal: str | Callable | AbstractJacobian = "exact",
        num_probes: int = 1,
        key: PRNGKeyArray | None = None,
        damping: AbstractDamping = AdaptiveDamping(),
        linear_solver: lx.AbstractLinearSolver = KalmanSmoother(),
        window: TimeWindow = TimeWindow(),
        jacobi_start: bool = True,
        verbose: bool = False,
    ):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.jacobian = diagonal_jacobian(
            diagonal, num_probes, jr.key(0) if key is None else key
        )
        self.damping = damping
        self.linear_solver = linear_solver
        self.window = window
        self.jacobi_start = jacobi_start
        self.verbose = verbose


_args = """**Arguments:**

- `rtol`, `atol`: tolerances of the stopping test (default $\\varepsilon^{0.7}$ of the
    state's dtype).
- `norm`: the norm used in the stopping test; `optimistix.max_norm` by default.
"""
_tail = """- `window`: the trust region in time, a [`parallel_dynamics.TimeWindow`][].
- `jacobi_start`: begin with a Jacobi sweep where it lowers the merit.
- `verbose`: print the residual, step, ratio and damping at every iteration.
"""
_filter = """- `damping`: [`parallel_dynamics.NonmonotoneDamping`][] (default),
    [`parallel_dynamics.AdaptiveDamping`][] or [`parallel_dynamics.FixedDamping`][].
- `linear_solver`: the solver of each damped step; [`parallel_dynamics.KalmanFilter`][]
    (default) or [`parallel_dynamics.KalmanSmoother`][].
"""
_smoother = """- `damping`: [`parallel_dynamics.AdaptiveDamping`][] (default),
    [`parallel_dynamics.NonmonotoneDamping`][] or [`parallel_dynamics.FixedDamping`][].
- `linear_solver`: the solver of each damped step; [`parallel_dynamics.KalmanSmoother`][]
    (default) or [`parallel_dynamics.KalmanFilter`][].
"""
LevenbergMarquardt.__init__.__doc__ = (
    _args
    + "- `jacobian`: what $A_t$ is (an [`parallel_dynamics.AbstractJacobian`][]).\n"
    + _filter
    + _tail
)
ELK.__init__.__doc__ = _args + _filter + _tail
QuasiELK.__init__.__doc__ = (
    _args
    + """- `diagonal`, `num_probes`, `key`: the diagonal of the Jacobian, as in
    [`parallel_dynamics.QuasiDEER`][].
"""
    + _smoother
    + _tail
)
