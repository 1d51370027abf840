import abc
import functools as ft
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Int, PRNGKeyArray, PyTree, Scalar

from .._blocks import mask_time
from .._jacobian import AbstractJacobian, DenseJacobian
from .._linear_solver.scan import AutoScan
from .._linear_solver.sharded import ShardedScan, time_mesh
from .._linear_solver.smoother import DampedBidiagonalOperator, KalmanSmoother
from .._operator import BlockBidiagonalOperator
from .base import (
    AbstractRecurrenceSolver,
    all_finite,
    as_recurrence,
    at_rounding_level,
    converged as converged_by_rate,
    first_unconverged,
)
from .newton import diagonal_jacobian


class AbstractDamping(eqx.Module):
    """How the Levenberg–Marquardt damping $\\lambda$ evolves and which steps are
    accepted."""

    @abc.abstractmethod
    def init(self, dtype) -> tuple[Scalar, Scalar]:
        """The initial damping and the strategy's own scalar state."""

    @abc.abstractmethod
    def update(
        self, damping: Scalar, memory: Scalar, ratio: Scalar
    ) -> tuple[Bool[Array, ""], Scalar, Scalar]:
        """Given the ratio $\\rho$ of actual to predicted decrease of $\\lVert F\\rVert^2$
        for a finite trial step, whether to accept it, the next damping and the next
        state."""


class FixedDamping(AbstractDamping):
    """A constant damping $\\lambda$ and every finite step accepted: the behaviour of
    the ELK paper's reference code (which writes $\\lambda = 1/\\sigma^2$ with a prior
    variance $\\sigma^2$), kept for comparison. It must be tuned by hand per problem.
    """

    damping: float

    def __check_init__(self):
        if not 0 < self.damping < np.inf:
            raise ValueError(
                f"`damping` must be positive and finite, got {self.damping}."
            )

    def init(self, dtype):
        return jnp.array(self.damping, dtype), jnp.array(1.0, dtype)

    def update(self, damping, memory, ratio):
        del ratio
        return jnp.array(True), damping, memory


class AdaptiveDamping(AbstractDamping):
    """Nielsen's rule (Nielsen 1999; Madsen, Nielsen & Tingleff 2004): accept a step
    when $\\rho > $ `accept_ratio`; then $\\lambda \\leftarrow \\lambda
    \\max(\\tfrac13, 1 - (2\\rho - 1)^3)$ and $\\nu \\leftarrow 2$, otherwise
    $\\lambda \\leftarrow \\nu \\lambda$ and $\\nu \\leftarrow 2 \\nu$. Good steps shrink
    $\\lambda$ towards Newton's method; each rejection grows it ever faster.
    """

    initial: float = 1.0
    accept_ratio: float = 1e-4
    max_damping: float = 1e16

    def __check_init__(self):
        if not 0 < self.initial < np.inf:
            raise ValueError(
                f"`initial` must be positive and finite, got {self.initial}."
            )
        # The damping is clipped to `max_damping`: a negative or infinite one makes
        # the Kalman weights 1 / (1 + λ) and λ / (1 + λ) infinite or NaN.
        if not self.initial <= self.max_damping < np.inf:
            raise ValueError(
                "`max_damping` must be finite and at least `initial` "
                f"({self.initial}), got {self.max_damping}."
            )
        if not 0 <= self.accept_ratio < 1:
            raise ValueError(
                f"`accept_ratio` must lie in [0, 1), got {self.accept_ratio}."
            )

    def init(self, dtype):
        return jnp.array(self.initial, dtype), jnp.array(2.0, dtype)

    def update(self, damping, memory, ratio):
        accept = ratio > self.accept_ratio
        tiny = np.finfo(damping.dtype).tiny ** 0.5
        shrink = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        new_damping = jnp.where(accept, damping * shrink, damping * memory)
        new_damping = jnp.clip(new_damping, tiny, self.max_damping)
        new_memory = jnp.where(accept, 2.0, jnp.minimum(2 * memory, 2.0**30))
        return accept, new_damping, new_memory.astype(memory.dtype)


