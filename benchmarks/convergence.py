"""Iterations to converge against T, for a contracting and a chaotic map (issue 6,
item 1b).

Two tanh RNNs $y_t = \\tanh(W y_{t-1} + x_t)$ with $D = 8$ and $W = g\\, G / \\sqrt{D}$
for a standard-normal $G$: gain $g = 0.5$ with standard-normal inputs contracts
(LLE about -1.4); gain $g = 3$ with inputs of standard deviation 0.3 is chaotic (LLE
about +0.06; Sompolinsky et al. 1988). Float32, rtol = atol = 1e-4, `max_steps = T`.
For every solver and T: the iterations, the result, the max error against `lax.scan`,
and the largest Lyapunov exponent along the trajectory (`pdyn.lyapunov_exponent`),
which predicts the outcome (Gonzalez et al. 2025): negative, O(log T)-ish iterations;
positive, about T for the quasi methods, overflow for undamped Newton.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optimistix as optx

import parallel_dynamics as pdyn

from .common import error_message, make_lax_scan


SIZE = 8
# label -> (gain, input scale)
MAPS = {"contracting (g=0.5)": (0.5, 1.0), "chaotic (g=3, inputs 0.3)": (3.0, 0.3)}
TOLERANCE = 1e-4
SOLVERS = {
    "DEER": lambda: pdyn.DEER(rtol=TOLERANCE, atol=TOLERANCE),
    "QuasiDEER": lambda: pdyn.QuasiDEER(rtol=TOLERANCE, atol=TOLERANCE),
    "ELK": lambda: pdyn.ELK(rtol=TOLERANCE, atol=TOLERANCE),
    "QuasiELK": lambda: pdyn.QuasiELK(rtol=TOLERANCE, atol=TOLERANCE),
    "Picard": lambda: pdyn.Picard(rtol=TOLERANCE, atol=TOLERANCE),
}


def tanh_step(y, x, w):
    return jnp.tanh(w @ y + x)


def _problem(gain: float, scale: float, length: int):
    w = gain * jax.random.normal(jax.random.key(0), (SIZE, SIZE)) / math.sqrt(SIZE)
    xs = scale * jax.random.normal(jax.random.key(1), (length, SIZE))
    return w, xs, jnp.zeros(SIZE)


def _result_name(result) -> str:
    for name in _RESULT_NAMES:
        if hasattr(optx.RESULTS, name) and bool(result == getattr(optx.RESULTS, name)):
            return name
    return optx.RESULTS[result] or "?"


_RESULT_NAMES = (
    "successful",
    "nonlinear_max_steps_reached",
    "nonfinite",
    "nonlinear_divergence",
    "singular",
)


def run(quick: bool, lengths=None) -> dict:
    lengths = (
        tuple(lengths) if lengths else ((100, 1000) if quick else (100, 1000, 10_000))
    )
    print(
        "\n== Iterations to converge against T (tanh RNN, D = 8, float32, tol 1e-4, "
        "max_steps = T) =="
    )
    print(
        f"{'map':<22} {'T':>6} {'LLE':>7} {'solver':<10} {'iters':>6} {'result':<28} "
        f"{'max err':>8}"
    )
    scan = make_lax_scan(tanh_step)
    rows = []
    for label, (gain, scale) in MAPS.items():
        for length in lengths:
            w, xs, y0 = _problem(gain, scale, length)
            reference = scan(y0, xs, w)
            try:
                lle = pdyn.lyapunov_exponent(tanh_step, y0, xs, w, trajectory=reference)
                lle = float(jnp.ravel(lle)[0])
            except Exception:
                lle = None
            for name, make in SOLVERS.items():
                row = {"map": label, "gain": gain, "input_scale": scale, "T": length}
                row["solver"] = name
                row["lle"] = lle
                try:
                    sol = jax.jit(
                        lambda xs, w, s=make(), y0=y0: pdyn.solve(
                            tanh_step, s, y0, xs, w, throw=False
                        )
                    )(xs, w)
                    row["iterations"] = int(sol.stats["num_steps"])
                    row["result"] = _result_name(sol.result)
                    row["converged"] = int(sol.result._value) == 0
                    value = sol.value
                    finite = bool(jnp.all(jnp.isfinite(value)))
                    row["max_error"] = (
                        float(jnp.max(jnp.abs(value - reference))) if finite else None
                    )
                except Exception as e:
                    row["error"] = error_message(e)
                rows.append(row)
                if "error" in row:
                    print(f"{label:<22} {length:>6} {name:<10} FAILED {row['error']}")
                    continue
                err = row["max_error"]
                print(
                    f"{label:<22} {length:>6} "
                    f"{'-' if lle is None else format(lle, '7.3f'):>7} {name:<10} "
                    f"{row['iterations']:>6d} {row['result']:<28} "
                    f"{'nan' if err is None else format(err, '8.1e'):>8}",
                    flush=True,
                )
    return {"rows": rows, "size": SIZE, "tolerance": TOLERANCE}
