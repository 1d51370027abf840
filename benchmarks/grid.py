"""The GRU grid: every solver against `jax.lax.scan`.

Problem: `eqx.nn.GRUCell(D, D)` (untrained, key 0), standard-normal inputs (key 1),
zero initial state, float32. For every (D, T) and every solver:

- the tolerance `rtol = atol`: the loosest of `TOLERANCES` (tried loosest first)
  whose solution is within a max abs error of 1e-4 of the `lax.scan` trajectory;
- the iterations it takes;
- the wall time of a compiled, warm solve: `pdyn.solve` inside `jax.jit` returning
  the trajectory, the iterations and the result (what a jitted training step does;
  `sol.stats["residual_norm"]` unused). On CPU it is timed interleaved with
  `lax.scan` (the ratio is the median of run-by-run ratios), and at T <= 10^4
  "direct" also times `pdyn.solve(...)` called directly, which adds Python dispatch
  and the final residual pass of `sol.stats`. On an accelerator, whose timings are
  steady and whose `lax.scan` takes seconds at large T, each is timed on its own;
- peak memory: the buffers XLA allocates for that jitted solve (arguments, output and
  temporaries, `compiled.memory_analysis()`), next to the same figure for `lax.scan`.
  Whole-process resident memory is measured separately (`benchmarks/memory.py`).

Cases that would not fit the memory budget, or solvers that took longer than the time
cap at a smaller T, are skipped and the reason recorded.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn

from .common import (
    error_message,
    fmt,
    gru_diagonal,
    gru_step,
    make_gru,
    make_lax_scan,
    MAX_ERROR,
    median_ms,
    on_cpu,
    paired_ratio,
    REFERENCE_RATIOS,
    time_interleaved,
)


TOLERANCES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
# A guard against a solver that does not converge; every solve that meets the error
# target here stops far earlier (the default max_steps is T).
SWEEP_MAX_STEPS = 1000


def _block_size(size: int) -> int:
    return 4 if size >= 8 else 2


# name -> (family of the CPU target, factory(tol, D) -> solver)
SOLVERS = {
    "Sequential": (None, lambda tol, d: pdyn.Sequential()),
    "QuasiDEER": ("quasi", lambda tol, d: pdyn.QuasiDEER(rtol=tol, atol=tol)),
    "QuasiDEER diag_fn": (
        None,
        lambda tol, d: pdyn.QuasiDEER(rtol=tol, atol=tol, diagonal=gru_diagonal),
    ),
    "QuasiDEER stoch k=1": (
        None,
        lambda tol, d: pdyn.QuasiDEER(
            rtol=tol, atol=tol, diagonal="stochastic", num_probes=1
        ),
    ),
    "BlockQuasiDEER k=4": (
        None,
        lambda tol, d: pdyn.BlockQuasiDEER(_block_size(d), rtol=tol, atol=tol),
    ),
    "DEER": ("deer", lambda tol, d: pdyn.DEER(rtol=tol, atol=tol)),
    "QuasiELK": (None, lambda tol, d: pdyn.QuasiELK(rtol=tol, atol=tol)),
    "ELK": (None, lambda tol, d: pdyn.ELK(rtol=tol, atol=tol)),
}
QUICK_SOLVERS = (
    "Sequential",
    "QuasiDEER",
    "QuasiDEER diag_fn",
    "QuasiDEER stoch k=1",
    "DEER",
)


def _settings(quick: bool) -> dict:
    if quick:
        return {
            "dims": (4, 16, 64),
            "lengths": (10_000,),
            "solvers": QUICK_SOLVERS,
            "memory_budget_mb": 3_000.0,
            "time_cap_s": 20.0,
            "interleave": on_cpu(),
            "min_ratio": 4.0 if on_cpu() else 0.0,
        }
    cpu = on_cpu()
    return {
        "dims": (4, 16, 64, 256),
        "lengths": (1_000, 10_000, 100_000, 1_000_000),
        "solvers": tuple(SOLVERS),
        # This machine's memory is shared; accelerators have their own.
        "memory_budget_mb": 6_000.0 if cpu else 60_000.0,
        "time_cap_s": 60.0 if cpu else 30.0,
        # A shared CPU is noisy: time side by side. An accelerator is steady, and its
        # lax.scan is too slow at large T to repeat for every solver.
        "interleave": cpu,
        "min_ratio": 8.0 if cpu else 0.0,
    }


def _sweep_fn(solver, y0):
    """The jitted solve that is both checked and timed: `pdyn.solve` inside `jax.jit`,
    returning the trajectory, the iterations and the result."""

    @jax.jit
    def run(xs, cell):
        sol = pdyn.solve(
            gru_step, solver, y0, xs, cell, max_steps=SWEEP_MAX_STEPS, throw=False
        )
        return sol.value, sol.stats["num_steps"], sol.result._value

    return run


def _choose_tolerance(
    make, size, y0, xs, cell, reference, start, tolerances, memory_budget_mb, cap_s
):
    """Tries tolerances loosest first (from `start`) and returns the first whose
    solution meets the error target, as `(tol, sweep record, compiled solve, XLA MB)`;
    `tol` is `None` when none does, or when the solve needs more memory than the
    budget (then the record says so)."""
    sweep = []
    candidates = [t for t in tolerances if start is None or t <= start]
    memory = None
    for tol in candidates:
        run = _sweep_fn(make(tol, size), y0).lower(xs, cell).compile()
        if memory is None:
            memory = _memory_of(run)
            if memory is not None and memory > memory_budget_mb:
                return None, [{"skipped_mb": memory}], None, memory
        begin = time.perf_counter()
        value, steps, result = jax.block_until_ready(run(xs, cell))
        elapsed = time.perf_counter() - begin
        finite = bool(jnp.all(jnp.isfinite(value)))
        error = float(jnp.max(jnp.abs(value - reference))) if finite else math.inf
        ok = finite and int(result) == 0 and error <= MAX_ERROR
        sweep.append(
            {
                "tol": tol,
                "iterations": int(steps),
                "max_error": error,
                "result": int(result),
                "ok": ok,
                "seconds": elapsed,
            }
        )
        if ok:
            return tol, sweep, run, memory
        if int(result) != 0 and int(steps) >= SWEEP_MAX_STEPS:
            break  # not converging: a tighter tolerance will not help
        if elapsed > cap_s:
            break  # too slow to try a tighter tolerance
    return None, sweep, None, memory


def _memory_of(compiled) -> float | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    return (
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    ) / 1e6


def _time_alone(fn, runs: int) -> list[float]:
    """Wall times of `runs` calls after one warm-up call (for accelerators, whose
    timings are steady: no need to interleave)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return times


