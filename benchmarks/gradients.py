"""One gradient step against backpropagation through `lax.scan`: speed,
memory and accuracy of the adjoints.

`jax.value_and_grad` of $L = \\operatorname{mean}(Y^2)$ with respect to the GRU cell's
parameters, with $Y$ from `pdyn.solve` (forward solve plus the implicit adjoint) or
from `lax.scan` (backpropagation through the loop). Timed interleaved, with the XLA
buffers of each jitted gradient and the relative error of the gradient against the
`lax.scan` one. The adjoints: the matrix-free chunked scan (`pdyn.MatrixFreeScan`,
exact, O(T D), the default), the dense transposed scan (`pdyn.AutoScan`,
O(T D^2)) and the iterative refinement (`pdyn.IterativeScan`,
O(T D), exact only to its tolerance). Whole-process peak memory of the D = 64, T = 10^5 cases is measured
by `benchmarks/memory.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn

from .common import (
    error_message,
    fmt,
    gru_step,
    make_gru,
    make_lax_scan,
    median_ms,
    paired_ratio,
    time_interleaved,
    xla_memory_mb,
)


TOLERANCE = 1e-4
METHODS = {
    "QuasiDEER + matrix-free adjoint (default)": (
        lambda: pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE),
        lambda: pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan()),
    ),
    "QuasiDEER + dense adjoint": (
        lambda: pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE),
        lambda: pdyn.ImplicitAdjoint(pdyn.AutoScan()),
    ),
    "QuasiDEER + iterative adjoint": (
        lambda: pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE),
        lambda: pdyn.ImplicitAdjoint(pdyn.IterativeScan()),
    ),
    "DEER + dense adjoint": (
        lambda: pdyn.DEER(rtol=TOLERANCE, atol=TOLERANCE),
        lambda: pdyn.ImplicitAdjoint(pdyn.AutoScan()),
    ),
    "DEER + matrix-free adjoint (default)": (
        lambda: pdyn.DEER(rtol=TOLERANCE, atol=TOLERANCE),
        lambda: pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan()),
    ),
}


def _grad_fn(y0, solver=None, adjoint=None):
    """`value_and_grad` with respect to the cell, jitted, the inputs an argument (a
    closed-over array would be constant-folded by XLA, for minutes at large T)."""
    scan = make_lax_scan()

    def loss(cell, xs):
        if solver is None:
            ys = scan(y0, xs, cell)
        else:
            ys = pdyn.solve(gru_step, solver, y0, xs, cell, adjoint=adjoint).value
        return jnp.mean(ys**2)

    return jax.jit(jax.value_and_grad(loss))


def _relative_error(grads, reference) -> float:
    num = sum(
        float(jnp.sum((a - b) ** 2))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))
    )
    den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(reference))
    return (num / den) ** 0.5


def run_case(size: int, length: int, budget_s: float) -> list[dict]:
    cell, xs, y0 = make_gru(length, size)
    reference_fn = _grad_fn(y0)
    _, reference = jax.block_until_ready(reference_fn(cell, xs))
    rows = [
        {
            "D": size,
            "T": length,
            "method": "lax.scan backprop",
            "xla_memory_mb": xla_memory_mb(reference_fn, cell, xs),
            "grad_rel_error": 0.0,
        }
    ]
    fns = {"lax.scan backprop": lambda: reference_fn(cell, xs)}
    for name, (make_solver, make_adjoint) in METHODS.items():
        row = {"D": size, "T": length, "method": name}
        rows.append(row)
        try:
            fn = _grad_fn(y0, make_solver(), make_adjoint())
            _, grads = jax.block_until_ready(fn(cell, xs))
            row["grad_rel_error"] = _relative_error(grads, reference)
            row["xla_memory_mb"] = xla_memory_mb(fn, cell, xs)
            fns[name] = lambda fn=fn: fn(cell, xs)
        except Exception as e:
            row["error"] = error_message(e)
    times = time_interleaved(fns, budget_s=budget_s, min_runs=3, max_runs=11)
    for row in rows:
        if row["method"] in times:
            samples = times[row["method"]]
            row["ms"] = median_ms(samples)
            row["x_scan"] = paired_ratio(samples, times["lax.scan backprop"])
            row["runs"] = len(samples)
    return rows


def run(quick: bool, cases=None, budget_s: float = 4.0) -> dict:
    if cases is None:
        cases = (
            ((16, 10_000),)
            if quick
            else ((16, 10_000), (64, 10_000), (16, 100_000), (64, 100_000))
        )
    print(
        "\n== One value_and_grad (mean(Y^2) w.r.t. the GRU parameters, float32) "
        "against backprop through lax.scan =="
    )
    print(
        f"{'D':>4} {'T':>7} {'method':<42} {'ms':>10} {'x scan':>7} {'XLA MB':>9} "
        f"{'grad rel err':>12}"
    )
    rows = []
    for size, length in cases:
        case_rows = run_case(size, length, budget_s)
        rows.extend(case_rows)
        for r in case_rows:
            if "error" in r:
                print(f"{size:>4} {length:>7} {r['method']:<42} FAILED {r['error']}")
                continue
            print(
                f"{size:>4} {length:>7} {r['method']:<42} {fmt(r.get('ms'), '.1f', 10)} "
                f"{fmt(r.get('x_scan'), '.2f', 7)} "
                f"{fmt(r.get('xla_memory_mb'), '.1f', 9)} "
                f"{fmt(r.get('grad_rel_error'), '.1e', 12)}",
                flush=True,
            )
    return {"rows": rows, "tolerance": TOLERANCE}
