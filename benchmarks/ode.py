"""ODE benchmark: `pdyn.diffeqsolve` against `diffrax.diffeqsolve`, Tsit5, float64, CPU.

Two problems, each on a fixed time interval with 10^4 and 10^5 steps of Tsit5 (so the
step shrinks as the number of steps grows):

- **Lotka–Volterra** (periodic; its largest Lyapunov exponent is ~0):
  $\\alpha, \\beta, \\gamma, \\delta = 2/3, 4/3, 1, 1$, $y_0 = (1, 1)$,
  $t \\in [0, 50]$ (about seven periods).
- **Lorenz** (chaotic; exponent ~0.9 per unit time): $\\sigma, \\rho, \\beta = 10, 28, 8/3$,
  from a point on the attractor, $t \\in [0, 1]$ (about one Lyapunov time).

For each, the parallel solvers `pdyn.DEER()`, `pdyn.QuasiDEER()` (the default of
`pdyn.diffeqsolve`) and `pdyn.Sequential()` (the same step map in a `lax.scan`, i.e. the
overhead of the bridge) are timed against `diffrax.diffeqsolve` with the same solver
and grid. Timing rule (a shared, noisy machine): every function is compiled and warmed
up, then all are called round-robin, `--repeats` times; a time is the median of its
runs and a ratio the median of the run-by-run ratios to Diffrax. Every parallel
solution is checked against Diffrax's (max abs difference); a failed solve (e.g.
non-finite iterates) is reported as such, with its time.

**Predictability.** The largest Lyapunov exponent (LLE) of the Tsit5 step along
Diffrax's trajectory is reported next to the iteration counts, per unit time and as
$\\lambda_1 (t_1 - t_0)$, the number of e-foldings a perturbation grows over the
interval. A sweep over the interval length at 10^4 steps (DEER) shows what it
predicts: the iteration count follows $\\lambda_1 (t_1 - t_0)$, not the number of
steps, and Newton's iterates overflow once the growth over the interval is too large.

Usage:

    python -m benchmarks.ode                # writes benchmarks/results/ode_cpu.json
    python -m benchmarks.ode --repeats 3 --out /tmp/ode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


jax.config.update("jax_enable_x64", True)

import parallel_dynamics as pdyn  # noqa: E402
from parallel_dynamics import DiffraxStep  # noqa: E402


RESULTS_PATH = Path(__file__).resolve().parent / "results" / "ode_cpu.json"
STEPS = (10_000, 100_000)
SOLVER = dfx.Tsit5()
SAVE_STEPS = dfx.SaveAt(steps=True)
PARALLEL = {
    "DEER": pdyn.DEER(),
    "QuasiDEER": pdyn.QuasiDEER(),
    "Sequential": pdyn.Sequential(),
}
SWEEP_STEPS = 10_000


# --- the problems ---------------------------------------------------------------------


def lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            delta * prey * predator - gamma * predator,
        ]
    )


def lorenz(t, y, args):
    sigma, rho, beta = args
    a, b, c = y
    return jnp.stack([sigma * (b - a), a * (rho - c) - b, a * b - beta * c])


def _on_the_attractor():
    """The Lorenz state at t = 20 from (1, 1, 1): past the transient."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lorenz), dfx.Tsit5(), 0.0, 20.0, 1e-3, jnp.ones(3),
        (10.0, 28.0, 8 / 3), max_steps=20_000,
    )  # fmt: skip
    return sol.ys[-1]


class Problem(eqx.Module):
    name: str = eqx.field(static=True)
    term: dfx.ODETerm
    args: tuple
    y0: jax.Array
    t1: float = eqx.field(static=True)
    sweep: tuple = eqx.field(static=True)  # interval lengths for the sweep


def problems() -> list[Problem]:
    return [
        Problem(
            "Lotka-Volterra",
            dfx.ODETerm(lotka_volterra),
            (2 / 3, 4 / 3, 1.0, 1.0),
            jnp.array([1.0, 1.0]),
            50.0,
            (12.5, 25.0, 50.0, 100.0, 200.0),
        ),
        Problem(
            "Lorenz",
            dfx.ODETerm(lorenz),
            (10.0, 28.0, 8 / 3),
            _on_the_attractor(),
            1.0,
            (0.25, 0.5, 1.0, 1.5, 2.0, 4.0),
        ),
    ]


# --- the solves (StepTo with traced times: one compilation per number of steps) --------


@eqx.filter_jit
def diffrax_solve(problem: Problem, ts):
    return dfx.diffeqsolve(
        problem.term, SOLVER, ts[0], ts[-1], None, problem.y0, problem.args,
        saveat=SAVE_STEPS, stepsize_controller=dfx.StepTo(ts),
        max_steps=ts.shape[0] - 1,
    ).ys  # fmt: skip


@eqx.filter_jit
def parallel_solve(problem: Problem, ts, parallel):
    sol = pdyn.diffeqsolve(
        problem.term, SOLVER, ts[0], ts[-1], None, problem.y0, problem.args,
        saveat=SAVE_STEPS, stepsize_controller=dfx.StepTo(ts), parallel=parallel,
        throw=False,
    )  # fmt: skip
    return sol.ys, sol.stats["num_parallel_iterations"], sol.result


@eqx.filter_jit
def largest_lyapunov_exponent(problem: Problem, ts, trajectory):
    """Per step: divide by the step size for the exponent per unit time."""
    step = DiffraxStep(problem.term, SOLVER)
    return pdyn.lyapunov_exponent(
        step, problem.y0, step.inputs(ts), problem.args, trajectory=trajectory
    )


def _result_name(result) -> str:
    for name in ("successful", "nonfinite", "max_steps_reached"):
        if result == getattr(dfx.RESULTS, name):
            return name
    return str(result)


