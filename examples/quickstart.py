"""Quick start: evaluate a GRU over a long sequence, in parallel over time.

Runs `eqx.nn.GRUCell` over T = 10,000 steps with `pdyn.Sequential` (a `lax.scan`),
`pdyn.DEER` (Newton) and `pdyn.QuasiDEER` (diagonal quasi-Newton), prints a table of
iterations, max error against the sequential trajectory and wall time, and saves a plot
of the residual norm against the iteration.

    python examples/quickstart.py
"""

import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt

import parallel_dynamics as pdyn


LENGTH, FEATURES, HIDDEN = 10_000, 4, 16
OUTPUT = pathlib.Path(__file__).with_name("quickstart_convergence.png")


def step(h, x, cell):
    return cell(x, h)


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    cell = eqx.nn.GRUCell(FEATURES, HIDDEN, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (LENGTH, FEATURES))
    h0 = jnp.zeros(HIDDEN)
    solvers = {
        "Sequential": pdyn.Sequential(),
        "DEER": pdyn.DEER(rtol=1e-5, atol=1e-5),
        "QuasiDEER": pdyn.QuasiDEER(rtol=1e-5, atol=1e-5),
    }

    @eqx.filter_jit
    def run(solver, cell, xs):
        return pdyn.solve(step, solver, h0, xs, cell)

    reference = run(solvers["Sequential"], cell, xs).value
    print(f"GRUCell({FEATURES}, {HIDDEN}) over T = {LENGTH:,} steps, float32, CPU\n")
    print(f"{'solver':<12}{'iterations':>12}{'max error':>14}{'time (ms)':>12}")
    for name, solver in solvers.items():
        sol = run(solver, cell, xs)
        error = float(jnp.max(jnp.abs(sol.value - reference)))
        seconds = timed(run, solver, cell, xs)
        iterations = int(sol.stats["num_steps"])
        print(f"{name:<12}{iterations:>12}{error:>14.2e}{1e3 * seconds:>12.1f}")

    # Convergence history: one iteration at a time, each starting from the last.
    @eqx.filter_jit
    def one_iteration(solver, cell, xs, guess):
        return pdyn.solve(
            step, solver, h0, xs, cell, init=guess, max_steps=1, throw=False
        )

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("DEER", "QuasiDEER"):
        guess = jnp.broadcast_to(h0, (LENGTH, HIDDEN))
        norms = [
            float(
                jnp.max(
                    jnp.abs(
                        guess
                        - jax.vmap(step, (0, 0, None))(
                            jnp.concatenate([h0[None], guess[:-1]]), xs, cell
                        )
                    )
                )
            )
        ]
        for _ in range(12):
            sol = one_iteration(solvers[name], cell, xs, guess)
            guess = sol.value
            norms.append(float(sol.stats["residual_norm"]))
        ax.semilogy(norms, marker="o", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"residual norm $\max_t |y_t - f(y_{t-1}, x_t)|$")
    ax.set_title(f"GRU, D = {HIDDEN}, T = {LENGTH:,}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUTPUT, dpi=120)
    print(f"\nSaved the convergence plot to {OUTPUT}")


if __name__ == "__main__":
    main()
