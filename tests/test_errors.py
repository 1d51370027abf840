"""Bad input raises at trace time naming the argument; numerical failure is reported
honestly through `RESULTS`."""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn


def step(y, x, args):
    return jnp.tanh(0.5 * y + x)


XS = jnp.ones((10, 3))
Y0 = jnp.zeros(3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(y0=jnp.zeros(3, jnp.int32)), TypeError, "`y0`.*floating"),
        (dict(y0=jnp.zeros(3, bool)), TypeError, "`y0`.*floating"),
        (dict(y0=(jnp.zeros(3), 1.0)), TypeError, "`y0`.*array"),
        (dict(y0=jnp.zeros(3, jnp.complex64)), TypeError, "Complex"),
        (dict(y0=()), ValueError, "`y0`"),
        (dict(inputs=None), ValueError, "`inputs`.*`length"),
        (dict(inputs=(XS, jnp.ones((9, 3)))), ValueError, "`inputs`.*length"),
        (dict(inputs=jnp.ones(())), ValueError, "`inputs`.*time axis"),
        (dict(inputs=[1.0] * 10), TypeError, "`inputs`"),
        (dict(length=11), ValueError, "`length=11`"),
        (dict(length=2.0), TypeError, "`length`"),
        (dict(inputs=jnp.ones((0, 3))), ValueError, "at least 1"),
        (dict(init=jnp.zeros((9, 3))), ValueError, "`init`"),
        (dict(init=(jnp.zeros((10, 3)),)), ValueError, "`init`"),
        (dict(init=jnp.zeros((10, 3), jnp.float32)), ValueError, "`init`"),
        (dict(max_steps=0), ValueError, "`max_steps`"),
        (dict(max_steps=-3), ValueError, "`max_steps`"),
        (dict(max_steps=2.5), TypeError, "`max_steps`"),
        (dict(solver=optx.BFGS(1e-3, 1e-3)), TypeError, None),
        (dict(solver="DEER"), TypeError, "`solver`"),
        (dict(step=3), TypeError, "`step`"),
        (dict(adjoint=None), TypeError, "`adjoint`"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    call = dict(step=step, solver=pdyn.DEER(), y0=Y0, inputs=XS)
    call.update(kwargs)
    args = (call.pop("step"), call.pop("solver"), call.pop("y0"), call.pop("inputs"))
    if match is None:  # a minimiser is a valid Optimistix solver: nothing to check
        return
    with pytest.raises(error, match=match):
        pdyn.solve(*args, **call)


@pytest.mark.parametrize(
    "bad_step, match",
    [
        (lambda y, x, a: (y, y), "structure"),
        (lambda y, x, a: jnp.concatenate([y, y]), "shapes"),
        (lambda y, x, a: y.astype(jnp.float32), "dtypes"),
        (lambda y, x, a: {"y": y}, "structure"),
    ],
)
def test_step_output_must_match_the_state(bad_step, match):
    with pytest.raises((ValueError, TypeError), match=f"`step`.*{match}"):
        pdyn.solve(bad_step, pdyn.DEER(), Y0, XS)


def test_float32_state_with_float64_output_under_x64():
    def promoting(y, x, args):
        return y + jnp.ones(3, jnp.float64)

    with pytest.raises(TypeError, match="`step`.*float32"):
        pdyn.solve(promoting, pdyn.QuasiDEER(), jnp.zeros(3, jnp.float32), length=4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pdyn.QuasiDEER(diagonal="stochastic", num_probes=0), "num_probes"),
        (lambda: pdyn.QuasiDEER(diagonal="bogus"), "diagonal"),
        (lambda: pdyn.BlockQuasiDEER(0), "block_size"),
        (lambda: pdyn.ChunkedScan(chunk_size=-1), "chunk_size"),
    ],
)
def test_bad_solver_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "solver, match",
    [
        (pdyn.DEER(rtol=-1.0), "rtol"),
        (pdyn.QuasiDEER(atol=-1e-3), "atol"),
        (pdyn.BlockQuasiDEER(2), "block_size"),  # 2 does not divide D = 3
    ],
)
def test_solver_options_checked_against_the_problem(solver, match):
    with pytest.raises(ValueError, match=match):
        pdyn.solve(step, solver, Y0, XS)


def test_solvers_refuse_args_that_are_not_a_recurrence():
    with pytest.raises(TypeError, match="Recurrence"):
        optx.root_find(lambda y, a: y, pdyn.DEER(), jnp.zeros((3, 2)), args=None)


# --- run-time failures --------------------------------------------------------------


def blows_up_at_step_5(y, x, args):
    return jnp.where(x > 4.5, jnp.nan, 0.5 * y + x)


T_NAN = jnp.arange(10.0)[:, None] * jnp.ones((10, 2))


@pytest.mark.parametrize("solver", [pdyn.DEER(), pdyn.QuasiDEER(), pdyn.Jacobi()])
def test_nonfinite_step_gives_nonfinite_result_and_keeps_a_finite_iterate(solver):
    sol = pdyn.solve(blows_up_at_step_5, solver, jnp.zeros(2), T_NAN, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert np.all(np.isfinite(np.asarray(sol.value)))
    with pytest.raises(Exception, match="non-finite.*ELK"):
        pdyn.solve(blows_up_at_step_5, solver, jnp.zeros(2), T_NAN, throw=True)


def test_sequential_reports_nonfinite_trajectories():
    sol = pdyn.solve(
        blows_up_at_step_5, pdyn.Sequential(), jnp.zeros(2), T_NAN, throw=False
    )
    assert sol.result == optx.RESULTS.nonfinite
    assert np.isnan(np.asarray(sol.value[5])).all()
    np.testing.assert_allclose(sol.value[4], 0.5 * sol.value[3] + 4.0)


def test_deer_overflow_in_float32_is_reported_not_hidden():
    # Linearised around the zero guess, tanh(3y) grows like 3^t: DEER's first scan
    # overflows float32 although the true trajectory is bounded.
    def expanding(y, x, args):
        return jnp.tanh(3.0 * y) + x

    xs = 0.01 * jnp.ones((200, 1), jnp.float32)
    y0 = jnp.zeros((1,), jnp.float32)
    sol = pdyn.solve(expanding, pdyn.DEER(), y0, xs, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert int(sol.stats["num_steps"]) == 1
    np.testing.assert_array_equal(np.asarray(sol.value), 0.0)  # the initial guess
    with pytest.raises(Exception):
        pdyn.solve(expanding, pdyn.DEER(), y0, xs)


def test_max_steps_reached():
    from .helpers import lorenz96_rk4

    step_l96, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=60)
    sol = pdyn.solve(
        step_l96, pdyn.Jacobi(), y0, None, dt, length=length, max_steps=3, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert int(sol.stats["num_steps"]) == 3
    with pytest.raises(Exception, match="did not converge within `max_steps`"):
        pdyn.solve(step_l96, pdyn.Jacobi(), y0, None, dt, length=length, max_steps=3)


def test_errors_raise_under_jit_too():
    @jax.jit
    def solve(y0):
        bad_step = lambda y, x, args: jnp.concatenate([y, x])
        return pdyn.solve(bad_step, pdyn.DEER(), y0, jnp.ones((5, 2))).value

    with pytest.raises(ValueError, match="`step`.*shapes"):
        solve(jnp.zeros(3))
