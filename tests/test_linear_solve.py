"""The block bidiagonal operator and its scan solvers used directly through
`lineax.linear_solve`: upper and complex operators, an infinite first block, forward
mode at $y_0$, and Lineax's tridiagonal path."""

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
    # `IterativeScan` solves a transposed (upper) `BlockBidiagonalOperator` with the
    # state its `init` builds for it.
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


_SOLVERS = [
    pdyn.ParallelScan(),
    pdyn.SequentialScan(),
    pdyn.ChunkedScan(),
    pdyn.ChunkedScan(chunk_size=3),
    pdyn.AutoScan(),
    pdyn.MatrixFreeScan(),
    pdyn.IterativeScan(),
]


def _boundary_blocks(kind):
    """Blocks whose $A_1$ is infinite, e.g. the Jacobian of sqrt at $y_0 = 0$."""
    if kind == "diagonal":
        return pdyn.DiagonalBlocks(jnp.full((LENGTH, SIZE), 0.5).at[0].set(jnp.inf))
    matrices = 0.4 * jr.normal(jr.key(3), (LENGTH, SIZE, SIZE))
    return pdyn.DenseBlocks(matrices.at[0].set(jnp.inf))


def _check_solves(operator, solvers):
    b = jr.normal(jr.key(4), (LENGTH, SIZE))
    expected = _dense_solve(operator, b)
    for solver in solvers:
        sol = lx.linear_solve(operator, b, solver, throw=False)
        assert sol.result == lx.RESULTS.successful, solver
        np.testing.assert_allclose(
            sol.value, expected, rtol=1e-10, err_msg=repr(solver)
        )


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_first_block_never_matters(kind):
    # $A_1$ multiplies $v_0 = 0$ and is absent from `as_matrix`. An infinite one
    # leaves `mv` and every transposed solve finite: the transposed scans must not
    # apply $A_1^\top$ to $v_{T+1} = 0$ (inf * 0 is NaN).
    lower = pdyn.BlockBidiagonalOperator(_boundary_blocks(kind))
    b = jr.normal(jr.key(5), (LENGTH, SIZE))
    for operator in (lower, lower.T):
        matrix = operator.as_matrix()
        assert jnp.all(jnp.isfinite(matrix))
        np.testing.assert_allclose(
            operator.mv(b).reshape(-1), matrix @ b.reshape(-1), rtol=1e-12
        )
    _check_solves(lower.T, _SOLVERS)
    _check_solves(lower, [pdyn.ParallelScan(), pdyn.IterativeScan()])


@pytest.mark.xfail(
    strict=True,
    reason="the forward sequential and chunked scans apply A_1 to v_0 = 0; masking "
    "it costs a pass over the blocks in the hot loop",
)
def test_first_block_never_matters_forward_sequential_and_chunked():
    lower = pdyn.BlockBidiagonalOperator(_boundary_blocks("diagonal"))
    _check_solves(lower, [pdyn.SequentialScan(), pdyn.ChunkedScan(chunk_size=3)])


