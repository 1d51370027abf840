"""Regression tests from a review of the linear algebra layer: the block bidiagonal
operator and its scan solvers used directly through `lineax.linear_solve`."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import parallel_dynamics as pdyn


LENGTH, SIZE = 7, 2


def _dense_solve(operator, b):
    return jnp.linalg.solve(operator.as_matrix(), b.reshape(-1)).reshape(b.shape)


@pytest.mark.parametrize("preconditioner", ["exact", "none"])
def test_iterative_scan_solves_an_upper_operator(preconditioner):
    # `IterativeScan.init` on a transposed (upper) `BlockBidiagonalOperator` unpacked
    # its own 3-tuple state as `(state, options)` and raised a ValueError.
    blocks = pdyn.DenseBlocks(0.6 * jr.normal(jr.key(0), (LENGTH, SIZE, SIZE)))
    upper = pdyn.BlockBidiagonalOperator(blocks).T
    b = jr.normal(jr.key(1), (LENGTH, SIZE))
    solver = pdyn.IterativeScan(preconditioner=preconditioner)
    sol = lx.linear_solve(upper, b, solver)
    np.testing.assert_allclose(sol.value, _dense_solve(upper, b), rtol=1e-10)
    # Reverse mode transposes the solver state back to the lower solve.
    cotangent = jr.normal(jr.key(2), (LENGTH, SIZE))
    _, vjp = jax.vjp(lambda b: lx.linear_solve(upper, b, solver).value, b)
    (got,) = vjp(cotangent)
    expected = _dense_solve(upper.T, cotangent)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
