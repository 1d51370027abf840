"""Gradients through `pdyn.solve` against backpropagation through `lax.scan`, finite
differences and forward mode of the sequential computation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import scan_reference, tree_allclose, tree_max_abs_diff, ZOO


SOLVERS = {
    "deer": pdyn.DEER(),
    "quasi_deer": pdyn.QuasiDEER(),
    "quasi_deer_stochastic": pdyn.QuasiDEER(diagonal="stochastic"),
    "block_quasi_deer": pdyn.Newton(jacobian=pdyn.BlockDiagonalJacobian(1)),
    "picard": pdyn.Picard(),
    "jacobi": pdyn.Jacobi(),
    "sequential": pdyn.Sequential(),
}


def _loss_weights(trajectory):
    leaves = jax.tree.leaves(trajectory)
    return [jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape) for x in leaves]


def _loss(trajectory):
    leaves = jax.tree.leaves(trajectory)
    return sum(
        jnp.sum(w * jnp.sin(x))
        for w, x in zip(_loss_weights(trajectory), leaves, strict=True)
    )


def _grads(step, solver, y0, inputs, args, length, adjoint=None):
    kwargs = {} if adjoint is None else {"adjoint": adjoint}

    def parallel(args, y0, inputs):
        sol = pdyn.solve(step, solver, y0, inputs, args, length=length, **kwargs)
        return _loss(sol.value)

    def sequential(args, y0, inputs):
        return _loss(scan_reference(step, y0, inputs, args, length=length))

    return (
        eqx.filter_grad(parallel)(args, y0, inputs),
        eqx.filter_grad(sequential)(args, y0, inputs),
    )


def _assert_grads_close(got, expected, rtol):
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(expected))
    assert tree_allclose(got, expected, rtol=rtol, atol=rtol * scale), (
        tree_max_abs_diff(got, expected),
        scale,
    )


def _solver_model_grid():
    # Every solver on the GRU and DEER / quasi-DEER on every model by default; the rest
    # of the grid is marked slow.
    for model in ("gru", "lstm", "tanh_rnn"):
        for name in SOLVERS:
            fast = model == "gru" or name in ("deer", "quasi_deer")
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param(name, model, marks=marks, id=f"{name}-{model}")


@pytest.mark.parametrize("name, model", list(_solver_model_grid()))
def test_gradient_wrt_args_matches_backprop_through_scan(name, model):
    step, y0, inputs, args, length = ZOO[model](jnp.float64, length=30)
    got, expected = _grads(step, SOLVERS[name], y0, inputs, args, length)
    _assert_grads_close(got, expected, rtol=1e-8)


@pytest.mark.parametrize("name", ["deer", "quasi_deer", "jacobi"])
def test_gradient_wrt_y0_and_inputs(name):
    step, y0, inputs, args, length = ZOO["lstm"](jnp.float64, length=30)

    def parallel(y0, inputs):
        return _loss(pdyn.solve(step, SOLVERS[name], y0, inputs, args).value)

    def sequential(y0, inputs):
        return _loss(scan_reference(step, y0, inputs, args))

    got = jax.grad(parallel, argnums=(0, 1))(y0, inputs)
    expected = jax.grad(sequential, argnums=(0, 1))(y0, inputs)
    _assert_grads_close(got, expected, rtol=1e-8)


@pytest.mark.parametrize("name", ["deer", "quasi_deer"])
def test_float32_gradients(name):
    step, y0, inputs, args, length = ZOO["gru"](jnp.float32, length=30)
    got, expected = _grads(step, SOLVERS[name], y0, inputs, args, length)
    _assert_grads_close(got, expected, rtol=1e-4)
    assert all(
        x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(got, eqx.is_array))
    )


@pytest.mark.parametrize(
    "adjoint",
    [
        pdyn.ImplicitAdjoint(pdyn.ParallelScan()),
        pdyn.ImplicitAdjoint(pdyn.SequentialScan()),
        pdyn.ImplicitAdjoint(pdyn.ChunkedScan(chunk_size=7)),
        pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan()),
        pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan(chunk_size=1)),
        pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan(chunk_size=7)),
        pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan(chunk_size=30)),
        pdyn.ImplicitAdjoint(pdyn.IterativeScan()),
        pdyn.ImplicitAdjoint(pdyn.IterativeScan(preconditioner="stochastic")),
        pdyn.ImplicitAdjoint(pdyn.IterativeScan(preconditioner="none")),
        optx.ImplicitAdjoint(linear_solver=pdyn.ParallelScan()),
    ],
    ids=lambda a: (
        type(a.linear_solver).__name__
        + getattr(a.linear_solver, "preconditioner", "")
        + str(getattr(a.linear_solver, "chunk_size", "") or "")
    ),
)
def test_every_adjoint_linear_solver_is_exact(adjoint):
    step, y0, inputs, args, length = ZOO["tanh_rnn"](jnp.float64, length=30)
    got, expected = _grads(step, pdyn.QuasiDEER(), y0, inputs, args, length, adjoint)
    _assert_grads_close(got, expected, rtol=1e-8)


@pytest.mark.parametrize(
    "linear_solver",
    [
        pdyn.IterativeScan(preconditioner="none"),  # exact through the prefix property
        pdyn.MatrixFreeScan(),
        pdyn.MatrixFreeScan(chunk_size=4),
    ],
    ids=["iterative", "matrix_free", "matrix_free_chunked"],
)
def test_adjoint_on_a_chaotic_map_is_exact(linear_solver):
    from .helpers import lorenz96_rk4

    step, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=40)
    adjoint = pdyn.ImplicitAdjoint(linear_solver)

    def parallel(y0):
        sol = pdyn.solve(
            step, pdyn.DEER(), y0, None, dt, length=length, adjoint=adjoint
        )
        return _loss(sol.value)

    def sequential(y0):
        return _loss(scan_reference(step, y0, None, dt, length=length))

    _assert_grads_close(jax.grad(parallel)(y0), jax.grad(sequential)(y0), rtol=1e-8)


def test_gradient_against_finite_differences():
    step, y0, inputs, weight, _ = ZOO["tanh_rnn"](jnp.float64, length=20, size=3)

    def loss(scale):
        sol = pdyn.solve(step, pdyn.QuasiDEER(), y0, inputs, scale * weight)
        return _loss(sol.value)

    grad = jax.grad(loss)(1.0)
    h = 1e-6
    finite_difference = (loss(1.0 + h) - loss(1.0 - h)) / (2 * h)
    np.testing.assert_allclose(grad, finite_difference, rtol=1e-6)


@pytest.mark.parametrize("name", ["deer", "quasi_deer"])
def test_forward_mode_matches_jvp_of_the_sequential_computation(name):
    step, y0, inputs, args, length = ZOO["gru"](jnp.float64, length=30)
    tangent_inputs = jr.normal(jr.key(9), inputs.shape)
    tangent_y0 = jr.normal(jr.key(10), y0.shape)

    def parallel(y0, inputs):
        return pdyn.solve(step, SOLVERS[name], y0, inputs, args).value

    def sequential(y0, inputs):
        return scan_reference(step, y0, inputs, args)

    _, got = jax.jvp(parallel, (y0, inputs), (tangent_y0, tangent_inputs))
    _, expected = jax.jvp(sequential, (y0, inputs), (tangent_y0, tangent_inputs))
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    jac = jax.jacfwd(parallel)(y0, inputs)
    np.testing.assert_allclose(
        jac, jax.jacfwd(sequential)(y0, inputs), rtol=1e-8, atol=1e-10
    )


def test_vmap_of_grad():
    step, y0, inputs, weight, _ = ZOO["tanh_rnn"](jnp.float64, length=20)
    batch = jnp.stack([inputs, 0.5 * inputs, -inputs])

    def loss(weight, xs, solve):
        return _loss(solve(weight, xs))

    parallel = lambda w, xs: pdyn.solve(step, pdyn.DEER(), y0, xs, w).value
    sequential = lambda w, xs: scan_reference(step, y0, xs, w)
    got = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(weight, batch, parallel)
    expected = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(
        weight, batch, sequential
    )
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_init_receives_no_gradient():
    step, y0, inputs, weight, _ = ZOO["tanh_rnn"](jnp.float64, length=20)

    def loss(init):
        return _loss(pdyn.solve(step, pdyn.DEER(), y0, inputs, weight, init=init).value)

    grad = jax.grad(loss)(jnp.ones((20, 4)))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_gradient_of_a_step_closing_over_parameters():
    step, y0, inputs, weight, _ = ZOO["tanh_rnn"](jnp.float64, length=20)

    def parallel(weight):
        closure = lambda y, x, args: step(y, x, weight)
        return _loss(pdyn.solve(closure, pdyn.QuasiDEER(), y0, inputs).value)

    def sequential(weight):
        return _loss(scan_reference(step, y0, inputs, weight))

    _assert_grads_close(
        jax.grad(parallel)(weight), jax.grad(sequential)(weight), rtol=1e-8
    )


def test_default_adjoint_is_matrix_free():
    from parallel_dynamics._adjoint import default_adjoint_solver

    for solver in SOLVERS.values():
        assert isinstance(default_adjoint_solver(solver), pdyn.MatrixFreeScan)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matrix_free_adjoint_on_pytree_states_in_forward_mode(chunk_size):
    adjoint = pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan(chunk_size))
    # A tuple state (LSTM), forward mode, chunks that do not divide T.
    step, y0, inputs, args, length = ZOO["lstm"](jnp.float64, length=30)
    tangents = jax.tree.map(jnp.ones_like, (y0, inputs))
    got = jax.jvp(
        lambda y0, xs: (
            pdyn.solve(step, pdyn.QuasiDEER(), y0, xs, args, adjoint=adjoint).value
        ),
        (y0, inputs),
        tangents,
    )[1]
    expected = jax.jvp(
        lambda y0, xs: scan_reference(step, y0, xs, args), (y0, inputs), tangents
    )[1]
    assert tree_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_matrix_free_adjoint_is_exact_in_float32_on_a_long_weakly_contracting_gru():
    # The case that defeats the iterative adjoint's stop (relative error ~1e-2 at
    # T = 10^4): recurrent weights near the edge of stability.
    length, size = 3000, 8
    keys = jr.split(jr.key(3), 4)
    w = 1.02 * jr.orthogonal(keys[0], size, dtype=jnp.float32)
    u = 0.5 * jr.normal(keys[1], (size, size), jnp.float32)
    xs = jr.normal(keys[2], (length, size), jnp.float32)
    y0 = jnp.zeros(size, jnp.float32)

    def step(h, x, params):
        w, u = params
        z = jax.nn.sigmoid(x @ u - 1.0)
        return (1 - z) * h + z * jnp.tanh(w @ h + x)

    solver = pdyn.QuasiDEER(rtol=1e-5, atol=1e-5)

    def relative_error(adjoint):
        def loss(params):
            ys = pdyn.solve(step, solver, y0, xs, params, adjoint=adjoint).value
            return jnp.mean(ys**2)

        def reference(params):
            return jnp.mean(scan_reference(step, y0, xs, params) ** 2)

        got = jax.grad(loss)((w, u))
        expected = jax.grad(reference)((w, u))
        num = sum(jnp.sum((a - b) ** 2) for a, b in zip(got, expected))
        den = sum(jnp.sum(b**2) for b in expected)
        return float(jnp.sqrt(num / den))

    assert relative_error(pdyn.ImplicitAdjoint()) < 1e-4
    assert relative_error(pdyn.ImplicitAdjoint(pdyn.MatrixFreeScan(16))) < 1e-4


def test_matrix_free_scan_as_a_lineax_solver():
    blocks = pdyn.DenseBlocks(0.5 * jr.normal(jr.key(0), (20, 3, 3)))
    operator = pdyn.BlockBidiagonalOperator(blocks)
    vector = jr.normal(jr.key(1), (20, 3))
    dense = operator.as_matrix()
    for op, matrix in ((operator, dense), (operator.transpose(), dense.T)):
        got = lx.linear_solve(op, vector, pdyn.MatrixFreeScan()).value
        expected = jnp.linalg.solve(matrix, vector.reshape(-1)).reshape(20, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="MatrixFreeScan"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.eye(3)), jnp.ones(3), pdyn.MatrixFreeScan()
        )
    with pytest.raises(ValueError, match="chunk_size"):
        pdyn.MatrixFreeScan(chunk_size=0)


@pytest.mark.parametrize("linear_solver", [None, pdyn.AutoScan()])
def test_second_derivative(linear_solver):
    step, y0, inputs, weight, _ = ZOO["tanh_rnn"](jnp.float64, length=12, size=3)
    adjoint = pdyn.ImplicitAdjoint(linear_solver)

    def parallel(scale):
        sol = pdyn.solve(
            step, pdyn.QuasiDEER(), y0, inputs, scale * weight, adjoint=adjoint
        )
        return _loss(sol.value)

    def sequential(scale):
        return _loss(scan_reference(step, y0, inputs, scale * weight))

    np.testing.assert_allclose(
        jax.hessian(parallel)(1.0), jax.hessian(sequential)(1.0), rtol=1e-8
    )


@pytest.mark.parametrize("linear_solver", ["scan", pdyn.AutoScan, lx.LU])
def test_adjoint_linear_solver_is_checked_at_construction(linear_solver):
    # Checked when the adjoint is built, not first when the solve is differentiated
    # (with an AttributeError or a TypeError about `init`'s arguments).
    with pytest.raises(TypeError, match="`linear_solver`"):
        pdyn.ImplicitAdjoint(linear_solver)
