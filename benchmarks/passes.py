"""Cost per iteration in passes, and where the time goes.

A **pass** is one `vmap`ped evaluation of the step over all T together with one
Jacobian-vector product: `jax.jvp(evaluate, (Y,), (V,))`, which returns both. Every
component below is timed interleaved with that pass (and with `lax.scan`) on the GRU
problem at T = 10^4, and reported as a multiple of it:

- `eval`: the vmapped step alone; `pass`: the unit;
- `lin <structure>`: a Jacobian structure's `linearise` (step values and blocks);
- `scan <...>`: the linear recurrence alone;
- `iter <solver>`: one iteration of a solver (`solver.step`, as `pdyn.solve` runs it:
  linearise, residual, scan, update, norms);
- `solve <solver>`: the whole jitted solve at the tolerance that reaches max error
  1e-4, and its iterations.

`profile` splits one iteration into linearise + scan + the rest (residual, update,
finiteness checks and norms), from the same interleaved measurements.

`errors_by_iteration`: the max error against `lax.scan` after each of the first
`ERROR_ITERATIONS` iterations (`max_steps = k`), for quasi-DEER (exact diagonal) and
DEER. It is what sets the number of iterations a solve needs, whatever an iteration
costs: quasi-DEER converges linearly, DEER quadratically.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn
from parallel_dynamics._linear_solver.scan_solvers import auto_scan

from .common import (
    error_message,
    gru_diagonal,
    gru_step,
    make_gru,
    make_lax_scan,
    MAX_ERROR,
    median_ms,
    paired_ratio,
    time_interleaved,
)


LENGTH = 10_000
TOLERANCES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
ERROR_ITERATIONS = 9

# name -> (Jacobian structure, solver factory(tol))
SOLVERS = {
    "QuasiDEER exact": (
        pdyn.ExactDiagonalJacobian(),
        lambda tol: pdyn.QuasiDEER(rtol=tol, atol=tol),
    ),
    "QuasiDEER diag_fn": (
        pdyn.DiagonalFunctionJacobian(gru_diagonal),
        lambda tol: pdyn.QuasiDEER(rtol=tol, atol=tol, diagonal=gru_diagonal),
    ),
    "QuasiDEER stoch k=1": (
        pdyn.StochasticDiagonalJacobian(num_probes=1),
        lambda tol: pdyn.QuasiDEER(
            rtol=tol, atol=tol, diagonal="stochastic", num_probes=1
        ),
    ),
    "QuasiDEER stoch k=4": (
        pdyn.StochasticDiagonalJacobian(num_probes=4),
        lambda tol: pdyn.QuasiDEER(
            rtol=tol, atol=tol, diagonal="stochastic", num_probes=4
        ),
    ),
    "DEER": (pdyn.DenseJacobian(), lambda tol: pdyn.DEER(rtol=tol, atol=tol)),
}


def _recurrence(y0, xs, cell) -> pdyn.Recurrence:
    return pdyn.Recurrence(
        step=gru_step,
        layout=pdyn.internal.StateLayout.of(y0),
        y0=y0,
        inputs=xs,
        args=cell,
        length=xs.shape[0],
    )


def _iteration_fn(solver):
    """One iteration of a Newton-type solver, exactly as `pdyn.solve` runs it."""

    @eqx.filter_jit
    def iterate(recurrence, y):
        state = solver.init_state(y)
        new_y, _, _ = solver.step(
            lambda t, r: r.residual(t), y, recurrence, {}, state, frozenset()
        )
        return new_y

    return iterate


def choose_tolerance(make, y0, xs, cell, reference):
    """The loosest of `TOLERANCES` whose solve (`make(tol)`) succeeds within max error
    1e-4 of `lax.scan`, as `(tol, iterations, error)`; `(None, None, None)` if none
    does."""
    for tol in TOLERANCES:

        @jax.jit
        def run(xs, cell, solver=make(tol)):
            sol = pdyn.solve(
                gru_step, solver, y0, xs, cell, max_steps=1000, throw=False
            )
            return sol.value, sol.stats["num_steps"], sol.result._value

        value, steps, result = run(xs, cell)
        error = float(jnp.max(jnp.abs(value - reference)))
        if int(result) == 0 and error <= MAX_ERROR:
            return tol, int(steps), error
    return None, None, None


def run_dim(size: int, budget_s: float) -> dict:
    cell, xs, y0 = make_gru(LENGTH, size)
    scan = make_lax_scan()
    reference = jax.block_until_ready(scan(y0, xs, cell))
    recurrence = _recurrence(y0, xs, cell)
    previous = recurrence.previous(reference)
    tangent = jax.random.normal(jax.random.key(2), previous.shape, previous.dtype)
    offsets = jax.random.normal(jax.random.key(3), previous.shape, previous.dtype)
    guess = jnp.broadcast_to(y0, (LENGTH, size))

    evaluate = eqx.filter_jit(lambda rec, p: rec.evaluate(p))
    jvp = eqx.filter_jit(lambda rec, p, v: jax.jvp(rec.evaluate, (p,), (v,)))
    linearise = eqx.filter_jit(lambda jac, rec, p: jac.linearise(rec, p, 0))
    _, diagonal_blocks = linearise(pdyn.ExactDiagonalJacobian(), recurrence, previous)
    _, dense_blocks = linearise(pdyn.DenseJacobian(), recurrence, previous)
    auto = jax.jit(lambda b, o: auto_scan(b, o))
    sequential = jax.jit(pdyn.internal.sequential_scan)
    associative = jax.jit(pdyn.internal.parallel_scan)
    chunked = jax.jit(pdyn.internal.chunked_scan)

    fns = {
        "lax.scan": lambda: scan(y0, xs, cell),
        "eval": lambda: evaluate(recurrence, previous),
        "pass": lambda: jvp(recurrence, previous, tangent),
        "scan diag AutoScan": lambda: auto(diagonal_blocks, offsets),
        "scan diag sequential": lambda: sequential(diagonal_blocks, offsets),
        "scan diag associative": lambda: associative(diagonal_blocks, offsets),
        "scan diag chunked": lambda: chunked(diagonal_blocks, offsets),
        "scan dense AutoScan": lambda: auto(dense_blocks, offsets),
        "scan dense associative": lambda: associative(dense_blocks, offsets),
        "scan dense chunked": lambda: chunked(dense_blocks, offsets),
    }
    for name, (jacobian, make) in SOLVERS.items():
        fns[f"lin {name}"] = lambda j=jacobian: linearise(j, recurrence, previous)
        iterate = _iteration_fn(make(1e-4))
        fns[f"iter {name}"] = lambda it=iterate: it(recurrence, guess)

    solves = {}
    for name, (_, make) in SOLVERS.items():
        tol, steps, error = choose_tolerance(make, y0, xs, cell, reference)
        if tol is None:
            continue
        solver = make(tol)
        user = jax.jit(
            lambda xs, cell, s=solver: pdyn.solve(gru_step, s, y0, xs, cell).value
        )
        solves[name] = {"tol": tol, "iterations": steps, "max_error": error}
        fns[f"solve {name}"] = lambda u=user: u(xs, cell)

    times = time_interleaved(fns, budget_s=budget_s, min_runs=7, max_runs=15)
    unit = times["pass"]
    components = {
        name: {
            "ms": median_ms(samples),
            "passes": paired_ratio(samples, unit),
            "evals": paired_ratio(samples, times["eval"]),
            "x_scan": paired_ratio(samples, times["lax.scan"]),
        }
        for name, samples in times.items()
    }
    profile = {}
    for name in SOLVERS:
        iteration = components[f"iter {name}"]["passes"]
        lin = components[f"lin {name}"]["passes"]
        structure = "dense" if name == "DEER" else "diag"
        scan_cost = components[f"scan {structure} AutoScan"]["passes"]
        entry = {
            "iteration_passes": iteration,
            "linearise_passes": lin,
            "scan_passes": scan_cost,
            "rest_passes": iteration - lin - scan_cost,
        }
        if name in solves:
            solve = components[f"solve {name}"]
            entry.update(solves[name])
            entry["solve_passes"] = solve["passes"]
            entry["solve_x_scan"] = solve["x_scan"]
            entry["passes_per_iteration_in_solve"] = (
                solve["passes"] / solves[name]["iterations"]
            )
        profile[name] = entry
    return {
        "D": size,
        "T": LENGTH,
        "runs": len(unit),
        "components": components,
        "profile": profile,
        "errors_by_iteration": errors_by_iteration(y0, xs, cell, reference),
    }


def errors_by_iteration(y0, xs, cell, reference) -> dict[str, list[float]]:
    """The max error against `lax.scan` after k = 1, ..., `ERROR_ITERATIONS`
    iterations (a solve with `max_steps = k` and a tolerance of 0, so that it runs
    all k), for quasi-DEER with the exact diagonal and for DEER."""
    out = {}
    for name in ("QuasiDEER exact", "DEER"):
        solver = SOLVERS[name][1](0.0)
        run = jax.jit(
            lambda xs, cell, k, s=solver: (
                pdyn.solve(gru_step, s, y0, xs, cell, max_steps=k, throw=False).value
            ),
            static_argnums=2,
        )
        out[name] = [
            float(jnp.max(jnp.abs(run(xs, cell, k) - reference)))
            for k in range(1, ERROR_ITERATIONS + 1)
        ]
    return out


def print_dim(result: dict) -> None:
    print(f"\n-- D = {result['D']}, T = {result['T']} ({result['runs']} rounds) --")
    print(f"{'component':<28} {'ms':>9} {'passes':>7} {'evals':>7} {'x scan':>7}")
    for name, c in result["components"].items():
        print(
            f"{name:<28} {c['ms']:>9.2f} {c['passes']:>7.2f} {c['evals']:>7.2f} "
            f"{c['x_scan']:>7.2f}"
        )
    print(
        f"\n{'one iteration, in passes':<24} {'total':>6} {'linear.':>7} {'scan':>6} "
        f"{'rest':>6} | {'tol':>6} {'iters':>5} {'solve':>7} {'/iter':>6} "
        f"{'x scan':>7}"
    )
    for name, p in result["profile"].items():
        tail = (
            f"{p['tol']:>6.0e} {p['iterations']:>5d} {p['solve_passes']:>7.1f} "
            f"{p['passes_per_iteration_in_solve']:>6.2f} {p['solve_x_scan']:>7.2f}"
            if "tol" in p
            else "(no tolerance met the error target)"
        )
        print(
            f"{name:<24} {p['iteration_passes']:>6.2f} {p['linearise_passes']:>7.2f} "
            f"{p['scan_passes']:>6.2f} {p['rest_passes']:>6.2f} | {tail}"
        )
    print("\nmax error against lax.scan after k iterations:")
    for name, errors in result.get("errors_by_iteration", {}).items():
        print(f"{name:<24} " + " ".join(f"{e:.1e}" for e in errors))


def run(quick: bool, dims=None, budget_s: float = 5.0) -> dict:
    dims = tuple(dims) if dims else ((16,) if quick else (16, 64))
    print(
        "\n== Cost per iteration (GRU, float32): 1 pass = jax.jvp of the vmapped step "
        "over all T (values + one JVP) =="
    )
    results = []
    for size in dims:
        try:
            result = run_dim(size, budget_s)
        except Exception as e:
            result = {"D": size, "error": error_message(e)}
            print(f"D = {size}: FAILED {result['error']}")
        else:
            print_dim(result)
        results.append(result)
    return {"dims": results, "T": LENGTH}
