"""Sequence parallelism: one trajectory sharded along time across devices.

On a machine with several accelerators this uses all of them. On a CPU, emulate
devices before JAX starts, e.g.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/sharded_solve.py

The inputs are sharded along time over a 1-D mesh; every device evaluates the step on
its own slice, scans its own chunk and exchanges only chunk summaries with the others
(`pdyn.ShardedScan`). The trajectory and the gradient stay sharded along time.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

import parallel_dynamics as pdyn


jax.config.update("jax_enable_x64", True)

devices = jax.device_count()
mesh = jax.make_mesh((devices,), ("time",), axis_types=(AxisType.Auto,))
scan = pdyn.ShardedScan(mesh)

T, D = 1024 * devices, 16  # T divisible by the device count
key_w, key_x = jax.random.split(jax.random.key(0))
w = 0.8 * jax.random.normal(key_w, (D, D)) / jnp.sqrt(D)
xs = pdyn.internal.shard_time(jax.random.normal(key_x, (T, D)), mesh)
y0 = jnp.zeros(D)


def step(h, x, w):
    return jnp.tanh(w @ h + x)


# Newton (DEER) and quasi-Newton (quasi-DEER) with the sharded scan.
for solver in (pdyn.DEER(linear_solver=scan), pdyn.QuasiDEER(linear_solver=scan)):
    sol = pdyn.solve(step, solver, y0, xs, w, throw=False)
    reference = pdyn.solve(step, pdyn.Sequential(), y0, xs, w).value
    error = float(jnp.max(jnp.abs(sol.value - reference)))
    shard_rows = [s.data.shape[0] for s in sol.value.addressable_shards]
    print(
        f"{type(solver).__name__:>9}: {int(sol.stats['num_steps'])} iterations, "
        f"max error {error:.1e}, sharding {sol.value.sharding.spec}, "
        f"rows per device {shard_rows}"
    )


# Gradients: the implicit adjoint's reverse scan is sharded the same way.
def loss(w, xs):
    sol = pdyn.solve(
        step,
        pdyn.QuasiDEER(linear_solver=scan),
        y0,
        xs,
        w,
        adjoint=pdyn.ImplicitAdjoint(linear_solver=scan),
        throw=False,
    )
    return jnp.mean(sol.value**2)


grad_w, grad_xs = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, xs)
print(
    f"d loss / d inputs: sharding {grad_xs.sharding.spec}, |g| = {jnp.abs(grad_w).max():.3e}"
)
