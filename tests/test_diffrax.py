"""`pdyn.diffeqsolve` against `diffrax.diffeqsolve`: the same solver on the same grid
gives the same discrete solution (to 1e-8 relative, float64), saved the same way, and
the same gradients.

JAX compilation dominates the run time here, so the problems are small (D <= 3, at most
60 steps) and built once at module level, so that calls with the same solver share one
compiled function. Marked slow (each takes 10-30 s, mostly compiling): the SDE solvers
(a virtual Brownian tree alone takes seconds to compile), the implicit solvers, and the
gradients through interpolation and SDEs; a plain ODE gradient runs by default."""

import importlib
import pathlib
import re
import sys

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn
from parallel_dynamics import diffeqsolve, DiffraxStep
from parallel_dynamics._diffrax import step as diffrax_step, version as diffrax_version
from parallel_dynamics._diffrax.grid import _make_grid


RTOL = 1e-8


def assert_close(got, expected, rtol=RTOL):
    """Leafwise, relative to the largest entry of each leaf of `expected`."""
    assert jtu.tree_structure(got) == jtu.tree_structure(expected)
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = np.max(np.abs(b), initial=0.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _vector_field(t, y, args):
    # A forced, damped oscillator coupled to a decaying third component.
    return jnp.stack([y[1], -args["k"] * y[0] - 0.1 * y[1] + jnp.sin(t), -y[2] * y[0]])


def _diffusion(t, y, args):
    # Diagonal noise, state dependent.
    return lx.DiagonalLinearOperator(args["s"] * jnp.tanh(y))


def _additive_diffusion(t, y, args):
    return args["s"] * jnp.eye(3)


ODE = dfx.ODETerm(_vector_field)
Y0 = jnp.array([1.0, 0.0, 0.5])
ARGS = {"k": jnp.array(2.0), "s": jnp.array(0.3)}
T0, T1, DT0 = 0.0, 3.0, 0.05  # 60 steps
NUM_STEPS = 60
OFF_GRID = jnp.array([0.0, 0.01, 0.52, 1.0, 1.337, 2.9, 3.0])

_BM = dfx.VirtualBrownianTree(
    T0, T1, tol=1e-3, shape=(3,), key=jr.key(0), levy_area=dfx.BrownianIncrement
)
_BM_LEVY = dfx.VirtualBrownianTree(
    T0, T1, tol=1e-3, shape=(3,), key=jr.key(1), levy_area=dfx.SpaceTimeLevyArea
)
SDE = dfx.MultiTerm(ODE, dfx.ControlTerm(_diffusion, _BM))
ADDITIVE_SDE = dfx.MultiTerm(ODE, dfx.ControlTerm(_additive_diffusion, _BM_LEVY))

# Every step (the discrete solution) and off-grid times (the solver's own dense output).
STEPS_AND_TS = dfx.SaveAt(subs=[dfx.SubSaveAt(steps=True), dfx.SubSaveAt(ts=OFF_GRID)])

_ROOT_FINDER = optx.Newton(rtol=1e-12, atol=1e-12)
SOLVERS = {
    "Euler": dfx.Euler(),
    "Heun": dfx.Heun(),
    "Midpoint": dfx.Midpoint(),
    "Ralston": dfx.Ralston(),
    "Bosh3": dfx.Bosh3(),
    "Tsit5": dfx.Tsit5(),
    "Dopri5": dfx.Dopri5(),
    "Dopri8": dfx.Dopri8(),
    "ImplicitEuler": dfx.ImplicitEuler(root_finder=_ROOT_FINDER),
    "Kvaerno5": dfx.Kvaerno5(root_finder=_ROOT_FINDER),
}
_SLOW_SOLVERS = ("ImplicitEuler", "Kvaerno5")


def _reference(terms, solver, saveat, t0=T0, t1=T1, dt0=DT0, y0=Y0, args=ARGS, **kw):
    """`diffrax.diffeqsolve`, with `max_steps` the number of steps so that
    `SaveAt(steps=...)` outputs are not padded."""
    kw.setdefault("max_steps", NUM_STEPS)
    return dfx.diffeqsolve(terms, solver, t0, t1, dt0, y0, args, saveat=saveat, **kw)


# --- every solver -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_SOLVERS else n
        for n in SOLVERS
    ],
)
def test_ode_solvers_match_diffrax(name):
    solver = SOLVERS[name]
    expected = _reference(ODE, solver, STEPS_AND_TS)
    sol = diffeqsolve(ODE, solver, T0, T1, DT0, Y0, ARGS, saveat=STEPS_AND_TS)
    assert sol.result == dfx.RESULTS.successful
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-14)
    assert int(sol.stats["num_steps"]) == int(expected.stats["num_steps"]) == NUM_STEPS
    assert int(sol.stats["num_accepted_steps"]) == NUM_STEPS
    assert int(sol.stats["num_rejected_steps"]) == 0
    assert 1 <= int(sol.stats["num_parallel_iterations"]) <= NUM_STEPS
    assert sol.t0 == T0 and sol.t1 == T1
    assert sol.interpolation is None and sol.solver_state is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver, terms",
    [
        (dfx.Euler(), SDE),
        (dfx.Heun(), SDE),
        (dfx.ShARK(), ADDITIVE_SDE),
        (dfx.SEA(), ADDITIVE_SDE),
        # Reads the path over half steps, so the increments are not precomputed.
        (dfx.HalfSolver(dfx.Heun()), SDE),
    ],
    ids=["Euler", "Heun", "ShARK", "SEA", "HalfSolver"],
)
def test_sde_solvers_match_diffrax(solver, terms):
    saveat = dfx.SaveAt(t0=True, ts=OFF_GRID[1:-1], steps=True)
    expected = _reference(terms, solver, saveat)
    sol = diffeqsolve(terms, solver, T0, T1, DT0, Y0, ARGS, saveat=saveat)
    assert sol.result == dfx.RESULTS.successful
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-14)


