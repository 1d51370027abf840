"""Where the time of one solve goes, per XLA operation.

    python -m benchmarks.profile [--dims 4 16 64] [--solves 5]

`benchmarks.passes` infers the split of an iteration by subtracting timings; this
module measures it. GRU problem of the grid (T = 10^4, float32), for every D:

- `QuasiDEER`: exact diagonal, `rtol = atol = 0` and `max_steps = 7`: exactly the 7
  iterations the grid's solves take to reach max error 1e-4;
- `DEER`: `rtol = atol = 0` and `max_steps = 3` (3 iterations reach 1e-4, see
  `errors_by_iteration` in `benchmarks.passes`);
- `lax.scan`: the sequential reference.

1. **Wall time.** The three jitted functions, and the solvers' linear recurrences
   alone (below), are timed without the profiler, side by side
   (`time_interleaved`, median).
2. **Trace.** Solves run under `jax.profiler.trace`. XLA:CPU's runtime records one
   event per operation of the compiled program, named after its HLO instruction;
   runtime events (the executor, Python frames, `end: ...`) are not instructions
   and are left out. Only leaves count: a `while` or `call` whose body's operations
   have events of their own is left out and its body counted instead (a `call` that
   XLA compiles into one function, such as quasi-DEER's diagonal scan at small D,
   is a leaf). An operation's traced time per solve is the median duration of its
   events times its events per solve, counted over the solves captured (the events
   of the entry computation's operations), not the solves requested. The median,
   rather than the sum, because on this shared machine single events take several
   times their usual time (another process, the first operations of a trace).
3. **Categories.** Every instruction is located in the compiled program
   (`fn.lower(...).compile().as_text()`, read by `benchmarks.hlo`) and classified by
   `benchmarks.classify` from its place (outside the solver's loop or in it), its
   `op_name` metadata (e.g. `.../while/body/vmap(jvp(eqx.nn.GRUCell))/dot_general`)
   and what it computes. The rules are in `classify`; what matches none of them is
   reported as `other`.
4. **Times.** The profile is put on the scale of the untraced wall time: the
   operations' times per solve add up to it, in proportion to their traced times
   (the time the runtime spends between operations is spread over them). The
   factor is printed and recorded (`other_scale`); on this shared machine it
   ranged from 0.7 to 1.6 across functions and runs: the runtime's time between
   operations, caches left cold by the other functions of the interleaved timing,
   and the noise of a single traced solve.

**Per-step loops.** A `while` that XLA does not compile into one function runs its
body as separate operations at every time step: `lax.scan` at D >= 16, and the
linear recurrence of quasi-DEER at D = 64 and of DEER at D >= 16. The profiler adds
about a microsecond to each, several times what such an operation costs (`lax.scan`
at D = 16: 3 to 5 ms untraced, 25 to 90 ms traced), so their traced times cannot
be used. The operations that run at least T times per solve get an untraced time
first, and the other operations the rest of the wall time: for a solver, its
iterations times the untraced time of the same linear recurrence solved alone
(`pdyn.internal.sequential_scan`, what `AutoScan` runs on a CPU, on blocks of the same
structure and shape, timed side by side with the solves); for `lax.scan`, its wall
time minus its other operations' traced time. That time is split between the loop's
operations in proportion to their traced times, which the profiler's cost per event
dominates: within such a loop the split says how many operations run per step, not
what each costs. Such a trace holds 1.4 to 5.6 x 10^5 events per solve, so only one
solve is traced there (the profiler keeps at most 10^6 events; a full buffer is
reported).

Writes `benchmarks/results/profile_<device>.json`; about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import parallel_dynamics as pdyn

from .classify import CATEGORIES, classify, short_op_name
from .common import (
    backend_tag,
    environment,
    gru_step,
    make_gru,
    make_lax_scan,
    median_ms,
    paired_ratio,
    RESULTS_DIR,
    save_json,
    time_interleaved,
)
from .hlo import Instruction, parse_hlo
from .trace import op_durations, trace_events


LENGTH = 10_000
# name -> (solver, max_steps: its iterations, as the tolerance is 0, the blocks of its
# linear recurrence); None: lax.scan.
SOLVERS = {
    "QuasiDEER": (pdyn.QuasiDEER(rtol=0.0, atol=0.0), 7, "diagonal"),
    "DEER": (pdyn.DEER(rtol=0.0, atol=0.0), 3, "dense"),
    "lax.scan": None,
}
TOP_OPS = 8
# A trace of several solves is made only if it holds fewer events than this; else
# the first trace, of one solve, is used.
EVENTS_PER_TRACE = 300_000
PROFILER_EVENT_LIMIT = 1_000_000


def profile_solve(
    fn: Callable, args, solves: int, iterations: int, loop_us: float | None
) -> dict:
    """The traced profile of one jitted function, by operation. `iterations`: of
    the solver's loop (time steps for `lax.scan`), to express the loop's time per
    iteration. `loop_us`: the untraced time per solve of the operations that run at
    least T times (see the module docstring); None: the wall time minus the other
    operations (`lax.scan`), set by `account`."""
    program = parse_hlo(fn.lower(*args).compile().as_text())
    events = trace_events(fn, args, 1)
    if len(events) * solves < EVENTS_PER_TRACE and solves > 1:
        events = trace_events(fn, args, solves)
    durations = op_durations(events, program)
    instructions = program.instructions
    entry = [len(d) for n, d in durations.items() if instructions[n].depth == 0]
    captured = max(entry, default=1)
    return {
        "iterations": iterations,
        "iterations_traced": _iterations(instructions, durations, captured),
        "solves_traced": captured,
        "events": len(events),
        "events_dropped": len(events) >= PROFILER_EVENT_LIMIT,
        "ops": {
            name: _op_record(instructions[name], times, captured)
            for name, times in durations.items()
        },
        "loop_us": loop_us,
    }


def _op_record(instruction: Instruction, durations: list[float], captured: int):
    """An operation's traced time per solve (the median event times the events per
    solve), its events per solve, whether it runs per time step, its category and
    what it is."""
    per_solve = len(durations) / captured
    return {
        "traced_us": float(np.median(durations)) * per_solve,
        "per_solve": per_solve,
        "per_step_loop": per_solve >= LENGTH,
        "category": classify(instruction),
        "op_name": short_op_name(instruction.op_name),
        "kind": instruction.root or instruction.opcode,
        "shape": re.sub(r"\{[^}]*\}", "", instruction.shape),
    }


def account(profile: dict, wall_us: float) -> dict:
    """The profile with its operations' times per solve, which add up to the
    untraced wall time: the per-step loops get `loop_us` (or the wall time minus the other
    operations' traced time), the other operations the rest of the wall time in
    proportion to their traced times; then the categories, the top operations and
    the time per iteration of the solver's loop."""
    ops = profile["ops"]
    traced_us = sum(op["traced_us"] for op in ops.values())
    loop_traced = sum(op["traced_us"] for op in ops.values() if op["per_step_loop"])
    other_traced = traced_us - loop_traced
    loop_us = profile["loop_us"] if loop_traced else 0.0
    if loop_us is None:
        loop_us = max(wall_us - other_traced, 0.0)
    scales = {
        True: loop_us / loop_traced if loop_traced else None,
        False: max(wall_us - loop_us, 0.0) / other_traced,
    }
    for op in ops.values():
        op["us"] = op["traced_us"] * scales[op["per_step_loop"]]
    by_category = collections.Counter()
    for op in ops.values():
        by_category[op["category"]] += op["us"]
    total = sum(by_category.values())
    in_loop = total - by_category["outside the loop"]
    top = sorted(ops, key=lambda n: ops[n]["us"], reverse=True)[:TOP_OPS]
    return {
        **{key: value for key, value in profile.items() if key != "ops"},
        "wall_us": wall_us,
        "traced_us": traced_us,
        "other_scale": scales[False],
        "loop_us": loop_us if loop_traced else None,
        "per_step_ops": sorted(n for n, op in ops.items() if op["per_step_loop"]),
        "per_step_traced_us": loop_traced,
        "loop_us_per_iteration": in_loop / profile["iterations"],
        "categories": {
            c: {"us": by_category[c], "share": by_category[c] / total}
            for c in CATEGORIES
        },
        "top": [{"name": n, **ops[n], "share": ops[n]["us"] / total} for n in top],
    }


def _iterations(instructions, durations, captured) -> int | None:
    """The iterations of the entry computation's loop, from the events of its body's
    operations (None where the loop is one operation, compiled as a whole)."""
    body = [
        len(d)
        for n, d in durations.items()
        if instructions[n].depth == 1 and not instructions[n].condition
    ]
    return max(body) // captured if body else None


# --------------------------------------------------------------------------- runs


def _solve_fn(solver, max_steps: int):
    return jax.jit(
        lambda y0, xs, cell: (
            pdyn.solve(
                gru_step, solver, y0, xs, cell, max_steps=max_steps, throw=False
            ).value
        )
    )


def _blocks(kind: str, size: int):
    """Blocks of a contracting linear recurrence of the problem's shape: its scan
    costs what the solver's does (it does not depend on the values)."""
    if kind == "diagonal":
        return pdyn.DiagonalBlocks(jnp.full((LENGTH, size), 0.5))
    return pdyn.DenseBlocks(jnp.full((LENGTH, size, size), 0.5 / size))


def run_dim(size: int, solves: int, budget_s: float) -> dict:
    """Times the three functions and the solvers' scans alone, side by side, then
    profiles each function."""
    cell, xs, y0 = make_gru(LENGTH, size)
    args = (y0, xs, cell)
    fns = {
        name: make_lax_scan() if spec is None else _solve_fn(*spec[:2])
        for name, spec in SOLVERS.items()
    }
    timed = {name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}
    scan = jax.jit(pdyn.internal.sequential_scan)
    offsets = jnp.ones((LENGTH, size))
    for kind in ("diagonal", "dense"):
        timed[f"scan {kind}"] = lambda b=_blocks(kind, size): scan(b, offsets)
    times = time_interleaved(timed, budget_s=budget_s, min_runs=5, max_runs=15)
    result = {
        "D": size,
        "T": LENGTH,
        "runs": len(times["lax.scan"]),
        "scan_us": {
            k: median_ms(times[f"scan {k}"]) * 1e3 for k in ("diagonal", "dense")
        },
        "solvers": {},
    }
    for name, fn in fns.items():
        spec = SOLVERS[name]
        if spec is None:
            iterations, loop_us = LENGTH, None
        else:
            iterations, loop_us = spec[1], spec[1] * result["scan_us"][spec[2]]
        profile = profile_solve(fn, args, solves, iterations, loop_us)
        profile = account(profile, median_ms(times[name]) * 1e3)
        profile["x_scan"] = paired_ratio(times[name], times["lax.scan"])
        result["solvers"][name] = profile
        print_profile(name, size, profile)
    return result


def print_profile(name: str, size: int, p: dict) -> None:
    """The profile of one function: its times, categories and top operations."""
    unit = "step" if name == "lax.scan" else "iteration"
    print(
        f"\n{name}, D = {size}: {p['wall_us'] / 1e3:.2f} ms per solve untraced "
        f"({p['x_scan']:.2f}x lax.scan), traced operations "
        f"{p['traced_us'] / 1e3:.2f} ms; {p['iterations']} {unit}s "
        f"({p['iterations_traced']} in the trace), "
        f"{p['loop_us_per_iteration']:.2f} us per {unit} in the loop; "
        f"{p['solves_traced']} solve(s) traced, {p['events']} events"
        + (" (profiler buffer full: events dropped)" if p["events_dropped"] else "")
    )
    print(
        f"  times scaled to the untraced wall time: traced operations x "
        f"{p['other_scale']:.2f}"
        + (
            f"; * per-step loop ({len(p['per_step_ops'])} operations, run >= T "
            f"times per solve) traced {p['per_step_traced_us'] / 1e3:.2f} ms, "
            f"counted as {p['loop_us'] / 1e3:.2f} ms (untraced)"
            if p["per_step_ops"]
            else ""
        )
    )
    for category, c in p["categories"].items():
        if c["us"] > 0:
            print(f"  {category:<22} {c['share']:6.1%} {c['us'] / 1e3:9.3f} ms")
    print(f"  {'top operations':<40} {'ms':>8} {'share':>6} {'runs':>6}  op_name")
    for op in p["top"]:
        mark = "*" if op["per_step_loop"] else " "
        print(
            f"  {op['name'][:38]:<38}{mark} {op['us'] / 1e3:8.3f} {op['share']:6.1%} "
            f"{op['per_solve']:6.0f}  {op['op_name']}  [{op['category']}: "
            f"{op['kind']} {op['shape']}]"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--solves", type=int, default=5, help="traced per function")
    parser.add_argument("--budget-s", type=float, default=3.0, help="wall timing")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.profile", *(argv or sys.argv[1:])])
    meta = {**environment(), "command": command}
    results = {"meta": meta, "T": LENGTH, "categories": CATEGORIES, "dims": []}
    path = RESULTS_DIR / f"profile_{backend_tag()}.json"
    for size in args.dims:
        results["dims"].append(run_dim(size, args.solves, args.budget_s))
        save_json(path, results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
