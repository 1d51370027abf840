"""PNG plots and Markdown tables from a results JSON of `benchmarks.run`.

python -m benchmarks.plots benchmarks/results/bench_cpu.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(results: dict) -> str:
    meta = results.get("meta", {})
    device = meta.get("device_kind") or meta.get("backend", "?")
    if meta.get("backend") == "cpu":
        device = f"{meta.get('cpu_model') or 'CPU'} ({meta.get('cpu_count')} cores)"
    return f"{device}, jax {meta.get('jax', '?')}"


def plot_grid(results: dict, path: Path) -> Path | None:
    rows = results.get("grid", {}).get("rows", [])
    timed = [r for r in rows if "ratio" in r]
    if not timed:
        return None
    plt = _plt()
    dims = sorted({r["D"] for r in rows})
    solvers = [s for s in dict.fromkeys(r["solver"] for r in timed)]
    fig, axes = plt.subplots(2, len(dims), figsize=(4 * len(dims), 7), squeeze=False)
    for j, size in enumerate(dims):
        for solver in solvers:
            pts = sorted(
                (r["T"], r["ratio"], r.get("xla_memory_mb"))
                for r in timed
                if r["D"] == size and r["solver"] == solver
            )
            if not pts:
                continue
            ts = [p[0] for p in pts]
            axes[0, j].plot(ts, [p[1] for p in pts], "o-", label=solver)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                axes[1, j].plot(*zip(*mem), "o-", label=solver)
        scan_mem = sorted(
            (r["T"], r["xla_memory_mb"])
            for r in rows
            if r["D"] == size and r["solver"] == "lax.scan" and r.get("xla_memory_mb")
        )
        if scan_mem:
            axes[1, j].plot(*zip(*scan_mem), "k--", label="lax.scan")
        axes[0, j].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[0, j].set_title(f"GRU D = {size}")
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].set_yscale("log")
            axes[i, j].set_xlabel("T")
        axes[0, j].set_ylabel("time / lax.scan")
        axes[1, j].set_ylabel("XLA buffers (MB)")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"Time to max error 1e-4 and memory, {_label(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# One colour per solver in every convergence plot.
_SOLVER_ORDER = (
    "DEER",
    "QuasiDEER",
    "TrustDEER",
    "QuasiTrustDEER",
    "ELK",
    "QuasiELK",
    "Picard",
)


def _solver_color(solver: str, others: list[str]) -> str:
    if solver in _SOLVER_ORDER:
        return f"C{_SOLVER_ORDER.index(solver)}"
    return f"C{(len(_SOLVER_ORDER) + others.index(solver)) % 10}"


def _correct(row: dict) -> bool:
    """Converged, and to the right trajectory (max error within 10x the tolerance)."""
    error = row.get("max_error")
    return bool(row.get("converged")) and error is not None and error <= 1e-3


def _against_t_panels(section: dict) -> list[tuple[str, dict, bool]]:
    """(title, {solver: [(T, iterations, good)]}, name of T) for every panel."""
    panels = []
    rows = [r for r in section.get("rows", []) if "iterations" in r]
    for label in dict.fromkeys(r["map"] for r in rows):
        mine = [r for r in rows if r["map"] == label]
        lle = next((r["lle"] for r in mine[::-1] if r.get("lle")), None)
        title = "tanh RNN, " + label
        title += "" if lle is None else f"\nLLE {lle:.2f} at the largest T"
        lines = {
            s: [
                (r["T"], r["iterations"], _correct(r)) for r in mine if r["solver"] == s
            ]
            for s in dict.fromkeys(r["solver"] for r in mine)
        }
        panels.append((title, lines, "T"))
    sweep = [
        r
        for r in section.get("odes", {}).get("against_n", {}).get("rows", [])
        if "iterations" in r
    ]
    for label in dict.fromkeys(r["problem"] for r in sweep):
        mine = [r for r in sweep if r["problem"] == label]
        lines = {
            s: [(r["N"], r["iterations"], _solved(r)) for r in mine if r["solver"] == s]
            for s in dict.fromkeys(r["solver"] for r in mine)
        }
        panels.append((f"Tsit5 on [0, 20], {label}", lines, "N"))
    return panels


def plot_convergence(results: dict, path: Path) -> Path | None:
    """Iterations against T: the tanh RNN maps and the ODEs against N."""
    panels = _against_t_panels(results.get("convergence", {}))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False
    )
    others = [s for _, lines, _ in panels for s in lines if s not in _SOLVER_ORDER]
    for ax, (title, lines, length) in zip(axes[0], panels):
        for solver, pts in lines.items():
            pts = sorted(pts)
            color = _solver_color(solver, others)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, "o-", color=color, label=solver)
            bad = [(p[0], p[1]) for p in pts if not p[2]]
            if bad:
                ax.plot(*zip(*bad), "x", color=color, ms=10)
        ts = sorted({p[0] for pts in lines.values() for p in pts})
        ax.plot(ts, ts, "k:", lw=0.8, label=f"{length} (the bound)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ts, [str(t) for t in ts], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel(f"{length} (steps)")
        ax.set_ylabel("iterations")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Iterations to converge (x: failed, or converged far from the reference), "
        + _label(results),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _solved(row: dict) -> bool:
    return bool(row.get("successful")) and not row.get("suspect")


def _problem_groups(section: dict) -> dict[str, list[dict]]:
    """Problem label -> its rows, over the ODEs, AR-GRU, GRU and Lorenz-96."""
    groups: dict[str, list[dict]] = {}
    for r in section.get("odes", {}).get("rows", []):
        groups.setdefault(r["problem"], []).append(r)
    argru = section.get("argru", {})
    for r in argru.get("rows", []):
        groups.setdefault(f"AR-GRU seed {r['seed']}", []).append(r)
    gru = section.get("gru", {})
    for r in gru.get("rows", []):
        groups.setdefault(f"GRU {gru['input']}->{gru['hidden']}", []).append(r)
    for r in section.get("lorenz96", {}).get("rows", []):
        groups.setdefault(f"Lorenz-96 D={r['D']}", []).append(r)
    return groups


def plot_convergence_problems(results: dict, path: Path) -> Path | None:
    """Iterations per problem, one bar per solver (hatched: failed or suspect)."""
    groups = _problem_groups(results.get("convergence", {}))
    if not groups:
        return None
    plt = _plt()
    solvers = list(dict.fromkeys(r["solver"] for rows in groups.values() for r in rows))
    others = [s for s in solvers if s not in _SOLVER_ORDER]
    colors = {s: _solver_color(s, others) for s in solvers}
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups)), 5))
    for k, rows in enumerate(groups.values()):
        rows = [r for r in rows if "iterations" in r]
        width = 0.85 / max(len(rows), 1)
        for i, r in enumerate(rows):
            x = k + (i - len(rows) / 2 + 0.5) * width
            good = _solved(r)
            ax.bar(
                x,
                max(r["iterations"], 1),
                width=width,
                color=colors[r["solver"]],
                alpha=1.0 if good else 0.45,
                hatch=None if good else "//",
                label=r["solver"],
            )
            if not good:
                ax.plot(x, max(r["iterations"], 1), "kx", ms=5)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("iterations")
    ax.set_title(
        "Iterations per problem (hatched, x: failed or converged far from the "
        f"reference), {_label(results)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passes(results: dict, path: Path) -> Path | None:
    dims = [d for d in results.get("passes", {}).get("dims", []) if "profile" in d]
    if not dims:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
    for j, result in enumerate(dims):
        ax = axes[0, j]
        names = list(result["profile"])
        parts = ("linearise_passes", "scan_passes", "rest_passes")
        bottom = [0.0] * len(names)
        for part in parts:
            values = [max(result["profile"][n][part], 0.0) for n in names]
            ax.bar(names, values, bottom=bottom, label=part.replace("_passes", ""))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.axhline(3.0, color="r", lw=0.8, ls="--", label="target 3 passes")
        ax.set_ylabel("passes per iteration")
        ax.set_title(f"D = {result['D']}, T = {result['T']}")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"Cost of one iteration, {_label(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scans(results: dict, path: Path) -> Path | None:
    rows = [r for r in results.get("scans", {}).get("rows", []) if "ms" in r]
    if not rows:
        return None
    plt = _plt()
    cases = list(dict.fromkeys((r["structure"], r["T"], r["D"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    scans = ["sequential", "associative", "chunked auto", "AutoScan"]
    width = 0.8 / len(scans)
    for i, scan in enumerate(scans):
        values = []
        for case in cases:
            match = [
                r["ms"]
                for r in rows
                if (r["structure"], r["T"], r["D"]) == case
                and r["scan"].startswith(scan)
            ]
            values.append(match[0] if match else 0.0)
        xs = [k + (i - len(scans) / 2 + 0.5) * width for k in range(len(cases))]
        ax.bar(xs, values, width=width, label=scan)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{s}\nT={t:.0e} D={d}" for s, t, d in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax.set_title(f"Linear recurrence alone, {_label(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results: dict, directory: Path, stem: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for kind, fn in (
        ("grid", plot_grid),
        ("convergence", plot_convergence),
        ("convergence_problems", plot_convergence_problems),
        ("passes", plot_passes),
        ("scans", plot_scans),
    ):
        try:
            out = fn(results, directory / f"{stem}_{kind}.png")
        except Exception as e:  # a plot must never lose the measurements
            print(f"plot {kind} failed: {type(e).__name__}: {e}")
            continue
        if out is not None:
            made.append(str(out))
    return made


# --------------------------------------------------------------------------- tables


def _f(value, spec="", missing="–"):
    if value is None:
        return missing
    return format(value, spec)


def grid_summary(results: dict) -> str:
    """One table per D: solvers down, T across; each cell is the time as a multiple of
    `lax.scan` (iterations; XLA buffers in MB), or why the case was not run."""
    rows = results.get("grid", {}).get("rows", [])
    if not rows:
        return ""
    out = []
    for size in sorted({r["D"] for r in rows}):
        lengths = sorted({r["T"] for r in rows if r["D"] == size})
        solvers = list(dict.fromkeys(r["solver"] for r in rows if r["D"] == size))
        out += [
            "",
            f"**D = {size}**: time / `lax.scan` (iterations, XLA MB)",
            "",
            "| solver | " + " | ".join(f"T = {t:.0e}" for t in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for solver in solvers:
            cells = []
            for length in lengths:
                match = [
                    r
                    for r in rows
                    if r["D"] == size and r["T"] == length and r["solver"] == solver
                ]
                if not match:
                    cells.append("")
                    continue
                r = match[0]
                if solver == "lax.scan":
                    ms = r.get("scan_ms")
                    cells.append(
                        f"1 ({_f(r.get('xla_memory_mb'), '.0f')} MB"
                        + ("" if ms is None else f", {ms:.0f} ms")
                        + ")"
                    )
                elif "ratio" in r:
                    cells.append(
                        f"**{r['ratio']:.1f}** ({r['iterations']} it, "
                        f"{_f(r.get('xla_memory_mb'), '.0f')} MB)"
                    )
                elif "skipped" in r:
                    cells.append("skipped¹" if "budget" in r["skipped"] else "skipped²")
                else:
                    cells.append("failed")
            out.append(f"| {solver} | " + " | ".join(cells) + " |")
    out += [
        "",
        "¹ over the memory budget of the run (XLA buffers of the compiled solve). "
        "² over the time cap (a smaller T already took longer than the cap, or "
        "`lax.scan` alone made a parallel solve certain to).",
    ]
    return "\n".join(out) + "\n"


_FAILURES = {
    "nonfinite": "nonfinite",
    "nonlinear_max_steps_reached": "max steps",
    "max_steps_reached": "max steps",
    "nonlinear_divergence": "diverged",
}


def iterations_cell(row: dict) -> str:
    """The iterations of a solve, marked when it failed or is suspect (reported
    success with an error far above its tolerance)."""
    if "iterations" not in row:
        return "error"
    if row.get("suspect"):
        return f"{row['iterations']} SUSPECT"
    if row.get("successful", row.get("converged")):  # older files: `converged`
        return str(row["iterations"])
    return f"{row['iterations']} ✗ {_FAILURES.get(row['result'], row['result'])}"


def text_table(headers: list[str], rows: list[list]) -> str:
    """Fixed-width columns: numbers (and iteration counts) right-aligned."""
    columns = list(zip(headers, *[[str(c) for c in r] for r in rows]))
    widths = [max(len(c) for c in col) for col in columns]
    right = [
        all(c.lstrip("-")[:1].isdigit() or c in ("", "-", "nan") for c in col[1:])
        for col in columns
    ]

    def line(cells):
        return "  ".join(
            f"{c:>{w}}" if r else f"{c:<{w}}" for c, w, r in zip(cells, widths, right)
        ).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join(
        line(r) for r in [headers, rule, *[[str(c) for c in r] for r in rows]]
    )


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


Table = tuple[str, list[str], list[list[str]]]
CONVERGENCE_LEGEND = (
    "Iterations: `✗` failed (with the result), `SUSPECT` reported success with an "
    "error far above its tolerance; `solved`, median and max count the solves that "
    "succeeded and are not suspect. On the chaotic maps (positive LLE) a successful "
    "solve may differ from the sequential reference by O(1): its defects of size tol "
    "grow like exp(LLE T)."
)


def convergence_tables(section: dict, parts=None) -> list[Table]:
    """The tables of the `convergence` section: (title, headers, rows) each."""
    builders = {
        "tanh": _tanh_table,
        "odes": _ode_tables,
        "argru": _argru_table,
        "gru": _gru_table,
        "lorenz96": _lorenz96_table,
    }
    tables = []
    for part, build in builders.items():
        if parts is None or part in parts:
            tables += build(section)
    return tables


def _tanh_table(section: dict) -> list[Table]:
    rows = section.get("rows", [])
    if not rows:
        return []
    body = [
        [
            r["map"],
            r["T"],
            _f(r.get("lle"), ".3f"),
            r["solver"],
            iterations_cell(r),
            r.get("result", r.get("error", "")),
            _f(r.get("max_error"), ".1e", "nan"),
        ]
        for r in rows
    ]
    title = (
        f"Tanh RNN against T (D = {section.get('size')}, float32, tol "
        f"{section.get('tolerance')}, default max_steps)"
    )
    headers = ["map", "T", "LLE", "solver", "iterations", "result", "max err"]
    return [(title, headers, body)]


def _pivot(rows, row_key, col_key, cell) -> tuple[list, list, list[list[str]]]:
    """Rows of `rows` grouped by `row_key` down and `col_key` across."""
    row_labels = list(dict.fromkeys(row_key(r) for r in rows))
    col_labels = list(dict.fromkeys(col_key(r) for r in rows))
    index = {(row_key(r), col_key(r)): r for r in rows}
    body = [
        [label]
        + [cell(index[label, c]) if (label, c) in index else "" for c in col_labels]
        for label in row_labels
    ]
    return row_labels, col_labels, body


def _ode_tables(section: dict) -> list[Table]:
    odes = section.get("odes")
    if not odes:
        return []
    rows = odes["rows"]
    problem, solver = (lambda r: r["problem"]), (lambda r: r["solver"])
    _, solvers, body = _pivot(rows, problem, solver, iterations_cell)
    for name, stat in (("median (solved)", np.median), ("max (solved)", np.max)):
        cells = []
        for s in solvers:
            its = [r["iterations"] for r in rows if r["solver"] == s and _solved(r)]
            cells.append(f"{stat(its):.0f}" if its else "-")
        body.append([name] + cells)
    problems = len({r["problem"] for r in rows})
    body.append(
        ["solved"]
        + [
            f"{sum(_solved(r) for r in rows if r['solver'] == s)}/{problems}"
            for s in solvers
        ]
    )
    where = f"Tsit5, N = {odes['N']} on [0, {odes['t1']:g}], {odes['dtype']}"
    tables = [(f"ODEs: iterations ({where})", ["problem"] + solvers, body)]
    _, solvers, errors = _pivot(
        rows, problem, solver, lambda r: _f(r.get("max_error"), ".1e", "nan")
    )
    tables.append(
        (
            f"ODEs: max abs error against diffrax ({where})",
            ["problem"] + solvers,
            errors,
        )
    )
    sweep = odes.get("against_n", {}).get("rows", [])
    if sweep:
        _, ns, body = _pivot(
            sweep,
            lambda r: f"{r['problem']}, {r['solver']}",
            lambda r: r["N"],
            iterations_cell,
        )
        tables.append(
            (
                f"ODEs: iterations against N (dt = {odes['t1']:g} / N)",
                ["problem, solver"] + [f"N = {n}" for n in ns],
                body,
            )
        )
    return tables


def _argru_table(section: dict) -> list[Table]:
    argru = section.get("argru")
    if not argru:
        return []
    lle = {int(k): v for k, v in argru.get("lle", {}).items()}
    body = [
        [
            r["seed"],
            _f(lle.get(r["seed"]), ".2e"),
            r["solver"],
            iterations_cell(r),
            r.get("result", r.get("error", "")),
            _f(r.get("mad"), ".1e", "nan"),
            _f(r.get("max_error"), ".1e", "nan"),
            _f(r.get("first_iteration_mad_below_target"), "d", "")
            if "first_iteration_mad_below_target" in r
            else "",
        ]
        for r in argru["rows"]
    ]
    title = (
        f"AR-GRU (ELK paper), T = {argru['T']}, {argru['dtype']}, rtol = atol = "
        f"{argru['tolerance']:g}, max_steps = {argru['max_steps'] or 'default'}"
    )
    headers = [
        "seed",
        "LLE",
        "solver",
        "iterations",
        "result",
        "MAD",
        "max err",
        f"first it. MAD < {argru['mad_target']:g}",
    ]
    return [(title, headers, body)]


def _gru_table(section: dict) -> list[Table]:
    gru = section.get("gru")
    if not gru:
        return []
    body = [
        [
            r["solver"],
            iterations_cell(r),
            r.get("result", r.get("error", "")),
            _f(r.get("max_error"), ".1e", "nan"),
        ]
        for r in gru["rows"]
    ]
    title = (
        f"Contracting GRU (GRUCell({gru['input']}, {gru['hidden']}), T = {gru['T']}, "
        "float32, default tolerances)"
    )
    return [(title, ["solver", "iterations", "result", "max err"], body)]


def _lorenz96_table(section: dict) -> list[Table]:
    l96 = section.get("lorenz96")
    if not l96:
        return []
    body = [
        [
            r["D"],
            _f(r.get("lle"), ".3f"),
            r["solver"],
            iterations_cell(r),
            r.get("result", r.get("error", "")),
            _f(r.get("max_error"), ".1e", "nan"),
            _f(r.get("relative_error"), ".1e", "nan"),
        ]
        for r in l96["rows"]
    ]
    title = (
        f"Lorenz-96 (RK4, dt = {l96['dt']}, T = {l96['T']}, {l96['dtype']}, default "
        "tolerances; LLE per step)"
    )
    headers = ["D", "LLE", "solver", "iterations", "result", "max err", "rel. err"]
    return [(title, headers, body)]


def markdown(results: dict) -> str:
    """The tables of `docs/benchmarks.md`, from one results JSON."""
    out = [f"Measured on {_label(results)}, {results.get('meta', {}).get('date')}."]
    summary = grid_summary(results)
    if summary:
        out.append(summary)
    grid = results.get("grid", {}).get("rows", [])
    if grid:
        out += [
            "",
            "| D | T | solver | tol | iters | max err | lax.scan ms | solve ms | "
            "× lax.scan | × (direct call) | XLA MB | target × | met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in grid:
            if r["solver"] == "lax.scan":
                out.append(
                    f"| {r['D']} | {r['T']:.0e} | lax.scan | | 1 | | | | 1 | | "
                    f"{_f(r.get('xla_memory_mb'), '.1f')} | | |"
                )
                continue
            if "skipped" in r:
                out.append(
                    f"| {r['D']} | {r['T']:.0e} | {r['solver']} | skipped: "
                    f"{r['skipped']} | | | | | | | | | |"
                )
                continue
            if "ratio" not in r:
                out.append(
                    f"| {r['D']} | {r['T']:.0e} | {r['solver']} | failed: "
                    f"{r.get('error', '')} | | | | | | | | | |"
                )
                continue
            met = r.get("target_met")
            out.append(
                f"| {r['D']} | {r['T']:.0e} | {r['solver']} | {_f(r.get('tol'), '.0e')} "
                f"| {r['iterations']} | {r['max_error']:.1e} | {r['scan_ms']:.2f} | "
                f"{r['jit_ms']:.2f} | **{r['ratio']:.2f}** | "
                f"{_f(r.get('ratio_direct'), '.2f')} | "
                f"{_f(r.get('xla_memory_mb'), '.1f')} | "
                f"{_f(r.get('target_ratio'), '.2f')} | "
                f"{'' if met is None else ('yes' if met else 'no')} |"
            )
    passes = [d for d in results.get("passes", {}).get("dims", []) if "profile" in d]
    for d in passes:
        out += [
            "",
            f"Cost of one iteration at D = {d['D']}, T = {d['T']} (1 pass = "
            f"`jax.jvp` of the vmapped step; {d['runs']} interleaved rounds):",
            "",
            "| solver | iteration (passes) | linearise | scan | rest | tol | iters | "
            "whole solve (passes) | passes / iter in the solve | solve × lax.scan |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in d["profile"].items():
            out.append(
                f"| {name} | **{p['iteration_passes']:.2f}** | "
                f"{p['linearise_passes']:.2f} | {p['scan_passes']:.2f} | "
                f"{p['rest_passes']:.2f} | {_f(p.get('tol'), '.0e')} | "
                f"{_f(p.get('iterations'))} | {_f(p.get('solve_passes'), '.1f')} | "
                f"{_f(p.get('passes_per_iteration_in_solve'), '.2f')} | "
                f"{_f(p.get('solve_x_scan'), '.2f')} |"
            )
        errors = d.get("errors_by_iteration")
        if errors:
            count = len(next(iter(errors.values())))
            out += [
                "",
                "Max error against `lax.scan` after k iterations (`max_steps = k`):",
                "",
                "| solver | "
                + " | ".join(f"k={k}" for k in range(1, count + 1))
                + " |",
                "|---|" + "---|" * count,
            ]
            for name, values in errors.items():
                out.append(
                    f"| {name} | " + " | ".join(f"{e:.1e}" for e in values) + " |"
                )
        c = d["components"]
        out += [
            "",
            "| component | ms | passes | evals | × lax.scan |",
            "|---|---|---|---|---|",
        ]
        for name, v in c.items():
            out.append(
                f"| {name} | {v['ms']:.2f} | {v['passes']:.2f} | {v['evals']:.2f} | "
                f"{v['x_scan']:.2f} |"
            )
    scans = results.get("scans", {}).get("rows", [])
    if scans:
        out += [
            "",
            "| structure | T | D | scan | ms | × sequential |",
            "|---|---|---|---|---|---|",
        ]
        for r in scans:
            if "ms" in r:
                out.append(
                    f"| {r['structure']} | {r['T']:.0e} | {r['D']} | {r['scan']} | "
                    f"{r['ms']:.3f} | {r['x_sequential']:.2f} |"
                )
            else:
                reason = r.get("skipped") or r.get("error")
                out.append(
                    f"| {r['structure']} | {r['T']:.0e} | {r['D']} | "
                    f"{r.get('scan', '')} | {reason} | |"
                )
    tables = convergence_tables(results.get("convergence", {}))
    for title, headers, rows in tables:
        out += ["", f"**{title}**", "", markdown_table(headers, rows)]
    if tables:
        out += ["", CONVERGENCE_LEGEND]
    grads = results.get("gradients", {}).get("rows", [])
    if grads:
        out += [
            "",
            "| D | T | gradient | ms | × lax.scan backprop | XLA MB | grad rel. err |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in grads:
            out.append(
                f"| {r['D']} | {r['T']:.0e} | {r['method']} | "
                f"{_f(r.get('ms'), '.1f', r.get('error', '–'))} | "
                f"{_f(r.get('x_scan'), '.2f')} | {_f(r.get('xla_memory_mb'), '.1f')} | "
                f"{_f(r.get('grad_rel_error'), '.1e')} |"
            )
    memory = results.get("memory", {}).get("cases", [])
    if memory:
        out += [
            "",
            "| kind | what | T | D | peak RSS (MB) | RSS after inputs (MB) | iters | "
            "status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in memory:
            child = r.get("child", {})
            status = r["status"]
            if "requirement_met" in r:
                status += (
                    f" (< {r['requirement_mb']:.0f} MB: "
                    f"{'met' if r['requirement_met'] else 'not met'})"
                )
            out.append(
                f"| {r['kind']} | {r['name']} | {r['T']:.0e} | {r['D']} | "
                f"{_f(r.get('peak_rss_mb'), '.0f')} | "
                f"{_f(child.get('rss_after_inputs_mb'), '.0f')} | "
                f"{_f(child.get('iterations'))} | {status} |"
            )
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        results = json.loads(path.read_text())
        made = make_plots(results, path.parent, path.stem)
        (path.parent / f"{path.stem}.md").write_text(markdown(results))
        print("\n".join(made + [str(path.parent / f"{path.stem}.md")]))


if __name__ == "__main__":
    main()