def test_precomputed_brownian_increment_is_only_used_over_its_step():
    # A solver reading the path over any other interval than its step gets NaN (and
    # the solve fails as non-finite) rather than a wrong increment.
    path = dfx.UnsafeBrownianPath(shape=(3,), key=jr.key(3))
    terms = dfx.MultiTerm(ODE, dfx.ControlTerm(_diffusion, path))
    step = DiffraxStep(terms, dfx.Euler())
    assert step.precompute_increments
    assert not DiffraxStep(terms, dfx.HalfSolver(dfx.Euler())).precompute_increments
    inputs = step.inputs(jnp.array([0.0, 0.5, 1.0]))
    x = jtu.tree_map(lambda u: u[1], inputs)
    (stand_in,) = diffrax_step._brownian_paths(step._wrapped_terms(*x))
    expected = path.evaluate(0.5, 1.0)
    np.testing.assert_array_equal(stand_in.evaluate(0.5, 1.0), expected)
    assert np.all(np.isnan(stand_in.evaluate(0.5, 0.75)))
    assert np.all(np.isnan(stand_in.evaluate(0.0, 0.5)))


def test_parallel_solvers_agree():
    solver = dfx.Heun()  # the same calls as in `test_ode_solvers_match_diffrax`
    expected = _reference(ODE, solver, STEPS_AND_TS).ys
    iterations = {}
    for parallel in (pdyn.DEER(), pdyn.QuasiDEER(), pdyn.Sequential()):
        sol = diffeqsolve(
            ODE, solver, T0, T1, DT0, Y0, ARGS, saveat=STEPS_AND_TS, parallel=parallel
        )
        assert_close(sol.ys, expected)
        iterations[type(parallel).__name__] = int(sol.stats["num_parallel_iterations"])
    assert iterations["DEER"] < iterations["QuasiDEER"] < NUM_STEPS
    assert iterations["Sequential"] == 1


