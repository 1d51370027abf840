"""The recurrence bound to its data, in the flat `(T, D)` layout the solvers work in."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Inexact, PyTree


# Intermediates of one step, in multiples of the state size D (a GRU has about 10).
STEP_WIDTH = 16
# Work buffer of the passes that evaluate the step (values, Jacobian-vector products)
# over all T: beyond this many intermediate entries they run in batches of time steps.
# Batching costs a loop (a GRU at D = 64, T = 10^4 measured 1.2 passes unbatched and
# 1.8 in batches of 2^22 entries), so this is larger than the Jacobians' buffer; at
# T = 10^6, D = 64 it keeps the step's (T, 3D) intermediates out of memory.
MAX_STEP_ENTRIES = 2**24


def map_in_batches(
    fn: Callable, arrays: tuple[Array, ...], inputs: PyTree | None, batch_size: int
) -> PyTree:
    """`fn(*arrays_t, x_t)` for every $t$, `vmap`ped over batches of `batch_size`
    time steps inside a `fori_loop`.

    Every batch is sliced out of the `(T, ...)` arrays and inputs with
    `dynamic_slice` and written into preallocated `(T, ...)` outputs with
    `dynamic_update_slice`, which XLA does in place: nothing of size $T$ is
    allocated besides the outputs. (`jax.lax.map` with `batch_size` instead copies
    every argument into a `(T / B, B, ...)` layout and its outputs back, a few extra
    `(T, D)` arrays.) When `batch_size` does not divide $T$ the last batch is
    `[T - B, T)`, overlapping its predecessor: those steps are evaluated twice, with
    the same values.
    """
    length = arrays[0].shape[0]
    batch_size = min(batch_size, length)
    num_batches = -(-length // batch_size)

    def batch(start):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch_size, axis=0)
        sliced = [cut(a) for a in arrays]
        if inputs is None:
            return jax.vmap(lambda *a: fn(*a, None))(*sliced)
        return jax.vmap(fn)(*sliced, jtu.tree_map(cut, inputs))

    out_struct = jax.eval_shape(batch, 0)
    init = jtu.tree_map(
        lambda s: jnp.zeros((length,) + s.shape[1:], s.dtype), out_struct
    )

    def body(i, out):
        start = jnp.minimum(i * batch_size, length - batch_size)
        values = batch(start)
        return jtu.tree_map(
            lambda o, v: jax.lax.dynamic_update_slice_in_dim(o, v, start, axis=0),
            out,
            values,
        )

    return jax.lax.fori_loop(0, num_batches, body, init)


class StateLayout(eqx.Module):
    """How one state PyTree is flattened to a vector of size $D$ and back.

    All leaves are cast to one floating dtype (the result type of the leaves) in the
    flat layout and cast back when unflattened.
    """

    treedef: jtu.PyTreeDef = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtypes: tuple[np.dtype, ...] = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    @staticmethod
    def of(tree: PyTree) -> "StateLayout":
        leaves, treedef = jtu.tree_flatten(tree)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        dtypes = tuple(np.dtype(leaf.dtype) for leaf in leaves)
        dtype = np.dtype(jnp.result_type(*dtypes))
        return StateLayout(treedef, shapes, dtypes, dtype)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, tree: PyTree[Array]) -> Inexact[Array, " D"]:
        leaves = jtu.tree_leaves(tree)
        if len(leaves) == 0:
            return jnp.zeros((0,), self.dtype)
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def unflatten(self, flat: Inexact[Array, " D"]) -> PyTree[Array]:
        leaves = []
        start = 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            stop = start + math.prod(shape)
            leaves.append(flat[start:stop].reshape(shape).astype(dtype))
            start = stop
        return jtu.tree_unflatten(self.treedef, leaves)

    def flatten_trajectory(self, tree: PyTree[Array]) -> Inexact[Array, "T D"]:
        return jax.vmap(self.flatten)(tree)

    def unflatten_trajectory(self, flat: Inexact[Array, "T D"]) -> PyTree[Array]:
        return jax.vmap(self.unflatten)(flat)


class Recurrence(eqx.Module):
    """A recurrence $y_t = f(y_{t-1}, x_t, \\theta)$ with its data, flattened.

    This is what [`parallel_dynamics.solve`][] hands its solvers as the `args` of the
    residual. It holds the step (closure-converted, so that every array it closes over
    is a differentiable leaf), the initial state $y_0$ as a flat vector, the inputs
    $x_1, \\dots, x_T$ (or `None`) and the step's `args` $\\theta$.
    """

    step: Callable
    layout: StateLayout
    y0: Inexact[Array, " D"]
    inputs: PyTree[Array] | None
    args: PyTree
    length: int = eqx.field(static=True)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    def flat_step(self, y_prev: Array, x: PyTree, args: PyTree | None = None) -> Array:
        """$f$ on flat states."""
        args = self.args if args is None else args
        out = self.step(self.layout.unflatten(y_prev), x, args)
        return self.layout.flatten(out)

    def step_at(self, y_prev: Array, x: PyTree) -> Array:
        return self.flat_step(y_prev, x)

    def map_steps(
        self,
        fn: Callable,
        *arrays: Array,
        entries_per_step: int | None = None,
        budget: int | None = None,
    ) -> PyTree:
        """`vmap`s `fn(*arrays_t, x_t)` over time.

        With `entries_per_step` (an estimate of the entries one call of `fn`
        materialises) and `budget`, a `vmap` over all $T$ steps that would
        materialise more than `budget` entries is replaced by a loop over batches of
        `budget // entries_per_step` steps (see `map_in_batches`).
        """
        length = arrays[0].shape[0]
        if (
            entries_per_step is not None
            and budget is not None
            and length * entries_per_step > budget
        ):
            batch_size = max(1, budget // entries_per_step)
            return map_in_batches(fn, arrays, self.inputs, batch_size)
        if self.inputs is None:
            return jax.vmap(lambda *a: fn(*a, None))(*arrays)
        return jax.vmap(fn)(*arrays, self.inputs)

    def step_width(self) -> int:
        """An estimate of the entries one step evaluation (or one JVP) materialises:
        the intermediates of a step (gates, hidden layers) are typically a few times
        wider than the state."""
        return STEP_WIDTH * self.size

    def previous(self, trajectory: Inexact[Array, "T D"]) -> Inexact[Array, "T D"]:
        """$(y_0, y_1, \\dots, y_{T-1})$."""
        # Not `shift_forward(trajectory).at[0].set(y0)`: on a trajectory sharded along
        # time, XLA:CPU (jax 0.10.2, emulated devices) compiled that to zeros at the
        # first step of every shard but the first for D = 1, 2, 3, 5 (not 4 or 8).
        y0 = self.y0.astype(trajectory.dtype)[None]
        return jnp.concatenate([y0, trajectory[:-1]], axis=0)

    def evaluate(self, previous: Inexact[Array, "T D"]) -> Inexact[Array, "T D"]:
        """$f(y_{t-1}, x_t)$ for every $t$, in one `vmap`."""
        return self.map_steps(self.step_at, previous)

    def residual(
        self, trajectory: Inexact[Array, "T D"], *, bounded: bool = False
    ) -> Inexact[Array, "T D"]:
        """$F(Y)_t = y_t - f(y_{t-1}, x_t)$.

        With `bounded=True` the steps are evaluated in batches of time steps when one
        `vmap` over all of them would materialise more than `MAX_STEP_ENTRIES`
        intermediates (a GRU at $T = 10^6$, $D = 64$ has gigabytes of them), each
        batch writing its residuals straight into the output. For the verification
        passes (the final residual, the check of exhausted solves); the residual that
        is differentiated stays one `vmap`.
        """
        previous = self.previous(trajectory)
        if not bounded:
            return trajectory - self.evaluate(previous)
        return self.map_steps(
            lambda y, y_prev, x: y - self.step_at(y_prev, x),
            trajectory,
            previous,
            entries_per_step=self.step_width(),
            budget=MAX_STEP_ENTRIES,
        )

    def sequential(self) -> Inexact[Array, "T D"]:
        """The exact trajectory by `lax.scan`."""

        def body(y, x):
            new = self.step_at(y, x)
            return new, new

        if self.inputs is None:
            _, out = jax.lax.scan(
                lambda y, _: body(y, None), self.y0, length=self.length
            )
        else:
            _, out = jax.lax.scan(body, self.y0, self.inputs)
        return out


def recurrence_residual(trajectory: Array, recurrence: Recurrence) -> Array:
    """The residual function handed to Optimistix: `fn(y, args)` with the
    [`parallel_dynamics.Recurrence`][] as `args`."""
    return recurrence.residual(trajectory)
