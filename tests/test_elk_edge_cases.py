"""ELK and quasi-ELK at the edges, against `lax.scan`: zero tolerances, empty states,
steps undefined at the initial guess, invalid damping options, failure codes, and a
rejected step once every defect is below tolerance."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import scan_reference


def _expanding_with_zero_component(y, x, args):
    # Component 0 expands by 3 per step around the initial guess y = 0 (it settles
    # near a fixed point); component 1 stays exactly zero along the whole trajectory.
    del args
    return jnp.stack([jnp.tanh(3.0 * y[0]) + x[0], 0.5 * y[1]])


@pytest.mark.parametrize("solver", [pdyn.ELK, pdyn.QuasiELK], ids=["elk", "quasi_elk"])
def test_damped_solve_with_zero_atol_and_a_component_that_stays_zero(solver):
    # With atol = 0 the defect of a component with y_t = 0 and a zero residual is
    # 0 / 0, which counts as zero: a NaN would make the maximum over the row NaN, and
    # a NaN row must not count as converged (the solve would stop after a few damped
    # steps with defects of order 1e-2 and report success).
    T = 40
    inputs = jnp.full((T, 1), 0.01)
    y0 = jnp.zeros(2)
    expected = scan_reference(_expanding_with_zero_component, y0, inputs, None)
    sol = pdyn.solve(
        _expanding_with_zero_component,
        solver(rtol=1e-8, atol=0.0),
        y0,
        inputs,
        throw=False,
    )
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, expected, rtol=1e-7, atol=0)
    assert int(sol.stats["num_steps"]) <= sol.stats["max_steps"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: pdyn.AdaptiveDamping(max_damping=0.0),
        lambda: pdyn.AdaptiveDamping(max_damping=-1.0),
        lambda: pdyn.AdaptiveDamping(max_damping=float("inf")),
        lambda: pdyn.AdaptiveDamping(initial=10.0, max_damping=1.0),
        lambda: pdyn.AdaptiveDamping(initial=float("inf")),
        lambda: pdyn.AdaptiveDamping(initial=float("nan")),
        lambda: pdyn.FixedDamping(float("inf")),
    ],
    ids=[
        "max0",
        "max_negative",
        "max_inf",
        "max_below_initial",
        "initial_inf",
        "initial_nan",
        "fixed_inf",
    ],
)
def test_bad_damping_arguments_raise(make):
    # A negative or zero `max_damping` would clip the damping to it (a negative
    # damping makes the Kalman weights 1 / (1 + λ) blow up); an infinite damping
    # makes them NaN.
    with pytest.raises(ValueError, match="damping|initial"):
        make()


@pytest.mark.parametrize("cls", [pdyn.KalmanSmoother, pdyn.KalmanFilter])
@pytest.mark.parametrize("radix", [1, 0, 2.5])
def test_bad_radix_raises_at_construction(cls, radix):
    # Checked when the smoother is built, whichever of its parallel or sequential
    # paths a solve takes later, with a message naming the argument.
    with pytest.raises(ValueError, match="`radix`"):
        cls(radix=radix)


def test_empty_state():
    # A state with no components (D = 0), which pdyn.DEER solves: the row maxima of
    # the defects are reductions over zero entries.
    sol = pdyn.solve(lambda y, x, args: 2 * y, pdyn.ELK(), jnp.zeros(0), length=3)
    assert sol.result == optx.RESULTS.successful
    assert sol.value.shape == (3, 0)


def _sqrt_step(y, x, args):
    del args
    return jnp.sqrt(y + x)


@pytest.mark.parametrize("solver", [pdyn.ELK(), pdyn.QuasiELK()], ids=["elk", "qelk"])
def test_step_undefined_at_the_initial_guess(solver):
    # The trajectory is well defined (y_t + x_t > 0 all along), but the step is NaN
    # at the default initial guess y_t = y0 from t = 6 on (0.1 - 0.2 < 0). ELK does
    # not fail with RESULTS.nonfinite at the first iteration: as the exact prefix
    # grows, those residuals become finite and the solve succeeds.
    T = 12
    inputs = jnp.where(jnp.arange(T) < 5, 1.0, -0.2)[:, None]
    y0 = jnp.full(1, 0.1)
    expected = scan_reference(_sqrt_step, y0, inputs, None)
    assert np.all(np.isfinite(np.asarray(expected)))
    sol = pdyn.solve(_sqrt_step, solver, y0, inputs, throw=False)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, expected, rtol=1e-10)


@pytest.mark.parametrize("solver", [pdyn.ELK(), pdyn.QuasiELK()], ids=["elk", "qelk"])
def test_nonfinite_trajectory_still_fails_with_a_finite_iterate(solver):
    # Here the recurrence's own trajectory is NaN from t = 7 on (y_6 + x_7 < 0).
    T = 12
    inputs = jnp.where(jnp.arange(T) < 5, 1.0, -1.5)[:, None]
    y0 = jnp.full(1, 0.1)
    assert np.isnan(np.asarray(scan_reference(_sqrt_step, y0, inputs, None))[6:]).all()
    sol = pdyn.solve(_sqrt_step, solver, y0, inputs, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert np.all(np.isfinite(np.asarray(sol.value)))


def _expanding(y, x, args):
    return 3.0 * y + x


def test_a_rejected_step_keeps_a_trajectory_at_tolerance():
    # Every defect is below tolerance (a state off by 0.3 tol makes defects of 0.3 and
    # 0.9 tol) and the last verification failed, so the step is a damped one over the
    # whole trajectory. With A_t = 0 it moves the two states with defects, and the map
    # triples the move into a defect of 1.35 tol after them: the trial is rejected.
    # Its converged prefix is no longer than the iterate's, so none of it is kept (kept,
    # it would break the recurrence where it ends).
    length, tol = 8, 1e-6
    inputs = jnp.zeros((length, 1))
    y = jnp.zeros((length, 1)).at[3, 0].set(0.3 * tol)
    fn, args = pdyn.root_find_problem(_expanding, jnp.zeros(1), inputs, None)
    assert float(jnp.max(jnp.abs(fn(y, args)))) < tol
    solver = pdyn.LevenbergMarquardt(
        rtol=tol,
        atol=tol,
        jacobian=pdyn.ZeroJacobian(),
        damping=pdyn.AdaptiveDamping(),
        jacobi_start=False,
    )
    struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
    state = solver.init(fn, y, args, {}, struct, None, frozenset())
    state = eqx.tree_at(lambda s: s.stopping.newton_failed, state, jnp.array(True))
    new_y, new_state, _ = solver.step(fn, y, args, {}, state, frozenset())
    assert float(new_state.damping) > float(state.damping)  # rejected
    np.testing.assert_array_equal(new_y, y)
    assert int(new_state.converged_prefix) == length
