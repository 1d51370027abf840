"""Parallel-in-time ODEs: coarse-grid initial guesses, time slices and Parareal.

    python -m benchmarks.parallel_in_time --quick   # N = 2000 only, no stiff part
    python -m benchmarks.parallel_in_time           # N = 2000 and 20 000, stiff part
    python -m benchmarks.parallel_in_time --parts stiff --tag stiff

Iteration counts and the **sequential span** of every method, on the oscillator and
orbit ODEs of `benchmarks/convergence.py` (`diffrax.Tsit5`, N fixed steps on
[0, 20], float64, default tolerances), each solve compared with `diffrax.diffeqsolve`
on the same grid. The span is the length of the chain of dependent operations, the
figure that predicts accelerator time when every parallel operation is one unit:

- TrustDEER from the constant guess: iterations × ⌈log₂ N⌉ (one parallel scan per
  iteration);
- TrustDEER from the default coarse guess (`pdyn.CoarseGuess()`: an adaptive
  Tsit5 solve): its steps (accepted and rejected) + iterations × ⌈log₂ N⌉;
- TrustDEER from the uniform coarse grid (`stepsize_controller=
  diffrax.ConstantStepSize()`, k chosen automatically): N / k coarse sequential
  steps + iterations × ⌈log₂ N⌉; with two levels, the coarsest level's N / k²
  steps + the middle level's iterations × ⌈log₂ (N / k)⌉ + iterations × ⌈log₂ N⌉;
- TrustDEER on time slices of m = k steps, from the default coarse guess: its
  coarse steps + iterations × (m + ⌈log₂ (N / m)⌉) + m (the slices' states filled
  in);
- Parareal (Lions, Maday, Turinici 2001) with the same coarse propagator (one
  Tsit5 step over each slice of k fine steps) and the fine one (k Tsit5 steps):
  N / k steps of the first coarse sweep + iterations × (k + N / k), a fine sweep in
  every slice at once and a sequential coarse correction per iteration; stopped
  when the update of the slice ends is within the same tolerance as TrustDEER's
  (rtol = atol = 1.1e-11, scaled as the library scales its updates). Also with
  k = ⌈√N⌉ slices, where its span per iteration is smallest.

The stiff part (full mode): Robertson's kinetics on a geometric `StepTo` grid to
t = 1e5, Van der Pol with μ = 1000 (on the step times of an adaptive Kvaerno5
solve) and a heat equation by the method of lines (D = 50), with
`diffrax.Kvaerno5` and `diffrax.ImplicitEuler` at fixed steps (Newton root finders
at tolerance 1e-10; 1e-8 for Van der Pol), each against `diffrax.diffeqsolve` on
the same grid, by TrustDEER and DEER from the constant and the coarse guess.

Writes `benchmarks/results/parallel_in_time_<device>[_quick].json`, a Markdown file
of the tables and a PNG of iterations and span against N next to it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time

import diffrax
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import parallel_dynamics as pdyn
from parallel_dynamics import DiffraxStep
from parallel_dynamics._coarse import automatic_factor, coarse_indices
from parallel_dynamics._slices import slice_inputs, SliceStep

from .common import backend_tag, environment, error_message, RESULTS_DIR, save_json
from .convergence import ODE_PROBLEMS, result_name


T1 = 20.0
TOLERANCE = float(np.finfo(np.float64).eps ** 0.7)  # the solvers' float64 default
SUSPECT_ERROR = 1e-6
CONSTANT = "TrustDEER, constant guess"
ADAPTIVE = "TrustDEER, coarse guess (default)"
UNIFORM = "TrustDEER, uniform coarse grid, k"
TWO_LEVELS = "TrustDEER, uniform coarse grid, 2 levels"
SLICES = "TrustDEER, slices m = k, coarse guess"
PARAREAL = "Parareal, k"
PARAREAL_SQRT = "Parareal, k = ⌈√N⌉"
METHODS = (CONSTANT, ADAPTIVE, UNIFORM, TWO_LEVELS, SLICES, PARAREAL, PARAREAL_SQRT)
_UNIFORM_GRID = diffrax.ConstantStepSize()
PARTS = ("odes", "against_n", "slices", "stiff")
SLICE_PROBLEMS = ("Lotka-Volterra (1.5,1,3,1)", "Kepler e=0.5", "Kepler e=0.9")
SLICE_SIZES = (1, 5, 20, 100, 400, 2000)
SWEEP_PROBLEMS = ("Lotka-Volterra (1.5,1,3,1)", "Kepler e=0.5", "Van der Pol mu=1")


def log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(max(n, 2))))


# --------------------------------------------------------------------------- solves


@functools.cache
def _pdyn_solve(vector_field, steps: int, coarse, steps_per_slice: int):
    @jax.jit
    def solve(y0, args):
        sol = pdyn.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            0.0,
            T1,
            T1 / steps,
            y0,
            args,
            saveat=diffrax.SaveAt(steps=True),
            coarse=coarse,
            steps_per_slice=steps_per_slice,
            throw=False,
        )
        stats = {
            k: v
            for k, v in sol.stats.items()
            if k
            in (
                "num_parallel_iterations",
                "num_coarse_steps",
                "coarse_parallel_iterations",
            )
        }
        return sol.ys, stats, sol.result

    return solve


@functools.cache
def _reference(vector_field, steps: int):
    @jax.jit
    def solve(y0, args):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            0.0,
            T1,
            T1 / steps,
            y0,
            args,
            saveat=diffrax.SaveAt(steps=True),
            max_steps=steps,
        ).ys

    return solve


def parareal(step: DiffraxStep, times, y0, args, factor: int, max_iterations: int):
    """Parareal with slices of `factor` fine steps: the coarse propagator $G$ is one
    step of the solver over a slice, the fine one $F$ the slice's fine steps;
    $U_{j+1} \\leftarrow G(U_j^{new}) + F(U_j) - G(U_j)$ until the update is within
    tolerance. Returns the fine trajectory, the iterations and whether it stopped on
    the tolerance."""
    num_steps = times.shape[0] - 1
    coarse_times = times[coarse_indices(num_steps, factor)]
    coarse_inputs = step.inputs(coarse_times)
    fine_inputs = slice_inputs(step.inputs(times), num_steps, factor)
    fine = SliceStep(step)

    def coarse_sweep(y):
        def body(y, x):
            y = step(y, x, args)
            return y, y

        return lax.scan(body, y, coarse_inputs)[1]

    first = coarse_sweep(y0)

    def cond(state):
        iteration, _, _, done = state
        return (~done) & (iteration < max_iterations)

    def body(state):
        iteration, ends, coarse_old, _ = state
        starts = jnp.concatenate([y0[None], ends[:-1]])
        fine_ends = jax.vmap(lambda y, x: fine(y, x, args))(starts, fine_inputs)

        def correct(y, xs):
            x, f, g_old = xs
            g = step(y, x, args)
            y_new = g + f - g_old
            return y_new, (y_new, g)

        _, (new, coarse_new) = lax.scan(
            correct, y0, (coarse_inputs, fine_ends, coarse_old)
        )
        scale = TOLERANCE + TOLERANCE * jnp.abs(new)
        done = jnp.max(jnp.abs(new - ends) / scale) <= 1
        return iteration + 1, new, coarse_new, done

    iterations, ends, _, done = lax.while_loop(
        cond, body, (jnp.array(0), first, first, jnp.array(False))
    )
    starts = jnp.concatenate([y0[None], ends[:-1]])
    states = jax.vmap(lambda y, x: fine.every_state(y, x, args))(starts, fine_inputs)
    trajectory = states.reshape((-1,) + states.shape[2:])[:num_steps]
    return trajectory, iterations, done


@functools.cache
def _parareal_solve(vector_field, steps: int, factor: int):
    step = DiffraxStep(diffrax.ODETerm(vector_field), diffrax.Tsit5())
    times = jnp.linspace(0.0, T1, steps + 1)
    slices = -(-steps // factor)

    @jax.jit
    def solve(y0, args):
        return parareal(step, times, y0, args, factor, slices)

    return solve


# --------------------------------------------------------------------------- ODE rows


def _row(label, steps, method, value, reference, **fields) -> dict:
    value = np.asarray(value)
    finite = bool(np.all(np.isfinite(value)))
    error = float(np.max(np.abs(value - np.asarray(reference)))) if finite else None
    scale = max(1.0, float(np.max(np.abs(reference))))
    row = {"problem": label, "N": steps, "method": method, "max_error": error, **fields}
    row["suspect"] = row.get("successful", False) and (
        error is None or error > SUSPECT_ERROR * scale
    )
    return row


def ode_rows(label: str, steps: int) -> list[dict]:
    problem = ODE_PROBLEMS[label]
    y0 = jnp.asarray(problem.y0, jnp.float64)
    args = None if problem.args is None else jnp.asarray(problem.args, jnp.float64)
    field = problem.vector_field
    reference = _reference(field, steps)(y0, args)
    factor = automatic_factor(steps)
    depth = log2_ceil(steps)
    coarse_steps = -(-steps // factor)
    configs = {
        CONSTANT: (None, 1),
        ADAPTIVE: (pdyn.CoarseGuess(), 1),
        UNIFORM: (pdyn.CoarseGuess(stepsize_controller=_UNIFORM_GRID), 1),
        TWO_LEVELS: (pdyn.CoarseGuess(levels=2), 1),
        SLICES: (pdyn.CoarseGuess(), factor),
    }
    rows = []
    for method, (coarse, m) in configs.items():
        try:
            value, stats, result = _pdyn_solve(field, steps, coarse, m)(y0, args)
        except Exception as e:
            rows.append({"problem": label, "N": steps, "method": method})
            rows[-1]["error"] = error_message(e)
            continue
        iterations = int(stats["num_parallel_iterations"])
        name = result_name(result)
        sequential = int(stats.get("num_coarse_steps", 0))
        if method == CONSTANT:
            span = iterations * depth
        elif method in (ADAPTIVE, UNIFORM):
            span = sequential + iterations * depth
        elif method == TWO_LEVELS:
            middle = [int(i) for i in np.asarray(stats["coarse_parallel_iterations"])]
            middle_depth = log2_ceil(coarse_steps)
            span = sequential + sum(middle) * middle_depth + iterations * depth
        else:
            span = sequential + iterations * (m + log2_ceil(coarse_steps)) + m
        extra = {"coarse_steps": sequential, "factor": factor}
        if method == TWO_LEVELS:
            extra["coarse_parallel_iterations"] = middle
        rows.append(
            _row(
                label,
                steps,
                method,
                value,
                reference,
                iterations=iterations,
                result=name,
                successful=name == "successful",
                span=span,
                **extra,
            )  # fmt: skip
        )
    for method, k in ((PARAREAL, factor), (PARAREAL_SQRT, math.isqrt(steps - 1) + 1)):
        slices = -(-steps // k)
        value, iterations, done = _parareal_solve(field, steps, k)(y0, args)
        iterations = int(iterations)
        rows.append(
            _row(
                label,
                steps,
                method,
                value,
                reference,
                iterations=iterations,
                result="successful" if bool(done) else "max_iterations",
                successful=bool(done),
                span=slices + iterations * (k + slices),
                coarse_steps=slices,
                factor=k,
            )  # fmt: skip
        )
    for row in rows:
        _progress(row)
    return rows


def _cell(row: dict) -> str:
    if "error" in row:
        return "error"
    if not row["successful"]:
        return f"✗ {row['iterations']} ({row['result']})"
    return f"{row['iterations']}" + (" SUSPECT" if row["suspect"] else "")


def _progress(row: dict) -> None:
    error = row.get("max_error")
    print(
        f"  {row['problem']:<28} N={row['N']:<6} {row['method']:<38} "
        f"{_cell(row):>10}  span {row.get('span', '-'):>6}  max err "
        + ("-" if error is None else f"{error:.1e}"),
        flush=True,
    )


def _median(values):
    return float(np.median(values)) if values else None


def summary(rows: list[dict]) -> list[dict]:
    """Per method and N: solved problems, median and max iterations and span over
    the solved ones."""
    out = []
    for steps in sorted({r["N"] for r in rows}):
        for method in METHODS:
            group = [r for r in rows if r["N"] == steps and r["method"] == method]
            if not group:
                continue
            ok = [r for r in group if r.get("successful") and not r.get("suspect")]
            its = [r["iterations"] for r in ok]
            spans = [r["span"] for r in ok]
            out.append(
                {
                    "N": steps,
                    "method": method,
                    "solved": f"{len(ok)}/{len(group)}",
                    "median_iterations": _median(its),
                    "max_iterations": max(its) if its else None,
                    "median_span": _median(spans),
                    "max_span": max(spans) if spans else None,
                    "span_over_N": (max(spans) / steps) if spans else None,
                }
            )
    return out


def slice_rows(steps: int) -> list[dict]:
    """TrustDEER from the constant and the coarse guess against the slice length m:
    span = (coarse steps) + iterations × (m + ⌈log₂ (N / m)⌉) + m."""
    rows = []
    for label in SLICE_PROBLEMS:
        problem = ODE_PROBLEMS[label]
        y0 = jnp.asarray(problem.y0, jnp.float64)
        args = None if problem.args is None else jnp.asarray(problem.args)
        reference = _reference(problem.vector_field, steps)(y0, args)
        for m in SLICE_SIZES:
            for coarse in (None, pdyn.CoarseGuess()):
                solve = _pdyn_solve(problem.vector_field, steps, coarse, m)
                value, stats, result = solve(y0, args)
                iterations = int(stats["num_parallel_iterations"])
                sequential = int(stats.get("num_coarse_steps", 0))
                slices = -(-steps // m)
                name = result_name(result)
                span = sequential + iterations * (m + log2_ceil(slices)) + m
                method = "coarse guess" if coarse else "constant guess"
                row = _row(
                    label, steps, method, value, reference, steps_per_slice=m,
                    iterations=iterations, result=name,
                    successful=name == "successful", span=span,
                    coarse_steps=sequential,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"  {label:<28} N={steps} m={m:<5} {method:<15} "
                    f"{_cell(row):>10}  span {span:>6}",
                    flush=True,
                )
        jax.clear_caches()
    return rows


# --------------------------------------------------------------------------- stiff


# DEER is left out on Van der Pol: there its diverged iterates make an implicit
# step's root finder return NaN, whose derivative raises inside Lineax (an
# `EquinoxRuntimeError` even with `throw=False`), after which XLA:CPU hung.
STIFF_PARALLEL = (pdyn.TrustDEER(), pdyn.DEER())


def stiff_solvers(tolerance: float) -> dict:
    """Kvaerno5 and implicit Euler with Newton root finders of the given tolerance."""
    root_finder = optx.Newton(rtol=tolerance, atol=tolerance)
    return {
        "Kvaerno5": diffrax.Kvaerno5(root_finder=root_finder),
        "ImplicitEuler": diffrax.ImplicitEuler(root_finder=root_finder),
    }


def robertson(t, y, args):
    y1, y2, y3 = y
    return jnp.stack(
        [
            -0.04 * y1 + 1e4 * y2 * y3,
            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
            3e7 * y2**2,
        ]
    )


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def heat(t, y, args):
    h = 1.0 / (y.shape[0] + 1)
    padded = jnp.concatenate([jnp.zeros(1), y, jnp.zeros(1)])
    return (padded[:-2] - 2 * y + padded[2:]) / h**2


HEAT_SIZE = 50


def _adaptive_steps(field, t1: float, y0=(2.0, 0.0), args=1000.0) -> np.ndarray:
    """The step times that an adaptive `diffrax.Kvaerno5` (rtol = atol = 1e-6)
    chooses: Van der Pol with mu = 1000 has jumps at folds of its slow manifold,
    where an implicit step of a fixed size has no nearby root (Diffrax itself fails
    with 0.5, 0.1 or 0.02 on [0, 1000]). On this grid Diffrax's fixed-step Kvaerno5
    succeeds with a Newton root finder at tolerance 1e-8 (not at 1e-10, nor with
    50 root-finder steps); implicit Euler fails on it, and on its own adaptive
    grid."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Kvaerno5(), 0.0, t1, 0.1,
        jnp.asarray(y0), args, saveat=diffrax.SaveAt(t0=True, steps=True),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        max_steps=100_000,
    )  # fmt: skip
    ts = np.asarray(sol.ts)
    return ts[np.isfinite(ts)]


