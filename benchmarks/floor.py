"""How far a quasi-DEER solve is from the floor of its method.

    python -m benchmarks.floor [--dims 4 16 64]

GRU problem of the grid (T = 10^4, float32). Timed side by side against `lax.scan`:

- `QuasiDEER`: the library's solve at the loosest tolerance that reaches max error
  1e-4, as in the grid (7 iterations at D = 4, 16, 64);
- `QuasiDEER, 7 iterations`: the same solver run for exactly 7 iterations
  (`max_steps=7`, tolerance 0), without the early stop;
- `QuasiDEER elementwise, 7 iterations`: the same with `diagonal="elementwise"`, whose
  one Jacobian-vector product with a vector of ones costs what a cheap diagonal costs
  (it is not the GRU's diagonal: this row measures cost only);
- `minimal loop, 7 iterations`: a hand-written `fori_loop` of 7 quasi-Newton updates
  with that same one-product diagonal and a `lax.scan` for the linear recurrence, and
  nothing else: no norms, no finiteness checks, no stopping test, no Optimistix or
  Lineax machinery. The floor of an implementation of the method on this machine.

The ratio between the second and the last row is the library's overhead per
iteration. Writes `benchmarks/results/floor_<device>.json`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn

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
from .passes import choose_tolerance


LENGTH = 10_000
ITERATIONS = 7


def minimal_quasi_newton(y0, xs, cell):
    """`ITERATIONS` quasi-Newton updates $Y \\leftarrow Y - \\Delta$ with
    $\\Delta_t = d_t \\Delta_{t-1} + y_t - f(y_{t-1}, x_t)$ and $d_t = J_t \\mathbf{1}$."""

    def update(_, y):
        previous = jnp.concatenate([y0[None], y[:-1]])
        values, diagonal = jax.vmap(
            lambda h, x: jax.jvp(
                lambda h: gru_step(h, x, cell), (h,), (jnp.ones_like(h),)
            )
        )(previous, xs)

        def scan_step(carry, inputs):
            d, r = inputs
            carry = d * carry + r
            return carry, carry

        _, delta = jax.lax.scan(scan_step, jnp.zeros_like(y0), (diagonal, y - values))
        return y - delta

    guess = jnp.broadcast_to(y0, (xs.shape[0], y0.shape[0]))
    return jax.lax.fori_loop(0, ITERATIONS, update, guess)


def _solve_fn(solver, max_steps=None):
    return jax.jit(
        lambda y0, xs, cell: (
            pdyn.solve(
                gru_step, solver, y0, xs, cell, max_steps=max_steps, throw=False
            ).value
        )
    )


def run_dim(size: int, budget_s: float) -> dict:
    cell, xs, y0 = make_gru(LENGTH, size)
    scan = make_lax_scan()
    reference = scan(y0, xs, cell)
    fixed = pdyn.QuasiDEER(rtol=0.0, atol=0.0)
    elementwise = pdyn.QuasiDEER(rtol=0.0, atol=0.0, diagonal="elementwise")
    tol, iterations, _ = choose_tolerance(
        lambda tol: pdyn.QuasiDEER(rtol=tol, atol=tol), y0, xs, cell, reference
    )
    solves = {
        "QuasiDEER": _solve_fn(pdyn.QuasiDEER(rtol=tol, atol=tol)),
        f"QuasiDEER, {ITERATIONS} iterations": _solve_fn(fixed, ITERATIONS),
        f"QuasiDEER elementwise, {ITERATIONS} iterations": _solve_fn(
            elementwise, ITERATIONS
        ),
        f"minimal loop, {ITERATIONS} iterations": jax.jit(minimal_quasi_newton),
    }
    errors = {
        name: float(jnp.max(jnp.abs(fn(y0, xs, cell) - reference)))
        for name, fn in solves.items()
    }
    fns = {"lax.scan": lambda: scan(y0, xs, cell)}
    fns.update({name: (lambda fn=fn: fn(y0, xs, cell)) for name, fn in solves.items()})
    times = time_interleaved(fns, budget_s=budget_s, min_runs=7, max_runs=21)
    rows = {
        name: {
            "ms": median_ms(samples),
            "x_scan": paired_ratio(samples, times["lax.scan"]),
            "max_error": errors.get(name, 0.0),
        }
        for name, samples in times.items()
    }
    rows["QuasiDEER"].update(tol=tol, iterations=iterations)
    return {"D": size, "T": LENGTH, "runs": len(times["lax.scan"]), "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--budget-s", type=float, default=6.0)
    args = parser.parse_args(argv)
    results = {"meta": environment(), "dims": []}
    path = RESULTS_DIR / f"floor_{backend_tag()}.json"
    for size in args.dims:
        result = run_dim(size, args.budget_s)
        results["dims"].append(result)
        save_json(path, results)
        print(f"\nD = {size}, T = {LENGTH} ({result['runs']} interleaved rounds)")
        for name, row in result["rows"].items():
            print(
                f"  {name:<40} {row['ms']:9.2f} ms {row['x_scan']:6.2f}x lax.scan  "
                f"max err {row['max_error']:.1e}"
            )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
