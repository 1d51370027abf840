"""The block bidiagonal operator and its scan solvers, against dense linear algebra."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import parallel_dynamics as pdyn


LENGTH, SIZE = 13, 4


def _blocks(kind, key=0, dtype=jnp.float64):
    k = jr.key(key)
    if kind == "dense":
        return pdyn.DenseBlocks(0.6 * jr.normal(k, (LENGTH, SIZE, SIZE), dtype))
    if kind == "diagonal":
        return pdyn.DiagonalBlocks(jr.uniform(k, (LENGTH, SIZE), dtype, -1.2, 1.2))
    if kind == "block":
        return pdyn.BlockDiagonalBlocks(0.7 * jr.normal(k, (LENGTH, 2, 2, 2), dtype))
    if kind == "identity":
        return pdyn.IdentityBlocks(LENGTH, SIZE, np.dtype(dtype))
    if kind == "zero":
        return pdyn.ZeroBlocks(LENGTH, SIZE, np.dtype(dtype))
    raise ValueError(kind)


KINDS = ["dense", "diagonal", "block", "identity", "zero"]
SOLVERS = [
    pdyn.ParallelScan(),
    pdyn.SequentialScan(),
    pdyn.ChunkedScan(),
    pdyn.ChunkedScan(chunk_size=5),  # does not divide T: exercises padding
    pdyn.ChunkedScan(chunk_size=1),
]


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_match_their_matrices(kind):
    blocks = _blocks(kind)
    matrices = blocks.as_matrices()
    v = jr.normal(jr.key(1), (LENGTH, SIZE))
    np.testing.assert_allclose(
        blocks.apply(v), jnp.einsum("tij,tj->ti", matrices, v), rtol=1e-12
    )
    np.testing.assert_allclose(
        blocks.transpose().as_matrices(), jnp.swapaxes(matrices, 1, 2), rtol=1e-12
    )
    other = _blocks(kind, key=2)
    np.testing.assert_allclose(
        other.compose(blocks).as_matrices(),
        other.as_matrices() @ matrices,
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lower", [True, False])
def test_operator_mv_matches_matrix(kind, lower):
    operator = pdyn.BlockBidiagonalOperator(_blocks(kind), lower=lower)
    v = jr.normal(jr.key(3), (LENGTH, SIZE))
    matrix = operator.as_matrix()
    np.testing.assert_allclose(
        operator.mv(v).reshape(-1), matrix @ v.reshape(-1), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(operator.T.as_matrix(), matrix.T)
    # The matrix is unit lower (upper) triangular with -A_t on the sub- (super-)
    # diagonal, and A_1 never appears.
    np.testing.assert_allclose(jnp.diag(matrix), 1.0)
    triangle = jnp.triu if lower else jnp.tril
    np.testing.assert_allclose(triangle(matrix, 1 if lower else -1), 0.0)
    np.testing.assert_allclose(lx.diagonal(operator), 1.0)


def test_lineax_structure_queries():
    lower = pdyn.BlockBidiagonalOperator(_blocks("dense"))
    upper = lower.T
    assert lx.is_lower_triangular(lower) and not lx.is_upper_triangular(lower)
    assert lx.is_upper_triangular(upper) and not lx.is_lower_triangular(upper)
    assert lx.has_unit_diagonal(lower)
    assert not lx.is_symmetric(lower) and not lx.is_diagonal(lower)
    assert not lx.is_tridiagonal(lower)
    assert not lx.is_positive_semidefinite(lower)
    assert not lx.is_negative_semidefinite(lower)
    assert lx.linearise(lower) is lower and lx.materialise(lower) is lower
    decoupled = pdyn.BlockBidiagonalOperator(_blocks("zero"))
    assert lx.is_diagonal(decoupled) and lx.is_symmetric(decoupled)
    scalar = pdyn.BlockBidiagonalOperator(pdyn.DiagonalBlocks(jnp.full((5, 1), 0.5)))
    diag, low, up = lx.tridiagonal(scalar)
    np.testing.assert_allclose(diag, 1.0)
    np.testing.assert_allclose(low, -0.5)
    np.testing.assert_allclose(up, 0.0)


class _ZeroDiagonalBlocks(pdyn.AbstractBlocks):
    """Diagonal blocks that are zero by construction (a zero diagonal, stored), and
    say so through `is_zero`."""

    diagonal: jax.Array

    def apply(self, vector):
        return self.diagonal * vector

    def compose(self, earlier):
        return _ZeroDiagonalBlocks(self.diagonal * earlier.diagonal)

    def transpose(self):
        return self

    def as_matrices(self):
        return jnp.vectorize(jnp.diag, signature="(d)->(d,d)")(self.diagonal)

    def is_zero(self):
        return True


def test_structure_queries_follow_is_zero():
    assert pdyn.ZeroBlocks(LENGTH, SIZE, np.dtype("float32")).is_zero()
    for kind in KINDS:
        assert _blocks(kind).is_zero() == (kind == "zero")
    blocks = _ZeroDiagonalBlocks(jnp.zeros((LENGTH, SIZE)))
    for lower in (True, False):
        operator = pdyn.BlockBidiagonalOperator(blocks, lower=lower)
        assert lx.is_diagonal(operator) and lx.is_symmetric(operator)
        assert lx.is_lower_triangular(operator) and lx.is_upper_triangular(operator)
        assert lx.is_tridiagonal(operator)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_scan_solvers_and_transposes_match_dense_solve(kind, solver):
    operator = pdyn.BlockBidiagonalOperator(_blocks(kind))
    b = jr.normal(jr.key(4), (LENGTH, SIZE))
    for op in (operator, operator.T):
        expected = jnp.linalg.solve(op.as_matrix(), b.reshape(-1)).reshape(b.shape)
        got = lx.linear_solve(op, b, solver).value
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS[:3], ids=repr)
def test_solver_transpose_state(solver):
    # `transpose` of the solver state must give the solve of the transposed operator:
    # this is what reverse-mode differentiation through `lx.linear_solve` uses.
    operator = pdyn.BlockBidiagonalOperator(_blocks("dense"))
    b = jr.normal(jr.key(5), (LENGTH, SIZE))

    def solve(b):
        return lx.linear_solve(operator, b, solver).value

    cotangent = jr.normal(jr.key(6), (LENGTH, SIZE))
    _, vjp = jax.vjp(solve, b)
    (got,) = vjp(cotangent)
    expected = jnp.linalg.solve(operator.as_matrix().T, cotangent.reshape(-1))
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-10, atol=1e-10)


def test_dense_blocks_recovered_from_a_generic_operator():
    blocks = _blocks("dense")
    operator = pdyn.BlockBidiagonalOperator(blocks)
    generic = lx.FunctionLinearOperator(operator.mv, operator.in_structure())
    recovered = pdyn.internal.dense_blocks_from_operator(generic)
    np.testing.assert_allclose(recovered.matrices[1:], blocks.matrices[1:], rtol=1e-12)
    np.testing.assert_allclose(recovered.matrices[0], 0.0)
    b = jr.normal(jr.key(7), (LENGTH, SIZE))
    expected = jnp.linalg.solve(operator.as_matrix(), b.reshape(-1)).reshape(b.shape)
    got = lx.linear_solve(generic, b, pdyn.ParallelScan()).value
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize(
    "scan", [pdyn.internal.parallel_scan, pdyn.internal.sequential_scan]
)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_functions_solve_the_recurrence(scan, reverse):
    blocks = _blocks("dense")
    b = jr.normal(jr.key(8), (LENGTH, SIZE))
    matrices = blocks.as_matrices()
    v = np.zeros(SIZE)
    expected = np.zeros((LENGTH, SIZE))
    order = range(LENGTH - 1, -1, -1) if reverse else range(LENGTH)
    for t in order:
        v = np.asarray(matrices[t]) @ v + np.asarray(b[t])
        expected[t] = v
    np.testing.assert_allclose(scan(blocks, b, reverse=reverse), expected, rtol=1e-10)
    np.testing.assert_allclose(
        pdyn.internal.chunked_scan(blocks, b, chunk_size=4, reverse=reverse),
        expected,
        rtol=1e-10,
    )


def test_float32_scans_stay_float32():
    blocks = _blocks("diagonal", dtype=jnp.float32)
    b = jnp.ones((LENGTH, SIZE), jnp.float32)
    for solver in SOLVERS:
        out = lx.linear_solve(pdyn.BlockBidiagonalOperator(blocks), b, solver).value
        assert out.dtype == jnp.float32


def test_chunk_size_validated():
    with pytest.raises(ValueError, match="chunk_size"):
        pdyn.ChunkedScan(chunk_size=0)
