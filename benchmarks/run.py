"""The benchmark suite of `parallel_dynamics`, in one command.

    python -m benchmarks.run --quick      # a few minutes on a CPU
    python -m benchmarks.run              # the full suite (an hour or more on a CPU)
    python -m benchmarks.run --only grid --dims 16 --lengths 10000 100000

Sections (`--only` / `--skip` take comma-separated names):

- `grid`: GRU, D in {4, 16, 64, 256} x T in {10^3, ..., 10^6}: every solver against
  `lax.scan` (time to max error 1e-4, iterations, XLA buffers); the CPU targets of
  issues 2 and 6 at T = 10^4 ([`benchmarks/grid.py`](grid.py));
- `passes`: the cost of one iteration in passes and where it goes (`passes.py`);
- `scans`: chunked against associative and sequential scans (`scans.py`);
- `convergence`: iteration counts (deterministic): contracting and chaotic maps
  against T, oscillator and orbit ODEs, the AR-GRU of the ELK paper, a contracting
  GRU and Lorenz-96 (`convergence.py`; standalone `python -m benchmarks.convergence`);
- `gradients`: one `value_and_grad` against backpropagation through `lax.scan`, lean
  and dense adjoints (`gradients.py`);
- `memory`: peak resident memory of whole processes with `/usr/bin/time -v`
  (`memory.py`);
- `external` (full mode, or `--only external`): the stability (ELK,
  `benchmarks/elk.py`) and ODE (`benchmarks/ode.py`) benchmarks of their own issues,
  run as they are when they exist; they write their own results files.

Standalone, not run by this command: `python -m benchmarks.floor` (the quasi-DEER
method's floor against the library's cost per iteration), `python -m
benchmarks.profile` (where the time of one solve goes, per XLA operation, with
`jax.profiler`; about a minute on a CPU) and `python -m benchmarks.sharding`
(sequence parallelism on emulated devices).

Writes `benchmarks/results/bench_<device>[_quick][_<tag>].json` (updated after every
section), PNG plots and a Markdown file of tables next to it, and prints the tables.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax

from . import convergence, gradients, grid, memory, passes, plots, scans
from .common import backend_tag, environment, RESULTS_DIR, ROOT, save_json


SECTIONS = ("grid", "passes", "scans", "convergence", "gradients", "memory", "external")
# module -> arguments (quick, full). Each writes its own results; the ODE benchmark's
# are redirected so that its owner's `ode_cpu.json` is not overwritten.
EXTERNAL = {
    "elk": (["--quick"], []),
    "ode": (
        ["--repeats", "3", "--out", "benchmarks/results/ode_via_run_quick.json"],
        ["--out", "benchmarks/results/ode_via_run.json"],
    ),
}
EXTERNAL_TIMEOUT_S = 3600


def _external(quick: bool) -> dict:
    """Runs the other issues' benchmark modules as they are, in subprocesses."""
    out = {}
    for name, (quick_args, full_args) in EXTERNAL.items():
        if not (Path(__file__).parent / f"{name}.py").exists():
            out[name] = {"status": "not present"}
            print(f"external {name}: benchmarks/{name}.py does not exist (yet)")
            continue
        command = [sys.executable, "-m", f"benchmarks.{name}"] + (
            quick_args if quick else full_args
        )
        print(f"\n== external: {' '.join(command[1:])} ==", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, timeout=EXTERNAL_TIMEOUT_S, text=True
            )
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {EXTERNAL_TIMEOUT_S} s"
        out[name] = {
            "command": " ".join(command[1:]),
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
        }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes on CPU")
    parser.add_argument("--only", default=None, help=f"sections among {SECTIONS}")
    parser.add_argument("--skip", default="", help="sections to leave out")
    parser.add_argument("--dims", type=int, nargs="+", help="grid: the D values")
    parser.add_argument("--lengths", type=int, nargs="+", help="grid: the T values")
    parser.add_argument(
        "--solvers", nargs="+", help=f"grid: among {list(grid.SOLVERS)}"
    )
    parser.add_argument("--tolerances", type=float, nargs="+", help="grid: rtol=atol")
    parser.add_argument("--passes-dims", type=int, nargs="+", help="passes: D values")
    parser.add_argument("--tag", default="", help="appended to the output file names")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--matmul-precision",
        default=None,
        help="jax_default_matmul_precision; default 'highest' on accelerators (where "
        "float32 matrix products otherwise run in TF32 and the parallel solutions "
        "differ from lax.scan by ~1e-3, above the 1e-4 error target), unchanged on CPU",
    )
    args = parser.parse_args(argv)
    precision = args.matmul_precision
    if precision is None and jax.default_backend() != "cpu":
        precision = "highest"
    if precision is not None:
        jax.config.update("jax_default_matmul_precision", precision)

    if args.only is not None:
        selected = tuple(args.only.split(","))
    elif args.quick:
        selected = tuple(s for s in SECTIONS if s != "external")
    else:
        selected = SECTIONS
    skipped = set(filter(None, args.skip.split(",")))
    unknown = (set(selected) | skipped) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    selected = tuple(s for s in selected if s not in skipped)

    stem = "bench_" + backend_tag() + ("_quick" if args.quick else "")
    stem += f"_{args.tag}" if args.tag else ""
    path = args.out_dir / f"{stem}.json"
    results: dict = {
        "meta": {
            **environment(),
            "mode": "quick" if args.quick else "full",
            "sections": list(selected),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "matmul_precision": precision,
        }
    }
    meta = results["meta"]
    print(
        f"parallel_dynamics benchmarks ({meta['mode']}): jax {meta['jax']} on "
        f"{meta['backend']} ({meta['device_kind']}; {meta['cpu_model']}, "
        f"{meta['cpu_count']} CPUs, load {meta['load_average']})"
    )
    start = time.perf_counter()
    for section in selected:
        begin = time.perf_counter()
        if section == "grid":

            def partial(rows):
                results["grid"] = {"rows": rows, "partial": True}
                save_json(path, results)

            results["grid"] = grid.run(
                args.quick,
                dims=args.dims,
                lengths=args.lengths,
                solvers=args.solvers,
                tolerances=args.tolerances,
                on_row=partial,
            )
        elif section == "passes":
            results["passes"] = passes.run(args.quick, dims=args.passes_dims)
        elif section == "scans":
            results["scans"] = scans.run(args.quick)
        elif section == "convergence":
            results["convergence"] = convergence.run(args.quick)
        elif section == "gradients":
            results["gradients"] = gradients.run(args.quick)
        elif section == "memory":
            results["memory"] = memory.run(args.quick)
        elif section == "external":
            results["external"] = _external(args.quick)
        results.setdefault("seconds", {})[section] = round(
            time.perf_counter() - begin, 1
        )
        save_json(path, results)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)
    save_json(path, results)
    (args.out_dir / f"{stem}.md").write_text(plots.markdown(results))
    made = [] if args.no_plots else plots.make_plots(results, args.out_dir, stem)
    print(f"\nwrote {path}, {args.out_dir / (stem + '.md')}")
    for p in made:
        print(f"wrote {p}")
    print(f"total {results['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
