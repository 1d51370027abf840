"""Markdown tables of the results in `benchmarks/results/`, for the documentation.

`docs/benchmarks.md` calls these while the site is built (`markdown-exec`), so its
numbers always come from the JSON files; the prose around them is written by hand.
Every function returns Markdown, or a note that the results file is missing.
"""

from __future__ import annotations

import functools
import json

from . import plots
from .common import RESULTS_DIR


GPU_GRID = "bench_gpu-nvidia-h100-80gb-hbm3_partial.json"
GPU_SCANS = "scans_gpu-nvidia-h100-80gb-hbm3_sweep.json"
PROFILE = "profile_cpu.json"
# The ratios to `lax.scan` of the reference implementation at T = 10^4, whose halves
# are the CPU targets.
PAPER = {
    "QuasiDEER": {4: 4.5, 16: 6.2, 64: 7.8},
    "DEER": {4: 34.0, 16: 14.0, 64: 102.0},
}
MEMORY_CASE = ("solve", "quasideer", 1_000_000, 64)
MEMORY_REQUIREMENT_MB = 4000.0


def load(name: str) -> dict | None:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(headers: list[str], rows: list[list]) -> str:
    return plots.markdown_table(headers, rows)


def _from(name: str):
    """Calls the decorated table function with the results in `name`, or says that
    they are missing."""

    def decorator(fn):
        @functools.wraps(fn)
        def table() -> str:
            results = load(name)
            if results is None:
                return f"*No results: `benchmarks/results/{name}` is missing.*"
            return fn(results)

        return table

    return decorator


def quick_runs() -> list[tuple[str, dict]]:
    """Every quick CPU run of `benchmarks.run`, oldest first."""
    runs = [
        (path.stem, json.loads(path.read_text()))
        for path in RESULTS_DIR.glob("bench_cpu_quick*.json")
    ]
    runs.sort(key=lambda r: r[1].get("meta", {}).get("date", ""))
    return runs


def latest(section: str) -> tuple[str, dict] | None:
    """The newest quick run that has `section`, as a results dict holding only it."""
    for stem, results in reversed(quick_runs()):
        if results.get(section):
            return stem, {"meta": results["meta"], section: results[section]}
    return None


def machine(meta: dict) -> str:
    """The machine, software and load of a run, in one line."""
    if meta.get("backend") == "cpu" or meta.get("device_kind") == "cpu":
        device = (
            f"CPU: {meta.get('cpu_model') or '?'}, {meta.get('cpu_count')} cores "
            "(shared with other jobs)"
        )
    else:
        device = f"{meta.get('device_kind')} ({meta.get('cpu_count')} host CPUs)"
    text = (
        f"{device}; jax {meta.get('jax')}, Python {meta.get('python')}; "
        f"{meta.get('date')}; load average {meta.get('load_average')}"
    )
    return text + (f"; `{meta['command']}`" if meta.get("command") else "")


def _source(stem: str, meta: dict) -> str:
    return f"From `benchmarks/results/{stem}.json`. Machine: {machine(meta)}."


def _ratio(results: dict | None, solver: str, size: int, length: int = 10_000):
    for r in (results or {}).get("grid", {}).get("rows", []):
        if (r["solver"], r["D"], r["T"]) == (solver, size, length) and "ratio" in r:
            return r
    return None


def _floor_cell(floor: dict | None, solver: str, size: int):
    if floor is None or solver != "QuasiDEER":
        return None
    for d in floor["dims"]:
        row = d["rows"].get(solver)
        if d["D"] == size and row and "iterations" in row:
            return {"ratio": row["x_scan"], "iterations": row["iterations"]}
    return None