# --- the grid -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "t0, t1, dt0",
    [
        (0.0, 1.0, 0.3),  # a final partial step: Diffrax spreads it over the others
        (0.0, 1.0, 0.1),  # 0.1 does not divide 1.0 exactly in floating point
        (0.5, 0.7, 1.0),  # one step, clipped to t1
        (2.0, -1.0, -0.07),  # backwards in time
    ],
)
def test_step_times_match_diffrax(t0, t1, dt0):
    solver = dfx.Euler()
    saveat = dfx.SaveAt(t0=True, steps=True)
    probe = dfx.diffeqsolve(ODE, solver, t0, t1, dt0, Y0, ARGS, max_steps=1000)
    num_steps = int(probe.stats["num_steps"])
    expected = _reference(
        ODE, solver, saveat, t0=t0, t1=t1, dt0=dt0, max_steps=num_steps
    )
    sol = diffeqsolve(ODE, solver, t0, t1, dt0, Y0, ARGS, saveat=saveat)
    assert int(sol.stats["num_steps"]) == num_steps
    assert sol.ts.shape == expected.ts.shape
    # XLA may round the step times of Diffrax's compiled loop differently by an ULP.
    np.testing.assert_allclose(sol.ts, expected.ts, rtol=1e-15, atol=1e-15)
    assert sol.ts[0] == t0 and sol.ts[-1] == t1
    assert_close(sol.ys, expected.ys)


@pytest.mark.parametrize(
    "t0, t1, dt0",
    [
        (0.0, 1.0, 0.3),
        (0.0, 1.0, 0.1),
        (0.5, 0.7, 1.0),
        (2.0, -1.0, -0.07),
        (0.0, 10.0, 0.01),
        (np.float32(0.0), np.float32(1.0), np.float32(0.1)),  # float32 times
    ],
)
def test_grid_matches_diffrax_steps(t0, t1, dt0):
    # The step grid on its own against the times at which `diffrax.diffeqsolve` saves
    # every step with a constant step size (without its `inf` padding).
    grid = _make_grid(t0, t1, dt0, dfx.SaveAt(t1=True), dfx.ConstantStepSize())
    expected = dfx.diffeqsolve(
        ODE, dfx.Euler(), t0, t1, dt0, Y0, ARGS,
        saveat=dfx.SaveAt(t0=True, steps=True),
        stepsize_controller=dfx.ConstantStepSize(), max_steps=2000,
    ).ts  # fmt: skip
    expected = np.asarray(expected)[np.isfinite(expected)]
    times = grid.times * grid.direction
    assert times.dtype == expected.dtype
    assert times.shape == expected.shape
    assert times[0] == t0 and times[-1] == t1
    # XLA may round the step times of Diffrax's compiled loop differently by an ULP.
    ulp = np.finfo(expected.dtype).eps * np.max(np.abs(expected))
    np.testing.assert_allclose(times, expected, rtol=0, atol=2 * ulp)


@pytest.mark.parametrize("direction", [1, -1], ids=["forwards", "backwards"])
def test_step_to_grid_matches_diffrax_steps(direction):
    ts = jnp.sort(jr.uniform(jr.key(5), (30,), minval=0.0, maxval=3.0))
    ts = direction * jnp.concatenate([jnp.array([0.0]), ts, jnp.array([3.0])])
    step_to = dfx.StepTo(ts)
    grid = _make_grid(ts[0], ts[-1], None, dfx.SaveAt(t1=True), step_to)
    expected = dfx.diffeqsolve(
        ODE, dfx.Euler(), ts[0], ts[-1], None, Y0, ARGS,
        saveat=dfx.SaveAt(t0=True, steps=True), stepsize_controller=step_to,
        max_steps=31,
    ).ts  # fmt: skip
    assert grid.direction == direction
    np.testing.assert_array_equal(grid.times * grid.direction, expected)


def test_step_to():
    solver = dfx.Heun()
    ts = jnp.concatenate([jnp.array([0.0]), jnp.sort(jr.uniform(jr.key(2), (40,)))])
    ts = 3.0 * jnp.concatenate([ts, jnp.array([1.0])])
    saveat = dfx.SaveAt(steps=True, ts=OFF_GRID)
    expected = dfx.diffeqsolve(
        ODE, solver, T0, T1, None, Y0, ARGS, saveat=saveat,
        stepsize_controller=dfx.StepTo(ts), max_steps=41,
    )  # fmt: skip

    # The step times (and t0, t1) may be traced: only their number must be static.
    @jax.jit
    def solve(ts, y0):
        return diffeqsolve(
            ODE, solver, ts[0], ts[-1], None, y0, ARGS, saveat=saveat,
            stepsize_controller=dfx.StepTo(ts),
        )  # fmt: skip

    sol = solve(ts, Y0)
    assert int(sol.stats["num_steps"]) == 41
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-15)


