"""Sequence parallelism on emulated CPU devices: `pdyn.ShardedScan` on 1, 2 and 4
devices (`--xla_force_host_platform_device_count`, one subprocess per device count).

For each device count P and each block structure (diagonal: quasi-DEER; dense: DEER)
it reports

- the error of the sharded solve against `pdyn.Sequential` (float64);
- the median wall time of the solve (emulated devices share the host's cores, so
  this shows overheads, not a speed-up);
- the communication of one sharded scan: the bytes all-gathered, computed
  analytically as P summaries of (D^2 + D) numbers (dense) or 2D numbers (diagonal),
  and the same read from the compiled HLO (the all-gather result shapes), plus the
  largest array any collective of the whole solve moves (it must not be T-sized);
- for ELK's sharded Kalman smoother (rows `elk_dense`, `elk_diagonal`: one damped
  step), the error against the single-device smoother and the bytes all-gathered,
  analytic (P filtering elements of D(3D + 2) numbers plus P smoothing summaries of
  D^2 + D, dense; 5D plus 2D, diagonal) and from the HLO;
- the bytes of the trajectory held per device (from `addressable_shards`), which
  falls as 1/P.

The solves use `throw=False`: with `throw=True` the error check of `pdyn.solve`
(`equinox.error_if` on the whole solution, a host callback on device 0) currently
makes XLA replicate the returned trajectory (see docs/sharding.md).

Run: `python -m benchmarks.sharding` (writes benchmarks/results/sharding_cpu.json).
"""

import json
import os
import pathlib
import subprocess
import sys


LENGTH = 8192
SIZE = 8
REPEATS = 3

_WORKER = r"""
import json, re, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import parallel_dynamics as pdyn

jax.config.update("jax_enable_x64", True)
T, D, REPEATS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
P = jax.device_count()
mesh = jax.make_mesh((P,), ("time",), axis_types=(AxisType.Auto,))
scan = pdyn.ShardedScan(mesh)
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
w = 0.5 * jax.random.normal(k1, (D, D)) / np.sqrt(D)
xs = jax.random.normal(k2, (T, D))
y0 = jnp.zeros(D)

def step(y, x, w):
    return jnp.tanh(w @ y + x)

_SHAPE = re.compile(r"= \(?(f64|f32)\[([0-9,]*)\][^ ]* (all-gather|collective-permute)")

def collectives(text):
    out = []
    for dtype, dims, kind in _SHAPE.findall(text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append((kind, n * (8 if dtype == "f64" else 4)))
    return out

ref = pdyn.solve(step, pdyn.Sequential(), y0, xs, w).value
xs_sharded = pdyn.internal.shard_time(xs, mesh)
rows = []
for name, solver, blocks in (
    ("diagonal", pdyn.QuasiDEER(linear_solver=scan),
     pdyn.DiagonalBlocks(jax.random.normal(k3, (T, D)))),
    ("dense", pdyn.DEER(linear_solver=scan),
     pdyn.DenseBlocks(jax.random.normal(k3, (T, D, D)) / D)),
):
    run = jax.jit(lambda xs, w: pdyn.solve(step, solver, y0, xs, w, throw=False))
    sol = run(xs_sharded, w)
    jax.block_until_ready(sol.value)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(run(xs_sharded, w).value)
        times.append(time.perf_counter() - start)
    solve_hlo = run.lower(xs_sharded, w).compile().as_text()
    one_scan = jax.jit(lambda b, o: pdyn.internal.sharded_scan(b, o, mesh=mesh))
    blocks = pdyn.internal.shard_time(blocks, mesh)
    offsets = pdyn.internal.shard_time(xs, mesh)
    scan_hlo = one_scan.lower(blocks, offsets).compile().as_text()
    per_summary = D * D + D if name == "dense" else 2 * D
    gathered_hlo = sum(b for k, b in collectives(scan_hlo) if k == "all-gather")
    solve_collectives = collectives(solve_hlo)
    rows.append({
        "structure": name,
        "devices": P,
        "length": T,
        "size": D,
        "error": float(jnp.max(jnp.abs(sol.value - ref))),
        "num_steps": int(sol.stats["num_steps"]),
        "time_s": float(np.median(times)),
        "allgather_bytes_analytic": P * per_summary * 8 if P > 1 else 0,
        "allgather_bytes_hlo": gathered_hlo,
        "largest_collective_bytes_in_solve": max(
            [b for _, b in solve_collectives], default=0
        ),
        "trajectory_bytes_total": int(sol.value.nbytes),
        "trajectory_bytes_per_device": max(
            s.data.nbytes for s in sol.value.addressable_shards
        ),
        "sharding": str(sol.value.sharding.spec),
    })
# ELK's sharded Kalman smoother: one damped step, its error against the
# single-device smoother and the bytes it all-gathers (HLO vs analytic).
for name, blocks in (
    ("elk_dense", pdyn.DenseBlocks(jax.random.normal(k3, (T, D, D)) / D)),
    ("elk_diagonal", pdyn.DiagonalBlocks(jax.random.normal(k3, (T, D)))),
):
    obs = jax.random.normal(k1, (T, D))
    def damped(blocks, b, obs, mesh):
        return pdyn.internal.kalman_smooth(blocks, b, obs, 1.0, parallel=False, mesh=mesh)
    ref = jax.jit(lambda *a: damped(*a, None))(blocks, xs, obs)
    placed = pdyn.internal.shard_time((blocks, xs, obs), mesh)
    run = jax.jit(lambda *a: damped(*a, mesh))
    got = run(*placed)
    hlo = run.lower(*placed).compile().as_text()
    if name == "elk_dense":
        per_device = D * (3 * D + 2) + D * D + D
    else:
        per_device = 5 * D + 2 * D
    rows.append({
        "structure": name,
        "devices": P,
        "length": T,
        "size": D,
        "error": float(jnp.max(jnp.abs(got - ref))),
        "allgather_bytes_analytic": P * per_device * 8 if P > 1 else 0,
        "allgather_bytes_hlo": sum(
            b for k, b in collectives(hlo) if k == "all-gather"
        ),
        "largest_collective_bytes_in_solve": max(
            [b for _, b in collectives(hlo)], default=0
        ),
        "trajectory_bytes_per_device": max(
            s.data.nbytes for s in got.addressable_shards
        ),
        "sharding": str(got.sharding.spec),
    })
print("RESULT" + json.dumps(rows))
"""