def stiff_problems() -> dict:
    """name -> (vector field, t0, t1, dt0 or None, step times or None, y0, args,
    root finder tolerance)."""
    x = np.linspace(0, 1, HEAT_SIZE + 2)[1:-1]
    return {
        "Robertson to t = 1e5 (400 geometric steps)": (
            robertson, 0.0, 1e5, None,
            np.concatenate([[0.0], np.geomspace(1e-6, 1e5, 400)]),
            np.array([1.0, 0.0, 0.0]), None, 1e-10,
        ),
        "Van der Pol mu = 1000 on [0, 3000] (adaptive Kvaerno5's steps)": (
            van_der_pol, 0.0, 3000.0, None, lambda: _adaptive_steps(van_der_pol, 3000.0),
            np.array([2.0, 0.0]), 1000.0, 1e-8,
        ),
        f"heat equation D = {HEAT_SIZE} on [0, 0.2] (200 steps)": (
            heat, 0.0, 0.2, 1e-3, None,
            np.sin(np.pi * x) + 0.5 * np.sin(7 * np.pi * x), None, 1e-10,
        ),
    }  # fmt: skip


def stiff(only: tuple[str, ...] = ()) -> list[dict]:
    """The stiff problems (those whose name contains a word of `only`, if given)."""
    print("\n== Stiff problems, fixed steps, float64 ==", flush=True)
    rows = []
    for label, problem in stiff_problems().items():
        if only and not any(word.lower() in label.lower() for word in only):
            continue
        field, t0, t1, dt0, ts, y0, args, tolerance = problem
        if callable(ts):
            ts = ts()
        controller = (
            diffrax.ConstantStepSize()
            if ts is None
            else diffrax.StepTo(jnp.asarray(ts))
        )
        steps = len(ts) - 1 if ts is not None else round((t1 - t0) / dt0)
        kwargs = dict(saveat=diffrax.SaveAt(steps=True), stepsize_controller=controller)
        y0 = jnp.asarray(y0)
        for name, solver in stiff_solvers(tolerance).items():
            term = diffrax.ODETerm(field)
            start = time.perf_counter()
            reference = diffrax.diffeqsolve(
                term, solver, t0, t1, dt0, y0, args, max_steps=steps, throw=False,
                **kwargs,
            )  # fmt: skip
            reference_result = result_name(reference.result)
            solvers = (pdyn.TrustDEER(),) if "Van der Pol" in label else STIFF_PARALLEL
            for parallel, coarse in itertools.product(
                solvers, (None, pdyn.CoarseGuess())
            ):
                method = type(parallel).__name__ + (
                    ", coarse guess" if coarse else ", constant guess"
                )
                try:
                    sol = pdyn.diffeqsolve(
                        term, solver, t0, t1, dt0, y0, args, coarse=coarse,
                        parallel=parallel, throw=False, **kwargs,
                    )  # fmt: skip
                except Exception as e:
                    rows.append({"problem": label, "solver": name, "method": method})
                    rows[-1]["error"] = error_message(e)
                    print(f"  {label} {name} {method}: {rows[-1]['error']}")
                    continue
                result = result_name(sol.result)
                row = _row(
                    label, steps, method, sol.ys, reference.ys,
                    solver=name, iterations=int(sol.stats["num_parallel_iterations"]),
                    result=result, successful=result == "successful",
                    diffrax_result=reference_result,
                    coarse_steps=int(sol.stats.get("num_coarse_steps", 0)),
                )  # fmt: skip
                row["relative_error"] = (
                    None
                    if row["max_error"] is None
                    else row["max_error"] / float(jnp.max(jnp.abs(reference.ys)))
                )
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(
                    f"  {label:<48} {name:<14} {method:<15} {_cell(row):>12}  "
                    f"rel err {row['relative_error']}  (diffrax: {reference_result})",
                    flush=True,
                )
            jax.clear_caches()
    return rows