def targets() -> str:
    """The CPU targets at $T = 10^4$ (half the reference implementation's ratio to
    `lax.scan`) against the full grid, the latest quick grid and `benchmarks.floor`;
    *met* is read from the latest quick grid."""
    full = load("bench_cpu.json")
    found = latest("grid")
    quick = found[1] if found else None
    floor = load("floor_cpu.json")
    out = [
        "| solver | D | reference's ratio | target (half) | full grid | latest quick "
        "run | `benchmarks.floor` | met in the latest quick run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for solver, by_dim in PAPER.items():
        for size, paper in by_dim.items():
            target = paper / 2
            cells = []
            for r in (
                _ratio(full, solver, size),
                _ratio(quick, solver, size),
                _floor_cell(floor, solver, size),
            ):
                cells.append(
                    "–" if r is None else f"{r['ratio']:.1f} ({r['iterations']} it)"
                )
            r = _ratio(quick, solver, size)
            met = "–" if r is None else ("yes" if r["ratio"] <= target else "no")
            out.append(
                f"| {solver} | {size} | {paper:g} | ≤ {target:g} | "
                + " | ".join(cells)
                + f" | {met} |"
            )
    return "\n".join(out)


@_from("floor_cpu.json")
def floor(results: dict) -> str:
    """`benchmarks.floor`: a minimal quasi-Newton loop against the library's solver,
    as multiples of `lax.scan`."""
    dims = results["dims"]
    names = list(dict.fromkeys(name for d in dims for name in d["rows"]))
    out = [
        "| variant | " + " | ".join(f"D = {d['D']}" for d in dims) + " |",
        "|---|" + "---|" * len(dims),
    ]
    for name in names:
        cells = [
            f"{d['rows'][name]['x_scan']:.1f}×" if name in d["rows"] else "–"
            for d in dims
        ]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"{_source('floor_cpu', results['meta'])}\n\n" + "\n".join(out)


@_from("bench_cpu.json")
def full_grid(results: dict) -> str:
    """The full CPU grid: its machine, the per-D summary and every row (folded)."""
    rows = plots.markdown({"meta": results["meta"], "grid": results["grid"]})
    lines = rows.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| D | T |"))
    folded = "\n".join(("    " + line) if line else "" for line in lines[start:])
    return "\n\n".join(
        [
            _source("bench_cpu", results["meta"]),
            plots.grid_summary(results),
            '??? note "Every row of the full grid"',
            folded,
        ]
    )


def quick(section: str) -> str:
    """The latest quick run's tables of `section` (`"grid"`, `"passes"`, `"scans"`,
    `"convergence"` or `"memory"`)."""
    found = latest(section)
    if found is None:
        return f"*No quick run has a `{section}` section.*"
    stem, results = found
    text = plots.markdown(results).split("\n", 1)[1].strip()
    return f"{_source(stem, results['meta'])}\n\n{text}"


def memory_runs() -> str:
    """The peak resident memory of QuasiDEER at $T = 10^6$, $D = 64$ in every quick
    run that measured it."""
    out = [
        "| run | date | peak RSS (MB) | RSS after inputs (MB) | iterations | "
        f"< {MEMORY_REQUIREMENT_MB:.0f} MB |",
        "|---|---|---|---|---|---|",
    ]
    for stem, results in quick_runs():
        for case in results.get("memory", {}).get("cases", []):
            if (case["kind"], case["name"], case["T"], case["D"]) != MEMORY_CASE:
                continue
            peak = case.get("peak_rss_mb")
            child = case.get("child", {})
            met = peak is not None and peak < MEMORY_REQUIREMENT_MB
            out.append(
                f"| `{stem}` | {results['meta'].get('date')} | "
                f"{plots._f(peak, '.0f')} | "
                f"{plots._f(child.get('rss_after_inputs_mb'), '.0f')} | "
                f"{plots._f(child.get('iterations'))} | {'yes' if met else 'no'} |"
            )
    return "\n".join(out)


@_from("bench_cpu_gradients.json")
def gradients(results: dict) -> str:
    """One gradient step against backpropagation through `lax.scan`."""
    text = plots.markdown(results).split("\n", 1)[1].strip()
    return f"{_source('bench_cpu_gradients', results['meta'])}\n\n{text}"


def _share(value: float) -> str:
    return "–" if value < 0.0005 else f"{100 * value:.0f}%" if value >= 0.01 else "<1%"


def _profile_rows(results: dict) -> list[tuple[str, int, dict]]:
    return [
        (name, d["D"], p)
        for name in ("QuasiDEER", "DEER", "lax.scan")
        for d in results["dims"]
        if (p := d["solvers"].get(name))
    ]


@_from(PROFILE)
def profile(results: dict) -> str:
    """The time of one solve split by XLA operation (`benchmarks.profile`): category
    shares per solver and D (rows marked † run a loop body per time step), and the
    largest operations (folded)."""
    categories = list(results["categories"])
    rows = _profile_rows(results)
    out = [
        _source("profile_cpu", results["meta"]),
        "",
        "| solver | D | ms per solve | × lax.scan | per iteration | "
        + " | ".join(categories)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(categories),
    ]
    for name, size, p in rows:
        per = (
            f"{p['loop_us_per_iteration']:.2f} µs per step"
            if name == "lax.scan"
            else f"{p['loop_us_per_iteration'] / 1e3:.2f} ms ({p['iterations']} it)"
        )
        mark = " †" if p["per_step_ops"] else ""
        shares = [_share(p["categories"][c]["share"]) for c in categories]
        out.append(
            f"| {name}{mark} | {size} | {p['wall_us'] / 1e3:.2f} | "
            f"{p['x_scan']:.2f} | {per} | " + " | ".join(shares) + " |"
        )
    out += [
        "",
        '??? note "The largest operations of every profile"',
        "",
        "    | solver | D | operation | category | share | per solve | op_name |",
        "    |---|---|---|---|---|---|---|",
    ]
    for name, size, p in rows:
        for op in p["top"][:5]:
            mark = " †" if op["per_step_loop"] else ""
            out.append(
                f"    | {name} | {size} | `{op['name']}`{mark} | {op['category']} | "
                f"{_share(op['share'])} | {op['per_solve']:.0f} | "
                f"`{op['op_name'] or '–'}` |"
            )
    return "\n".join(out)


@_from(GPU_GRID)
def gpu_grid(results: dict) -> str:
    """The partial accelerator grid: every tolerance of the sweep of each solver."""
    grid = results["grid"]["rows"]
    scan_ms = {(r["D"], r["T"]): r.get("scan_ms") for r in grid if "scan_ms" in r}
    rows = [
        [
            r["D"],
            f"{r['T']:.0e}",
            r["solver"],
            f"{s['tol']:g}",
            s["iterations"],
            f"{s['max_error']:.1e}",
            f"{1e3 * s['seconds']:.1f} ms",
            plots._f(scan_ms.get((r["D"], r["T"])), ".1f"),
        ]
        for r in grid
        if r["solver"] != "lax.scan"
        for s in r.get("sweep", [])
    ]
    headers = ["D", "T", "solver", "rtol = atol", "iterations", "max error"]
    headers += ["seconds", "lax.scan ms"]
    return f"Machine: {machine(results['meta'])}.\n\n" + _table(headers, rows)


@_from(GPU_SCANS)
def gpu_scans(results: dict) -> str:
    """The linear recurrence alone on an accelerator: sequential, associative and the
    best chunked scan."""
    rows = []
    for r in results["rows"]:
        ms = r["ms"]
        chunked = {k: v for k, v in ms.items() if k.startswith("chunked")}
        best = min(chunked, key=chunked.get)
        rows.append(
            [
                f"{r['T']:.0e}",
                r["D"],
                f"{ms['sequential']:.0f}",
                f"{ms['associative']:.3f}",
                best.removeprefix("chunked "),
                f"{chunked[best]:.3f}",
                f"{ms['associative'] / chunked[best]:.2f}",
            ]
        )
    headers = ["T", "D", "sequential ms", "associative ms", "best chunked"]
    headers += ["chunked ms", "associative / chunked"]
    return (
        f"Machine: {machine(results['env'])}. `L` = chunk size, `u` = unroll of the "
        "sequential sweeps.\n\n" + _table(headers, rows)
    )


@_from("elk_cpu_quick.json")
def elk(results: dict) -> str:
    """ELK and the Newton-type solvers on the AR-GRU and on Lorenz-96."""
    argru = results["argru"]
    argru_rows = [
        [
            r["method"],
            r["iterations"],
            "successful" if r["successful"] else r["result"],
            f"{r['max_abs_error']:.1e}",
            f"{r['ratio_to_lax_scan']:.0f}",
        ]
        for r in argru["rows"]
    ]
    lorenz_rows = [
        [
            r["D"],
            block["T"],
            r["dtype"],
            r["method"],
            r["iterations"],
            "yes" if r["successful"] else "no",
            f"{r['relative_error']:.1e}",
        ]
        for block in results.get("lorenz96", [])
        for r in block["rows"]
    ]
    return "\n\n".join(
        [
            f"AR-GRU of the ELK paper, T = {argru['T']}, {argru['dtype']} (largest "
            f"Lyapunov exponent {argru['lyapunov']:.4f}):",
            _table(
                ["method", "iterations", "result", "max error", "× lax.scan"],
                argru_rows,
            ),
            "Lorenz-96 (chaotic), relative error of the trajectory:",
            _table(
                ["D", "T", "dtype", "method", "iterations", "successful"]
                + ["relative error"],
                lorenz_rows,
            ),
        ]
    )


@_from("ode_cpu.json")
def ode(results: dict) -> str:
    """`pdyn.diffeqsolve` against `diffrax.diffeqsolve` with fixed steps."""
    env = results["environment"]
    rows = [
        [
            r["problem"],
            f"{r['num_steps']:.0e}",
            f"{r['lyapunov_exponent_times_t1']:.2f}",
            f"{r['diffrax_seconds']:.3f}",
            method,
            p["iterations"],
            p["result"],
            plots._f(p["max_abs_difference"], ".1e"),
            f"{p['ratio_to_diffrax']:.2f}",
        ]
        for r in results["rows"]
        for method, p in r["parallel"].items()
    ]
    headers = ["problem", "steps", "LLE × t1", "diffrax s", "method", "iterations"]
    headers += ["result", "max abs. difference", "× diffrax"]
    return (
        f"Diffrax `{results['solver']}` with fixed steps against `pdyn.diffeqsolve` "
        f"({env['device']}, {env['cpu_count']} cores, load "
        f"{[round(x, 1) for x in env['load_average_at_start']]} at the start; "
        f"{results['timing']}; {env['date']}):\n\n" + _table(headers, rows)
    )


@_from("sharding_cpu.json")
def sharding(results: dict) -> str:
    """The time-sharded solve on emulated CPU devices."""
    meta = results["meta"]
    rows = [
        [
            r["structure"],
            r["devices"],
            plots._f(r.get("num_steps")),
            f"{r['error']:.1e}",
            plots._f(r.get("time_s"), ".3f"),
            f"{r['allgather_bytes_analytic']} / {r['allgather_bytes_hlo']}",
            r["trajectory_bytes_per_device"],
        ]
        for r in results["rows"]
    ]
    headers = ["structure", "devices", "iterations", "error", "seconds"]
    headers += ["all-gather bytes (analytic / HLO)", "trajectory bytes per device"]
    return (
        f"T = {meta['length']}, D = {meta['size']}, {meta['dtype']}. "
        f"{meta['note']}\n\n" + _table(headers, rows)
    )