# --- timing ---------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Warm every function up, then call them round-robin `repeats` times."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def benchmark(problem: Problem, num_steps: int, repeats: int) -> dict:
    ts = jnp.linspace(0.0, problem.t1, num_steps + 1)
    dt = problem.t1 / num_steps
    fns = {"diffrax": lambda: diffrax_solve(problem, ts)}
    for name, parallel in PARALLEL.items():
        fns[name] = lambda parallel=parallel: parallel_solve(problem, ts, parallel)
    times = interleaved(fns, repeats)
    reference = diffrax_solve(problem, ts)
    exponent = float(largest_lyapunov_exponent(problem, ts, reference)) / dt
    row = {
        "problem": problem.name,
        "num_steps": num_steps,
        "t1": problem.t1,
        "dt": dt,
        "lyapunov_exponent_per_time": exponent,
        "lyapunov_exponent_times_t1": exponent * problem.t1,
        "diffrax_seconds": float(np.median(times["diffrax"])),
        "parallel": {},
    }
    for name in PARALLEL:
        ys, iterations, result = parallel_solve(problem, ts, PARALLEL[name])
        ratios = np.asarray(times[name]) / np.asarray(times["diffrax"])
        okay = bool(dfx.is_okay(result))
        row["parallel"][name] = {
            "iterations": int(iterations),
            "result": _result_name(result),
            "max_abs_difference": float(jnp.max(jnp.abs(ys - reference)))
            if okay
            else None,
            "seconds": float(np.median(times[name])),
            "ratio_to_diffrax": float(np.median(ratios)),
            "seconds_all": [float(t) for t in times[name]],
        }
    return row


def sweep(problem: Problem, num_steps: int) -> list[dict]:
    """DEER at `num_steps` steps over intervals of several lengths: one run each."""
    rows = []
    for t1 in problem.sweep:
        ts = jnp.linspace(0.0, t1, num_steps + 1)
        reference = diffrax_solve(problem, ts)
        ys, iterations, result = parallel_solve(problem, ts, PARALLEL["DEER"])
        exponent = float(largest_lyapunov_exponent(problem, ts, reference))
        exponent /= t1 / num_steps
        okay = bool(dfx.is_okay(result))
        rows.append(
            {
                "problem": problem.name,
                "num_steps": num_steps,
                "t1": t1,
                "lyapunov_exponent_per_time": exponent,
                "lyapunov_exponent_times_t1": exponent * t1,
                "deer_iterations": int(iterations),
                "deer_result": _result_name(result),
                "max_abs_difference": (
                    float(jnp.max(jnp.abs(ys - reference))) if okay else None
                ),
            }
        )
    return rows


# --- output ---------------------------------------------------------------------------


def print_header() -> None:
    print(
        f"{'problem':<16}{'steps':>8}{'LLE/time':>10}{'LLE*T':>8}{'solver':>12}"
        f"{'iters':>7}{'result':>12}{'max|diff|':>11}{'time (s)':>10}{'/ diffrax':>10}"
    )


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        head = (
            f"{row['problem']:<16}{row['num_steps']:>8}"
            f"{row['lyapunov_exponent_per_time']:>10.3f}"
            f"{row['lyapunov_exponent_times_t1']:>8.2f}"
        )
        print(
            f"{head}{'diffrax':>12}{'':>7}{'':>12}{'':>11}{row['diffrax_seconds']:>10.3f}"
        )
        blank = " " * len(head)
        for name, r in row["parallel"].items():
            diff = r["max_abs_difference"]
            diff = "-" if diff is None else f"{diff:.1e}"
            print(
                f"{blank}{name:>12}{r['iterations']:>7}{r['result']:>12}{diff:>11}"
                f"{r['seconds']:>10.3f}{r['ratio_to_diffrax']:>9.1f}x"
            )


def print_sweep(rows: list[dict]) -> None:
    print(
        f"\nPredictability sweep: DEER, {rows[0]['num_steps']} steps, interval [0, t1]\n"
        f"{'problem':<16}{'t1':>8}{'LLE/time':>10}{'LLE*t1':>8}{'iters':>7}"
        f"{'result':>12}{'max|diff|':>11}"
    )
    for row in rows:
        diff = row["max_abs_difference"]
        diff = "-" if diff is None else f"{diff:.1e}"
        print(
            f"{row['problem']:<16}{row['t1']:>8}{row['lyapunov_exponent_per_time']:>10.3f}"
            f"{row['lyapunov_exponent_times_t1']:>8.2f}{row['deer_iterations']:>7}"
            f"{row['deer_result']:>12}{diff:>11}"
        )


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "diffrax": dfx.__version__,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--sweep-steps", type=int, default=SWEEP_STEPS)
    options = parser.parse_args()
    env = environment()
    print(
        f"Tsit5, float64, {env['device']}, {env['cpu_count']} CPUs, load average "
        f"{env['load_average_at_start'][0]:.1f}; median of {options.repeats} "
        "interleaved runs\n"
    )
    rows, sweeps = [], []
    print_header()
    for problem in problems():
        for num_steps in options.steps:
            rows.append(benchmark(problem, num_steps, options.repeats))
            print_rows(rows[-1:])
    for problem in problems():
        sweeps += sweep(problem, options.sweep_steps)
    print_sweep(sweeps)
    env["load_average_at_end"] = os.getloadavg()
    options.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": env,
        "solver": "Tsit5",
        "timing": "median of interleaved runs; ratio = median of run-by-run ratios",
        "rows": rows,
        "predictability_sweep": sweeps,
    }
    options.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {options.out}")


if __name__ == "__main__":
    main()
