"""Time slices (multiple shooting): $m$ fine steps grouped into one step map.

The step map of a slice, $\\Psi_j = \\Phi_{jm + m - 1} \\circ \\dots \\circ \\Phi_{jm}$,
runs its $m$ fine steps sequentially; the values $y_m, y_{2m}, \\dots$ at the ends of
the slices are the trajectory of a recurrence with $\\lceil N / m \\rceil$ steps,
solved in parallel by the same solvers, and the states inside the slices follow from
one more sequential pass of $m$ steps in every slice, all slices at once.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


class SliceStep(eqx.Module):
    """The step map of a time slice: `step` applied $m$ times, sequentially.

    Its input is `(inputs, active)`: the inputs of the slice's $m$ fine steps (a
    leading axis $m$) and a boolean mask; an inactive step leaves the state as it is
    (the last slice of a grid that $m$ does not divide is padded with inactive
    steps)."""

    step: eqx.Module

    def __call__(self, y: PyTree, x: tuple, args: PyTree) -> PyTree:
        inputs, active = x

        def body(y, xa):
            x_n, is_active = xa
            y_next = self.step(y, x_n, args)
            y_next = jtu.tree_map(lambda a, b: jnp.where(is_active, a, b), y_next, y)
            return y_next, None

        return lax.scan(body, y, (inputs, active))[0]

    def every_state(self, y: PyTree, x: tuple, args: PyTree) -> PyTree:
        """The $m$ states after each fine step of the slice, from `y` at its start."""
        inputs, active = x

        def body(y, xa):
            x_n, is_active = xa
            y_next = self.step(y, x_n, args)
            y_next = jtu.tree_map(lambda a, b: jnp.where(is_active, a, b), y_next, y)
            return y_next, y_next

        return lax.scan(body, y, (inputs, active))[1]


def num_slices(num_steps: int, steps_per_slice: int) -> int:
    return -(-num_steps // steps_per_slice)


def slice_inputs(inputs: PyTree[Array], num_steps: int, steps_per_slice: int) -> tuple:
    """The inputs of the $N$ fine steps as inputs of $\\lceil N/m \\rceil$ slices:
    `(inputs, active)` with leading axes `(slices, m)`; the padding repeats the last
    fine input (so that every evaluation stays finite) and is inactive."""
    slices = num_slices(num_steps, steps_per_slice)
    padded = slices * steps_per_slice
    index = np.minimum(np.arange(padded), num_steps - 1)

    def reshape(x):
        x = x[index]
        return x.reshape((slices, steps_per_slice) + x.shape[1:])

    active = jnp.asarray(np.arange(padded) < num_steps).reshape(slices, steps_per_slice)
    return jtu.tree_map(reshape, inputs), active


def slice_ends(trajectory: PyTree[Array], num_steps: int, steps_per_slice: int):
    """The states of a fine trajectory $y_1, \\dots, y_N$ at the ends of the slices."""
    slices = num_slices(num_steps, steps_per_slice)
    ends = np.minimum((np.arange(slices) + 1) * steps_per_slice, num_steps) - 1
    return jtu.tree_map(lambda y: y[ends], trajectory)


def fill_slices(
    slice_step: SliceStep,
    y0: PyTree[Array],
    ends: PyTree[Array],
    sliced_inputs: tuple,
    args: PyTree,
    num_steps: int,
) -> PyTree[Array]:
    """The fine trajectory $y_1, \\dots, y_N$ from the states at the ends of the
    slices: every slice run from its start, all slices at once."""
    starts = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b[:-1]]), y0, ends)
    states = jax.vmap(lambda y, x: slice_step.every_state(y, x, args))(
        starts, sliced_inputs
    )
    return jtu.tree_map(lambda s: s.reshape((-1,) + s.shape[2:])[:num_steps], states)
