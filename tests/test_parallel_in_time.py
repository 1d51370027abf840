"""Coarse-grid initial guesses and time slices of `pdyn.diffeqsolve`, against
`diffrax.diffeqsolve` on the same grid (values to 1e-9 relative in float64, and
gradients), with iteration ceilings that show what the coarse guess buys.

Iteration counts are deterministic; each ceiling leaves a margin over the count
measured when it was written (given next to it). Small problems only: Lotka-Volterra
(1.5, 1, 3, 1) from (10, 1), 200 Tsit5 steps on [0, 4], where TrustDEER from the
constant guess takes 15 iterations and DEER overflows. The stiff problems at full
size are in `benchmarks/parallel_in_time.py`."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn
from parallel_dynamics._coarse import (
    adaptive_budget,
    automatic_factor,
    automatic_tolerance,
    coarse_indices,
)

from .helpers import robertson


RTOL = 1e-9


def assert_close(got, expected, rtol=RTOL):
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = np.max(np.abs(b), initial=0.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            delta * prey * predator - gamma * predator,
        ]
    )


TERM = dfx.ODETerm(_lotka_volterra)
Y0 = jnp.array([10.0, 1.0])
ARGS = jnp.array([1.5, 1.0, 3.0, 1.0])
T0, T1, DT0, NUM_STEPS = 0.0, 4.0, 0.02, 200
STEPS = dfx.SaveAt(steps=True)
OFF_GRID = jnp.array([0.0, 0.013, 1.0, 2.345, 3.99, 4.0])


def _reference(solver=dfx.Tsit5(), saveat=STEPS, **kwargs):
    kwargs.setdefault("max_steps", NUM_STEPS)
    return dfx.diffeqsolve(TERM, solver, T0, T1, DT0, Y0, ARGS, saveat=saveat, **kwargs)


def _solve(solver=dfx.Tsit5(), saveat=STEPS, **kwargs):
    kwargs.setdefault("throw", False)
    return pdyn.diffeqsolve(
        TERM, solver, T0, T1, DT0, Y0, ARGS, saveat=saveat, **kwargs
    )


def _iterations(sol) -> int:
    return int(sol.stats["num_parallel_iterations"])


# --- coarse guesses -----------------------------------------------------------------


def test_automatic_factor():
    assert [automatic_factor(n) for n in (2, 100, 200, 2000, 20_000, 10**6)] == [
        2, 2, 3, 11, 20, 20,
    ]  # fmt: skip
    np.testing.assert_array_equal(coarse_indices(10, 4), [0, 4, 8, 10])
    np.testing.assert_array_equal(coarse_indices(8, 4), [0, 4, 8])


def _adaptive_reference(tolerance: float, max_steps: int = NUM_STEPS):
    """The adaptive Tsit5 solve that the default coarse guess runs."""
    times = jnp.linspace(T0, T1, NUM_STEPS + 1)
    return dfx.diffeqsolve(
        TERM, dfx.Tsit5(), T0, T1, None, Y0, ARGS,
        saveat=dfx.SaveAt(ts=times[1:]),
        stepsize_controller=dfx.PIDController(rtol=tolerance, atol=tolerance),
        max_steps=max_steps,
    )  # fmt: skip


@pytest.mark.parametrize(
    "parallel, without, ceiling",
    [
        # Measured: TrustDEER 15 -> 2, DEER nonfinite -> 2, QuasiTrustDEER 30 -> 22.
        (pdyn.TrustDEER(), 15, 3),
        (pdyn.DEER(), None, 3),
        (pdyn.QuasiTrustDEER(), 30, 26),
    ],
    ids=["TrustDEER", "DEER", "QuasiTrustDEER"],
)
def test_default_coarse_guess_matches_diffrax_in_fewer_iterations(
    parallel, without, ceiling
):
    expected = _reference().ys
    plain = _solve(parallel=parallel, coarse=None)
    if without is None:  # DEER overflows from the constant guess
        assert plain.result != dfx.RESULTS.successful
    else:
        assert _iterations(plain) == without
    assert "num_coarse_steps" not in plain.stats
    sol = _solve(parallel=parallel)
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= ceiling
    assert_close(sol.ys, expected)
    # The default coarse grid is adaptive, at rtol = atol = 1e-6 in float64: 52
    # steps (10 of them rejected), within the budget of twice the 67 steps of the
    # automatic uniform grid.
    adaptive_steps = int(_adaptive_reference(1e-6).stats["num_steps"])
    assert int(sol.stats["num_coarse_steps"]) == adaptive_steps == 52
    assert adaptive_budget(NUM_STEPS) == 134
    assert "coarse_factor" not in sol.stats


def test_uniform_coarse_grid():
    sol = _solve(coarse=pdyn.CoarseGuess(stepsize_controller=dfx.ConstantStepSize()))
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= 3  # measured: 2
    assert_close(sol.ys, _reference().ys)
    assert sol.stats["coarse_factor"] == automatic_factor(NUM_STEPS) == 3
    assert int(sol.stats["num_coarse_steps"]) == 67


def test_adaptive_coarse_guess_with_a_given_controller():
    controller = dfx.PIDController(rtol=1e-8, atol=1e-8)
    sol = _solve(coarse=pdyn.CoarseGuess(stepsize_controller=controller))
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= 3  # measured: 2
    assert_close(sol.ys, _reference().ys)
    assert int(sol.stats["num_coarse_steps"]) == int(
        _adaptive_reference(1e-8).stats["num_steps"]
    )


@pytest.mark.parametrize(
    "solver, coarse_steps, ceiling",
    [
        # Euler estimates no error: the uniform grid (67 steps), measured 5 its.
        (dfx.Euler(), 67, 7),
        # Heun at 1e-6 needs more adaptive steps than the budget of 134: the uniform
        # grid's 67 steps are added. Measured: 4 iterations.
        (dfx.Heun(), 134 + 67, 6),
    ],
    ids=["Euler", "Heun"],
)
def test_coarse_guess_falls_back_to_the_uniform_grid(solver, coarse_steps, ceiling):
    sol = _solve(solver=solver)
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= ceiling
    assert_close(sol.ys, _reference(solver).ys)
    assert int(sol.stats["num_coarse_steps"]) == coarse_steps


def test_automatic_tolerance():
    assert automatic_tolerance(jnp.float64) == 1e-6
    assert automatic_tolerance(jnp.float32) == pytest.approx(3.45e-4, rel=1e-2)


def test_coarse_true_is_the_default_coarse_guess():
    a = _solve(coarse=True)
    b = _solve(coarse=pdyn.CoarseGuess())
    c = _solve()
    for other in (b, c):
        np.testing.assert_array_equal(a.ys, other.ys)
        assert _iterations(a) == _iterations(other)
        assert int(a.stats["num_coarse_steps"]) == int(other.stats["num_coarse_steps"])
    assert _iterations(_solve(coarse=False)) == _iterations(_solve(coarse=None)) == 15


@pytest.mark.parametrize(
    "coarse, ceiling",
    [
        # Measured: 3, 3, 5, 6 iterations. (With k = 20, a coarse step of 0.4, the
        # coarse orbit is wrong and TrustDEER takes 30 iterations from its guess.)
        (pdyn.CoarseGuess(factor=5), 3),
        (pdyn.CoarseGuess(factor=10), 3),
        (pdyn.CoarseGuess(factor=4, solver=dfx.Heun()), 6),
        (pdyn.CoarseGuess(factor=4, solver=dfx.Euler()), 7),
    ],
    ids=["k=5", "k=10", "Heun", "Euler"],
)
def test_coarse_guess_options(coarse, ceiling):
    sol = _solve(coarse=coarse)
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= ceiling
    assert_close(sol.ys, _reference().ys)
    assert sol.stats["coarse_factor"] == coarse.factor


def test_multilevel_coarse_guess():
    # Three levels with k = 3: 200 -> 67 -> 23 -> 8 sequential steps; the two middle
    # levels are solved in parallel.
    sol = _solve(coarse=pdyn.CoarseGuess(factor=3, levels=3))
    assert sol.result == dfx.RESULTS.successful
    assert_close(sol.ys, _reference().ys)
    assert int(sol.stats["num_coarse_steps"]) == 8
    coarse_iterations = np.asarray(sol.stats["coarse_parallel_iterations"])
    assert coarse_iterations.shape == (2,)
    # Measured: 14 on the 23 steps solved from the 8 coarsest, then 3 on the 67.
    assert np.all(coarse_iterations >= 1) and np.all(coarse_iterations <= [17, 4])
    assert _iterations(sol) <= 3


def test_init_wins_over_the_coarse_guess():
    expected = _reference().ys
    sol = _solve(init=expected, coarse=pdyn.CoarseGuess(factor=50))
    assert _iterations(sol) == 1
    assert "num_coarse_steps" not in sol.stats
    assert_close(sol.ys, expected)


def test_coarse_guess_on_a_step_to_grid_backwards_in_time():
    # A geometric grid, backwards from t = 4 to t = 0.
    ts = 4.0 - (jnp.geomspace(1.0, 5.0, 121) - 1.0)
    ts = ts.at[-1].set(0.0)
    kwargs = dict(
        stepsize_controller=dfx.StepTo(ts), saveat=dfx.SaveAt(ts=OFF_GRID[::-1])
    )
    y1 = _reference().ys[-1]
    expected = dfx.diffeqsolve(
        TERM, dfx.Tsit5(), 4.0, 0.0, None, y1, ARGS, max_steps=120, **kwargs
    )
    sol = pdyn.diffeqsolve(
        TERM, dfx.Tsit5(), 4.0, 0.0, None, y1, ARGS, coarse=True, **kwargs
    )
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= 4  # measured 3
    assert_close(sol.ys, expected.ys)


def test_non_finite_coarse_solve_falls_back_to_y0():
    # Explicit Euler with 200 fine steps of the stiff y' = -50 (y - cos t) is stable
    # (h * 50 = 1 < 2); with 10 times larger steps it blows up. The guess keeps y0
    # where the coarse solve is non-finite, and the solve still converges.
    term = dfx.ODETerm(lambda t, y, args: -50.0 * (y - jnp.cos(t)))
    kwargs = dict(saveat=STEPS)
    expected = dfx.diffeqsolve(
        term, dfx.Euler(), 0.0, 4.0, 0.02, jnp.ones(2), max_steps=200, **kwargs
    )
    sol = pdyn.diffeqsolve(
        term, dfx.Euler(), 0.0, 4.0, 0.02, jnp.ones(2),
        coarse=pdyn.CoarseGuess(factor=10), parallel=pdyn.DEER(), **kwargs,
    )  # fmt: skip
    assert sol.result == dfx.RESULTS.successful
    assert_close(sol.ys, expected.ys)


def _loss(solve, **kwargs):
    def loss(y0, args):
        sol = solve(TERM, dfx.Tsit5(), T0, T1, DT0, y0, args, saveat=dfx.SaveAt(
            ts=OFF_GRID[1:], steps=10), **kwargs)  # fmt: skip
        return jnp.sum(jnp.sin(sol.ys))

    return jax.grad(loss, argnums=(0, 1))(Y0, ARGS)


@pytest.mark.parametrize(
    "kwargs",
    [dict(coarse=True), dict(steps_per_slice=7), dict(coarse=True, steps_per_slice=10)],
    ids=["coarse", "slices", "both"],
)
def test_gradients_match_backpropagation_through_diffrax(kwargs):
    expected = _loss(dfx.diffeqsolve, max_steps=NUM_STEPS)
    got = _loss(pdyn.diffeqsolve, **kwargs)
    assert_close(got, expected, rtol=1e-7)


# --- time slices --------------------------------------------------------------------


@pytest.mark.parametrize("steps_per_slice", [1, 7, 50, 200, 500])
def test_slices_match_diffrax(steps_per_slice):
    # 7 does not divide 200: the last slice is shorter. Measured: 14, 12, 4, 1, 1
    # iterations (one slice is a sequential solve).
    saveat = dfx.SaveAt(t0=True, ts=OFF_GRID[1:-1], steps=True)
    expected = _reference(saveat=saveat)
    sol = _solve(saveat=saveat, steps_per_slice=steps_per_slice)
    assert sol.result == dfx.RESULTS.successful
    assert_close(sol.ys, expected.ys)
    assert_close(sol.ts, expected.ts, rtol=1e-14)
    slices = -(-NUM_STEPS // steps_per_slice)
    assert 1 <= _iterations(sol) <= slices
    assert int(sol.stats["num_steps"]) == NUM_STEPS


def test_slices_with_dense_output_and_a_coarse_guess():
    expected = _reference(saveat=dfx.SaveAt(dense=True))
    sol = _solve(
        saveat=dfx.SaveAt(dense=True),
        steps_per_slice=10,
        coarse=pdyn.CoarseGuess(factor=10),
        parallel=pdyn.DEER(),
    )
    assert sol.result == dfx.RESULTS.successful
    assert _iterations(sol) <= 3  # measured 2; without the guess DEER overflows
    assert_close(
        jax.vmap(sol.evaluate)(OFF_GRID), jax.vmap(expected.evaluate)(OFF_GRID)
    )


def test_slices_under_jit_and_vmap():
    @jax.jit
    @jax.vmap
    def solve(y0):
        return pdyn.diffeqsolve(
            TERM, dfx.Tsit5(), T0, T1, DT0, y0, ARGS, saveat=STEPS,
            steps_per_slice=8, coarse=True,
        ).ys  # fmt: skip

    y0s = jnp.stack([Y0, Y0 * 0.5])
    got = solve(y0s)
    for y0, ys in zip(y0s, got):
        expected = dfx.diffeqsolve(
            TERM, dfx.Tsit5(), T0, T1, DT0, y0, ARGS, saveat=STEPS, max_steps=200
        )
        assert_close(ys, expected.ys)


@pytest.mark.slow
def test_sde_with_a_coarse_guess_and_slices():
    # The coarse solve reads the same Brownian path over its longer steps.
    bm = dfx.VirtualBrownianTree(
        T0, T1, tol=1e-3, shape=(2,), key=jax.random.key(0),
        levy_area=dfx.BrownianIncrement,
    )  # fmt: skip
    terms = dfx.MultiTerm(
        TERM, dfx.ControlTerm(lambda t, y, args: 0.1 * jnp.diag(y), bm)
    )
    expected = dfx.diffeqsolve(
        terms, dfx.Heun(), T0, T1, DT0, Y0, ARGS, saveat=STEPS, max_steps=NUM_STEPS
    )
    for kwargs in (dict(coarse=True), dict(coarse=True, steps_per_slice=9)):
        sol = pdyn.diffeqsolve(
            terms, dfx.Heun(), T0, T1, DT0, Y0, ARGS, saveat=STEPS, **kwargs
        )
        assert_close(sol.ys, expected.ys)
        assert _iterations(sol) <= 6


# --- stiff problems (small; the full sizes are in the benchmark) ----------------------


_ROOT_FINDER = optx.Newton(rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver",
    [
        dfx.ImplicitEuler(root_finder=_ROOT_FINDER),
        dfx.Kvaerno5(root_finder=_ROOT_FINDER),
    ],
    ids=["ImplicitEuler", "Kvaerno5"],
)
def testrobertson_on_a_geometric_grid(solver):
    ts = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-5, 1e5, 60)])
    kwargs = dict(stepsize_controller=dfx.StepTo(ts), saveat=STEPS)
    y0 = jnp.array([1.0, 0.0, 0.0])
    term = dfx.ODETerm(robertson)
    expected = dfx.diffeqsolve(term, solver, 0.0, 1e5, None, y0, max_steps=60, **kwargs)
    for coarse in (None, pdyn.CoarseGuess(factor=4)):
        sol = pdyn.diffeqsolve(
            term, solver, 0.0, 1e5, None, y0, coarse=coarse, throw=False, **kwargs
        )
        assert sol.result == dfx.RESULTS.successful
        assert_close(sol.ys, expected.ys, rtol=1e-8)


def _heat(t, y, args):
    # u_t = u_xx on (0, 1) with u = 0 at both ends, D interior points.
    h = 1.0 / (y.shape[0] + 1)
    padded = jnp.concatenate([jnp.zeros(1), y, jnp.zeros(1)])
    return (padded[:-2] - 2 * y + padded[2:]) / h**2


def test_stiff_heat_equation_with_implicit_euler():
    # D = 20: the stiffness ratio is about 4 (D + 1)^2 / pi^2 ~ 180, far beyond what
    # an explicit step of dt = 0.01 can take (dt * 4 (D + 1)^2 ~ 18).
    size = 20
    x = jnp.linspace(0, 1, size + 2)[1:-1]
    y0 = jnp.sin(jnp.pi * x) + 0.5 * jnp.sin(7 * jnp.pi * x)
    solver = dfx.ImplicitEuler(root_finder=_ROOT_FINDER)
    term = dfx.ODETerm(_heat)
    expected = dfx.diffeqsolve(
        term, solver, 0.0, 0.5, 0.01, y0, saveat=STEPS, max_steps=50
    )
    sol = pdyn.diffeqsolve(
        term, solver, 0.0, 0.5, 0.01, y0, saveat=STEPS, parallel=pdyn.DEER(),
        coarse=True,
    )  # fmt: skip
    assert_close(sol.ys, expected.ys, rtol=1e-8)
    assert _iterations(sol) <= 2  # linear: one Newton step, one to verify


def test_implicit_step_from_a_non_finite_state_is_non_finite_and_does_not_raise():
    # A diverged iterate of a parallel solver reaches the step map; the derivative of
    # the implicit step's root find would raise on it (Lineax rejects non-finite
    # input), so the step is non-finite there without running the root finder.
    from parallel_dynamics import DiffraxStep

    step = DiffraxStep(TERM, dfx.ImplicitEuler(root_finder=_ROOT_FINDER))
    x = (jnp.array(0.0), jnp.array(0.02), ())
    y = jnp.array([jnp.nan, 1.0])
    assert np.all(np.isnan(step(y, x, ARGS)))
    jacobian = jax.jit(jax.jacfwd(step))(y, x, ARGS)
    assert jacobian.shape == (2, 2)
    expected = dfx.diffeqsolve(
        TERM, step.solver, 0.0, 0.02, 0.02, Y0, ARGS, saveat=dfx.SaveAt(t1=True)
    )
    np.testing.assert_array_equal(step(Y0, x, ARGS), expected.ys[0])


# --- arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(coarse="yes"), TypeError, "`coarse` must be a `pdyn.CoarseGuess"),
        (dict(coarse=5), TypeError, "`coarse` must be"),
        (dict(steps_per_slice=0), ValueError, "`steps_per_slice` must be a positive"),
        (dict(steps_per_slice=2.5), ValueError, "`steps_per_slice`"),
        (
            dict(coarse=pdyn.CoarseGuess(solver=dfx.Kvaerno5())),
            ValueError,
            "tolerances",
        ),
        (
            dict(coarse=pdyn.CoarseGuess(solver=dfx.ReversibleHeun())),
            ValueError,
            "carries state",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _solve(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor=1), r"factor=.*>= 2"),
        (dict(factor=2.0), r"factor="),
        (dict(levels=0), r"levels=.*>= 1"),
        (
            dict(factor=4, stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3)),
            r"uniform coarse grid",
        ),
        (
            dict(levels=2, stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3)),
            r"uniform coarse grid",
        ),
    ],
)
def test_bad_coarse_guess(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pdyn.CoarseGuess(**kwargs)
    with pytest.raises(TypeError, match=r"solver="):
        pdyn.CoarseGuess(solver="Heun")
    for controller in ("pid", dfx.StepTo(jnp.linspace(0.0, 1.0, 3))):
        with pytest.raises(TypeError, match=r"stepsize_controller="):
            pdyn.CoarseGuess(stepsize_controller=controller)
