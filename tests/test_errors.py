"""Numerical failure is reported honestly through `RESULTS`: `throw=False` returns the
last finite iterate with the failing result, `throw=True` raises a message that says
what happened and what to try. (Wrong arguments: `test_validation.py`.)"""

import diffrax as dfx
import equinox._errors
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import lorenz96_rk4, scan_reference


def finite(tree) -> bool:
    return bool(np.all(np.isfinite(np.asarray(tree))))


# --- the step produces NaN at some t ------------------------------------------------


def blows_up_at_step_6(y, x, args):
    return jnp.where(x > 4.5, jnp.nan, 0.5 * y + x)


T_NAN = jnp.arange(10.0)[:, None] * jnp.ones((10, 2))


@pytest.mark.parametrize(
    "solver, check_throw",
    [
        (pdyn.DEER(), True),
        (pdyn.QuasiDEER(), False),
        (pdyn.Jacobi(), False),
        (pdyn.Picard(), False),
        (pdyn.ELK(), True),
        (pdyn.QuasiELK(), False),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, bool) else str(x),
)
def test_nonfinite_step_gives_nonfinite_result_and_keeps_a_finite_iterate(
    solver, check_throw
):
    sol = pdyn.solve(blows_up_at_step_6, solver, jnp.zeros(2), T_NAN, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert finite(sol.value)
    if check_throw:
        with pytest.raises(Exception, match="non-finite.*ELK.*float64.*Sequential"):
            pdyn.solve(blows_up_at_step_6, solver, jnp.zeros(2), T_NAN)


@pytest.mark.parametrize(
    "solver",
    [pdyn.DEER, pdyn.Picard, pdyn.Jacobi],
    ids=lambda x: x.__name__,
)
def test_nonfinite_residual_is_reported_with_any_lineax_solver(solver):
    """The library's scans add the residual into the update at every step, so a
    non-finite residual makes the update non-finite; a generic Lineax solver need not
    (CG on the normal equations returns zero for a NaN right-hand side), and the
    solve must not then report the unchanged guess as a solution."""
    linear_solver = lx.Normal(lx.CG(rtol=1e-8, atol=1e-8))
    sol = pdyn.solve(
        blows_up_at_step_6,
        solver(linear_solver=linear_solver),
        jnp.zeros(2),
        T_NAN,
        throw=False,
    )
    assert sol.result == optx.RESULTS.nonfinite
    assert finite(sol.value)


def test_sequential_reports_nonfinite_trajectories():
    sol = pdyn.solve(
        blows_up_at_step_6, pdyn.Sequential(), jnp.zeros(2), T_NAN, throw=False
    )
    assert sol.result == optx.RESULTS.nonfinite
    assert np.isnan(np.asarray(sol.value[5])).all()
    np.testing.assert_allclose(sol.value[4], 0.5 * sol.value[3] + 4.0)


@pytest.mark.parametrize("where", ["y0", "init", "inputs", "args"])
def test_nonfinite_data_is_reported(where):
    """Non-finite values in the data, rather than made by the step."""

    def step(y, x, w):
        return jnp.tanh(w * y + x)

    y0, xs, w = jnp.zeros(2), jnp.ones((6, 2)), jnp.asarray(0.5)
    init = None
    if where == "y0":
        y0 = y0.at[1].set(jnp.inf)
    elif where == "init":
        init = jnp.zeros((6, 2)).at[3, 0].set(jnp.nan)
    elif where == "inputs":
        xs = xs.at[2, 1].set(jnp.nan)
    else:
        w = jnp.asarray(jnp.nan)
    sol = pdyn.solve(step, pdyn.QuasiDEER(), y0, xs, w, init=init, throw=False)
    assert sol.result == optx.RESULTS.nonfinite


# --- overflow in DEER's scan --------------------------------------------------------


def expanding(y, x, args):
    # Linearised around the zero guess, tanh(3y) grows like 3^t: DEER's first scan
    # overflows float32 although the true trajectory is bounded.
    return jnp.tanh(3.0 * y) + x


XS_EXPANDING = 0.01 * jnp.ones((200, 1), jnp.float32)
Y0_EXPANDING = jnp.zeros((1,), jnp.float32)


@pytest.mark.parametrize("solver", [pdyn.DEER(), pdyn.QuasiDEER()])
def test_overflow_in_float32_is_reported_not_hidden(solver):
    sol = pdyn.solve(expanding, solver, Y0_EXPANDING, XS_EXPANDING, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert int(sol.stats["num_steps"]) == 1
    np.testing.assert_array_equal(np.asarray(sol.value), 0.0)  # the initial guess


def test_overflow_message_and_the_suggested_remedies():
    with pytest.raises(Exception, match="non-finite.*overflowed.*ELK"):
        pdyn.solve(expanding, pdyn.DEER(), Y0_EXPANDING, XS_EXPANDING)
    expected = scan_reference(expanding, Y0_EXPANDING, XS_EXPANDING, None)
    # ELK stays finite where DEER's scan overflows; so does float64.
    for solver, y0, xs in [
        (pdyn.ELK(), Y0_EXPANDING, XS_EXPANDING),
        (pdyn.DEER(), Y0_EXPANDING.astype(jnp.float64), XS_EXPANDING.astype(float)),
    ]:
        sol = pdyn.solve(expanding, solver, y0, xs)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, expected, rtol=1e-4, atol=1e-4)


# --- no convergence -----------------------------------------------------------------


def test_max_steps_reached():
    step_l96, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=60)
    sol = pdyn.solve(
        step_l96, pdyn.Jacobi(), y0, None, dt, length=length, max_steps=3, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    assert finite(sol.value)
    with pytest.raises(Exception, match="did not converge within `max_steps`.*ELK"):
        pdyn.solve(step_l96, pdyn.Jacobi(), y0, None, dt, length=length, max_steps=3)


def logistic(y, x, r):
    return r * y * (1 - y)


def test_stagnation_on_a_chaotic_map_is_not_reported_as_success():
    """The logistic map at r = 3.9 in float64. Jacobi's iterates never settle: every
    iteration perturbs the converged prefix by a rounding error, which the map
    amplifies by about 2 per step, so after all T iterations (exact in exact
    arithmetic) the trajectory still violates the recurrence, which is not
    success."""
    y0, r = jnp.array([0.3, 0.6]), jnp.asarray(3.9)
    sol = pdyn.solve(logistic, pdyn.Jacobi(), y0, None, r, length=32, throw=False)
    assert int(sol.stats["num_steps"]) == 32
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert finite(sol.value)
    with pytest.raises(Exception, match="used all T iterations.*DEER.*Sequential"):
        pdyn.solve(logistic, pdyn.Jacobi(), y0, None, r, length=32)


def test_exhausting_the_iterations_on_a_benign_map_is_still_success():
    """The verification after T iterations accepts exact trajectories, even with zero
    tolerances (rounding is allowed for)."""
    step_l96, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=30)
    sol = pdyn.solve(
        step_l96, pdyn.Jacobi(rtol=0.0, atol=0.0), y0, None, dt, length=length
    )
    assert int(sol.stats["num_steps"]) == length
    assert sol.result == optx.RESULTS.successful