def test_backwards_in_time():
    solver = dfx.Heun()
    t0, t1, dt0 = 1.0, -2.0, -0.05
    saveat = dfx.SaveAt(t0=True, ts=jnp.array([0.9, 0.0, -1.234, -2.0]), steps=3)
    expected = _reference(ODE, solver, saveat, t0=t0, t1=t1, dt0=dt0)
    sol = diffeqsolve(ODE, solver, t0, t1, dt0, Y0, ARGS, saveat=saveat)
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-15)
    assert sol.t0 == t0 and sol.t1 == t1

    ts = jnp.linspace(t0, t1, 61)
    step_to = dict(stepsize_controller=dfx.StepTo(ts))
    expected = _reference(ODE, solver, saveat, t0=t0, t1=t1, dt0=None, **step_to)
    sol = diffeqsolve(ODE, solver, t0, t1, None, Y0, ARGS, saveat=saveat, **step_to)
    assert_close(sol.ys, expected.ys)


def test_sde_backwards_in_time():
    # Backwards, Diffrax reads the Brownian path over each step in increasing time
    # and negates the increment (`WrapTerm`); the step map reads the same intervals.
    # The step times are given (`StepTo`) so that they are bitwise Diffrax's: an
    # `UnsafeBrownianPath` draws an unrelated increment over any other interval.
    path = dfx.UnsafeBrownianPath(shape=(3,), key=jr.key(4))
    terms = dfx.MultiTerm(ODE, dfx.ControlTerm(_diffusion, path))
    ts = jnp.linspace(1.0, -2.0, 61)
    kwargs = dict(
        saveat=dfx.SaveAt(t0=True, steps=True), stepsize_controller=dfx.StepTo(ts)
    )
    expected = _reference(
        terms, dfx.Heun(), t0=1.0, t1=-2.0, dt0=None, adjoint=dfx.ForwardMode(),
        **kwargs,
    )  # fmt: skip
    sol = diffeqsolve(terms, dfx.Heun(), 1.0, -2.0, None, Y0, ARGS, **kwargs)
    assert_close(sol.ys, expected.ys)
    np.testing.assert_array_equal(sol.ts, expected.ts)


# --- what is saved ------------------------------------------------------------------


def test_saveat_variants():
    solver = dfx.Heun()
    on_grid = jnp.array([0.5, 1.0, 1.5])
    saveat = dfx.SaveAt(
        subs={
            "t0": dfx.SubSaveAt(t0=True),
            "t1_fn": dfx.SubSaveAt(t1=True, fn=lambda t, y, args: (t * y[0], y[1:])),
            "ts": dfx.SubSaveAt(ts=OFF_GRID),
            "on_grid": dfx.SubSaveAt(ts=on_grid),
            # 60 = 7 * 8 + 4 steps: t1 is saved separately.
            "every_7": dfx.SubSaveAt(steps=7, t1=True),
            # 60 = 6 * 10: t1 is the last of the saved steps.
            "every_6": dfx.SubSaveAt(t0=True, steps=6, t1=True),
            "mixed": dfx.SubSaveAt(ts=jnp.array([0.2, 0.25, 1.6, 2.0]), steps=8),
        },
        dense=True,
    )
    expected = _reference(ODE, solver, saveat)
    sol = diffeqsolve(ODE, solver, T0, T1, DT0, Y0, ARGS, saveat=saveat)
    assert sol.ys["every_7"].shape == (9, 3)
    assert sol.ys["every_6"].shape == (11, 3)
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-14)
    # Dense output: the solver's interpolation between the steps.
    points = jnp.linspace(T0, T1, 23)
    assert_close(jax.vmap(sol.evaluate)(points), jax.vmap(expected.evaluate)(points))
    assert_close(
        jax.vmap(sol.derivative)(points), jax.vmap(expected.derivative)(points)
    )

    default = diffeqsolve(ODE, solver, T0, T1, DT0, Y0, ARGS)
    assert default.ts.shape == (1,) and default.ys.shape == (1, 3)
    assert_close(default.ys, expected.ys["every_6"][-1:])