@pytest.mark.parametrize(
    "linear_solver",
    [
        pdyn.MatrixFreeScan(),
        pdyn.MatrixFreeScan(chunk_size=2),
        pdyn.AutoScan(),
        pdyn.ParallelScan(),
    ],
    ids=repr,
)
def test_forward_mode_ignores_the_jacobian_at_y0(linear_solver):
    # The tangent system's A_1 is the Jacobian of the step at y0, which multiplies
    # the zero tangent v_0: with sqrt at y0 = 0 it is infinite, and neither the
    # matrix-free scan (the default adjoint) nor the blocks recovered from the
    # Jacobian operator may turn it into NaN.
    def step(y, x, args):
        return jnp.sqrt(y) + x

    xs = jnp.linspace(1.0, 2.0, 2 * LENGTH).reshape(LENGTH, SIZE)
    tangent = jnp.cos(xs)
    adjoint = pdyn.ImplicitAdjoint(linear_solver)

    def solve(xs):
        return pdyn.solve(step, pdyn.Sequential(), jnp.zeros(SIZE), xs, adjoint=adjoint)

    _, got = jax.jvp(lambda xs: solve(xs).value, (xs,), (tangent,))

    # y_1 = x_1 exactly, then the recurrence: differentiate that by `lax.scan`.
    def reference(first, rest):
        body = lambda y, x: (step(y, x, None),) * 2
        return jnp.concatenate([first[None], jax.lax.scan(body, first, rest)[1]])

    _, expected = jax.jvp(reference, (xs[0], xs[1:]), (tangent[0], tangent[1:]))
    assert jnp.all(jnp.isfinite(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize("lower", [True, False])
def test_tridiagonal_does_not_materialise(lower):
    # With D = 1 (or zero blocks) Lineax's automatic solver picks its tridiagonal
    # solver, which calls `lx.tridiagonal`: that reads the blocks, never the dense
    # (T D)^2 matrix.
    length = 4096
    operator = pdyn.BlockBidiagonalOperator(
        pdyn.DiagonalBlocks(jnp.linspace(-1.0, 1.0, length)[:, None]), lower=lower
    )
    jaxpr = jax.make_jaxpr(lx.tridiagonal)(operator)
    largest = max(v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars)
    assert largest <= length
    small = pdyn.BlockBidiagonalOperator(
        pdyn.DiagonalBlocks(jnp.linspace(-1.0, 1.0, LENGTH)[:, None]), lower=lower
    )
    zero = pdyn.BlockBidiagonalOperator(
        pdyn.ZeroBlocks(LENGTH, SIZE, np.dtype(jnp.float64)), lower=lower
    )
    for op in (small, zero):
        matrix = op.as_matrix()
        expected = (jnp.diag(matrix), jnp.diag(matrix, -1), jnp.diag(matrix, 1))
        for got, want in zip(lx.tridiagonal(op), expected):
            np.testing.assert_array_equal(got, want)
    b = jr.normal(jr.key(6), (LENGTH, 1))
    np.testing.assert_allclose(
        lx.linear_solve(small, b).value, _dense_solve(small, b), rtol=1e-12
    )


def test_iterative_scan_on_a_complex_operator():
    # Its stopping sizes are real, also for a complex operator and right-hand side.
    key1, key2, key3, key4 = jr.split(jr.key(7), 4)
    shape = (LENGTH, SIZE)
    a = 0.5 * (jr.normal(key1, shape) + 1j * jr.normal(key2, shape))
    b = jr.normal(key3, shape) + 1j * jr.normal(key4, shape)
    lower = pdyn.BlockBidiagonalOperator(pdyn.DiagonalBlocks(a))
    for operator in (lower, lower.T):
        sol = lx.linear_solve(operator, b, pdyn.IterativeScan())
        assert sol.value.dtype == jnp.complex128
        np.testing.assert_allclose(sol.value, _dense_solve(operator, b), rtol=1e-10)


def test_iterative_scan_stops_like_the_nonlinear_solvers():
    # A contracting system of T = 200 steps: the corrections shrink geometrically and
    # the stopping test on their rate ends the refinement long before T. A component
    # that stays exactly zero has no scale with `atol = 0` (0 / 0), and counts as
    # converged.
    length = 200
    diagonal = jnp.full((length, SIZE), 0.3).at[:, 1].set(0.0)
    operator = pdyn.BlockBidiagonalOperator(pdyn.DiagonalBlocks(diagonal))
    b = jr.normal(jr.key(8), (length, SIZE)).at[:, 1].set(0.0)
    matrices = 0.3 * jr.normal(jr.key(9), (length, SIZE, SIZE))
    coupled = pdyn.BlockBidiagonalOperator(pdyn.DenseBlocks(matrices))
    for op, solver in [
        (operator, pdyn.IterativeScan(rtol=1e-10, atol=0.0, preconditioner="none")),
        (coupled, pdyn.IterativeScan(rtol=1e-10, atol=1e-10)),
    ]:
        sol = lx.linear_solve(op, b, solver)
        assert sol.result == lx.RESULTS.successful
        assert 2 <= int(sol.stats["num_steps"]) < length // 4
        np.testing.assert_allclose(
            sol.value, _dense_solve(op, b), rtol=1e-9, atol=1e-12
        )
    # A zero right-hand side is solved at once.
    zero = lx.linear_solve(coupled, jnp.zeros_like(b), pdyn.IterativeScan())
    assert int(zero.stats["num_steps"]) <= 2
    assert jnp.all(zero.value == 0)
