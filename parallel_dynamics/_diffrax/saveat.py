"""SaveAt and interpolation: the values a solve saves, as `diffrax.diffeqsolve` saves
them, from the trajectory at the step times and the solver's dense output between
them."""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .grid import _Grid, _is_subsaveat
from .step import DiffraxStep


class _Saved(eqx.Module):
    ts: Array
    ys: PyTree[Array]


def interpolate(
    step: DiffraxStep, grid: _Grid, y0: PyTree, infos_at: Callable, ts: Array
) -> PyTree:
    """Values at the (normalised) times `ts` by the solver's dense output, from the
    step that Diffrax saves them in: the first whose end is >= t. `infos_at(indices)`
    is the dense information of the steps with the given indices."""
    grid = grid.times
    num_steps = grid.shape[0] - 1
    tnext = grid[1:]
    if num_steps == 0:
        return jtu.tree_map(lambda y: jnp.broadcast_to(y, ts.shape + y.shape), y0)
    indices = jnp.clip(
        jnp.searchsorted(tnext, ts, side="left"), 0, num_steps - 1
    ).astype(jnp.int32)
    infos = infos_at(indices)

    def evaluate(t, a, b, info):
        return step.solver.interpolation_cls(t0=a, t1=b, **info).evaluate(t)

    return jax.vmap(evaluate)(ts, grid[indices], grid[indices + 1], infos)


def save(
    grid: _Grid, y0: PyTree, trajectory: PyTree, args: PyTree, interpolate: Callable
) -> tuple[PyTree, PyTree]:
    """`(ts, ys)` as `diffrax.diffeqsolve` saves them with `grid.saveat`, from the
    `trajectory` $y_1, \\dots, y_N$ at the step times and `interpolate(ts)`, the
    values at (normalised) times between them."""
    direction = grid.direction
    t0, saveat = grid.t0, grid.saveat
    grid = grid.times
    num_steps = grid.shape[0] - 1
    tnext = grid[1:]

    def save_sub(sub: dfx.SubSaveAt):
        times = []
        values = []
        if sub.t0:
            times.append(t0[None] * direction)
            values.append(jtu.tree_map(lambda y: y[None], y0))
        middle_times = []
        middle_values = []
        middle_keys = []
        if sub.ts is not None:
            ts = sub.ts
            if num_steps == 0:
                middle_times.append(jnp.full_like(ts, t0 * direction))
            else:
                middle_times.append(ts)
            middle_values.append(interpolate(ts))
            # Saved during step j, before that step's own `steps` save.
            middle_keys.append(
                2 * jnp.clip(jnp.searchsorted(tnext, ts, side="left"), 0, num_steps - 1)
            )
        if sub.steps:
            saved = np.arange(sub.steps, num_steps + 1, sub.steps)
            middle_times.append(grid[saved])
            if sub.steps == 1:
                # Every state: the trajectory itself (no gather, so a trajectory
                # sharded along time stays sharded).
                middle_values.append(trajectory)
            else:
                middle_values.append(jtu.tree_map(lambda y: y[saved - 1], trajectory))
            middle_keys.append(jnp.asarray(2 * (saved - 1) + 1))
        if len(middle_times) == 2:
            order = jnp.argsort(jnp.concatenate(middle_keys), stable=True)
            middle_times = [jnp.concatenate(middle_times)[order]]
            middle_values = [
                jtu.tree_map(
                    lambda a, b: jnp.concatenate([a, b])[order], *middle_values
                )
            ]
        times += middle_times
        values += middle_values
        t1_via_steps = sub.steps != 0 and num_steps % sub.steps == 0
        if sub.t1 and not t1_via_steps:
            times.append(grid[-1:])
            values.append(
                jtu.tree_map(
                    lambda y_0, ys: jnp.concatenate([y_0[None], ys])[-1:],
                    y0,
                    trajectory,
                )
            )
        times = jnp.concatenate(times)
        values = jtu.tree_map(lambda *v: jnp.concatenate(v), *values)
        values = jax.vmap(lambda t, y: sub.fn(t * direction, y, args))(times, values)
        return _Saved(times * direction, values)

    saved = jtu.tree_map(save_sub, saveat.subs, is_leaf=_is_subsaveat)
    is_saved = lambda x: isinstance(x, _Saved)
    ts = jtu.tree_map(lambda s: s.ts, saved, is_leaf=is_saved)
    ys = jtu.tree_map(lambda s: s.ys, saved, is_leaf=is_saved)
    return ts, ys


def dense_interpolation(
    step: DiffraxStep, grid: _Grid, y0: PyTree, args: PyTree, all_infos: PyTree | None
) -> dfx.DenseInterpolation:
    """The `diffrax.DenseInterpolation` of `SaveAt(dense=True)`, from the dense
    information `all_infos` of every step (`None` when there are no steps)."""
    direction = grid.direction
    t0 = grid.t0
    grid = grid.times
    num_steps = grid.shape[0] - 1
    if num_steps == 0:
        x = jtu.tree_map(
            lambda u: u[0], step.inputs(grid[jnp.array([0, 0])] * direction)
        )
        info_struct = eqx.filter_eval_shape(lambda: step.full_step(y0, x, args)[1])
        # Diffrax's interpolation reads one (unused) interval even when there is
        # none.
        all_infos = jtu.tree_map(
            lambda s: jnp.zeros((1,) + s.shape, s.dtype), info_struct
        )
    return dfx.DenseInterpolation(
        ts=grid if num_steps else jnp.concatenate([grid, grid]),
        ts_size=num_steps + 1,
        infos=all_infos,
        interpolation_cls=step.solver.interpolation_cls,
        direction=direction,
        t0_if_trivial=t0 * direction,
        y0_if_trivial=y0,
    )
