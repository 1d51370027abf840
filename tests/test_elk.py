"""ELK and quasi-ELK: exact damped steps, adaptive damping, stability where DEER fails."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import gru, lorenz96_rk4, lstm, scan_reference, tree_allclose


# The merits at the iterate and at the trial: only NonmonotoneDamping reads them.
MERITS = (jnp.array(1.0), jnp.array(1.0))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


def _l96_problem(length=12, size=5):
    """Lorenz-96 (chaotic), and an iterate near but not at its trajectory."""
    step, y0, _, dt, _ = lorenz96_rk4(jnp.float64, length=length, size=size)
    exact = scan_reference(step, y0, None, dt, length=length)
    noise = jax.random.normal(jax.random.key(3), exact.shape, jnp.float64)
    return step, y0, dt, exact + 0.3 * noise


def _residual(step, y0, dt):
    def residual(Y):
        previous = jnp.concatenate([y0[None], Y[:-1]])
        return Y - jax.vmap(step, in_axes=(0, None, None))(previous, None, dt)

    return residual


def _blocks(step, y0, dt, Y, structure):
    previous = jnp.concatenate([y0[None], Y[:-1]])
    matrices = jax.vmap(jax.jacfwd(step), in_axes=(0, None, None))(previous, None, dt)
    if structure == "dense":
        return pdyn.DenseBlocks(matrices)
    return pdyn.DiagonalBlocks(jnp.diagonal(matrices, axis1=1, axis2=2))


def _dense_damped_least_squares(jacobian, residual, damping):
    """min ‖F − J Δ‖² + λ‖Δ‖², by QR on the stacked (2TD × TD) problem."""
    n = jacobian.shape[1]
    matrix = np.concatenate([jacobian, np.sqrt(damping) * np.eye(n)])
    vector = np.concatenate([residual, np.zeros(n)])
    return np.linalg.lstsq(matrix, vector, rcond=None)[0]


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("damping", [1e-4, 1.0])
def test_damped_step_is_the_dense_least_squares_solution(structure, parallel, damping):
    step, y0, dt, Y = _l96_problem()
    T, D = Y.shape
    residual = _residual(step, y0, dt)(Y)
    blocks = _blocks(step, y0, dt, Y, structure)
    bidiagonal = pdyn.BlockBidiagonalOperator(blocks)
    if structure == "dense":
        # ELK: the true Jacobian of the residual of the whole trajectory.
        jacobian = jax.jacfwd(_residual(step, y0, dt))(Y).reshape(T * D, T * D)
        np.testing.assert_allclose(bidiagonal.as_matrix(), jacobian, atol=1e-12)
    else:
        # Quasi-ELK: the same with only the diagonals of the Jacobian blocks.
        jacobian = bidiagonal.as_matrix()
    operator = pdyn.DampedBidiagonalOperator(bidiagonal, damping)
    vector = (residual, jnp.zeros_like(residual))
    solver = pdyn.KalmanSmoother(parallel=parallel)
    update = lx.linear_solve(operator, vector, solver).value
    expected = _dense_damped_least_squares(
        np.asarray(jacobian), np.asarray(residual).reshape(-1), damping
    )
    assert _rel_err(update.reshape(-1), expected) < 1e-10
    # Lineax's own dense least squares on the materialised operator agrees too.
    dense = lx.MatrixLinearOperator(operator.as_matrix())
    stacked = jnp.concatenate([residual.reshape(-1), jnp.zeros(T * D)])
    qr = lx.linear_solve(dense, stacked, lx.QR()).value
    assert _rel_err(update.reshape(-1), qr) < 1e-10


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_kalman_filter_is_causal(parallel):
    step, y0, dt, Y = _l96_problem()
    residual = _residual(step, y0, dt)(Y)
    blocks = _blocks(step, y0, dt, Y, "dense")
    solver = pdyn.KalmanFilter(parallel=parallel)

    def filtered(r):
        operator = pdyn.DampedBidiagonalOperator(
            pdyn.BlockBidiagonalOperator(blocks), 0.1
        )
        return lx.linear_solve(operator, (r, jnp.zeros_like(r)), solver).value

    update = filtered(residual)
    # Changing residuals after t leaves the steps up to t unchanged.
    changed = filtered(residual.at[6:].add(5.0))
    np.testing.assert_array_equal(update[:6], changed[:6])
    assert not np.allclose(update[6:], changed[6:])
    # Its last step is the smoother's.
    smoothed = lx.linear_solve(
        pdyn.DampedBidiagonalOperator(pdyn.BlockBidiagonalOperator(blocks), 0.1),
        (residual, jnp.zeros_like(residual)),
        pdyn.KalmanSmoother(parallel=parallel),
    ).value
    assert _rel_err(update[-1], smoothed[-1]) < 1e-10


def test_first_elk_iteration_is_the_damped_least_squares_step():
    step, y0, dt, Y = _l96_problem()
    T, D = Y.shape
    damping = 0.5
    solver = pdyn.ELK(
        damping=pdyn.FixedDamping(damping),
        linear_solver=pdyn.KalmanSmoother(),
        jacobi_start=False,
    )
    sol = pdyn.solve(
        step, solver, y0, None, dt, length=T, init=Y, max_steps=1, throw=False
    )
    assert sol.result != optx.RESULTS.successful  # stopped after one step
    # The first unconverged state is made exact, y_1 = f(y_0); then the
    # Levenberg–Marquardt step of the rest of the trajectory from there (with the
    # Jacobian blocks evaluated at the iterate the step started from).
    exact = Y.at[0].set(step(y0, None, dt))
    residual = _residual(step, y0, dt)(exact)
    jacobian = jax.jacfwd(_residual(step, y0, dt))(Y).reshape(T * D, T * D)
    update = _dense_damped_least_squares(
        np.asarray(jacobian)[D:, D:], np.asarray(residual)[1:].reshape(-1), damping
    ).reshape(T - 1, D)
    np.testing.assert_allclose(sol.value[0], exact[0], rtol=1e-14)
    assert _rel_err(sol.value[1:], exact[1:] - update) < 1e-10


def test_adaptive_damping_follows_nielsen():
    rule = pdyn.AdaptiveDamping(initial=2.0)
    damping, memory = rule.init(jnp.float64)
    assert float(damping) == 2.0 and float(memory) == 2.0
    # A perfect step (ratio 1) divides by three; a poor but accepted one (ratio 0.1)
    # multiplies by 1 - (2 * 0.1 - 1)^3 = 1.512.
    accept, new, new_memory = rule.update(damping, memory, jnp.array(1.0), *MERITS)
    assert bool(accept) and np.isclose(float(new), 2 / 3)
    accept, new, _ = rule.update(damping, memory, jnp.array(0.1), *MERITS)
    assert bool(accept) and np.isclose(float(new), 2 * 1.512)
    # Rejections multiply by ν, which doubles each time.
    accept, new, new_memory = rule.update(damping, memory, jnp.array(-1.0), *MERITS)
    assert not bool(accept) and float(new) == 4.0 and float(new_memory) == 4.0
    accept, new, new_memory = rule.update(new, new_memory, jnp.array(-jnp.inf), *MERITS)
    assert not bool(accept) and float(new) == 16.0 and float(new_memory) == 8.0


SOLVERS = {
    "elk": pdyn.ELK(),
    "quasi_elk": pdyn.QuasiELK(),
    "elk_fixed": pdyn.ELK(damping=pdyn.FixedDamping(1e-3)),
    "elk_filter": pdyn.ELK(linear_solver=pdyn.KalmanFilter()),
    "elk_parallel_smoother": pdyn.ELK(
        linear_solver=pdyn.KalmanSmoother(parallel=True, radix=8)
    ),
    "quasi_elk_sequential": pdyn.QuasiELK(
        linear_solver=pdyn.KalmanSmoother(parallel=False)
    ),
    "lm_block": pdyn.LevenbergMarquardt(jacobian=pdyn.BlockDiagonalJacobian(1)),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_converges_to_lax_scan_on_lorenz96(name):
    step, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=150)
    expected = scan_reference(step, y0, None, dt, length=length)
    sol = pdyn.solve(step, SOLVERS[name], y0, None, dt, length=length)
    assert sol.result == optx.RESULTS.successful
    assert _rel_err(sol.value, expected) < 1e-8
    assert int(sol.stats["num_steps"]) <= sol.stats["max_steps"]


@pytest.mark.parametrize("name", ["elk", "quasi_elk"])
@pytest.mark.parametrize("model", [gru, lstm], ids=["gru", "lstm"])
def test_converges_to_lax_scan_on_the_zoo(name, model):
    step, y0, inputs, args, length = model(jnp.float64)
    expected = scan_reference(step, y0, inputs, args, length=length)
    sol = pdyn.solve(step, SOLVERS[name], y0, inputs, args)
    assert sol.result == optx.RESULTS.successful
    assert tree_allclose(sol.value, expected, rtol=1e-8, atol=1e-8)


# Once the damping has collapsed below eps^2, ELK's steps are DEER's and it stops as
# soon as DEER would; in float64 the damping takes one more collapse to get there.
@pytest.mark.parametrize("dtype, extra", [(jnp.float32, 0), (jnp.float64, 1)])
def test_takes_deers_iterations_on_a_contracting_map(dtype, extra):
    step, y0, inputs, cell, _ = gru(dtype, length=300, hidden=8)
    deer = pdyn.solve(step, pdyn.DEER(rtol=1e-5, atol=1e-5), y0, inputs, cell)
    elk = pdyn.solve(step, pdyn.ELK(rtol=1e-5, atol=1e-5), y0, inputs, cell)
    assert int(deer.stats["num_steps"]) <= 5
    assert int(elk.stats["num_steps"]) <= int(deer.stats["num_steps"]) + extra
    expected = scan_reference(step, y0, inputs, cell)
    close = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else {}
    assert tree_allclose(elk.value, expected, **close)


def _unstable(y, x, args):
    # Linearised at the initial guess y = 0 the map expands by 3 per step, so DEER's
    # first scan grows like 3^T; the trajectory itself settles near a fixed point.
    return jnp.tanh(3.0 * y) + x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_elk_converges_where_deer_overflows(dtype):
    T = 400
    inputs = 0.01 * jnp.ones((T, 2), dtype)
    y0 = jnp.zeros(2, dtype)
    expected = scan_reference(_unstable, y0, inputs, None)
    deer = pdyn.solve(_unstable, pdyn.DEER(), y0, inputs, throw=False)
    if dtype == jnp.float32:
        assert deer.result == optx.RESULTS.nonfinite
    for solver in (pdyn.ELK(), pdyn.QuasiELK()):
        sol = pdyn.solve(_unstable, solver, y0, inputs)
        assert sol.result == optx.RESULTS.successful
        assert np.all(np.isfinite(np.asarray(sol.value)))
        tol = 1e-4 if dtype == jnp.float32 else 1e-9
        assert _rel_err(sol.value, expected) < tol


def _defined_for_positive(y, x, args):
    # The step is NaN for y < 0: a bold trial step can leave the domain.
    return jnp.sqrt(y) + x


def test_nonfinite_trials_are_rejected_and_the_iterate_stays_finite():
    T = 60
    inputs = jnp.full((T, 1), 0.5)
    y0 = jnp.ones(1)
    expected = scan_reference(_defined_for_positive, y0, inputs, None)
    init = jnp.linspace(5.0, -0.0, T)[:, None]  # a poor guess
    solver = pdyn.ELK(damping=pdyn.AdaptiveDamping(initial=1e-8))
    sol = pdyn.solve(_defined_for_positive, solver, y0, inputs, init=init)
    assert sol.result == optx.RESULTS.successful
    assert _rel_err(sol.value, expected) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("size", [5, 10])
@pytest.mark.parametrize("name", ["elk", "quasi_elk"])
def test_lorenz96_t1000_float64(size, name):
    step, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=1000, size=size)
    expected = scan_reference(step, y0, None, dt, length=length)
    sol = pdyn.solve(step, SOLVERS[name], y0, None, dt, length=length)
    assert sol.result == optx.RESULTS.successful
    # The map is chaotic (growth ~1e7 over T = 1000): perturbing y0 by the tolerance
    # (eps^0.7 ~ 1e-11) moves lax.scan's own trajectory by ~1e-5. Every defect is at
    # most the tolerance, so the error is within a small multiple of that.
    tol = pdyn.ELK().tolerances(jnp.float64)[0]
    perturbed = scan_reference(step, y0 * (1 + tol), None, dt, length=length)
    sensitivity = np.max(np.abs(np.asarray(perturbed - expected)))
    assert np.max(np.abs(np.asarray(sol.value - expected))) < 10 * sensitivity


@pytest.mark.slow
def test_lorenz96_t1000_deer_float32_overflows():
    step, y0, _, dt, length = lorenz96_rk4(jnp.float32, length=1000, size=10)
    sol = pdyn.solve(step, pdyn.DEER(), y0, None, dt, length=length, throw=False)
    assert sol.result != optx.RESULTS.successful


def _tanh_step(y, x, args):
    return jnp.tanh(0.5 * y + x)


@pytest.mark.parametrize("jacobi_start", [True, False])
def test_first_iteration_is_a_jacobi_sweep_where_it_lowers_the_merit(jacobi_start):
    xs = jax.random.normal(jax.random.key(3), (20, 3))
    y0 = jnp.full(3, 2.0)
    solver = pdyn.ELK(jacobi_start=jacobi_start)
    sol = pdyn.solve(_tanh_step, solver, y0, xs, max_steps=1, throw=False)
    sweep = pdyn.jacobi_guess(_tanh_step, y0, xs)
    assert sol.stats["num_steps"] == 1
    if jacobi_start:
        np.testing.assert_allclose(sol.value, sweep, rtol=1e-6)
    else:
        assert not np.allclose(sol.value, sweep, rtol=1e-3)


def _expanding_step(y, x, args):
    return 3.0 * y + x


def test_no_jacobi_sweep_where_it_raises_the_merit():
    # On an expanding map the sweep carries a perturbation of one state forward,
    # tripled: it raises the merit, so the first iteration is the damped step.
    xs = jax.random.normal(jax.random.key(4), (12, 2))
    y0 = jnp.zeros(2)
    reference = scan_reference(_expanding_step, y0, xs, None)
    init = reference.at[5].add(0.1)
    previous = jnp.concatenate([y0[None], init[:-1]])
    sweep = jax.vmap(_expanding_step, in_axes=(0, 0, None))(previous, xs, None)
    sol = pdyn.solve(
        _expanding_step, pdyn.ELK(), y0, xs, init=init, max_steps=1, throw=False
    )
    assert np.max(np.abs(sweep[6] - reference[6])) == pytest.approx(0.3)
    assert np.max(np.abs(sol.value - reference)) < 0.1
