"""Newton-type iterations with a trust region in time (TrustDEER, QuasiTrustDEER,
TrustRegionNewton): the horizon and continuation rules, agreement with `lax.scan` and
Diffrax, convergence where undamped Newton diverges, DEER's iteration counts where it
converges, and honest results."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn
from parallel_dynamics._solver.horizon import (
    continue_beyond,
    hold_beyond,
    squared_residual_beyond,
    trusted_horizon,
)

from .helpers import gru, lorenz96_rk4, robertson, scan_reference, tree_allclose, ZOO


# --- the horizon and the continuation -------------------------------------------------


def _horizon(old, new, converged=None, start=0, max_growth=np.inf):
    old = jnp.asarray(old, jnp.float64)[:, None]
    new = jnp.asarray(new, jnp.float64)[:, None]
    if converged is None:
        converged = jnp.zeros(old.shape[0], bool)
    horizon = trusted_horizon(
        old, new, jnp.asarray(converged), jnp.array(start), 0.0, max_growth
    )
    return int(horizon)


def test_horizon_is_everything_when_the_trial_decreases_every_residual():
    assert _horizon([1, 1, 1, 1], [0.1, 0.5, 0.9, 0.0]) == 4


def test_horizon_ends_where_the_gain_turns_negative():
    # Cumulative squares: old 1, 2, 3, 4; new 0, 0.25, 2.21, 6.21.
    assert _horizon([1, 1, 1, 1], [0.0, 0.5, 1.4, 2.0]) == 3
    # A single increase that the interval has paid for is trusted.
    assert _horizon([1, 1, 1, 1], [0.0, 1.2, 0.0, 0.0]) == 4


def test_horizon_measures_the_gain_from_the_first_unconverged_state():
    # Before `start` the step only polishes: trusted where finite, whatever its gain.
    old, new = [1e-9, 1e-9, 1, 1], [2e-9, 2e-9, 0.5, 0.5]
    assert _horizon(old, new, start=2) == 4
    # ... and the horizon is past `start`, which the trial makes exact.
    assert _horizon([0, 0, 1, 1], [0, 0, 5.0, 5.0], start=2) == 3


def test_horizon_bounds_the_growth_at_single_times():
    # A large early decrease pays for a trial that left the trajectory at t = 2.
    old, new = [10, 1, 1, 1], [0, 0, 5, 0]
    assert _horizon(old, new) == 4
    assert _horizon(old, new, max_growth=2.0) == 2


def test_horizon_ends_at_a_non_finite_trial():
    assert _horizon([1, 1, 1, 1], [0.0, 0.0, np.nan, 0.0]) == 2
    assert _horizon([1, 1, 1, 1], [0.0, np.inf, 0.0, 0.0]) == 1


def test_horizon_trusts_times_where_the_trial_satisfies_the_recurrence():
    converged = [True, True, True, False]
    assert _horizon([1, 1, 1, 1], [2.0, 2.0, 2.0, 2.0], converged) == 3


def test_horizon_is_at_least_one():
    assert _horizon([1, 1], [5.0, 5.0]) == 1


def test_continuation_is_continuous_at_the_horizon():
    y = jnp.arange(10.0).reshape(5, 2)
    trial = y + jnp.array([[1.0, 2.0]]) * jnp.arange(1, 6)[:, None]
    new = continue_beyond(y, trial, jnp.array(3))
    np.testing.assert_array_equal(new[:3], trial[:3])
    # Beyond the horizon: the iterate shifted by the correction at t = 2.
    np.testing.assert_array_equal(new[3:], y[3:] + (trial[2] - y[2]))
    np.testing.assert_array_equal(continue_beyond(y, trial, jnp.array(5)), trial)


def test_continuation_that_overflows_restarts_from_the_last_trusted_state():
    big = 0.75 * np.finfo(np.float32).max
    y = jnp.array([[0.0], [-big], [big], [big]], jnp.float32)
    trial = jnp.array([[1.0], [2.0], [3.0], [4.0]], jnp.float32)
    new = continue_beyond(y, trial, jnp.array(2))
    # Shifted by trial[1] - y[1] = 2 + big, the states beyond would overflow.
    np.testing.assert_array_equal(new, [[1.0], [2.0], [2.0], [2.0]])


def test_hold_keeps_the_last_trusted_state():
    trial = jnp.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(
        hold_beyond(trial, jnp.array(2)), [[0, 1], [2, 3], [2, 3], [2, 3], [2, 3]]
    )
    np.testing.assert_array_equal(hold_beyond(trial, jnp.array(5)), trial)


# --- agreement with the sequential reference -------------------------------------------


SOLVERS = {
    "TrustDEER": pdyn.TrustDEER,
    "QuasiTrustDEER": pdyn.QuasiTrustDEER,
    "BlockTrust": lambda **kw: pdyn.TrustRegionNewton(
        jacobian=pdyn.BlockDiagonalJacobian(1), **kw
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_matches_lax_scan(name, solver, dtype):
    step, y0, inputs, args, length = ZOO[name](dtype)
    expected = scan_reference(step, y0, inputs, args, length)
    tol = 1e-5 if dtype == jnp.float32 else 1e-9
    sol = pdyn.solve(
        step, SOLVERS[solver](rtol=tol, atol=tol), y0, inputs, args, length=length
    )
    assert sol.result == optx.RESULTS.successful
    close = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else {}
    assert tree_allclose(sol.value, expected, **close)


def test_takes_deers_iterations_on_a_contracting_map():
    step, y0, inputs, cell, _ = gru(jnp.float64, length=300, hidden=8)
    deer = pdyn.solve(step, pdyn.DEER(), y0, inputs, cell)
    trust = pdyn.solve(step, pdyn.TrustDEER(), y0, inputs, cell)
    assert int(trust.stats["num_steps"]) == int(deer.stats["num_steps"]) <= 6
    assert tree_allclose(trust.value, scan_reference(step, y0, inputs, cell))


def test_gradients_match_backpropagation_through_the_scan():
    step, y0, inputs, cell, _ = gru(jnp.float64, length=30)

    def loss(cell, solve):
        return jnp.sum(jnp.sin(solve(cell)))

    parallel = lambda c: pdyn.solve(step, pdyn.TrustDEER(), y0, inputs, c).value
    sequential = lambda c: scan_reference(step, y0, inputs, c)
    grads = jax.grad(loss)(cell, parallel)
    expected = jax.grad(loss)(cell, sequential)
    assert tree_allclose(grads, expected, rtol=1e-7, atol=1e-10)


# --- oscillators and orbits, where undamped Newton diverges ----------------------------


def _lotka_volterra(t, y, args):
    prey, predator = y
    return jnp.stack([1.5 * prey - prey * predator, predator * (prey - 3.0)])


def _kepler(t, y, args):
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -q / jnp.sum(q**2) ** 1.5])


_ECCENTRICITY = 0.9
ODES = {
    "lotka_volterra": (_lotka_volterra, jnp.array([10.0, 1.0])),
    "kepler_e0.9": (
        _kepler,
        jnp.array(
            [
                1 - _ECCENTRICITY,
                0,
                0,
                np.sqrt((1 + _ECCENTRICITY) / (1 - _ECCENTRICITY)),
            ]
        ),
    ),
}
# 200 Tsit5 steps on [0, 4]. Iteration counts are deterministic; these ceilings have
# a margin of about a quarter over the measured counts (TrustDEER 14 and 10,
# QuasiTrustDEER 30 and 28).
_CEILINGS = {"TrustDEER": 18, "QuasiTrustDEER": 38}


def _ode(name, parallel, coarse=None):
    """From the constant initial guess unless a `coarse` guess is given."""
    vector_field, y0 = ODES[name]
    kwargs = dict(saveat=dfx.SaveAt(steps=True))
    term = dfx.ODETerm(vector_field)
    sol = pdyn.diffeqsolve(
        term, dfx.Tsit5(), 0.0, 4.0, 0.02, y0,
        parallel=parallel, coarse=coarse, throw=False, **kwargs,
    )  # fmt: skip
    expected = dfx.diffeqsolve(
        term, dfx.Tsit5(), 0.0, 4.0, 0.02, y0, max_steps=200, **kwargs
    )
    return sol, expected.ys


@pytest.mark.parametrize("name", sorted(ODES))
def test_deer_overflows_on_the_oscillators(name):
    sol, _ = _ode(name, pdyn.DEER())
    assert sol.result != dfx.RESULTS.successful


@pytest.mark.parametrize("name", sorted(ODES))
@pytest.mark.parametrize("solver", sorted(_CEILINGS))
def test_converges_on_the_oscillators_in_few_iterations(name, solver):
    sol, expected = _ode(name, getattr(pdyn, solver)())
    assert sol.result == dfx.RESULTS.successful
    assert int(sol.stats["num_parallel_iterations"]) <= _CEILINGS[solver]
    np.testing.assert_allclose(sol.ys, expected, rtol=1e-9, atol=1e-9)


def test_squared_residual_beyond():
    residual = jnp.array([[1.0, 2.0], [3.0, 0.0], [0.0, 2.0]])
    assert float(squared_residual_beyond(residual, jnp.array(1))) == 13.0
    assert float(squared_residual_beyond(residual, jnp.array(3))) == 0.0
    residual = residual.at[2, 0].set(jnp.nan)
    assert float(squared_residual_beyond(residual, jnp.array(1))) == np.inf


def test_takes_newtons_iterations_from_a_good_guess():
    # Kepler e = 0.9 over three orbits (2000 Tsit5 steps on [0, 20]) from the
    # default adaptive coarse guess. DEER converges although its residual grows at
    # some perihelia on the way, so the trust region ends before T; beyond it the
    # trial leaves a smaller residual than the continuation from the last trusted
    # state, and TrustDEER keeps it. Measured: 6 iterations for both.
    vector_field, y0 = ODES["kepler_e0.9"]
    term = dfx.ODETerm(vector_field)
    kwargs = dict(saveat=dfx.SaveAt(steps=True))
    expected = dfx.diffeqsolve(
        term, dfx.Tsit5(), 0.0, 20.0, 0.01, y0, max_steps=2000, **kwargs
    ).ys
    iterations = {}
    for parallel in (pdyn.DEER(), pdyn.TrustDEER()):
        sol = pdyn.diffeqsolve(
            term, dfx.Tsit5(), 0.0, 20.0, 0.01, y0, parallel=parallel, **kwargs
        )
        np.testing.assert_allclose(sol.ys, expected, rtol=1e-9, atol=1e-9)
        iterations[type(parallel).__name__] = int(sol.stats["num_parallel_iterations"])
    assert iterations["DEER"] <= 7
    assert iterations["TrustDEER"] <= iterations["DEER"]


def test_stiff_kinetics_with_implicit_euler():
    # Robertson's kinetics, 400 implicit Euler steps on a geometric grid to t = 1e5.
    # Continuing a shifted iterate beyond the horizon can send the states far off
    # (the residual beyond grows by 1e40 within a few iterations), where an implicit
    # step's root finder fails and the derivative of that root find raises; holding
    # the last trusted state there instead keeps the iterates near the trajectory.
    # Measured: 94 iterations from the constant and from the uniform coarse guess.
    ts = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-6, 1e5, 400)])
    solver = dfx.ImplicitEuler(root_finder=optx.Newton(rtol=1e-10, atol=1e-10))
    kwargs = dict(stepsize_controller=dfx.StepTo(ts), saveat=dfx.SaveAt(steps=True))
    term, y0 = dfx.ODETerm(robertson), jnp.array([1.0, 0.0, 0.0])
    expected = dfx.diffeqsolve(
        term, solver, 0.0, 1e5, None, y0, max_steps=400, **kwargs
    ).ys
    sol = pdyn.diffeqsolve(
        term, solver, 0.0, 1e5, None, y0, coarse=pdyn.CoarseGuess(factor=5),
        throw=False, **kwargs,
    )  # fmt: skip
    assert sol.result == dfx.RESULTS.successful
    assert int(sol.stats["num_parallel_iterations"]) <= 110
    np.testing.assert_allclose(sol.ys, expected, rtol=1e-9, atol=1e-12)


def test_is_the_default_of_diffeqsolve():
    sol, expected = _ode("lotka_volterra", pdyn.TrustDEER(), pdyn.CoarseGuess())
    vector_field, y0 = ODES["lotka_volterra"]
    default = pdyn.diffeqsolve(
        dfx.ODETerm(vector_field), dfx.Tsit5(), 0.0, 4.0, 0.02, y0,
        saveat=dfx.SaveAt(steps=True),
    )  # fmt: skip
    np.testing.assert_array_equal(default.ys, sol.ys)
    assert (
        default.stats["num_parallel_iterations"] == sol.stats["num_parallel_iterations"]
    )


# --- honest results --------------------------------------------------------------------


def test_chaotic_map_in_float32_is_right_or_fails():
    step, y0, _, dt, length = lorenz96_rk4(jnp.float32, length=400, size=8)
    expected = scan_reference(step, y0, None, dt, length)
    for solver in (pdyn.TrustDEER(), pdyn.QuasiTrustDEER()):
        sol = pdyn.solve(step, solver, y0, None, dt, length=length, throw=False)
        if sol.result == optx.RESULTS.successful:
            # Successful means every defect is within tolerance; on a chaotic map the
            # forward error may exceed that by the growth of the dynamics, but the
            # trajectory is the scan's to within float32 rounding amplified.
            residual = sol.value[1:] - jax.vmap(step, (0, None, None))(
                sol.value[:-1], None, dt
            )
            assert np.all(np.isfinite(sol.value))
            assert np.max(np.abs(residual)) < 1e-3
            assert np.max(np.abs(sol.value[:50] - expected[:50])) < 1e-3


def test_a_step_undefined_at_the_initial_state_fails():
    step = lambda y, x, args: jnp.log(y) + x
    sol = pdyn.solve(
        step, pdyn.TrustDEER(), -jnp.ones(2), jnp.ones((5, 2)), throw=False
    )
    assert sol.result == optx.RESULTS.nonfinite


@pytest.mark.parametrize("length", [1, 2, 5])
@pytest.mark.parametrize(
    "solver",
    [
        pdyn.DEER(),
        pdyn.QuasiDEER(),
        pdyn.TrustDEER(),
        pdyn.QuasiTrustDEER(),
        pdyn.ELK(),
        pdyn.QuasiELK(),
        pdyn.Picard(),
        pdyn.Jacobi(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_max_steps_equal_to_the_length_is_exact_and_successful(length, solver):
    xs = jax.random.normal(jax.random.key(0), (length, 3))
    step = lambda y, x, w: jnp.tanh(w * y + x)
    sol = pdyn.solve(step, solver, jnp.zeros(3), xs, 0.7, max_steps=length, throw=False)
    assert sol.result == optx.RESULTS.successful
    expected = scan_reference(step, jnp.zeros(3), xs, 0.7)
    np.testing.assert_allclose(sol.value, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "option, value",
    [("min_ratio", 1.0), ("min_ratio", -np.inf), ("min_ratio", np.nan)]
    + [("max_growth", 0.5), ("max_growth", np.nan)],
)
def test_trust_options_out_of_range_are_rejected(option, value):
    for solver in (pdyn.TrustDEER, pdyn.QuasiTrustDEER, pdyn.TrustRegionNewton):
        with pytest.raises(ValueError, match=option):
            solver(**{option: value})