def run_case(size, length, solvers, settings, state, budget_s) -> list[dict]:
    """All solvers at one (D, T). `state` carries, per (solver, D), the tolerance
    chosen at the previous T and whether the solver was too slow to go on."""
    cell, xs, y0 = make_gru(length, size)
    scan = make_lax_scan().lower(y0, xs, cell).compile()
    scan_memory = _memory_of(scan)
    begin = time.perf_counter()
    reference = jax.block_until_ready(scan(y0, xs, cell))
    scan_once_s = time.perf_counter() - begin
    scan_row = {
        "D": size,
        "T": length,
        "solver": "lax.scan",
        "iterations": 1,
        "max_error": 0.0,
        "xla_memory_mb": scan_memory,
        "scan_once_s": scan_once_s,
    }
    rows = [scan_row]
    interleave = settings["interleave"]
    scan_times = None
    if not interleave:
        # lax.scan on an accelerator is slow at large T (a kernel launch per step)
        # and steady: one run suffices when it takes seconds.
        scan_times = (
            [scan_once_s]
            if scan_once_s > 2.0
            else _time_alone(lambda: scan(y0, xs, cell), 3)
        )
        scan_row["scan_ms"] = median_ms(scan_times)
    # Every parallel solver takes a few lax.scan times or more on a CPU: when that
    # would exceed the time cap, only the sequential solve is run.
    scan_bound = settings["time_cap_s"] / max(settings["min_ratio"], 1e-9)
    for name in solvers:
        family, make = SOLVERS[name]
        row = {"D": size, "T": length, "solver": name, "family": family}
        rows.append(row)
        key = (name, size)
        if key in state.get("too_slow", {}):
            row["skipped"] = state["too_slow"][key]
            continue
        if name != "Sequential" and scan_once_s > scan_bound:
            row["skipped"] = (
                f"lax.scan alone takes {scan_once_s:.1f} s here; a parallel solve "
                f"({settings['min_ratio']:g} x that or more) would exceed the "
                f"{settings['time_cap_s']:.0f} s cap of this run"
            )
            continue
        try:
            tolerances = (1.0,) if name == "Sequential" else settings["tolerances"]
            tol, sweep, run, memory = _choose_tolerance(
                make,
                size,
                y0,
                xs,
                cell,
                reference,
                state.get("tol", {}).get(key),
                tolerances,
                settings["memory_budget_mb"],
                settings["time_cap_s"],
            )
            row["xla_memory_mb"] = memory
            if sweep and "skipped_mb" in sweep[0]:
                row["skipped"] = (
                    f"needs {memory:.0f} MB of XLA buffers, over the "
                    f"{settings['memory_budget_mb']:.0f} MB budget of this run"
                )
                continue
            row["sweep"] = sweep
            if tol is None:
                row["error"] = (
                    f"no tolerance in {tolerances} reaches max error {MAX_ERROR:g}"
                )
                continue
            state.setdefault("tol", {})[key] = tol
            last = sweep[-1]
            row.update(
                tol=None if name == "Sequential" else tol,
                iterations=last["iterations"],
                max_error=last["max_error"],
            )
            once = last["seconds"]
            solve = lambda run=run: run(xs, cell)
            if once > settings["time_cap_s"]:
                # One run is all we can afford.
                times = {"scan": scan_times or [scan_once_s], "jit": [once]}
                state.setdefault("too_slow", {})[key] = (
                    f"one solve took {once:.0f} s at T = {length // 10} or less "
                    f"(cap {settings['time_cap_s']:.0f} s)"
                )
            elif interleave:
                fns = {"scan": lambda: scan(y0, xs, cell), "jit": solve}
                if length <= 10_000:
                    solver = make(tol, size)
                    fns["direct"] = lambda solver=solver: pdyn.solve(
                        gru_step, solver, y0, xs, cell
                    )
                runs = (3, 5) if once > 5 else (5, 21)
                times = time_interleaved(
                    fns, budget_s=budget_s, min_runs=runs[0], max_runs=runs[1]
                )
            else:
                runs = 3 if once > 1 else 10
                times = {"scan": scan_times, "jit": _time_alone(solve, runs)}
            row.update(
                scan_ms=median_ms(times["scan"]),
                jit_ms=median_ms(times["jit"]),
                runs=len(times["jit"]),
            )
            if interleave and len(times["scan"]) == len(times["jit"]):
                row["ratio"] = paired_ratio(times["jit"], times["scan"])
            else:
                row["ratio"] = row["jit_ms"] / row["scan_ms"]
            if "direct" in times:
                row["direct_ms"] = median_ms(times["direct"])
                row["ratio_direct"] = paired_ratio(times["direct"], times["scan"])
            reference_ratio = (
                REFERENCE_RATIOS.get(family, {}).get(size) if length == 10_000 else None
            )
            if reference_ratio is not None:
                row["reference_ratio"] = reference_ratio
                row["target_ratio"] = reference_ratio / 2
                row["target_met"] = row["ratio"] <= reference_ratio / 2
        except Exception as e:  # keep the grid going; the row records the failure
            row["error"] = error_message(e)
    return rows