def test_pytree_state():
    def vector_field(t, y, args):
        return {"x": y["v"][None], "v": -args * y["x"][0] - 0.1 * y["v"]}

    term = dfx.ODETerm(vector_field)
    y0 = {"x": jnp.array([1.0]), "v": jnp.array(0.5)}
    saveat = dfx.SaveAt(t0=True, ts=OFF_GRID)
    expected = _reference(term, dfx.Tsit5(), saveat, y0=y0, args=2.0)
    sol = diffeqsolve(term, dfx.Tsit5(), T0, T1, DT0, y0, 2.0, saveat=saveat)
    assert_close(sol.ys, expected.ys)
    assert sol.ys["v"].shape == (8,) and sol.ys["x"].shape == (8, 1)


def test_t0_equals_t1():
    saveat = dfx.SaveAt(t0=True, t1=True, ts=jnp.array([1.0, 1.0]))
    expected = dfx.diffeqsolve(ODE, dfx.Euler(), 1.0, 1.0, 0.1, Y0, ARGS, saveat=saveat)
    sol = diffeqsolve(ODE, dfx.Euler(), 1.0, 1.0, 0.1, Y0, ARGS, saveat=saveat)
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts)
    assert int(sol.stats["num_steps"]) == 0


def test_vmap_and_jit():
    solver = dfx.Midpoint()
    y0s = Y0 + jnp.linspace(-0.5, 0.5, 4)[:, None]

    @jax.jit
    def batched(y0s):
        return jax.vmap(lambda y: diffeqsolve(ODE, solver, T0, T1, DT0, y, ARGS).ys)(
            y0s
        )

    expected = jax.vmap(
        lambda y: dfx.diffeqsolve(ODE, solver, T0, T1, DT0, y, ARGS).ys
    )(y0s)
    assert_close(batched(y0s), expected)


# --- the step map on its own --------------------------------------------------------


def test_diffrax_step_with_solve_and_lyapunov_exponent():
    # Diffrax's Runge-Kutta stages run in a loop that blocks `jax.jacfwd` by default;
    # `DiffraxStep` switches it, so DEER's dense Jacobians and the Lyapunov exponent
    # (both forward mode) work with an unmodified `diffrax.Tsit5()`.
    step = DiffraxStep(ODE, dfx.Tsit5())
    ts = jnp.linspace(T0, T1, NUM_STEPS + 1)
    inputs = step.inputs(ts)
    expected = dfx.diffeqsolve(
        ODE, dfx.Tsit5(), T0, T1, None, Y0, ARGS, saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.StepTo(ts), max_steps=NUM_STEPS,
    ).ys  # fmt: skip
    sol = pdyn.solve(step, pdyn.DEER(), Y0, inputs, ARGS)
    assert_close(sol.value, expected)
    exponent = pdyn.lyapunov_exponent(step, Y0, inputs, ARGS, trajectory=sol.value)
    assert jnp.isfinite(exponent)
    jacobian = jax.jacfwd(step)(Y0, jtu.tree_map(lambda x: x[0], inputs), ARGS)
    assert jacobian.shape == (3, 3)


# --- gradients ----------------------------------------------------------------------


def _gradients(solve, terms, solver, saveat):
    def loss(y0, args):
        sol = solve(terms, solver, T0, T1, DT0, y0, args, saveat=saveat)
        return jnp.sum(jnp.sin(sol.ys))

    return jax.grad(loss, argnums=(0, 1))(Y0, ARGS)


def _assert_gradients_match(terms, solver, saveat):
    expected = _gradients(dfx.diffeqsolve, terms, solver, saveat)
    got = _gradients(diffeqsolve, terms, solver, saveat)
    if terms is ODE:  # no diffusion: the gradient for its scale is zero
        assert float(got[1]["s"]) == 0.0 == float(expected[1]["s"])
    assert_close(got, expected)
    assert all(np.all(np.isfinite(g)) for g in jtu.tree_leaves(got))


def test_gradients_match_backpropagation_through_diffrax():
    # Implicit differentiation of the parallel solve against backpropagation through
    # Diffrax's loop, with respect to `y0` and `args`.
    _assert_gradients_match(ODE, dfx.Euler(), dfx.SaveAt(steps=True))


