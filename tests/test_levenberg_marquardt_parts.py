"""The parts Levenberg–Marquardt on a trajectory is composed of, each on its own: the
damping and its acceptance rule, the trust region in time, the gain ratio, the linear
step and the stopping test."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import parallel_dynamics as pdyn
from parallel_dynamics._solver.levenberg_marquardt.gain_ratio import gain_ratio
from parallel_dynamics._solver.levenberg_marquardt.linear_step import (
    damped_step,
    newton_step,
    undamped_solver,
)
from parallel_dynamics._solver.levenberg_marquardt.stopping import (
    FLOOR_STEPS,
    init_stopping,
    update_stopping,
    verifies,
)


# The merits at the iterate and at the trial: only NonmonotoneDamping reads them.
MERITS = (jnp.array(1.0), jnp.array(1.0))


def _dense_bidiagonal(blocks: np.ndarray) -> np.ndarray:
    """The (TD × TD) matrix of the block bidiagonal operator with subdiagonal blocks
    `-blocks[1:]` (the first block is not coupled to anything)."""
    length, size, _ = blocks.shape
    matrix = np.eye(length * size)
    for t in range(1, length):
        rows = slice(t * size, (t + 1) * size)
        matrix[rows, (t - 1) * size : t * size] = -blocks[t]
    return matrix


# --- the damping -----------------------------------------------------------------


def test_fixed_damping_accepts_every_step_and_keeps_lambda():
    damping, memory = pdyn.FixedDamping(1e-3).init(jnp.float64)
    for ratio in (-1.0, 0.0, 0.5, 1.0):
        accept, new_damping, new_memory = pdyn.FixedDamping(1e-3).update(
            damping, memory, jnp.array(ratio), *MERITS
        )
        assert bool(accept)
        assert float(new_damping) == 1e-3
        assert float(new_memory) == float(memory)


@pytest.mark.parametrize(
    "ratio, factor",
    [(1.0, 1 / 3), (0.75, 1 - 0.5**3), (0.5, 1.0), (0.25, 1 - (-0.5) ** 3)],
)
def test_adaptive_damping_shrinks_by_nielsens_factor_on_acceptance(ratio, factor):
    rule = pdyn.AdaptiveDamping(initial=2.0)
    damping, memory = rule.init(jnp.float64)
    accept, new_damping, new_memory = rule.update(
        damping, memory, jnp.array(ratio), *MERITS
    )
    assert bool(accept)
    assert float(new_damping) == pytest.approx(2.0 * min(max(factor, 1 / 3), 2.0))
    assert float(new_memory) == 2.0


def test_adaptive_damping_grows_ever_faster_on_rejection():
    rule = pdyn.AdaptiveDamping(initial=1.0, max_damping=1e3)
    damping, memory = rule.init(jnp.float64)
    dampings = []
    for _ in range(4):
        accept, damping, memory = rule.update(damping, memory, jnp.array(-1.0), *MERITS)
        assert not bool(accept)
        dampings.append(float(damping))
    # ν doubles after every rejection: λ is multiplied by 2, 4, 8, 16.
    assert dampings == [2.0, 8.0, 64.0, 1e3]
    accept, damping, memory = rule.update(damping, memory, jnp.array(1e-5), *MERITS)
    assert not bool(accept)  # below `accept_ratio`


# --- the trust region in time ----------------------------------------------------


def _nonmonotone_update(ratio, merit, trial_merit, lowest=np.inf, damping=1e-3):
    rule = pdyn.NonmonotoneDamping()
    return rule.update(
        jnp.array(damping),
        jnp.array(lowest),
        jnp.array(ratio),
        jnp.array(merit),
        jnp.array(trial_merit),
    )


@pytest.mark.parametrize(
    "ratio, trial_merit, accepted, factor",
    [
        (0.5, 0.5, True, 1 / 2),  # lower merit: halve
        (0.95, 0.05, True, 1e-6),  # the model is right: collapse
        (-1.0, 2.5, True, 1.0),  # a bounded increase is taken, damping kept
        (-1.0, 3.5, False, 10.0),  # beyond `max_increase`: rejected
        (-jnp.inf, jnp.inf, False, 10.0),  # non-finite trial
    ],
)
def test_nonmonotone_damping_accepts_bounded_increases(
    ratio, trial_merit, accepted, factor
):
    accept, damping, lowest = _nonmonotone_update(ratio, 1.0, trial_merit)
    assert bool(accept) is accepted
    np.testing.assert_allclose(float(damping), 1e-3 * factor, rtol=1e-12)
    assert float(lowest) == (min(1.0, trial_merit) if accepted else 1.0)  # merit 1


def test_nonmonotone_damping_rejects_an_excursion_from_the_lowest_merit():
    # Each step only doubles the merit, but the iterates have run away from the
    # lowest merit reached.
    accept, damping, lowest = _nonmonotone_update(-1.0, 600.0, 1200.0, lowest=1.0)
    assert not bool(accept)
    assert float(damping) == pytest.approx(1e-2)
    # The rejection forgets the lowest merit: the next bound is set by the iterate's.
    assert float(lowest) == 600.0
    accept, _, lowest = _nonmonotone_update(-1.0, 400.0, 800.0, lowest=1.0)
    assert bool(accept)
    assert float(lowest) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(initial=0.0),
        dict(initial=10.0, max_damping=1.0),
        dict(max_increase=0.5),
        dict(decrease=float("inf")),
    ],
)
def test_nonmonotone_damping_checks_its_arguments(kwargs):
    with pytest.raises(ValueError):
        pdyn.NonmonotoneDamping(**kwargs)


def test_time_window_covers_the_times_after_the_first_unconverged_state():
    window = pdyn.TimeWindow()
    times = jnp.arange(10)
    active = window.active(times, jnp.array(2), jnp.array(10), jnp.array(3))
    np.testing.assert_array_equal(np.flatnonzero(active), [3, 4, 5])
    # It ends before the first time at which the step cannot be evaluated.
    active = window.active(times, jnp.array(2), jnp.array(4), jnp.array(3))
    np.testing.assert_array_equal(np.flatnonzero(active), [3])
    assert int(window.init(10)) == 10


@pytest.mark.parametrize(
    "accepted, ratio, damping, expected",
    [
        (True, 0.9, 0.1, 8),  # a good step doubles it
        (True, 0.9, 10.0, 8),
        (True, 0.1, 0.1, 4),  # a mediocre one keeps it
        (False, -1.0, 0.1, 4),  # the damping defends first
        (False, -1.0, 1.0, 2),  # a strongly damped step failed: halve
    ],
)
def test_time_window_grows_and_shrinks_with_the_outcome(
    accepted, ratio, damping, expected
):
    size = pdyn.TimeWindow().update(
        jnp.array(4), 100, jnp.array(accepted), jnp.array(ratio), jnp.array(damping)
    )
    assert int(size) == expected
    assert int(pdyn.TimeWindow().update(jnp.array(64), 100, True, 1.0, 0.0)) == 100
    assert int(pdyn.TimeWindow().update(jnp.array(1), 100, False, -1.0, 2.0)) == 1


# --- the gain ratio --------------------------------------------------------------


def test_gain_ratio_is_actual_over_predicted_decrease_on_the_window():
    residual = jnp.array([[3.0], [2.0], [100.0]])
    model = jnp.array([[1.0], [0.0], [50.0]])
    trial = jnp.array([[2.0], [1.0], [-7.0]])
    where = jnp.array([True, True, False])
    ratio, merit, trial_merit = gain_ratio(residual, model, trial, where)
    # ‖F‖² = 13 on the window; the model predicts 1, the trial gives 5.
    assert float(merit) == pytest.approx(13.0)
    assert float(trial_merit) == pytest.approx(5.0)
    assert float(ratio) == pytest.approx(8.0 / 12.0)
    # No predicted decrease: ratio 0 whatever happened.
    ratio, _, _ = gain_ratio(residual, residual, trial, where)
    assert float(ratio) == 0.0


# --- the linear step -------------------------------------------------------------


def _random_system(key, length=6, size=3):
    k1, k2 = jax.random.split(key)
    blocks = 0.8 * jax.random.normal(k1, (length, size, size))
    residual = jax.random.normal(k2, (length, size))
    return blocks, residual


@pytest.mark.parametrize("solver", [pdyn.KalmanSmoother(), pdyn.KalmanSmoother(False)])
def test_damped_step_solves_the_damped_least_squares_problem(solver):
    blocks, residual = _random_system(jax.random.key(0))
    length, size = residual.shape
    damping = jnp.array([0.1, 0.5, 2.0, 0.01, 1.0, 0.3])
    bidiagonal = pdyn.BlockBidiagonalOperator(pdyn.DenseBlocks(blocks))
    step = damped_step(bidiagonal, residual, damping, solver)
    matrix = _dense_bidiagonal(np.asarray(blocks))
    weights = np.repeat(np.asarray(damping), size)
    normal = matrix.T @ matrix + np.diag(weights)
    expected = np.linalg.solve(normal, matrix.T @ np.asarray(residual).ravel())
    np.testing.assert_allclose(step.ravel(), expected, rtol=1e-9, atol=1e-10)


def test_newton_step_solves_the_undamped_system():
    blocks, residual = _random_system(jax.random.key(1))
    bidiagonal = pdyn.BlockBidiagonalOperator(pdyn.DenseBlocks(blocks))
    for solver in (pdyn.KalmanSmoother(), pdyn.KalmanFilter(parallel=True)):
        step = newton_step(bidiagonal, residual, solver)
        expected = np.linalg.solve(
            _dense_bidiagonal(np.asarray(blocks)), np.asarray(residual).ravel()
        )
        np.testing.assert_allclose(step.ravel(), expected, rtol=1e-9, atol=1e-10)


def test_undamped_solver_follows_the_configuration_of_the_damped_one():
    assert isinstance(undamped_solver(pdyn.KalmanSmoother()), pdyn.AutoScan)
    assert isinstance(
        undamped_solver(pdyn.KalmanSmoother(parallel=True)), pdyn.ParallelScan
    )
    assert isinstance(
        undamped_solver(pdyn.KalmanFilter(parallel=False)), pdyn.SequentialScan
    )
    assert isinstance(undamped_solver(lx.LU()), pdyn.AutoScan)
    mesh = jax.make_mesh((1,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = undamped_solver(pdyn.KalmanSmoother(mesh=mesh))
    assert isinstance(sharded, pdyn.ShardedScan)
    assert sharded.mesh is mesh


# --- stopping --------------------------------------------------------------------


def _stop(state, **overrides):
    arguments = dict(
        newton=jnp.array(False),
        accepted=jnp.array(True),
        progress=jnp.array(True),
        all_converged=jnp.array(True),
        now_converged=jnp.array(True),
        merit_before=jnp.array(1.0),
        merit_after=jnp.array(1.0),
        diffsize=jnp.array(0.5),
        superlinear=True,
        rounding=jnp.array(False),
    )
    arguments.update({k: jnp.asarray(v) for k, v in overrides.items()})
    return update_stopping(state, **arguments)


def test_stopping_verifies_with_undamped_steps():
    state = init_stopping(jnp.float64)
    false, true = jnp.array(False), jnp.array(True)
    assert bool(verifies(state, true, false))
    assert not bool(verifies(state, false, false))
    # An early verification, before every defect is below tolerance.
    assert bool(verifies(state, false, true))
    # A first accepted verification step of size 0.5: superlinear, so enough.
    done, state = _stop(state, newton=True)
    assert bool(done)
    # A failed verification makes the next step a damped one, until one helps, and
    # no verification is early any more.
    done, state = _stop(init_stopping(jnp.float64), newton=True, accepted=False)
    assert not bool(done)
    assert not bool(verifies(state, true, false))
    _, state = _stop(state, progress=True)
    assert bool(verifies(state, true, false))
    assert not bool(verifies(state, false, true))


def test_stopping_takes_the_rate_against_the_damped_step_before():
    # A damped step of size 50, then a verification step of size 2: a contraction
    # rate of 0.04, so the error left is about 0.08 and the solve stops.
    state = init_stopping(jnp.float64)
    done, state = _stop(state, all_converged=False, diffsize=jnp.array(50.0))
    assert not bool(done)
    done, _ = _stop(state, newton=True, diffsize=jnp.array(2.0))
    assert bool(done)
    # The same step, damped, decides nothing.
    done, _ = _stop(state, diffsize=jnp.array(2.0))
    assert not bool(done)
    # After a rejected step the rate is unknown: a first verification step of size 2
    # is not enough.
    _, rejected = _stop(state, accepted=False, progress=False)
    done, _ = _stop(rejected, newton=True, diffsize=jnp.array(2.0))
    assert not bool(done)


def test_stopping_at_the_rounding_floor_after_steps_without_progress():
    state = init_stopping(jnp.float64)
    # Verification steps above the rounding level do not count: they can be moving an
    # error forward in time without changing the merit.
    for _ in range(2 * FLOOR_STEPS):
        done, state = _stop(state, newton=True, accepted=True, diffsize=jnp.array(2.0))
        assert not bool(done)
    assert int(state.floor_steps) == 0
    # Unless the damping accepts every step, so that no rejection signals the floor.
    counted = init_stopping(jnp.float64)
    for i in range(FLOOR_STEPS):
        done, counted = _stop(
            counted, newton=True, diffsize=jnp.array(2.0), count_verifications=True
        )
        assert bool(done) == (i == FLOOR_STEPS - 1)
    # A failed verification at the rounding level and damped steps that are all
    # rejected.
    done, state = _stop(state, newton=True, accepted=False, rounding=jnp.array(True))
    assert not bool(done)
    for i in range(1, FLOOR_STEPS):
        done, state = _stop(state, accepted=False, progress=False)
        assert bool(done) == (i == FLOOR_STEPS - 1)
    # Not while some defect is above tolerance.
    _, state = _stop(state, accepted=False, progress=False, now_converged=False)
    done, _ = _stop(state, accepted=False, progress=False, now_converged=False)
    assert not bool(done)


def test_stopping_at_the_floor_when_accepted_steps_only_fluctuate():
    """A fixed damping accepts every step; at the rounding floor the merit of those
    steps goes up and down. Fluctuations are no progress; a steady decrease is."""
    merits = [1.0, 0.995, 1.003, 0.999, 0.996, 1.001, 0.998, 0.997, 1.0, 0.999, 1.002]
    state = init_stopping(jnp.float64)
    stopped = []
    for before, after in zip(merits[:-1], merits[1:]):
        done, state = _stop(state, merit_before=before, merit_after=after)
        stopped.append(bool(done))
    # Ten steps, none of which improves on the best merit by 1 %.
    assert stopped == [False] * (FLOOR_STEPS - 1) + [True]
    state = init_stopping(jnp.float64)
    for i in range(3 * FLOOR_STEPS):
        done, state = _stop(state, merit_before=0.9**i, merit_after=0.9 ** (i + 1))
        assert not bool(done)


def test_stopping_counts_from_the_first_trajectory_at_tolerance():
    """A step at the floor that pushes a defect back over tolerance is no progress
    either; the solve stops only once every defect is below tolerance again."""
    state = init_stopping(jnp.float64)
    done, state = _stop(state, all_converged=False, now_converged=False)
    assert int(state.floor_steps) == 0  # nothing at tolerance yet
    for i in range(1, FLOOR_STEPS + 2):
        at_tolerance = i % 3 != 0
        done, state = _stop(
            state, all_converged=at_tolerance, now_converged=at_tolerance
        )
        assert int(state.floor_steps) == i
        assert bool(done) == (i >= FLOOR_STEPS and at_tolerance)