def test_elk_stays_finite_on_the_chaotic_map():
    y0, r = jnp.array([0.3, 0.6]), jnp.asarray(3.9)
    sol = pdyn.solve(logistic, pdyn.QuasiELK(), y0, None, r, length=32, throw=False)
    assert finite(sol.value)
    if sol.result == optx.RESULTS.successful:
        # Then every step satisfies the recurrence to the tolerance.
        previous = jnp.concatenate([y0[None], sol.value[:-1]])
        defect = jnp.abs(sol.value - logistic(previous, None, r))
        tol = np.finfo(np.float64).eps ** 0.7
        assert bool(jnp.all(defect <= 2 * tol * (1 + jnp.abs(sol.value))))
    else:
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached


# --- EQX_ON_ERROR=nan ---------------------------------------------------------------


@pytest.fixture
def eqx_on_error_nan(monkeypatch):
    """`EQX_ON_ERROR=nan` for what is traced within the test. Equinox reads the
    variable on import, and caches its traced checks without it, hence the cleared
    caches, before (so that the checks are traced again) and after (so that no other
    test runs a check traced with it)."""
    jax.clear_caches()
    monkeypatch.setattr(equinox._errors, "EQX_ON_ERROR", "nan")
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.usefixtures("eqx_on_error_nan")
def test_eqx_on_error_nan_makes_a_failed_solve_nan_in_solve_and_diffeqsolve():
    # `throw=True` raises through `equinox.error_if`, so with `EQX_ON_ERROR=nan` a
    # failure gives NaN values instead, in `pdyn.solve` and `pdyn.diffeqsolve` alike.

    def step(y, x, args):
        return jnp.tanh(args * y + x)

    xs = jnp.sin(jnp.arange(40.0))[:, None] * jnp.ones((40, 3))
    y0 = jnp.ones(3)
    kwargs = dict(max_steps=1)
    failed = pdyn.solve(step, pdyn.QuasiDEER(), y0, xs, 2.0, throw=False, **kwargs)
    assert failed.result == optx.RESULTS.nonlinear_max_steps_reached
    assert finite(failed.value)
    sol = pdyn.solve(step, pdyn.QuasiDEER(), y0, xs, 2.0, **kwargs)
    assert np.all(np.isnan(sol.value))

    term = dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -args * jnp.sin(y[0])]))
    kwargs = dict(parallel=pdyn.QuasiDEER(), max_steps=1, saveat=dfx.SaveAt(steps=True))
    failed = pdyn.diffeqsolve(
        term, dfx.Heun(), 0.0, 3.0, 0.05, jnp.array([1.0, 0.0]), 2.0, throw=False,
        **kwargs,
    )  # fmt: skip
    assert failed.result == dfx.RESULTS.max_steps_reached
    assert finite(failed.ys)
    sol = pdyn.diffeqsolve(
        term, dfx.Heun(), 0.0, 3.0, 0.05, jnp.array([1.0, 0.0]), 2.0, **kwargs
    )
    assert np.all(np.isnan(sol.ys))
    assert sol.result == failed.result