@pytest.mark.slow
@pytest.mark.parametrize(
    "terms, solver",
    [(ODE, dfx.Tsit5()), (SDE, dfx.Heun())],
    ids=["ode_tsit5", "sde_heun"],
)
def test_gradients_through_interpolation_and_sdes(terms, solver):
    # Also through the dense output at off-grid times, and for an SDE.
    _assert_gradients_match(terms, solver, dfx.SaveAt(ts=OFF_GRID[1:], steps=10))


# --- failures -----------------------------------------------------------------------


BLOW_UP = dfx.ODETerm(lambda t, y, args: y**2)  # y = 1 / (1 - t): infinite at t = 1


def test_non_finite_solution_fails():
    sol = diffeqsolve(
        BLOW_UP, dfx.Euler(), 0.0, 3.0, 0.1, jnp.ones(2), throw=False,
        parallel=pdyn.Sequential(),
    )  # fmt: skip
    assert sol.result == dfx.RESULTS.nonfinite
    assert not dfx.is_okay(sol.result)
    sol = diffeqsolve(BLOW_UP, dfx.Euler(), 0.0, 3.0, 0.1, jnp.ones(2), throw=False)
    assert sol.result == dfx.RESULTS.nonfinite
    with pytest.raises(Exception, match="non-finite"):
        diffeqsolve(BLOW_UP, dfx.Euler(), 0.0, 3.0, 0.1, jnp.ones(2))


def test_max_steps_reached():
    kwargs = dict(parallel=pdyn.QuasiDEER(), max_steps=2)
    sol = diffeqsolve(ODE, dfx.Heun(), T0, T1, DT0, Y0, ARGS, throw=False, **kwargs)
    assert sol.result == dfx.RESULTS.max_steps_reached
    assert int(sol.stats["num_parallel_iterations"]) == 2
    assert sol.stats["max_steps"] == 2
    with pytest.raises(Exception, match="did not converge within `max_steps`"):
        diffeqsolve(ODE, dfx.Heun(), T0, T1, DT0, Y0, ARGS, **kwargs)


@pytest.mark.slow
def test_implicit_root_finder_failure_is_reported():
    # One Newton iteration cannot solve implicit Euler's equation to 1e-14, so every
    # step reports failure, as in `diffrax.diffeqsolve`.
    solver = dfx.ImplicitEuler(
        root_finder=optx.Newton(rtol=1e-14, atol=1e-14), root_find_max_steps=1
    )
    expected = _reference(ODE, solver, dfx.SaveAt(t1=True), throw=False)
    sol = diffeqsolve(ODE, solver, T0, T1, DT0, Y0, ARGS, throw=False)
    assert expected.result != dfx.RESULTS.successful
    assert sol.result == expected.result