class _LevenbergMarquardtState(eqx.Module):
    step: Int[Array, ""]
    window: Int[Array, ""]
    converged: Bool[Array, ""]
    newton_failed: Bool[Array, ""]
    newton_steps: Int[Array, ""]
    floor_steps: Int[Array, ""]
    newton_diffsize: Scalar
    converged_prefix: Int[Array, ""]
    residual_norm: Scalar
    damping: Scalar
    damping_memory: Scalar
    result: optx.RESULTS


# Damped steps in a row that fail to decrease the merit once every defect is below
# tolerance, after which the rounding floor is taken to be reached. With adaptive
# damping that many rejections multiply the damping by 2^55.
_FLOOR_STEPS = 10


def _take(x: Array, index, *, sharded: bool) -> Array:
    """`x[index]` along the time axis. When `x` is sharded along time, as a masked
    sum: a reduction, which stays local per device (plus an all-reduce of one row),
    where a dynamic index would make XLA gather the whole array."""
    if not sharded or not jnp.issubdtype(x.dtype, jnp.number):
        return x[index]
    mask = (jnp.arange(x.shape[0]) == index).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype)), axis=0, dtype=x.dtype)


class AbstractLevenbergMarquardt(AbstractRecurrenceSolver):
    """Levenberg–Marquardt on the trajectory: each step minimises

    $$\\lVert F(Y) - L \\Delta \\rVert^2 + \\lambda \\lVert \\Delta \\rVert^2,$$

    with $L$ the block bidiagonal operator of the blocks $A_t \\approx J_t$ (the
    `jacobian` structure), and proposes $Y - \\Delta$. That is the posterior mean of a
    linear-Gaussian state-space model, so the step is a Kalman smoother
    ([`parallel_dynamics.KalmanSmoother`][]) — parallel over time, and finite even
    where the undamped (DEER) scan overflows, because the damping bounds the filter.

    A trial step is accepted or rejected by the ratio $\\rho$ of the actual decrease of
    $\\lVert F \\rVert^2$ to the decrease the linear model predicts, and the damping
    adapts (`damping`, [`parallel_dynamics.AdaptiveDamping`][] by default). A trial
    with non-finite values is always rejected, so the iterate stays finite.

    **Time windows and the prefix guarantee.** On long chaotic or nearly neutral
    trajectories $\\lVert F \\rVert^2$ is so ill-conditioned that plain
    Levenberg–Marquardt stalls: its smallest singular values shrink with $T$, and the
    residuals far ahead (large and meaningless before the iterate has converged there)
    pull every earlier state. So each step works on a window of time
    $[k, k + W)$: the converged prefix $t < k$ (every defect below tolerance) stays
    fixed, $y_k$ is set to $f(y_{k-1}, x_k)$ exactly, and the damped least-squares
    problem of the window alone (no residuals or coupling outside it) is solved
    exactly. $W$ is a trust region in time: it doubles after a good step ($\\rho >
    1/4$) and halves after a rejected one. A rejected trial still contributes its
    converged prefix. The converged prefix grows by at least one step per iteration,
    so after at most $T$ iterations every step satisfies the recurrence to tolerance.

    **Stopping.** Small defects alone do not make a trajectory accurate: on a nearly
    neutral map defects just below tolerance add up along the trajectory. Once every
    defect is below tolerance, the next step is an undamped (Newton, $\\lambda = 0$)
    step over the whole trajectory, which estimates the remaining error; the solve
    stops when that step is finite, keeps every defect
    $|F(Y)_t| < \\text{atol} + \\text{rtol}\\,|y_t|$ and moves no state by more than
    the same tolerance. If the Newton step overflows (chaotic maps in single
    precision), damped steps continue and the check is retried; a problem on which it
    never succeeds ends with `RESULTS.nonlinear_max_steps_reached`, never with a wrong trajectory
    marked successful. A step that is non-finite at the current iterate (undefined
    at the initial guess, say) only limits the window to the time before it; the
    solve fails with `RESULTS.nonfinite` when the step is non-finite after the
    converged prefix, where the recurrence's own trajectory is.

    **The step.** `linear_solver=`[`parallel_dynamics.KalmanSmoother`][] (default)
    takes the exact Levenberg–Marquardt step of the window.
    [`parallel_dynamics.KalmanFilter`][] takes the causal step of the ELK paper's
    reference code instead (not a least-squares solution, but on long nearly neutral
    or chaotic problems often faster to converge, and half the work).
    """

    jacobian: eqx.AbstractVar[AbstractJacobian]
    damping: eqx.AbstractVar[AbstractDamping]
    linear_solver: eqx.AbstractVar[lx.AbstractLinearSolver]
    verbose: eqx.AbstractVar[bool]

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        self.check_tolerances()
        damping, memory = self.damping.init(y.dtype)
        return _LevenbergMarquardtState(
            step=jnp.array(0),
            window=jnp.array(y.shape[0]),
            converged=jnp.array(False),
            newton_failed=jnp.array(False),
            newton_steps=jnp.array(0),
            floor_steps=jnp.array(0),
            newton_diffsize=jnp.array(jnp.inf, y.dtype),
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
        values, blocks = self.jacobian.linearise(
            recurrence, recurrence.previous(y), state.step
        )
        residual = y - values
        start = first_unconverged(self.defect(y, residual))
        times = jnp.arange(length)
        all_converged = start == length
        # Once every step satisfies the recurrence to tolerance, an undamped (Newton or
        # quasi-Newton) step over the whole trajectory estimates the remaining error,
        # which small defects alone do not bound: they add up along the trajectory. It
        # is a plain scan, which unlike a Kalman filter without damping propagates no
        # covariances, so it stays finite on chaotic maps in double precision.
        newton = all_converged & ~state.newton_failed
        # Only the stopping test of that step reads it (for quasi-Newton checks).
        rounding = at_rounding_level(residual, y, values, when=newton)
        # Otherwise the first unconverged state is made exact, y_k = f(y_{k-1}, x_k)
        # (y_{k-1} is unchanged), which changes only F_k (to zero) and F_{k+1}; then a
        # damped step on a window of time after it. The prefix up to k stays fixed;
        # everything after the window waits.
        # Where the previous state is exact (or converged), a non-finite f(y_{k-1}, x_k)
        # is the recurrence's own trajectory failing: nothing to solve. Non-finite
        # values elsewhere (a step undefined at the initial guess) only wait.
        finite_values = jnp.all(jnp.isfinite(values), axis=1)
        step_nonfinite = jnp.any((times == start) & ~finite_values)
        exact = ((times == start) & finite_values)[:, None]
        y = jnp.where(exact, values, y)
        following = jnp.minimum(start + 1, length - 1)
        mesh, axis_name = time_mesh(self)
        take = ft.partial(_take, sharded=mesh is not None)
        inputs = jtu.tree_map(lambda x: take(x, following), recurrence.inputs)
        residual_following = take(y, following) - recurrence.step_at(
            take(y, start % length), inputs
        )
        residual = jnp.where(exact, 0, residual)
        residual = jnp.where(
            ((times == start + 1) & ~all_converged)[:, None],
            residual_following,
            residual,
        )
        # The window ends before the first non-finite residual after k.
        nonfinite = ~jnp.all(jnp.isfinite(residual), axis=1) & (times > start)
        end = jnp.min(jnp.where(nonfinite, times, length))
        active = (times > start) & (times <= start + state.window) & (times < end)
        active = active | all_converged
        pinned = 1 / jnp.finfo(y.dtype).eps
        damping = jnp.where(active, state.damping, pinned)
        # The window's least-squares problem on its own: outside it, no residual and
        # no coupling to the previous step. (A_{k+1} is still the Jacobian at the old
        # y_k: the model is approximate there, the acceptance test is not.)
        bidiagonal = BlockBidiagonalOperator(mask_time(blocks, active))
        vector = jnp.where(active[:, None], residual, 0)

        if mesh is None:
            scan = AutoScan()
        else:
            # A smoother sharded along time: so is the undamped step's scan.
            scan = ShardedScan(mesh, axis_name)  # pyright: ignore

        def newton_step():
            return lx.linear_solve(bidiagonal, vector, scan, throw=False).value

        def damped_step():
            operator = DampedBidiagonalOperator(bidiagonal, damping)
            zeros = jnp.zeros_like(residual)
            return lx.linear_solve(
                operator, (vector, zeros), self.linear_solver, throw=False
            ).value

        update = lax.cond(newton, newton_step, damped_step)
        update = jnp.where(active[:, None], update, 0)

        trial = y - update
        trial_residual = recurrence.residual(trial)
        in_window = active[:, None]
        merit = jnp.sum(jnp.where(in_window, residual, 0) ** 2)
        model = jnp.where(in_window, residual - bidiagonal.mv(update), 0)
        predicted = merit - jnp.sum(model**2)
        actual = merit - jnp.sum(jnp.where(in_window, trial_residual, 0) ** 2)
        ratio = actual / jnp.where(predicted > 0, predicted, jnp.inf)
        # Only the window moves; residuals after it wait for the next step.
        finite = all_finite(
            jnp.where(in_window, trial, 0), jnp.where(in_window, trial_residual, 0)
        )
        accept, new_damping, memory = self.damping.update(
            state.damping, state.damping_memory, jnp.where(finite, ratio, -jnp.inf)
        )
        accept = accept & finite
        trial_defect = self.defect(trial, trial_residual)
        trial_defect = jnp.where(jnp.isfinite(trial_defect), trial_defect, jnp.inf)
        trial_start = first_unconverged(trial_defect)
        # Near the solution the decrease of the merit is lost in rounding and the ratio
        # says nothing; a Newton step that keeps every defect below tolerance is taken.
        accept = accept | (newton & finite & (trial_start == length))
        # A Newton step leaves the damping as it was.
        new_damping = jnp.where(newton, state.damping, new_damping)
        memory = jnp.where(newton, state.damping_memory, memory)
        # A rejected damped trial still contributes its converged prefix (at least
        # y_k, which is exact); the rest of the trajectory stays as it was.
        keep = accept | ((times < trial_start) & ~newton)
        new_y = jnp.where(keep[:, None], trial, y)
        # The error estimate of Hairer & Wanner over consecutive (quasi-)Newton steps,
        # as for DEER and quasi-DEER.
        diffsize = jnp.max(self.defect(y, update), initial=0)
        newton_steps = jnp.where(newton & accept, state.newton_steps + 1, 0)
        converged = (
            newton
            & accept
            & (trial_start == length)
            & converged_by_rate(
                newton_steps,
                diffsize,
                state.newton_diffsize,
                superlinear=self.superlinear,
                rounding=rounding,
            )
        )
        # On chaotic maps the forward error of a trajectory whose defects are at
        # tolerance can exceed the tolerance by the growth factor of the dynamics, and
        # no iteration (nor `lax.scan` itself) does better: the Newton check keeps
        # failing and damped steps stop decreasing the defects. Then every step
        # satisfies the recurrence to tolerance and that is what is returned.
        progress = accept & (actual > 0)
        floor_steps = jnp.where(
            all_converged & ~newton,
            jnp.where(progress, 0, state.floor_steps + 1),
            jnp.where(all_converged, state.floor_steps, 0),
        )
        now_converged = jnp.where(accept, trial_start == length, all_converged)
        converged = converged | ((floor_steps >= _FLOOR_STEPS) & now_converged)
        # The window is a trust region in time: it doubles after a good step and
        # halves after a rejected one, so that ill-conditioned (chaotic, unstable)
        # problems are solved over horizons on which the linearisation is trusted.
        # The damping is the first line of defence; the horizon shrinks only when
        # even a strongly damped step (λ ≥ 1, a step shorter than the residual) fails.
        grown = jnp.minimum(2 * state.window, length)
        shrunk = jnp.where(
            state.damping >= 1, jnp.maximum(state.window // 2, 1), state.window
        )
        window = jnp.where(accept, jnp.where(ratio > 0.25, grown, state.window), shrunk)
        window = jnp.where(newton, state.window, window)
        result = optx.RESULTS.where(
            step_nonfinite, optx.RESULTS.nonfinite, optx.RESULTS.successful
        )
        new_state = _LevenbergMarquardtState(
            step=state.step + 1,
            window=window,
            converged=converged,
            # After a failed check, the next one waits for a damped step that helps.
            newton_failed=jnp.where(newton, ~accept, state.newton_failed & ~progress),
            floor_steps=floor_steps,
            newton_steps=newton_steps,
            newton_diffsize=jnp.where(newton & accept, diffsize, jnp.inf),
            converged_prefix=jnp.maximum(trial_start, jnp.minimum(start + 1, length)),
            residual_norm=jnp.where(
                accept, self.norm(trial_residual), self.norm(residual)
            ),
            damping=new_damping,
            damping_memory=memory,
            result=result,
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
    damping: AbstractDamping = AdaptiveDamping()
    linear_solver: lx.AbstractLinearSolver = KalmanSmoother()
    verbose: bool = False


class ELK(AbstractLevenbergMarquardt):
    """ELK (Gonzalez et al., NeurIPS 2024): Levenberg–Marquardt on the trajectory with
    the dense Jacobian blocks, each step an exact parallel Kalman smoother, and the
    damping adapted by [`parallel_dynamics.AdaptiveDamping`][] (pass
    `damping=pdyn.FixedDamping(λ)` for the paper's fixed damping).

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
    damping: AbstractDamping = AdaptiveDamping()
    linear_solver: lx.AbstractLinearSolver = KalmanSmoother()
    verbose: bool = False

    @property
    def jacobian(self) -> AbstractJacobian:
        return DenseJacobian()


class QuasiELK(AbstractLevenbergMarquardt):
    """Quasi-ELK (Gonzalez et al., NeurIPS 2024): Levenberg–Marquardt with the diagonal
    of the Jacobian, each step $D$ independent scalar Kalman smoothers: $O(T D)$ work
    and memory, with the stability of ELK's damping. The diagonal is chosen as in
    [`parallel_dynamics.QuasiDEER`][].
    """

    rtol: float | None
    atol: float | None
    norm: Callable[[PyTree], Scalar]
    jacobian: AbstractJacobian
    damping: AbstractDamping
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
        damping: AbstractDamping = AdaptiveDamping(),
        linear_solver: lx.AbstractLinearSolver = KalmanSmoother(),
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
        self.verbose = verbose


_args = """**Arguments:**

- `rtol`, `atol`: tolerances of the stopping test (default $\\varepsilon^{0.7}$ of the
    state's dtype).
- `norm`: the norm used in the stopping test; `optimistix.max_norm` by default.
"""
_tail = """- `damping`: [`parallel_dynamics.AdaptiveDamping`][] (default) or
    [`parallel_dynamics.FixedDamping`][].
- `linear_solver`: the solver of each damped step; [`parallel_dynamics.KalmanSmoother`][]
    (`parallel=True` by default).
- `verbose`: print the residual, step, ratio and damping at every iteration.
"""
LevenbergMarquardt.__init__.__doc__ = (
    _args
    + "- `jacobian`: what $A_t$ is (an [`parallel_dynamics.AbstractJacobian`][]).\n"
    + _tail
)
ELK.__init__.__doc__ = _args + _tail
QuasiELK.__init__.__doc__ = (
    _args
    + """- `diagonal`, `num_probes`, `key`: the diagonal of the Jacobian, as in
    [`parallel_dynamics.QuasiDEER`][].
"""
    + _tail
)
FixedDamping.__init__.__doc__ = """**Arguments:**

- `damping`: the constant $\\lambda > 0$ (the paper's $1/\\sigma^2$).
"""
AdaptiveDamping.__init__.__doc__ = """**Arguments:**

- `initial`: the initial damping $\\lambda_0$.
- `accept_ratio`: the smallest ratio $\\rho$ of actual to predicted decrease for which a
    step is accepted.
- `max_damping`: the largest damping (the damping is clipped there).
"""