def _run(devices: int) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(LENGTH), str(SIZE), str(REPEATS)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    return json.loads(line[len("RESULT") :])


def main() -> list[dict]:
    rows = []
    for devices in (1, 2, 4):
        rows.extend(_run(devices))
    rows.sort(key=lambda r: (r["structure"], r["devices"]))
    header = (
        f"{'blocks':<9}{'P':>3}{'error':>10}{'iters':>6}{'time ms':>9}"
        f"{'gather B':>10}{'(HLO)':>8}{'max coll B':>11}{'traj B/dev':>12}"
    )
    print(f"T = {LENGTH}, D = {SIZE}, float64, emulated CPU devices")
    print(header)
    for r in rows:
        print(
            f"{r['structure']:<9}{r['devices']:>3}{r['error']:>10.1e}"
            f"{r.get('num_steps', 0):>6}{1e3 * r.get('time_s', 0):>9.1f}"
            f"{r['allgather_bytes_analytic']:>10}{r['allgather_bytes_hlo']:>8}"
            f"{r['largest_collective_bytes_in_solve']:>11}"
            f"{r['trajectory_bytes_per_device']:>12}"
        )
    out = pathlib.Path(__file__).parent / "results" / "sharding_cpu.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "length": LENGTH,
        "size": SIZE,
        "dtype": "float64",
        "note": (
            "Emulated devices share the host CPU cores: times show overheads, not a "
            "multi-device speed-up. allgather_bytes_analytic = P * (D^2 + D) * 8 "
            "(dense) or P * 2D * 8 (diagonal) per sharded scan (each device receives "
            "P chunk summaries); allgather_bytes_hlo sums the all-gather result "
            "shapes of the compiled scan. elk_* rows: one damped step of the "
            "sharded Kalman smoother (KalmanSmoother(mesh=...)), error against the "
            "single-device smoother; analytic = P * (D(3D+2) + D^2 + D) * 8 "
            "(dense: one filtering element and one smoothing summary per device) "
            "or P * 7D * 8 (diagonal); the largest collective also counts the "
            "ppermute of one block per device."
        ),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