# --- argument errors (all at trace time) ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6)),
            ValueError,
            "fixed steps.*ConstantStepSize.*StepTo",
        ),
        (dict(dt0=None), ValueError, "`dt0`"),
        (
            dict(stepsize_controller=dfx.StepTo(jnp.linspace(T0, T1, 5))),
            ValueError,
            "`dt0` should be `None`",
        ),
        (dict(dt0=-0.1), ValueError, r"\(t1 - t0\) \* dt0 >= 0"),
        (dict(dt0=0.0), ValueError, "`dt0`"),
        (dict(t1=jnp.inf), ValueError, "finite"),
        (dict(solver=dfx.ReversibleHeun()), ValueError, "carries state"),
        (dict(solver=dfx.LeapfrogMidpoint()), ValueError, "carries state"),
        (dict(solver=dfx.Kvaerno5()), ValueError, "tolerances"),
        (dict(solver=dfx.HalfSolver(dfx.Kvaerno5())), ValueError, "tolerances"),
        (dict(solver=dfx.HalfSolver(dfx.ReversibleHeun())), ValueError, "carries"),
        (dict(solver=dfx.ShARK()), ValueError, "MultiTerm"),
        (dict(solver="Tsit5"), TypeError, "`solver`"),
        (dict(parallel=dfx.Tsit5()), TypeError, "`parallel`"),
        (
            dict(parallel=optx.Newton(rtol=1e-6, atol=1e-6)),
            TypeError,
            "`parallel` must be a recurrence solver.*optimistix.Newton",
        ),
        (dict(parallel=pdyn.DEER), TypeError, "`parallel`.*class `DEER`.*DEER()"),
        (dict(solver=dfx.Tsit5), TypeError, "`solver`.*class `Tsit5`.*Tsit5()"),
        (dict(throw=None), TypeError, "`throw` must be a bool"),
        (dict(throw="yes"), TypeError, "`throw` must be a bool"),
        (dict(adjoint=dfx.RecursiveCheckpointAdjoint()), TypeError, "`adjoint"),
        (dict(saveat=dfx.SaveAt(t1=True, solver_state=True)), ValueError, "solver"),
        (dict(saveat=dfx.SaveAt(ts=jnp.array([1.0, 4.0]))), ValueError, "between"),
        (dict(saveat=dfx.SaveAt(ts=jnp.array([2.0, 1.0]))), ValueError, "increasing"),
        (
            dict(dt0=None, stepsize_controller=dfx.StepTo(jnp.array([0.0, 1.0, 2.0]))),
            ValueError,
            "t1==ts",
        ),
        (
            dict(
                dt0=None,
                stepsize_controller=dfx.StepTo(jnp.array([0.0, 2.0, 1.0, 3.0])),
            ),
            ValueError,
            "strictly increasing",
        ),
        (dict(max_steps=0), ValueError, "`max_steps`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    call = dict(terms=ODE, solver=dfx.Euler(), t0=T0, t1=T1, dt0=DT0, y0=Y0, args=ARGS)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        diffeqsolve(**call)


@pytest.mark.parametrize("t1", [True, False], ids=["t1", "dense only"])
def test_dense_output_of_an_empty_interval(t1):
    # t0 == t1: no steps; the interpolation is constant, as Diffrax's.
    saveat = dfx.SaveAt(t1=t1, dense=True)
    expected = _reference(ODE, dfx.Tsit5(), saveat, t1=T0)
    sol = diffeqsolve(ODE, dfx.Tsit5(), T0, T0, DT0, Y0, ARGS, saveat=saveat)
    if t1:
        assert_close(sol.ys, expected.ys)
    # (Outside the interval, Diffrax's interpolation is NaN and this one is not.)
    assert_close(sol.evaluate(T0), expected.evaluate(T0))
    assert_close(sol.evaluate(T0), Y0)


def test_traced_grid_needs_step_to():
    @jax.jit
    def solve(t1):
        return diffeqsolve(ODE, dfx.Euler(), T0, t1, DT0, Y0, ARGS).ys

    with pytest.raises(ValueError, match="`t1` must be a concrete.*StepTo"):
        solve(T1)

    # Concrete Python floats inside `jit` are fine.
    solve_static = eqx.filter_jit(
        lambda y0: diffeqsolve(ODE, dfx.Euler(), T0, T1, DT0, y0, ARGS).ys
    )
    assert solve_static(Y0).shape == (1, 3)


# --- the supported Diffrax versions -------------------------------------------------


@pytest.mark.parametrize(
    "installed", ["0.6.2", "0.7.1", "0.8.0", "0.8.0rc1", "1.0", "unknown"]
)
def test_unsupported_diffrax_versions_fail_on_import(monkeypatch, installed):
    monkeypatch.setattr(diffrax_version, "installed_version", lambda: installed)
    match = (
        rf"supports diffrax{re.escape(diffrax_version.SUPPORTED)}.*"
        rf"diffrax {re.escape(installed)} is installed"
    )
    with pytest.raises(ImportError, match=match):
        diffrax_version.check_diffrax_version()
    # The bridge checks on import, before it imports Diffrax's internals.
    with pytest.raises(ImportError, match=match):
        importlib.reload(sys.modules["parallel_dynamics._diffrax"])


@pytest.mark.parametrize("installed", ["0.7.2", "0.7.10", "0.7.3.dev1"])
def test_supported_diffrax_versions(monkeypatch, installed):
    monkeypatch.setattr(diffrax_version, "installed_version", lambda: installed)
    diffrax_version.check_diffrax_version()


def test_the_supported_range_is_the_one_pyproject_pins():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert diffrax_version.SUPPORTED == ">=0.7.2,<0.8"
    assert f'"diffrax{diffrax_version.SUPPORTED}"' in pyproject.read_text()
    diffrax_version.check_diffrax_version()  # the installed version
