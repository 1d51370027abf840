"""The step grid: the step times of a fixed-step solve, as Diffrax computes them.

Diffrax normalises time to run forwards (`t -> t * direction`) and computes the step
times inside its loop. The same expressions are evaluated here, in NumPy when the
times are concrete (so that no JAX operation is dispatched or compiled for them, and
argument errors are raised at once), or in JAX when they are traced (only possible
with `StepTo`, whose number of steps is the static length of `ts`).
"""

from typing import Any

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


def _is_subsaveat(x) -> bool:
    return isinstance(x, dfx.SubSaveAt)


def _time_dtype(t0, t1, dt0, saveat: dfx.SaveAt):
    timelikes = [t0, t1, dt0] + [
        s.ts for s in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)
    ]
    timelikes = [x for x in timelikes if x is not None]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*timelikes)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError("`t0`, `t1`, `dt0` and `SaveAt(ts=...)` cannot be complex.")
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        dtype = jnp.result_type(float)  # the default floating dtype, as Diffrax
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"Unrecognised time dtype {dtype}.")
    return np.dtype(dtype)


def _as_time(x, dtype):
    """`x` as a NumPy array of `dtype` when it is concrete, else as a JAX array."""
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, dtype)
    return np.asarray(x).astype(dtype)


def _is_numpy(*xs) -> bool:
    return all(isinstance(x, (np.ndarray, np.generic)) for x in xs)


_CONCRETE_GRID = (
    "the number of steps of the grid from `dt0`, and so the length of the "
    "trajectory, must be known when tracing. Pass `t0`, `t1` and `dt0` as Python or "
    "NumPy numbers (e.g. mark them static), or pass the step times with "
    "`stepsize_controller=diffrax.StepTo(ts)`, whose values may be traced."
)


def _prevbefore(x):
    """The floating point number before `x` (as `equinox.internal.prevbefore`)."""
    if _is_numpy(x):
        before = np.nextafter(x, np.asarray(-np.inf, x.dtype))
        return np.where(x == 0, -np.finfo(x.dtype).tiny, before).astype(x.dtype)
    return eqxi.prevbefore(x)


def _clip_to_end(tnext, t1):
    """As `diffrax.diffeqsolve`: a step ending within 100 ULP of `t1` ends at `t1`."""
    floor = t1
    for _ in range(100):
        floor = _prevbefore(floor)
    xp = np if _is_numpy(tnext, t1) else jnp
    return xp.where(tnext > floor, t1, tnext)


def _constant_grid(t0: np.ndarray, t1: np.ndarray, dt0: np.ndarray) -> np.ndarray:
    """The step times of `diffrax.ConstantStepSize`, in normalised time (`t0 < t1`,
    `dt0 > 0`, NumPy scalars of the time dtype).

    The first step ends at `t0 + dt0`; step $k \\geq 2$ at
    `t0 + (t1 - t0) * (k / N)` with `N = ceil((t1 - t0) / nextafter(dt0))`, the last
    at `t1`; a step ending within 100 ULP of `t1` ends at `t1`; the solve stops after
    the first step that reaches `t1`. These are Diffrax's expressions, evaluated in
    the same dtype, here by NumPy: XLA evaluates them inside Diffrax's loop with its
    own contractions (fused multiply-adds, reciprocals), so a step time can differ
    from Diffrax's by an ULP or two, which moves the solution by rounding only."""
    dtype = t0.dtype
    dt0_after = np.where(
        dt0 == 0, np.finfo(dtype).tiny, np.nextafter(dt0, np.asarray(np.inf, dtype))
    ).astype(dtype)
    num_steps = int(np.ceil((t1 - t0) / dt0_after))
    if num_steps >= np.iinfo(np.int32).max:
        raise ValueError(
            f"`dt0={dt0}` gives {num_steps} steps from `t0` to `t1`, more than "
            "Diffrax's int32 step counter allows."
        )
    first = np.minimum(t0 + dt0, t1)
    k = np.arange(2, max(num_steps, 1) + 2)
    later = t0 + (t1 - t0) * (k.astype(dtype) / np.asarray(num_steps, dtype))
    later = np.where(k == num_steps, t1, later).astype(dtype)
    ends = np.concatenate([first[None], _clip_to_end(later, t1)])
    count = int(np.argmax(ends >= t1)) + 1
    return np.concatenate([t0[None], ends[:count]])


