"""Differential equations in parallel over time: `pdyn.diffeqsolve` against Diffrax.

Two problems, each solved with a Diffrax solver on a fixed grid, once sequentially by
`diffrax.diffeqsolve` and once in parallel over time by `pdyn.diffeqsolve` (the same
solver, the same steps, so the same discrete solution):

1. **Lotka–Volterra** predator–prey dynamics with `diffrax.Tsit5()` over 100,000 steps
   ($t \\in [0, 50]$, about seven periods). The parallel solves: DEER (Newton) from
   $y_0$ at every step (`coarse=None`), DEER started from a cheap coarse sequential
   solve made by hand (100x fewer steps, interpolated), the default (TrustDEER from
   `pdyn.diffeqsolve`'s own adaptive coarse guess) and quasi-DEER from $y_0$. The
   Lyapunov exponent along the trajectory is printed too: it is ~0 (a periodic orbit,
   neither contracting nor chaotic).
2. A **stiff** problem: a nonlinear heat equation (method of lines, 16 points) with
   `diffrax.Kvaerno5()`, on a step for which `Tsit5` is unstable.

It prints the iterations, the largest difference from Diffrax and the wall times
(compiled, median of interleaved runs), and saves a phase portrait of the
Lotka–Volterra solution with the convergence of DEER next to this script:
`ode_parallel_in_time.png`.

    python examples/ode_parallel_in_time.py
"""

import pathlib
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optimistix as optx


matplotlib.use("Agg")
import matplotlib.pyplot as plt

import parallel_dynamics as pdyn
from parallel_dynamics import DiffraxStep


jax.config.update("jax_enable_x64", True)

OUTPUT = pathlib.Path(__file__).with_name("ode_parallel_in_time.png")
REPEATS = 3


def timed(*fns):
    """Median wall time of each compiled, warm function, run in turn (interleaved)."""
    for fn in fns:
        jax.block_until_ready(fn())
    times = [[] for _ in fns]
    for _ in range(REPEATS):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def print_table(rows, sequential_seconds):
    print(
        f"  {'solve':<34}{'iterations':>11}{'max |diff|':>12}"
        f"{'time (s)':>10}{'/ Diffrax':>11}"
    )
    print(f"  {'diffrax.diffeqsolve':<34}{'-':>11}{'-':>12}{sequential_seconds:>10.3f}")
    for name, sol, error, seconds in rows:
        iterations = int(sol.stats["num_parallel_iterations"])
        if dfx.is_okay(sol.result):
            error = f"{error:.1e}"
        else:  # say how it failed instead of a meaningless difference
            error = "failed"
            name = f"{name} ({_failure(sol.result)})"
        ratio = seconds / sequential_seconds
        print(f"  {name:<34}{iterations:>11}{error:>12}{seconds:>10.3f}{ratio:>10.1f}x")


def _failure(result):
    for name in ("nonfinite", "max_steps_reached"):
        if result == getattr(dfx.RESULTS, name):
            return name
    return "failed"


# --- 1. Lotka–Volterra with Tsit5 over 100,000 steps ---------------------------------


def lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            delta * prey * predator - gamma * predator,
        ]
    )


LV_TERM = dfx.ODETerm(lotka_volterra)
LV_ARGS = (2 / 3, 4 / 3, 1.0, 1.0)
LV_Y0 = jnp.array([1.0, 1.0])
LV_T1, LV_STEPS = 50.0, 100_000
LV_DT = LV_T1 / LV_STEPS
STEPS = dfx.SaveAt(steps=True)


@jax.jit
def lv_sequential(y0):
    return dfx.diffeqsolve(
        LV_TERM, dfx.Tsit5(), 0.0, LV_T1, LV_DT, y0, LV_ARGS, saveat=STEPS,
        max_steps=LV_STEPS,
    )  # fmt: skip


@jax.jit
def lv_coarse_guess(y0):
    """A sequential solve with 100x larger steps, at the end of every fine step."""
    coarse = dfx.diffeqsolve(
        LV_TERM, dfx.Tsit5(), 0.0, LV_T1, 100 * LV_DT, y0, LV_ARGS,
        saveat=dfx.SaveAt(dense=True), max_steps=LV_STEPS // 100,
    )  # fmt: skip
    times = jnp.linspace(0.0, LV_T1, LV_STEPS + 1)[1:]
    return jax.vmap(coarse.evaluate)(times)


@eqx.filter_jit
def lv_parallel(parallel, init=None, max_steps=None, coarse=None):
    """From `init`, else from the `coarse` guess, else from $y_0$ at every step."""
    return pdyn.diffeqsolve(
        LV_TERM, dfx.Tsit5(), 0.0, LV_T1, LV_DT, LV_Y0, LV_ARGS, saveat=STEPS,
        parallel=parallel, init=init, max_steps=max_steps, coarse=coarse, throw=False,
    )  # fmt: skip


