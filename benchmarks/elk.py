"""ELK and quasi-ELK on the trained AR-GRU of the ELK paper (Fig. 4), and Lorenz-96.

For every method: iterations to convergence, wall time of the compiled solve as a
ratio to `lax.scan` (measured interleaved, median of repeats), the final mean absolute
deviation (MAD) of the sampled outputs from the sequential trajectory, and the MAD
after every iteration (the Fig. 4 curve, saved as a PNG).

The methods: DEER and quasi-DEER (undamped), ELK and quasi-ELK with this library's
defaults (exact Levenberg–Marquardt steps by Kalman smoothing, adaptive damping), ELK
with the causal Kalman-filter step and adaptive damping, and the paper's reference
configuration (Kalman-filter step, fixed damping).

Usage:

    python -m benchmarks.elk            # AR-GRU T = 9,999 (float32) + Lorenz-96
    python -m benchmarks.elk --quick    # T = 2,000, fewer repeats

Writes `benchmarks/results/elk_cpu[_quick].json` and `benchmarks/results/elk_argru.png`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import parallel_dynamics as pdyn
from parallel_dynamics._problem import Recurrence, recurrence_residual, StateLayout

from .argru import argru_step, load_argru_case, mad_x, sequential_rollout


RESULTS = Path(__file__).parent / "results"


def methods() -> dict[str, optx.AbstractRootFinder]:
    filter_ = pdyn.KalmanFilter()
    return {
        "DEER": pdyn.DEER(),
        "quasi-DEER": pdyn.QuasiDEER(),
        "ELK": pdyn.ELK(),
        "ELK (filter step)": pdyn.ELK(linear_solver=filter_),
        "ELK (paper: filter, fixed λ=1e-6)": pdyn.ELK(
            damping=pdyn.FixedDamping(1e-6), linear_solver=filter_
        ),
        "quasi-ELK": pdyn.QuasiELK(),
        "quasi-ELK (filter step)": pdyn.QuasiELK(linear_solver=filter_),
        "quasi-ELK (paper: filter, fixed λ=1e-2)": pdyn.QuasiELK(
            damping=pdyn.FixedDamping(1e-2), linear_solver=filter_
        ),
    }


def _recurrence(step, y0, inputs, args) -> Recurrence:
    x_struct = jax.eval_shape(lambda: jax.tree.map(lambda x: x[0], inputs))
    closed = eqx.filter_closure_convert(step, y0, x_struct, args)
    layout = StateLayout.of(y0)
    length = jax.tree.leaves(inputs)[0].shape[0]
    return Recurrence(
        step=closed,
        layout=layout,
        y0=layout.flatten(y0),
        inputs=inputs,
        args=args,
        length=length,
    )


def mad_trace(solver, step, y0, inputs, args, reference, num_iterations, init=None):
    """The MAD from the reference after each of `num_iterations` iterations (frozen
    once the solver terminates), by driving the Optimistix solver's `step` directly,
    from `init` ($y_0$ at every time by default)."""
    recurrence = _recurrence(step, y0, inputs, args)
    guess = jnp.broadcast_to(y0, reference.shape) if init is None else init
    f_struct = jax.ShapeDtypeStruct(reference.shape, reference.dtype)

    @jax.jit
    def run():
        state = solver.init(
            recurrence_residual, guess, recurrence, {}, f_struct, None, frozenset()
        )

        def body(carry, _):
            y, state, done = carry
            new_y, new_state, _ = solver.step(
                recurrence_residual, y, recurrence, {}, state, frozenset()
            )
            y = jnp.where(done, y, new_y)
            state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state, new_state)
            stop, _ = solver.terminate(
                recurrence_residual, y, recurrence, {}, state, frozenset()
            )
            done = done | stop
            mad = mad_x(y, reference, y0[0])
            return (y, state, done), jnp.where(jnp.isfinite(mad), mad, jnp.nan)

        _, mads = jax.lax.scan(
            body, (guess, state, jnp.array(False)), None, length=num_iterations
        )
        return mads

    return np.asarray(run())


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def argru(length: int, repeats: int, trace_iterations: int) -> dict:
    case = load_argru_case(seed=1)
    drivers = case.drivers[:length]
    reference = sequential_rollout(case.params, case.s0, drivers)
    sequential = jax.jit(lambda: sequential_rollout(case.params, case.s0, drivers))
    jax.block_until_ready(sequential())
    lyapunov = float(pdyn.lyapunov_exponent(argru_step, case.s0, drivers, case.params))
    rows = []
    for name, solver in methods().items():
        solve = jax.jit(
            lambda solver=solver: pdyn.solve(
                argru_step,
                solver,
                case.s0,
                drivers,
                case.params,
                max_steps=2 * length + 10,
                throw=False,
            )
        )
        start = time.perf_counter()
        sol = jax.block_until_ready(solve())
        compile_and_run = time.perf_counter() - start
        # Interleave with lax.scan so that the ratio is measured side by side.
        pairs = [(_time(solve, 1), _time(sequential, 1)) for _ in range(repeats)]
        t_solve = statistics.median(p[0] for p in pairs)
        t_scan = statistics.median(p[1] for p in pairs)
        value = np.asarray(sol.value)
        finite = bool(np.all(np.isfinite(value)))
        row = {
            "method": name,
            "iterations": int(sol.stats["num_steps"]),
            "result": str(sol.result).split("<")[-1].rstrip(">") or "successful",
            "successful": bool(sol.result == optx.RESULTS.successful),
            "mad": float(mad_x(sol.value, reference, case.s0[0])) if finite else None,
            "max_abs_error": float(np.max(np.abs(value - reference)))
            if finite
            else None,
            "time_s": t_solve,
            "lax_scan_s": t_scan,
            "ratio_to_lax_scan": t_solve / t_scan,
            "compile_and_first_run_s": compile_and_run,
        }
        row["trace"] = mad_trace(
            solver,
            argru_step,
            case.s0,
            drivers,
            case.params,
            reference,
            min(trace_iterations, max(row["iterations"], 1)),
        ).tolist()
        rows.append(row)
        print(
            f"  {name:42s} {row['iterations']:6d} its  "
            f"{'ok ' if row['successful'] else 'FAIL'}  "
            f"MAD {row['mad'] if row['mad'] is not None else float('nan'):.2e}  "
            f"{t_solve * 1e3:9.1f} ms  ({t_solve / t_scan:7.1f}x lax.scan)",
            flush=True,
        )
    return {"T": length, "dtype": "float32", "lyapunov": lyapunov, "rows": rows}


def lorenz96(length: int, size: int) -> dict:
    jax.config.update("jax_enable_x64", True)
    forcing, dt = 8.0, 0.01

    def vector_field(y):
        return (jnp.roll(y, -1) - jnp.roll(y, 2)) * jnp.roll(y, 1) - y + forcing

    def step(y, x, dt):
        del x
        k1 = vector_field(y)
        k2 = vector_field(y + 0.5 * dt * k1)
        k3 = vector_field(y + 0.5 * dt * k2)
        k4 = vector_field(y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    rows = []
    for dtype in (jnp.float32, jnp.float64):
        y0 = forcing + 0.01 * jax.random.normal(jax.random.key(0), (size,), dtype)
        dt_ = jnp.asarray(dt, dtype)
        reference = pdyn.solve(
            step, pdyn.Sequential(), y0, None, dt_, length=length
        ).value
        for name in ("DEER", "ELK", "quasi-ELK"):
            solver = methods()[name]
            sol = pdyn.solve(step, solver, y0, None, dt_, length=length, throw=False)
            value = np.asarray(sol.value)
            err = np.max(np.abs(value - np.asarray(reference))) / np.max(
                np.abs(np.asarray(reference))
            )
            rows.append(
                {
                    "method": name,
                    "dtype": jnp.dtype(dtype).name,
                    "D": size,
                    "iterations": int(sol.stats["num_steps"]),
                    "successful": bool(sol.result == optx.RESULTS.successful),
                    "finite": bool(np.all(np.isfinite(value))),
                    "relative_error": float(err) if np.isfinite(err) else None,
                }
            )
            print(
                f"  L96 D={size} {jnp.dtype(dtype).name} {name:10s} "
                f"{rows[-1]['iterations']:5d} its  "
                f"{'ok ' if rows[-1]['successful'] else 'FAIL'}  rel. error {err:.1e}",
                flush=True,
            )
    jax.config.update("jax_enable_x64", False)
    return {"T": length, "rows": rows}


def plot(argru_result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in argru_result["rows"]:
        trace = np.asarray(row["trace"], dtype=float)
        if trace.size:
            ax.plot(np.arange(1, trace.size + 1), trace, label=row["method"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MAD from the sequential trajectory")
    ax.set_title(f"AR-GRU (ELK paper, Fig. 4), T = {argru_result['T']}, float32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    length = 2000 if arguments.quick else 9999
    repeats = 1 if arguments.quick else 3
    print(f"device: {jax.devices()[0].device_kind}, {platform.processor()}")
    print(f"AR-GRU, seed 1, T = {length}, float32:")
    result = {"device": jax.devices()[0].device_kind}
    result["argru"] = argru(length, repeats, trace_iterations=3000)
    print(f"  largest Lyapunov exponent: {result['argru']['lyapunov']:+.2e} per step")
    print("Lorenz-96, forcing 8, dt = 0.01, RK4, T = 1000:")
    result["lorenz96"] = [lorenz96(1000, size) for size in (5, 10)]
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if arguments.quick else ""
    (RESULTS / f"elk_cpu{suffix}.json").write_text(json.dumps(result, indent=1))
    plot(result["argru"], RESULTS / f"elk_argru{suffix}.png")
    print(f"wrote {RESULTS / f'elk_cpu{suffix}.json'}")


if __name__ == "__main__":
    main()
