"""Checks of arguments: solver options at construction, and the arguments of
[`parallel_dynamics.solve`][] and [`parallel_dynamics.lyapunov_exponent`][] when they
are traced."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


def check_count(name: str, value, *, optional: bool = False) -> None:
    """Raises unless `value` is an integer of at least 1 (or `None`, if `optional`):
    a `TypeError` for the wrong type (bools and floats included, which would otherwise
    reach shapes or loop bounds), a `ValueError` for a value below 1."""
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}.")


def static_int(name: str, value) -> int | None:
    """`value` as a Python int (or `None`); NumPy and concrete JAX integer scalars are
    accepted, traced values are not (the value fixes shapes or the iteration limit)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a Python int, got the bool {value!r}.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a static Python int, got a traced value ({value}). "
            "Inside `jax.jit`, compute it from shapes or mark it static."
        )
    if (
        eqx.is_array(value)
        and jnp.ndim(value) == 0
        and jnp.issubdtype(jnp.result_type(value), jnp.integer)
    ):
        return int(value)
    raise TypeError(f"`{name}` must be a Python int, got {value!r}.")


def check_state(y0: PyTree) -> None:
    """Raises unless `y0` is a non-empty PyTree of real floating arrays of at least
    32 bits."""
    leaves = jtu.tree_leaves(y0)
    if len(leaves) == 0:
        raise ValueError("`y0` must contain at least one array.")
    for path, leaf in jtu.tree_leaves_with_path(y0):
        where = jtu.keystr(path) or "(the root)"
        if not eqx.is_array(leaf):
            raise TypeError(
                f"Every leaf of `y0` must be a JAX or NumPy array; the leaf at {where} "
                f"is a {type(leaf).__name__}. Wrap scalars with `jnp.asarray`."
            )
        dtype = leaf.dtype
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"Complex states are not supported: the leaf of `y0` at {where} has "
                f"dtype {dtype}. Split it into real and imaginary parts."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Every leaf of `y0` must have a floating dtype; the leaf at {where} "
                f"has dtype {dtype}."
            )
        if jnp.finfo(dtype).bits < 32:
            raise TypeError(
                f"Half-precision states are not supported: the leaf of `y0` at {where} "
                f"has dtype {dtype}. The default tolerances and the scans need at "
                "least float32: solve in float32 and cast the result."
            )


def describe(struct: PyTree) -> str:
    return str(jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", struct))


def check_step_output(out_struct: PyTree, y0: PyTree, *, dtypes: bool = True) -> None:
    """Raises unless `out_struct` (the output of `step`, from `jax.eval_shape`) has the
    structure and shapes of `y0`, and with `dtypes` its dtypes too."""
    for path, leaf in jtu.tree_leaves_with_path(out_struct):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            where = jtu.keystr(path) or "(the root)"
            raise TypeError(
                "`step` must return a PyTree of arrays with the structure, shapes and "
                f"dtypes of `y0`; the leaf at {where} of its output is a "
                f"{type(leaf).__name__} ({leaf!r}). Wrap constants with `jnp.asarray` "
                "and the dtype of `y0`."
            )
    y0_struct = jax.eval_shape(lambda: y0)
    if jtu.tree_structure(out_struct) != jtu.tree_structure(y0_struct):
        raise ValueError(
            "`step` must return a PyTree with the structure of `y0`; got "
            f"{describe(out_struct)} for `y0` = {describe(y0_struct)}."
        )
    for out, ref in zip(jtu.tree_leaves(out_struct), jtu.tree_leaves(y0_struct)):
        if out.shape != ref.shape:
            raise ValueError(
                "`step` must return arrays with the shapes of `y0`; got "
                f"{describe(out_struct)} for `y0` = {describe(y0_struct)}."
            )
        if dtypes and out.dtype != ref.dtype:
            raise TypeError(
                "`step` must return arrays with the dtypes of `y0` (a float32 state "
                "must stay float32, also under `jax_enable_x64`); got "
                f"{describe(out_struct)} for `y0` = {describe(y0_struct)}."
            )
