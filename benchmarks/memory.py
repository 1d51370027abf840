"""Peak resident memory of whole processes, measured with `/usr/bin/time -v`,
of the solvers and of the adjoints.

`quasideer` calls `pdyn.solve(...)` directly, as a user does, so the returned solution
includes `sol.stats` (its final residual pass); `quasideer-jit` runs the same solve
inside `jax.jit` and returns only `sol.value`. Every case runs in a fresh subprocess (`python -m benchmarks.memory child ...`) that
builds the GRU problem, runs one solve (or one `value_and_grad`), and prints a JSON
line; the parent reads the maximum resident set size that `/usr/bin/time -v` reports.
The `inputs` case only builds the problem: the baseline (Python, JAX, XLA, the
inputs) that the solves add to.

    python -m benchmarks.memory child solve quasideer 1000000 64
    python -m benchmarks.memory child grad matrix-free 100000 64
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn

from .common import (
    fmt,
    gru_step,
    make_gru,
    make_lax_scan,
    rss_now_mb,
    rss_peak_mb,
    run_measured,
)


TOLERANCE = 1e-4
REQUIREMENT_MB = 4000.0  # QuasiDEER, T = 10^6, D = 64, float32: below 4 GB

SOLVES = {
    "inputs": None,
    "lax.scan": "scan",
    "quasideer": lambda: pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE),
    "quasideer-stoch": lambda: pdyn.QuasiDEER(
        rtol=TOLERANCE, atol=TOLERANCE, diagonal="stochastic"
    ),
    "deer": lambda: pdyn.DEER(rtol=TOLERANCE, atol=TOLERANCE),
}
# `<name>-jit`: the same solve inside `jax.jit`, returning only `sol.value`.
SOLVES.update({f"{k}-jit": "jit" for k in ("quasideer", "quasideer-stoch", "deer")})
# Gradient of sum(Y^2)/T with respect to the cell's parameters.
GRADS = {
    "lax.scan": None,  # backpropagation through lax.scan
    "matrix-free": lambda: pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan()),  # default
    "iterative": lambda: pdyn.ImplicitAdjoint(pdyn.IterativeScan()),  # O(T D)
    "dense": lambda: pdyn.ImplicitAdjoint(pdyn.AutoScan()),  # O(T D^2)
}

QUICK_CASES = (
    ("solve", "quasideer", 1_000_000, 64),
    ("solve", "quasideer-jit", 1_000_000, 64),
)
FULL_CASES = (
    ("solve", "inputs", 1_000_000, 64),
    ("solve", "lax.scan", 1_000_000, 64),
    ("solve", "quasideer", 1_000_000, 64),
    ("solve", "quasideer-jit", 1_000_000, 64),
    ("solve", "quasideer-stoch", 1_000_000, 64),
    ("solve", "quasideer-stoch-jit", 1_000_000, 64),
    ("solve", "deer", 10_000, 64),
    ("solve", "deer", 100_000, 16),
    ("solve", "deer", 100_000, 32),
    ("solve", "deer", 100_000, 64),
    ("grad", "lax.scan", 100_000, 64),
    ("grad", "matrix-free", 100_000, 64),
    ("grad", "iterative", 100_000, 64),
    ("grad", "dense", 100_000, 64),
)
TIMEOUT_S = 900


def child(kind: str, name: str, length: int, size: int) -> None:
    start = time.perf_counter()
    cell, xs, y0 = make_gru(length, size)
    jax.block_until_ready(xs)
    out: dict = {"kind": kind, "name": name, "T": length, "D": size}
    out["rss_after_inputs_mb"] = rss_now_mb()
    status = "ok"
    if kind == "solve":
        make = SOLVES[name]
        if make == "scan":
            value = jax.block_until_ready(make_lax_scan()(y0, xs, cell))
        elif name.endswith("-jit"):
            # Inside the user's jit, using only the solution (sol.stats unused).
            solver = SOLVES[name.removesuffix("-jit")]()
            fn = jax.jit(
                lambda xs, cell: pdyn.solve(gru_step, solver, y0, xs, cell).value
            )
            value = jax.block_until_ready(fn(xs, cell))
        elif make is not None:
            sol = pdyn.solve(gru_step, make(), y0, xs, cell, throw=False)
            value = jax.block_until_ready(sol.value)
            out["iterations"] = int(sol.stats["num_steps"])
            if int(sol.result._value) != 0:
                status = f"solve failed (result {int(sol.result._value)})"
        else:
            value = xs
    else:
        make = GRADS[name]

        if make is None:

            def loss(cell, xs):
                ys = make_lax_scan()(y0, xs, cell)
                return jnp.mean(ys**2)

        else:
            solver = pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE)
            adjoint = make()

            def loss(cell, xs):
                ys = pdyn.solve(gru_step, solver, y0, xs, cell, adjoint=adjoint).value
                return jnp.mean(ys**2)

        # The inputs are an argument: XLA would constant-fold a closed-over array.
        value, grads = jax.jit(jax.value_and_grad(loss))(cell, xs)
        value = jax.block_until_ready((value, grads))
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(value))
    if not finite:
        status = "non-finite output"
    out["status"] = status
    out["peak_vmhwm_mb"] = rss_peak_mb()
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    out["wall_s"] = time.perf_counter() - start  # includes compilation
    print("RESULT " + json.dumps(out), flush=True)


def run(quick: bool, cases=None) -> dict:
    cases = cases or (QUICK_CASES if quick else FULL_CASES)
    print(
        "\n== Peak resident memory of a whole process (/usr/bin/time -v), GRU "
        "float32 =="
    )
    print(
        f"{'kind':<6} {'what':<16} {'T':>9} {'D':>4} {'peak MB':>9} {'inputs MB':>9} "
        f"{'iters':>5} {'wall s':>7}  status"
    )
    records = []
    for kind, name, length, size in cases:
        record = run_measured(
            ["benchmarks.memory", "child", kind, name, str(length), str(size)],
            timeout_s=TIMEOUT_S,
        )
        record.update(kind=kind, name=name, T=length, D=size)
        if (kind, name, length, size) == ("solve", "quasideer", 1_000_000, 64):
            peak = record.get("peak_rss_mb")
            record["requirement_mb"] = REQUIREMENT_MB
            record["requirement_met"] = (
                peak is not None and record["status"] == "ok" and peak < REQUIREMENT_MB
            )
        child_out = record.get("child", {})
        print(
            f"{kind:<6} {name:<16} {length:>9} {size:>4} "
            f"{fmt(record.get('peak_rss_mb'), '.0f', 9)} "
            f"{fmt(child_out.get('rss_after_inputs_mb'), '.0f', 9)} "
            f"{fmt(child_out.get('iterations'), 'd', 5)} "
            f"{fmt(child_out.get('wall_s'), '.1f', 7)}  {record['status']}"
            + (
                f" (requirement < {REQUIREMENT_MB:.0f} MB: "
                f"{'met' if record['requirement_met'] else 'NOT met'})"
                if "requirement_met" in record
                else ""
            ),
            flush=True,
        )
        records.append(record)
    return {"cases": records, "tolerance": TOLERANCE}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["child"])
    parser.add_argument("kind", choices=["solve", "grad"])
    parser.add_argument("name")
    parser.add_argument("T", type=int)
    parser.add_argument("D", type=int)
    args = parser.parse_args(argv)
    table = SOLVES if args.kind == "solve" else GRADS
    if args.name not in table:
        sys.exit(f"unknown {args.kind} {args.name!r}; choose from {sorted(table)}")
    child(args.kind, args.name, args.T, args.D)


if __name__ == "__main__":
    main()