# --------------------------------------------------------------------------- output


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    rows = results.get("odes", [])
    for steps in sorted({r["N"] for r in rows}):
        problems = list(dict.fromkeys(r["problem"] for r in rows if r["N"] == steps))
        headers = ["problem"] + [m for m in METHODS]
        body = []
        for p in problems:
            line = [p]
            for m in METHODS:
                r = [x for x in rows if x["N"] == steps and x["problem"] == p]
                r = [x for x in r if x["method"] == m]
                line.append(f"{_cell(r[0])} / {r[0].get('span', '-')}" if r else "-")
            body.append(line)
        out.append(
            (
                f"Iterations / sequential span, Tsit5, N = {steps} on [0, {T1:g}] "
                f"(k = {automatic_factor(steps)}, ⌈log₂ N⌉ = {log2_ceil(steps)})",
                headers,
                body,
            )
        )
    headers = ["N", "method", "solved", "median it", "max it", "median span",
               "max span", "max span / N"]  # fmt: skip
    body = [
        [
            str(s["N"]),
            s["method"],
            s["solved"],
            _fmt(s["median_iterations"]),
            _fmt(s["max_iterations"]),
            _fmt(s["median_span"]),
            _fmt(s["max_span"]),
            _fmt(s["span_over_N"], ".3f"),
        ]  # fmt: skip
        for s in results.get("summary", [])
    ]
    if body:
        out.append(("Summary over the problems each method solved", headers, body))
    if results.get("slices"):
        slice_rows_ = results["slices"]
        headers = ["problem", "guess"] + [f"m = {m}" for m in SLICE_SIZES]
        body = []
        for problem in SLICE_PROBLEMS:
            for method in ("constant guess", "coarse guess"):
                cells = []
                for m in SLICE_SIZES:
                    r = [
                        x
                        for x in slice_rows_
                        if x["problem"] == problem
                        and x["method"] == method
                        and x["steps_per_slice"] == m
                    ]
                    cells.append(f"{_cell(r[0])} / {r[0]['span']}" if r else "-")
                body.append([problem, method] + cells)
        steps = slice_rows_[0]["N"]
        out.append(
            (f"Slices of m steps, N = {steps}: iterations / span", headers, body)
        )
    if results.get("stiff"):
        headers = ["problem", "solver", "parallel, guess", "iterations", "coarse steps",
                   "relative error vs Diffrax", "Diffrax"]  # fmt: skip
        body = [
            [
                r["problem"],
                r.get("solver", "-"),
                r["method"],
                _cell(r) if "iterations" in r else r.get("error", "-")[:40],
                str(r.get("coarse_steps", "-")),
                _fmt(r.get("relative_error"), ".1e"),
                r.get("diffrax_result", "-"),
            ]  # fmt: skip
            for r in results["stiff"]
        ]
        out.append(("Stiff problems", headers, body))
    return out


