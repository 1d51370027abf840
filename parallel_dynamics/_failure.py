"""Run-time failures: `throw=True` of [`parallel_dynamics.solve`][] and
[`parallel_dynamics.diffeqsolve`][]."""

from collections.abc import Callable, Sequence

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, PyTree

from ._linear_solver.sharding import TimeSharding


def _failure_token(
    result: eqxi.Enumeration,
    is_okay: Callable[[eqxi.Enumeration], Bool[Array, ""]],
    messages: Sequence[tuple[eqxi.Enumeration, str]],
) -> Array:
    """A scalar zero that raises (at run time) if `result` is a failure: with the
    message paired with its code in `messages`, else with the code's own message.

    Floating point, so that with `EQX_ON_ERROR=nan` the token, and through it the
    solution, becomes NaN as `equinox.error_if` on the solution would make it."""
    token = jnp.zeros((), jnp.float32)
    for code, message in messages:
        token = eqx.error_if(token, result == code, message)
    return result.error_if(token, jnp.invert(is_okay(result)))


def _checked_token(result, failure_token: Callable, mesh: Mesh | None) -> Array:
    """`failure_token(result)`: a scalar zero that raises (at run time) if `result`
    is a failure. With a `mesh` it is computed on every device of the mesh (inside
    `jax.shard_map`, where callbacks are per device), so no device waits for a token
    broadcast from a device whose callback raised."""
    if mesh is None or mesh.size == 1:
        return failure_token(result)

    def check(value):
        return failure_token(eqx.tree_at(lambda r: r._value, result, value))

    return jax.shard_map(
        check,
        mesh=mesh,
        in_specs=PartitionSpec(),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(result._value)  # pyright: ignore


def raise_on_failure(
    tree: PyTree,
    result: eqxi.Enumeration,
    is_okay: Callable[[eqxi.Enumeration], Bool[Array, ""]],
    messages: Sequence[tuple[eqxi.Enumeration, str]],
    sharding: TimeSharding | None = None,
) -> PyTree:
    """Raises (at run time) if `result` is a failure, and returns `tree` tied to the
    check.

    **Arguments:**

    - `tree`: what the solve returns (the trajectory, or the whole solution).
    - `result`: an `optimistix.RESULTS` or `diffrax.RESULTS`.
    - `is_okay`: whether `result` is a success.
    - `messages`: `(code, message)` pairs: the error raised for each code, which
        says what happened and what to try. Other failures raise with the message of
        their code.
    - `sharding`: the [`parallel_dynamics.TimeSharding`][] of a sharded solver, or
        `None`.

    **Returns:**

    `tree`, whose floating-point arrays are tied to the checks (integer arrays, such
    as a result code, are left as they are).

    The checks run on a scalar token computed from `result` alone, and every
    floating-point array of `tree` is tied to the token by an elementwise select that
    always picks the array (a scalar broadcast, which XLA cannot drop as the token
    comes out of the host callback of `equinox.error_if`): nothing that uses `tree`
    can run before the checks. Unlike `equinox.error_if` on the whole solution, whose
    host callback on one device would take the trajectory as an operand, this keeps
    the arrays in the layout they were computed in, e.g. sharded along time across
    devices. With `EQX_ON_ERROR=nan` a failure makes them NaN.

    With the `sharding` of a sharded solver the check runs on every device of its mesh
    (inside `jax.shard_map`, where callbacks are per device), so no device waits for
    a token broadcast from a device whose callback raised.
    """
    mesh = None if sharding is None else sharding.mesh
    token = _checked_token(result, lambda r: _failure_token(r, is_okay, messages), mesh)
    ok = token == 0

    def tie(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(ok, x, jnp.nan)
        return x

    return jtu.tree_map(tie, tree)
