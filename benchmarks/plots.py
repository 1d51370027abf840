"""PNG plots and Markdown tables from a results JSON of `benchmarks.run`.

python -m benchmarks.plots benchmarks/results/bench_cpu.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def _correct(row: dict) -> bool:
    """Converged, and to the right trajectory (max error within 10x the tolerance)."""
    error = row.get("max_error")
    return bool(row.get("converged")) and error is not None and error <= 1e-3


def plot_convergence(results: dict, path: Path) -> Path | None:
    rows = [
        r for r in results.get("convergence", {}).get("rows", []) if "iterations" in r
    ]
    if not rows:
        return None
    plt = _plt()
    maps = list(dict.fromkeys(r["map"] for r in rows))
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4), squeeze=False)
    for j, label in enumerate(maps):
        ax = axes[0, j]
        for solver in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted(
                (r["T"], r["iterations"], _correct(r))
                for r in rows
                if r["map"] == label and r["solver"] == solver
            )
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=solver)
            bad = [(p[0], p[1]) for p in pts if not p[2]]
            if bad:
                ax.plot(*zip(*bad), "x", color=line[0].get_color(), ms=10)
        ts = sorted({r["T"] for r in rows})
        ax.plot(ts, ts, "k:", lw=0.8, label="T (the bound)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("iterations")
        lle = next(
            (r["lle"] for r in rows[::-1] if r["map"] == label and r.get("lle")), None
        )
        ax.set_title(
            label + ("" if lle is None else f", LLE {lle:.2f} at the largest T")
        )
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(
        "Iterations to converge (x: did not converge / non-finite)", fontsize=10
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
    conv = results.get("convergence", {}).get("rows", [])
    if conv:
        out += [
            "",
            "| map | T | LLE | solver | iterations | result | max err |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in conv:
            if "iterations" not in r:
                out.append(
                    f"| {r['map']} | {r['T']} | | {r['solver']} | failed: "
                    f"{r.get('error')} | | |"
                )
                continue
            out.append(
                f"| {r['map']} | {r['T']} | {_f(r.get('lle'), '.3f')} | {r['solver']} "
                f"| {r['iterations']} | {r['result']} | "
                f"{_f(r.get('max_error'), '.1e', 'nan')} |"
            )
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
