"""The recurrence bound to its data, in the flat `(T, D)` layout the solvers work in."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Inexact, PyTree

from ._operator import shift_forward


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

    def map_steps(self, fn: Callable, *arrays: Array) -> PyTree:
        """`vmap`s `fn(*arrays_t, x_t)` over time."""
        if self.inputs is None:
            return jax.vmap(lambda *a: fn(*a, None))(*arrays)
        return jax.vmap(fn)(*arrays, self.inputs)

    def previous(self, trajectory: Inexact[Array, "T D"]) -> Inexact[Array, "T D"]:
        """$(y_0, y_1, \\dots, y_{T-1})$."""
        return shift_forward(trajectory).at[0].set(self.y0)

    def evaluate(self, previous: Inexact[Array, "T D"]) -> Inexact[Array, "T D"]:
        """$f(y_{t-1}, x_t)$ for every $t$, in one `vmap`."""
        return self.map_steps(self.step_at, previous)

    def residual(self, trajectory: Inexact[Array, "T D"]) -> Inexact[Array, "T D"]:
        """$F(Y)_t = y_t - f(y_{t-1}, x_t)$."""
        return trajectory - self.evaluate(self.previous(trajectory))

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