def _fmt(value, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    from .plots import markdown_table

    lines = [
        "# Parallel-in-time ODEs: coarse guesses, slices and Parareal",
        "",
        f"`{results['meta']['command']}` ({results['meta']['backend']}, "
        f"{results['seconds']['total']:.0f} s). Cells: iterations / sequential span.",
    ]
    for title, headers, body in tables(results):
        lines += ["", f"## {title}", "", markdown_table(headers, body)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results.get("against_n", [])
    if not rows:
        return None
    fig, axes = plt.subplots(
        2, len(SWEEP_PROBLEMS), figsize=(4 * len(SWEEP_PROBLEMS), 7), sharex=True
    )
    ns = sorted({r["N"] for r in rows})
    for column, problem in enumerate(SWEEP_PROBLEMS):
        for index, method in enumerate(METHODS):
            group = sorted(
                (
                    r
                    for r in rows
                    if r["method"] == method
                    and r["problem"] == problem
                    and r.get("successful")
                ),
                key=lambda r: r["N"],
            )
            if not group:
                continue
            style = dict(marker="o", color=f"C{index}", label=method, alpha=0.85)
            x = [r["N"] for r in group]
            axes[0, column].plot(x, [r["iterations"] for r in group], **style)
            axes[1, column].plot(x, [r["span"] for r in group], **style)
        axes[1, column].plot(ns, [n / 10 for n in ns], "k--", label="N / 10")
        axes[0, column].set_title(problem)
        axes[0, column].set_ylabel("iterations")
        axes[1, column].set_ylabel("sequential span")
        axes[1, column].set_xlabel("N (Tsit5 steps on [0, 20])")
        for ax in axes[:, column]:
            ax.set_xscale("log")
            ax.set_yscale("log")
    axes[1, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the output file names")
    parser.add_argument(
        "--stiff-problems",
        nargs="*",
        default=[],
        help="run the stiff problems whose name contains one of these words",
    )
    parser.add_argument("--out-dir", default=RESULTS_DIR, type=type(RESULTS_DIR))
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run"
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    stem = "parallel_in_time_" + backend_tag() + ("_quick" if args.quick else "")
    stem += f"_{args.tag}" if args.tag else ""
    start = time.perf_counter()
    results = {
        "meta": {
            **environment(),
            "mode": "quick" if args.quick else "full",
            "command": "python -m benchmarks.parallel_in_time "
            + " ".join(sys.argv[1:]),
            "tolerance": TOLERANCE,
        },
        "seconds": {},
    }
    sizes = (2000,) if args.quick else (2000, 20_000)
    rows = []
    if "odes" in args.parts:
        for steps in sizes:
            print(f"\n== ODEs, Tsit5, N = {steps} on [0, {T1:g}], float64 ==")
            for label in ODE_PROBLEMS:
                rows += ode_rows(label, steps)
            jax.clear_caches()
            _pdyn_solve.cache_clear()
            _parareal_solve.cache_clear()
            _reference.cache_clear()
        results["odes"] = rows
        results["summary"] = summary(rows)
    if "against_n" in args.parts:
        sweep = (500, 2000, 5000) if args.quick else (500, 2000, 5000, 20_000)
        print("\n== Against N ==", flush=True)
        against = [r for r in rows if r["problem"] in SWEEP_PROBLEMS]
        for steps in sweep:
            if rows and steps in sizes:
                continue
            for label in SWEEP_PROBLEMS:
                against += ode_rows(label, steps)
            jax.clear_caches()
        results["against_n"] = against
    if "slices" in args.parts:
        print("\n== Slice length m (TrustDEER) ==", flush=True)
        results["slices"] = slice_rows(2000 if args.quick else 20_000)
    if "stiff" in args.parts and not args.quick:
        results["stiff"] = stiff(tuple(args.stiff_problems))
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)
    for title, headers, body in tables(results):
        from .plots import text_table

        print(f"\n{title}\n{text_table(headers, body)}")
    path = args.out_dir / f"{stem}.json"
    save_json(path, results)
    (args.out_dir / f"{stem}.md").write_text(markdown(results))
    made = plot(results, args.out_dir / f"{stem}.png")
    for p in [path, args.out_dir / f"{stem}.md", made]:
        if p:
            print(f"wrote {p}")
    print(f"total {results['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
