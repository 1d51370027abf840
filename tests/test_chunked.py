"""The chunked scan (ALGORITHMS.md §7) against `lax.associative_scan` and `lax.scan`,
for every block structure, both directions and awkward chunk sizes; its Lineax solver
and the automatic choices (chunk size, `AutoScan`)."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import parallel_dynamics as pdyn
import parallel_dynamics._scan as scan_module
from parallel_dynamics._scan import default_chunk_size


LENGTH, SIZE = 23, 4
STRUCTURES = ["diagonal", "block", "dense"]


def _blocks(structure, length=LENGTH, dtype=jnp.float64):
    key = jr.key(0)
    if structure == "diagonal":
        return pdyn.DiagonalBlocks(jr.uniform(key, (length, SIZE), dtype, -1.1, 1.1))
    if structure == "block":
        return pdyn.BlockDiagonalBlocks(0.7 * jr.normal(key, (length, 2, 2, 2), dtype))
    return pdyn.DenseBlocks(0.5 * jr.normal(key, (length, SIZE, SIZE), dtype))


def _offsets(length=LENGTH, dtype=jnp.float64):
    return jr.normal(jr.key(1), (length, SIZE), dtype)


def _lax_scan(blocks, offsets, reverse=False):
    """The recurrence with `lax.scan` on the materialised matrices."""

    def body(v, matrix_and_offset):
        matrix, offset = matrix_and_offset
        v = matrix @ v + offset
        return v, v

    init = jnp.zeros(offsets.shape[1:], offsets.dtype)
    matrices = blocks.as_matrices()
    return lax.scan(body, init, (matrices, offsets), reverse=reverse)[1]


def _associative_scan(blocks, offsets, reverse=False):
    """The recurrence with `lax.associative_scan` on the materialised matrices."""

    def combine(earlier, later):
        a1, b1 = earlier
        a2, b2 = later
        return a2 @ a1, jnp.einsum("...ij,...j->...i", a2, b1) + b2

    matrices = blocks.as_matrices()
    return lax.associative_scan(combine, (matrices, offsets), reverse=reverse)[1]


chunked = jax.jit(
    lambda b, o, c, r: pdyn.internal.chunked_scan(b, o, chunk_size=c, reverse=r),
    static_argnums=(2, 3),
)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_matches_lax_scans(structure, reverse):
    blocks, offsets = _blocks(structure), _offsets()
    expected = _lax_scan(blocks, offsets, reverse)
    np.testing.assert_allclose(
        _associative_scan(blocks, offsets, reverse), expected, rtol=1e-10, atol=1e-12
    )
    # Default, one step per chunk, not dividing T, T - 1, T, longer than T.
    for chunk_size in (None, 1, 5, LENGTH - 1, LENGTH, 100):
        got = chunked(blocks, offsets, chunk_size, reverse)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        pdyn.internal.parallel_scan(blocks, offsets, reverse=reverse),
        expected,
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_chunked_accelerator_path(structure, monkeypatch):
    # The accelerator branch (chunk size 8, unrolled sweeps), exercised on the CPU.
    monkeypatch.setattr(scan_module, "on_cpu", lambda: False)
    assert default_chunk_size(LENGTH) == 8
    blocks, offsets = _blocks(structure), _offsets()
    for reverse in (False, True):
        got = pdyn.internal.chunked_scan(blocks, offsets, reverse=reverse)
        expected = _lax_scan(blocks, offsets, reverse)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        auto = pdyn.AutoScan()._solve(blocks, offsets, reverse)
        np.testing.assert_allclose(auto, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_chunked_scan_solver_and_transpose(structure):
    blocks, offsets = _blocks(structure), _offsets()
    operator = pdyn.BlockBidiagonalOperator(blocks)
    matrix = operator.as_matrix()
    flat = offsets.reshape(-1)
    solver = pdyn.ChunkedScan(chunk_size=6)
    got = lx.linear_solve(operator, offsets, solver).value
    expected = jnp.linalg.solve(matrix, flat).reshape(offsets.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    got_t = lx.linear_solve(operator.transpose(), offsets, solver).value
    expected_t = jnp.linalg.solve(matrix.T, flat).reshape(offsets.shape)
    np.testing.assert_allclose(got_t, expected_t, rtol=1e-10, atol=1e-12)


def test_chunked_float32_jit_vmap():
    blocks = _blocks("diagonal", dtype=jnp.float32)
    offsets = jnp.stack([_offsets(dtype=jnp.float32), -_offsets(dtype=jnp.float32)])
    fn = jax.jit(
        jax.vmap(lambda b: pdyn.internal.chunked_scan(blocks, b, chunk_size=4))
    )
    got = fn(offsets)
    assert got.dtype == jnp.float32
    for i in range(2):
        np.testing.assert_allclose(
            got[i],
            pdyn.internal.sequential_scan(blocks, offsets[i]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_chunked_trivial_structures():
    offsets = _offsets()
    identity = pdyn.IdentityBlocks(LENGTH, SIZE, np.dtype(jnp.float64))
    zero = pdyn.ZeroBlocks(LENGTH, SIZE, np.dtype(jnp.float64))
    np.testing.assert_allclose(
        pdyn.internal.chunked_scan(identity, offsets, chunk_size=3),
        jnp.cumsum(offsets, 0),
    )
    np.testing.assert_allclose(pdyn.internal.chunked_scan(zero, offsets), offsets)


def test_chunked_length_one():
    blocks, offsets = _blocks("dense", length=1), _offsets(length=1)
    np.testing.assert_allclose(pdyn.internal.chunked_scan(blocks, offsets), offsets)


def test_default_chunk_size_rule():
    # CPU (the test machine): about sqrt(T), within [1, T].
    assert default_chunk_size(1) == 1
    assert default_chunk_size(10_000) == 100
    assert default_chunk_size(10**6) == 1000
    for length in (1, 2, 7, 64, 1000):
        assert 1 <= default_chunk_size(length) <= length


def test_autoscan_on_cpu_is_sequential():
    blocks, offsets = _blocks("dense"), _offsets()
    np.testing.assert_array_equal(
        pdyn.AutoScan()._solve(blocks, offsets, False),
        pdyn.internal.sequential_scan(blocks, offsets),
    )


def test_deer_with_chunked_scan_matches_sequential():
    step = lambda y, x, w: jnp.tanh(w @ y + x)
    w = 0.5 * jr.normal(jr.key(2), (SIZE, SIZE))
    xs = jr.normal(jr.key(3), (50, SIZE))
    y0 = jnp.zeros(SIZE)
    expected = pdyn.solve(step, pdyn.Sequential(), y0, xs, w).value
    for solver in (
        pdyn.DEER(linear_solver=pdyn.ChunkedScan(7)),
        pdyn.QuasiDEER(linear_solver=pdyn.ChunkedScan()),
    ):
        got = pdyn.solve(step, solver, y0, xs, w).value
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