def lotka_volterra_example():
    print(
        f"1. Lotka-Volterra, Tsit5, {LV_STEPS:,} steps of {LV_DT} on [0, {LV_T1}], "
        "float64, CPU"
    )
    reference = lv_sequential(LV_Y0)
    deer, quasi_deer = pdyn.DEER(), pdyn.QuasiDEER()
    solves = {
        "DEER": lambda: lv_parallel(deer),
        "DEER, coarse init": lambda: lv_parallel(deer, lv_coarse_guess(LV_Y0)),
        "TrustDEER + CoarseGuess (default)": lambda: lv_parallel(
            pdyn.TrustDEER(), coarse=pdyn.CoarseGuess()
        ),
        "QuasiDEER": lambda: lv_parallel(quasi_deer),
    }
    seconds = timed(lambda: lv_sequential(LV_Y0).ys, *solves.values())
    rows = []
    for (name, solve), time_ in zip(solves.items(), seconds[1:]):
        sol = solve()
        error = float(jnp.max(jnp.abs(sol.ys - reference.ys)))
        rows.append((name, sol, error, time_))
    print_table(rows, seconds[0])
    (coarse_seconds,) = timed(lambda: lv_coarse_guess(LV_Y0))
    print(f"  (the coarse solve for the initial guess alone: {coarse_seconds:.3f} s)")

    # Predictability: the largest Lyapunov exponent of the step map along the solution.
    step = DiffraxStep(LV_TERM, dfx.Tsit5())
    inputs = step.inputs(jnp.linspace(0.0, LV_T1, LV_STEPS + 1))
    exponent = pdyn.lyapunov_exponent(
        step, LV_Y0, inputs, LV_ARGS, trajectory=reference.ys
    )
    print(
        f"  largest Lyapunov exponent: {float(exponent) / LV_DT:+.2e} per unit time "
        "(periodic orbit: ~0)"
    )

    # DEER one iteration at a time, each from the last, for the convergence plot.
    errors, iterate = [], None
    for _ in range(int(rows[0][1].stats["num_parallel_iterations"])):
        iterate = lv_parallel(deer, iterate, 1).ys
        errors.append(float(jnp.max(jnp.abs(iterate - reference.ys))))
    return reference, rows[0][1], errors


def plot(reference, parallel, errors):
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
    ref = np.asarray(reference.ys)
    par = np.asarray(parallel.ys)
    ax0.plot(ref[:, 0], ref[:, 1], lw=4, color="0.8", label="diffrax.diffeqsolve")
    ax0.plot(par[:, 0], par[:, 1], lw=1, color="C0", label="pdyn.diffeqsolve (DEER)")
    ax0.plot(*LV_Y0, "ko", ms=4)
    ax0.set(xlabel="prey", ylabel="predator")
    ax0.set_title(f"Lotka-Volterra, Tsit5, {LV_STEPS:,} steps")
    ax0.legend(loc="center")
    ax1.semilogy(np.arange(1, len(errors) + 1), np.maximum(errors, 1e-17), "o-")
    ax1.set(xlabel="DEER iteration", ylabel="max |y - y_diffrax|")
    ax1.set_title("Convergence from y0 at every step")
    ax1.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUTPUT, dpi=120)
    print(f"  saved {OUTPUT.name}")


# --- 2. A stiff problem with Kvaerno5 -------------------------------------------------

POINTS = 16
SPACING = 1.0 / (POINTS + 1)
X = jnp.linspace(SPACING, 1.0 - SPACING, POINTS)


def heat(t, y, args):
    """$\\partial_t u = D\\,\\partial_x^2 u - u^3 + \\sin(\\pi x)\\cos(2t)$ with
    $u = 0$ at both ends, on a grid: the Laplacian makes it stiff (eigenvalues down to
    $-4D/h^2$), the cubic term nonlinear (and dissipative)."""
    padded = jnp.pad(y, 1)
    laplacian = (padded[2:] - 2 * y + padded[:-2]) / SPACING**2
    return args * laplacian - y**3 + jnp.sin(jnp.pi * X) * jnp.cos(2 * t)


HEAT_TERM = dfx.ODETerm(heat)
HEAT_T1, HEAT_STEPS, DIFFUSIVITY = 10.0, 200, 1.0
HEAT_DT = HEAT_T1 / HEAT_STEPS
HEAT_Y0 = jnp.zeros(POINTS)
# Fixed steps: the root finder's tolerances are set explicitly (Diffrax requires it).
# Newton rather than Diffrax's VeryChord, which reports divergence at tolerances this
# tight on this problem.
KVAERNO5 = dfx.Kvaerno5(root_finder=optx.Newton(rtol=1e-10, atol=1e-10))


@eqx.filter_jit
def heat_sequential(solver):
    return dfx.diffeqsolve(
        HEAT_TERM, solver, 0.0, HEAT_T1, HEAT_DT, HEAT_Y0, DIFFUSIVITY, saveat=STEPS,
        max_steps=HEAT_STEPS, throw=False,
    )  # fmt: skip


@jax.jit
def heat_parallel():
    return pdyn.diffeqsolve(
        HEAT_TERM, KVAERNO5, 0.0, HEAT_T1, HEAT_DT, HEAT_Y0, DIFFUSIVITY, saveat=STEPS,
        parallel=pdyn.DEER(), throw=False,
    )  # fmt: skip


def stiff_example():
    stiffness = 4 * DIFFUSIVITY / SPACING**2
    print(
        f"\n2. Stiff: nonlinear heat equation on {POINTS} points, Kvaerno5, "
        f"{HEAT_STEPS} steps of {HEAT_DT} (dt * |lambda_max| = "
        f"{HEAT_DT * stiffness:.0f}), float64, CPU"
    )
    explicit = heat_sequential(dfx.Tsit5())
    finite = bool(jnp.all(jnp.isfinite(explicit.ys)))
    print(f"  Tsit5 on the same grid: {'finite' if finite else 'blows up (unstable)'}")
    reference = heat_sequential(KVAERNO5)
    assert dfx.is_okay(reference.result)
    sequential_seconds, parallel_seconds = timed(
        lambda: heat_sequential(KVAERNO5).ys, lambda: heat_parallel().ys
    )
    sol = heat_parallel()
    error = float(jnp.max(jnp.abs(sol.ys - reference.ys)))
    print_table([("DEER", sol, error, parallel_seconds)], sequential_seconds)


def main():
    reference, parallel, errors = lotka_volterra_example()
    plot(reference, parallel, errors)
    stiff_example()


if __name__ == "__main__":
    main()