def _step_to_grid(ts, t0, t1):
    """The step times of `diffrax.StepTo(ts)`, from its normalised `ts`: the first
    step ends at `min(ts[1], t1)`, later ones are clipped to `t1` within 100 ULP."""
    xp = np if _is_numpy(ts, t0, t1) else jnp
    first = xp.minimum(ts[1], t1)
    return xp.concatenate([t0[None], first[None], _clip_to_end(ts[2:], t1)])


def _check(bad, message: str):
    """Raise a `ValueError` now if `bad` is concrete, else check it at run time.
    Returns the check to apply to an output (the identity when concrete)."""
    if _is_numpy(bad):
        if np.any(bad):
            raise ValueError(message)
        return lambda x: x
    return lambda x: eqx.error_if(x, bad, message)


def _promote_state(y0: PyTree, time_dtype) -> PyTree:
    """As Diffrax: time affects the state, so the state takes the time dtype if that
    is wider (e.g. an integer or float32 `y0` with float64 times)."""

    def promote(y):
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(y, time_dtype)
        return jnp.asarray(y, dtype)

    return jtu.tree_map(promote, y0)


class _Grid(eqx.Module):
    """The step times and saving times of a solve, in normalised time."""

    t0: Any
    t1: Any
    direction: Any  # a Python int, or a traced array with traced `StepTo(ts)`
    times: Any  # t_0, ..., t_N
    saveat: dfx.SaveAt


def _make_grid(t0, t1, dt0, saveat, stepsize_controller) -> _Grid:
    dtype = _time_dtype(t0, t1, dt0, saveat)
    t0 = _as_time(t0, dtype)
    t1 = _as_time(t1, dtype)
    if t0.ndim != 0 or t1.ndim != 0:
        raise ValueError("`t0` and `t1` must be scalars.")
    checks = []

    if isinstance(stepsize_controller, dfx.ConstantStepSize):
        dt0 = _as_time(dt0, dtype)
        for name, value in (("t0", t0), ("t1", t1), ("dt0", dt0)):
            if not _is_numpy(value):
                raise ValueError(
                    f"`{name}` must be a concrete value (not traced by `jax.jit` or "
                    f"`jax.vmap`): {_CONCRETE_GRID}"
                )
        if dt0.ndim != 0:
            raise ValueError("`dt0` must be a scalar.")
        if not (np.isfinite(t0) and np.isfinite(t1)):
            raise ValueError(
                "`t0` and `t1` must be finite: a parallel-in-time solve needs the "
                "whole grid of step times before it starts."
            )
        if (t1 - t0) * dt0 < 0:
            raise ValueError(
                f"Must have (t1 - t0) * dt0 >= 0, we instead got `t1` with value {t1}, "
                f"`t0` with value {t0}, and `dt0` with value {dt0}."
            )
        if dt0 == 0 and t0 != t1:
            raise ValueError("`dt0` must be nonzero when `t0 != t1`.")
        # As Diffrax: `direction = where(t0 < t1, 1, -1)`.
        direction = 1 if t0 < t1 else -1
        if t0 == t1:
            times = (t0 * direction)[None]
        else:
            times = _constant_grid(t0 * direction, t1 * direction, dt0 * direction)
    else:  # StepTo
        ts = _as_time(stepsize_controller.ts, dtype)
        if _is_numpy(t0, t1):
            direction = 1 if t0 < t1 else -1
        else:
            direction = jnp.where(t0 < t1, 1, -1)
        ts = ts * direction
        checks.append(
            _check(
                ts[1:] <= ts[:-1],
                "`StepTo(ts=...)` must be strictly increasing (or strictly decreasing "
                "if t0 > t1).",
            )
        )
        checks.append(
            _check(
                (t0 * direction != ts[0]) | (t1 * direction != ts[-1]),
                "Must have `t0==ts[0]` and `t1==ts[-1]`.",
            )
        )
        times = _step_to_grid(ts, t0 * direction, t1 * direction)

    def normalise_saveat_ts(ts):
        ts = _as_time(ts, dtype) * direction
        checks.append(
            _check(ts[1:] < ts[:-1], "saveat.ts must be increasing or decreasing.")
        )
        checks.append(
            _check(
                (ts > t1 * direction) | (ts < t0 * direction),
                "saveat.ts must lie between t0 and t1.",
            )
        )
        return ts

    def saveat_ts(saveat):
        out = [s.ts for s in jtu.tree_leaves(saveat.subs, is_leaf=_is_subsaveat)]
        return [x for x in out if x is not None]

    saveat = eqx.tree_at(saveat_ts, saveat, replace_fn=normalise_saveat_ts)
    for check in checks:
        times = check(times)
    return _Grid(t0, t1, direction, times, saveat)
