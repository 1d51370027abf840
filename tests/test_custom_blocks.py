"""A block structure defined outside the library works with every solver: the scans,
the sharded scan, the Kalman smoother and filter, and gradients."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
from jax.sharding import AxisType

import parallel_dynamics as pdyn

from .helpers import tree_allclose


T, D = 24, 3


class ScaledIdentityBlocks(pdyn.AbstractBlocks):
    """$A_t = s_t I$: only the four required methods."""

    scale: jax.Array  # (*batch,)
    size: int = eqx.field(static=True)

    def apply(self, vector):
        return self.scale[..., None] * vector

    def compose(self, earlier):
        assert isinstance(earlier, ScaledIdentityBlocks)
        return ScaledIdentityBlocks(self.scale * earlier.scale, self.size)

    def transpose(self):
        return self

    def as_matrices(self):
        eye = jnp.eye(self.size, dtype=self.scale.dtype)
        return self.scale[..., None, None] * eye


class MeanDiagonalJacobian(pdyn.AbstractJacobian):
    """$A_t$ = the mean of the diagonal of $J_t$ times the identity, for elementwise
    steps (one Jacobian-vector product with a vector of ones)."""

    def linearise(self, recurrence, previous, iteration):
        del iteration

        def fn(y, x):
            step = lambda _y: recurrence.step_at(_y, x)
            return jax.jvp(step, (y,), (jnp.ones_like(y),))

        values, diagonal = recurrence.map_steps(fn, previous)
        return values, ScaledIdentityBlocks(jnp.mean(diagonal, axis=-1), D)


def _step(y, x, args):
    return jnp.tanh(args * y + x)


def _reference(y0, xs, args):
    def body(y, x):
        y = _step(y, x, args)
        return y, y

    return lax.scan(body, y0, xs)[1]


_mesh = jax.make_mesh((1,), ("time",), axis_types=(AxisType.Auto,))
_options = dict(rtol=1e-10, atol=1e-10, jacobian=MeanDiagonalJacobian())
_SOLVERS = {
    "parallel": pdyn.Newton(linear_solver=pdyn.ParallelScan(), **_options),
    "chunked": pdyn.Newton(linear_solver=pdyn.ChunkedScan(5), **_options),
    "sharded": pdyn.Newton(linear_solver=pdyn.ShardedScan(_mesh), **_options),
    "smoother": pdyn.LevenbergMarquardt(
        linear_solver=pdyn.KalmanSmoother(parallel=True), **_options
    ),
    "filter": pdyn.LevenbergMarquardt(
        linear_solver=pdyn.KalmanFilter(parallel=False), **_options
    ),
    "sharded_smoother": pdyn.LevenbergMarquardt(
        linear_solver=pdyn.KalmanSmoother(mesh=_mesh), **_options
    ),
}


def _problem():
    key_y, key_x = jr.split(jr.key(0))
    y0 = jr.normal(key_y, (D,))
    xs = 0.5 * jr.normal(key_x, (T, D))
    return y0, xs, jnp.asarray(0.7)


@pytest.mark.parametrize("name", list(_SOLVERS))
def test_custom_blocks_solve_and_gradient(name):
    solver = _SOLVERS[name]
    y0, xs, args = _problem()

    @jax.jit
    def loss(y0, xs, args):
        sol = pdyn.solve(_step, solver, y0, xs, args)
        return jnp.sum(sol.value**2), sol.value

    @jax.jit
    def reference_loss(y0, xs, args):
        value = _reference(y0, xs, args)
        return jnp.sum(value**2), value

    (_, value), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        y0, xs, args
    )
    (_, expected), expected_grads = jax.value_and_grad(
        reference_loss, argnums=(0, 1, 2), has_aux=True
    )(y0, xs, args)
    assert tree_allclose(value, expected, rtol=1e-8, atol=1e-8)
    assert tree_allclose(grads, expected_grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_custom_blocks_scans_match_dense(reverse):
    scale = jr.uniform(jr.key(1), (T,), minval=-1.2, maxval=1.2)
    offsets = jr.normal(jr.key(2), (T, D))
    custom = ScaledIdentityBlocks(scale, D)
    dense = pdyn.DenseBlocks(custom.as_matrices())
    expected = pdyn.internal.sequential_scan(dense, offsets, reverse=reverse)
    for scan in (
        pdyn.internal.parallel_scan,
        pdyn.internal.sequential_scan,
        pdyn.internal.chunked_scan,
    ):
        out = scan(custom, offsets, reverse=reverse)
        assert tree_allclose(out, expected, rtol=1e-10, atol=1e-10)
    out = pdyn.internal.sharded_scan(custom, offsets, mesh=_mesh, reverse=reverse)
    assert tree_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("smooth", [True, False])
def test_custom_blocks_kalman_matches_dense(smooth):
    scale = jr.uniform(jr.key(3), (T,), minval=-1.5, maxval=1.5)
    offsets = jr.normal(jr.key(4), (T, D))
    observations = jr.normal(jr.key(5), (T, D))
    custom = ScaledIdentityBlocks(scale, D)
    dense = pdyn.DenseBlocks(custom.as_matrices())
    expected = pdyn.internal.kalman_smooth(
        dense, offsets, observations, 0.3, parallel=False, smooth=smooth
    )
    for kwargs in ({"parallel": True}, {"parallel": False}, {"mesh": _mesh}):
        out = pdyn.internal.kalman_smooth(
            custom, offsets, observations, 0.3, smooth=smooth, **kwargs
        )
        assert tree_allclose(out, expected, rtol=1e-10, atol=1e-10)
