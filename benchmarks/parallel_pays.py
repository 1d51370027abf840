"""When does parallel evaluation pay? Iterations against the sequence length T for a
contracting, a nearly neutral and a chaotic map.

    python -m benchmarks.parallel_pays            # about five minutes on a CPU
    python -m benchmarks.parallel_pays --quick    # about a minute

Every iteration of a parallel solver costs at least one evaluation of the step over the
whole trajectory, so the iteration count decides whether it can beat the sequential
loop on any hardware. Iteration counts are deterministic and hardware-independent.

- Contracting: an untrained `eqx.nn.GRUCell(4, 16)` driven by standard-normal inputs.
- Nearly neutral: the ELK paper's trained autoregressive GRU (`benchmarks/argru.py`,
  seed 1), whose largest Lyapunov exponent is about -0.001 per step.
- Chaotic: Lorenz-96 (D = 8, forcing 8) integrated with one RK4 step of 0.01 per time
  step.

All float32, `rtol = atol = 1e-5`, `max_steps = T`, from the default initial guess
($y_0$ at every time) except for the fixed-damping filter from `pdyn.jacobi_guess`.
Each problem also gets its largest Lyapunov exponent (`pdyn.lyapunov_exponent`). Writes
`benchmarks/results/parallel_pays[_quick].json` and a plot next to it, copied to
`docs/_static/benchmarks/` for the documentation.
"""

from __future__ import annotations

import argparse
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import parallel_dynamics as pdyn

from .argru import argru_step, load_argru_case
from .common import environment, RESULTS_DIR, ROOT, save_json


TOLERANCE = 1e-5
FILTER_FROM_JACOBI_GUESS = "ELK (filter, damping 1e-7, Jacobi guess)"
SOLVERS = {
    "DEER": lambda: pdyn.DEER(rtol=TOLERANCE, atol=TOLERANCE),
    "TrustDEER": lambda: pdyn.TrustDEER(rtol=TOLERANCE, atol=TOLERANCE),
    "ELK": lambda: pdyn.ELK(rtol=TOLERANCE, atol=TOLERANCE),
    FILTER_FROM_JACOBI_GUESS: lambda: pdyn.ELK(
        rtol=TOLERANCE,
        atol=TOLERANCE,
        damping=pdyn.FixedDamping(1e-7),
        linear_solver=pdyn.KalmanFilter(),
    ),
}


def _gru(length):
    cell = eqx.nn.GRUCell(4, 16, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (length, 4))
    return (lambda h, x, c: c(x, h)), jnp.zeros(16), xs, cell


def _argru(length):
    case = load_argru_case(seed=1)
    return argru_step, case.s0, case.drivers[:length], case.params


def _lorenz96(length):
    def vector_field(y):
        return (jnp.roll(y, -1) - jnp.roll(y, 2)) * jnp.roll(y, 1) - y + 8.0

    def step(y, x, dt):
        del x
        k1 = vector_field(y)
        k2 = vector_field(y + 0.5 * dt * k1)
        k3 = vector_field(y + 0.5 * dt * k2)
        k4 = vector_field(y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    y0 = 8.0 + 0.01 * jax.random.normal(jax.random.key(0), (8,))
    return step, y0, jnp.zeros((length, 0)), jnp.float32(0.01)


PROBLEMS = {
    "contracting (GRU)": _gru,
    "nearly neutral (AR-GRU)": _argru,
    "chaotic (Lorenz-96)": _lorenz96,
}


def _result_name(result) -> str:
    for name in ("successful", "nonlinear_max_steps_reached", "nonfinite"):
        if bool(result == getattr(optx.RESULTS, name)):
            return name
    return "nonlinear_divergence"


def measure(lengths) -> list[dict]:
    rows = []
    for problem, make in PROBLEMS.items():
        for length in lengths:
            step, y0, xs, args = make(length)
            exponent = float(pdyn.lyapunov_exponent(step, y0, xs, args))
            jacobi = pdyn.jacobi_guess(step, y0, xs, args)
            for solver, build in SOLVERS.items():
                init = jacobi if solver == FILTER_FROM_JACOBI_GUESS else None
                sol = pdyn.solve(
                    step,
                    build(),
                    y0,
                    xs,
                    args,
                    init=init,
                    max_steps=length,
                    throw=False,
                )
                row = dict(
                    problem=problem,
                    T=length,
                    solver=solver,
                    iterations=int(sol.stats["num_steps"]),
                    result=_result_name(sol.result),
                    lyapunov_exponent=exponent,
                )
                rows.append(row)
                print(
                    f"{problem:<26} {length:>6} {exponent:>8.4f} {solver:<42} "
                    f"{row['iterations']:>6} {row['result']}",
                    flush=True,
                )
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(13, 3.8), sharey=True)
    for ax, problem in zip(axes, PROBLEMS):
        lengths = sorted({r["T"] for r in rows if r["problem"] == problem})
        ax.plot(lengths, lengths, "k:", label="T (sequential depth)")
        for solver in SOLVERS:
            points = [
                (r["T"], r["iterations"], r["result"] == "successful")
                for r in rows
                if r["problem"] == problem and r["solver"] == solver
            ]
            ts, its, ok = zip(*points)
            line = ax.plot(ts, its, "o-", label=solver)[0]
            failed = [(t, i) for t, i, good in points if not good]
            if failed:
                ax.plot(*zip(*failed), "x", color=line.get_color(), ms=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(problem)
        ax.set_xlabel("T")
    axes[0].set_ylabel("iterations (x: not successful)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    lengths = (100, 400, 1600) if options.quick else (100, 300, 1000, 3000, 9999)
    print(f"{'problem':<26} {'T':>6} {'LLE':>8} {'solver':<42} {'iters':>6} result")
    rows = measure(lengths)
    suffix = "_quick" if options.quick else ""
    save_json(
        RESULTS_DIR / f"parallel_pays{suffix}.json",
        dict(environment=environment(), tolerance=TOLERANCE, rows=rows),
    )
    png = RESULTS_DIR / f"parallel_pays{suffix}.png"
    plot(rows, png)
    static = ROOT / "docs" / "_static" / "benchmarks"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, static / png.name)
    print(f"wrote {png}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