HEADER = (
    f"{'D':>4} {'T':>8} {'solver':<20} {'tol':>6} {'iters':>5} {'max err':>8} "
    f"{'scan ms':>9} {'solve ms':>10} {'x scan':>7} {'direct x':>8} {'XLA MB':>8} "
    f"{'target':>6} {'met':>4}"
)


def print_row(row: dict) -> None:
    lead = f"{row['D']:>4} {row['T']:>8} {row['solver']:<20}"
    if row["solver"] == "lax.scan":
        print(
            f"{lead} {'-':>6} {1:>5} {0.0:>8.1e} {fmt(row.get('scan_ms'), '.2f', 9)} "
            f"{'':>10} {1.0:>7.2f} "
            f"{'':>8} {fmt(row.get('xla_memory_mb'), '.1f', 8)}",
            flush=True,
        )
        return
    if "skipped" in row:
        print(f"{lead} skipped: {row['skipped']}", flush=True)
        return
    if "ratio" not in row:
        tried = ", ".join(
            f"{s['tol']:g}: {s['iterations']} it, err {s['max_error']:.1e}"
            for s in row.get("sweep", [])
        )
        print(f"{lead} FAILED: {row.get('error')} [{tried}]", flush=True)
        return
    met = row.get("target_met")
    print(
        f"{lead} {fmt(row.get('tol'), '.0e', 6)} {row['iterations']:>5d} "
        f"{row['max_error']:>8.1e} {row['scan_ms']:>9.2f} {row['jit_ms']:>10.2f} "
        f"{row['ratio']:>7.2f} {fmt(row.get('ratio_direct'), '.2f', 8)} "
        f"{fmt(row.get('xla_memory_mb'), '.1f', 8)} "
        f"{fmt(row.get('target_ratio'), '.2f', 6)} "
        f"{'-' if met is None else ('yes' if met else 'NO'):>4}",
        flush=True,
    )


def run(
    quick: bool,
    dims=None,
    lengths=None,
    solvers=None,
    tolerances=None,
    budget_s: float = 4.0,
    on_row=None,
) -> dict:
    settings = _settings(quick)
    if dims:
        settings["dims"] = tuple(dims)
    if lengths:
        settings["lengths"] = tuple(lengths)
    if solvers:
        unknown = set(solvers) - set(SOLVERS)
        if unknown:
            raise SystemExit(f"unknown solvers {unknown}; choose from {list(SOLVERS)}")
        settings["solvers"] = tuple(solvers)
    settings["tolerances"] = tuple(tolerances) if tolerances else TOLERANCES
    print(
        "\n== GRU grid: time to max error 1e-4 against lax.scan (float32) ==\n"
        "x scan: jitted solve / lax.scan, median of interleaved run-by-run ratios; "
        "direct x: pdyn.solve called directly (T <= 1e4); XLA MB: buffers of the "
        "jitted call; target: half the reference implementation's ratio (T = 1e4)"
    )
    print(HEADER)
    rows: list[dict] = []
    state: dict = {}
    for size in settings["dims"]:
        for length in settings["lengths"]:
            case = run_case(
                size, length, settings["solvers"], settings, state, budget_s
            )
            for row in case:
                print_row(row)
            rows.extend(case)
            if on_row is not None:
                on_row(rows)
    return {
        "rows": rows,
        "settings": {k: v for k, v in settings.items()},
        "problem": (
            "eqx.nn.GRUCell(D, D, key=jax.random.key(0)), inputs "
            "jax.random.normal(jax.random.key(1), (T, D)), y0 = 0, float32"
        ),
        "max_error": MAX_ERROR,
    }
