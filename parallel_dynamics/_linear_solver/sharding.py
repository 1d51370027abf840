"""The time axis sharded across devices: which mesh axis, and how arrays are laid out
and padded on it."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def shard_time(x, mesh: Mesh, axis_name: str = "time"):
    """Lays out every array of the PyTree `x` sharded along its leading (time) axis
    over the `mesh.shape[axis_name]` devices of `mesh`.

    Uses `jax.reshard` on an explicit mesh axis, and on an automatic one
    `jax.lax.with_sharding_constraint` inside `jax.jit` or `jax.device_put` outside.
    Outside `jax.jit` the time axis must be divisible by the number of devices (a
    `jax.Array` is split evenly); otherwise a `ValueError` says how to pad.

    **Arguments:**

    - `x`: a PyTree of arrays with a leading time axis, e.g. the `inputs` of
        [`parallel_dynamics.solve`][].
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis_name`: the mesh axis to shard the time axis over.

    **Returns:**

    `x`, with every leaf sharded along time.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        from jax.sharding import AxisType

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("time",), axis_types=(AxisType.Auto,))
        xs = pdyn.internal.shard_time(jnp.zeros((8 * n, 3)), mesh)
        ```
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name]

    num_devices = mesh.shape[axis_name]

    def _one(leaf):
        if not isinstance(leaf, jax.core.Tracer) and leaf.shape[0] % num_devices:
            raise ValueError(
                f"Cannot shard a time axis of length {leaf.shape[0]} over "
                f"{num_devices} devices: a `jax.Array` must split evenly. Either pad "
                "the inputs at their end to a multiple of the device count (the "
                "recurrence is causal, so the first T states of the padded solve are "
                "the solution; keep `sol.value[:T]`), or place them on the mesh "
                "unsharded (`NamedSharding(mesh, PartitionSpec())`): the scans still "
                "run sharded inside, on a padded time axis."
            )
        if axis_type == AxisType.Explicit:
            return jax.reshard(leaf, sharding)
        if isinstance(leaf, jax.core.Tracer):
            return lax.with_sharding_constraint(leaf, sharding)
        return jax.device_put(leaf, sharding)

    return jax.tree.map(_one, x)


class TimeSharding(eqx.Module):
    """The time axis of a solve sharded over the devices of one axis of a mesh
    (sequence parallelism).

    It is what a sharded linear solver declares: [`parallel_dynamics.ShardedScan`][]
    always, [`parallel_dynamics.KalmanSmoother`][] and
    [`parallel_dynamics.KalmanFilter`][] when given a `mesh`. A solver reports the
    sharding of its linear solver as `solver.time_sharding` (`None` when its time axis
    is not sharded), and [`parallel_dynamics.solve`][], the default
    [`parallel_dynamics.ImplicitAdjoint`][] and [`parallel_dynamics.diffeqsolve`][]
    follow it: the gradients are solved on the same mesh axis, and the failure checks
    of `throw=True` run without gathering the trajectory.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn
        from jax.sharding import AxisType

        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("time",), axis_types=(AxisType.Auto,))
        solver = pdyn.DEER(linear_solver=pdyn.ShardedScan(mesh))
        sharding = solver.time_sharding  # pdyn.TimeSharding(mesh, "time")
        xs = sharding.shard(jnp.zeros((8 * n, 3)))
        assert pdyn.DEER().time_sharding is None
        ```
    """

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True, default="time")

    def __check_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(
                f"`mesh` must be a `jax.sharding.Mesh`, got {type(self.mesh).__name__}."
            )
        axis_name = self.axis_name
        if axis_name not in self.mesh.axis_names:
            raise ValueError(
                f"`axis_name={axis_name!r}` is not an axis of the mesh, whose "
                f"axes are {self.mesh.axis_names}."
            )
        axis_type = dict(zip(self.mesh.axis_names, self.mesh.axis_types))
        if axis_type[axis_name] == AxisType.Explicit:
            raise ValueError(
                f"The mesh axis {axis_name!r} is `AxisType.Explicit` (the default "
                "of `jax.make_mesh`), whose sharding-in-types rules the solvers do not "
                "support yet. Build the mesh with `axis_types=(AxisType.Auto,)`, e.g. "
                f"`jax.make_mesh((n,), ({axis_name!r},), "
                "axis_types=(jax.sharding.AxisType.Auto,))`."
            )

    @property
    def num_devices(self) -> int:
        """The number of devices $P$ along `axis_name`."""
        return self.mesh.shape[self.axis_name]

    def shard(self, x: PyTree) -> PyTree:
        """Lays out every array of the PyTree `x` sharded along its leading (time)
        axis, as [`parallel_dynamics.internal.shard_time`][] does."""
        return shard_time(x, self.mesh, self.axis_name)


# The arguments `mesh` and `axis_name`, as every sharded solver documents them.
MESH_ARGUMENTS = """- `mesh`: a `jax.sharding.Mesh` whose axis `axis_name` is `AxisType.Auto`, e.g.
    `jax.make_mesh((4,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))`.
- `axis_name`: the mesh axis that the time axis is sharded over (default `"time"`).
    Other mesh axes, if any, are left to the caller (e.g. a batch axis under
    `jax.vmap`).
"""

TimeSharding.__init__.__doc__ = f"""**Arguments:**

{MESH_ARGUMENTS}
Raises `TypeError` if `mesh` is not a `jax.sharding.Mesh`, and `ValueError` if
`axis_name` is not one of its axes or is an `AxisType.Explicit` axis.
"""


def pad_time(x: PyTree, pad: int, fill: float = 0) -> PyTree:
    """Every array of `x` with `pad` steps of value `fill` appended to its leading
    (time) axis."""
    if pad == 0:
        return x

    def _pad(leaf):
        padding = jnp.full((pad,) + leaf.shape[1:], fill, leaf.dtype)
        return jnp.concatenate([leaf, padding], axis=0)

    return jax.tree.map(_pad, x)


def time_padding(sharding: TimeSharding, length: int) -> int:
    """The number of steps that pad a time axis of `length` steps to a multiple of
    the number of devices of `sharding`."""
    return (-length) % sharding.num_devices


def shard_map_time(body: Callable, sharding: TimeSharding, num_args: int) -> Callable:
    """`body`, run by `jax.shard_map` on every device's chunk of its `num_args`
    arguments and of its output, all sharded along time."""
    spec = PartitionSpec(sharding.axis_name)
    # `check_vma=False`: the local scans start their carries from unsharded zeros,
    # which the varying-manual-axes check would reject.
    return jax.shard_map(
        body,
        mesh=sharding.mesh,
        in_specs=(spec,) * num_args,
        out_specs=spec,
        check_vma=False,
    )
