"""Gradients through `pdyn.solve` against backpropagation through `lax.scan`, finite
differences and forward mode of the sequential computation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
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
        pdyn.ImplicitAdjoint(pdyn.IterativeScan()),
        pdyn.ImplicitAdjoint(pdyn.IterativeScan(preconditioner="stochastic")),
        pdyn.ImplicitAdjoint(pdyn.IterativeScan(preconditioner="none")),
        optx.ImplicitAdjoint(linear_solver=pdyn.ParallelScan()),
    ],
    ids=lambda a: (
        type(a.linear_solver).__name__ + getattr(a.linear_solver, "preconditioner", "")
    ),
)
def test_every_adjoint_linear_solver_is_exact(adjoint):
    step, y0, inputs, args, length = ZOO["tanh_rnn"](jnp.float64, length=30)
    got, expected = _grads(step, pdyn.QuasiDEER(), y0, inputs, args, length, adjoint)
    _assert_grads_close(got, expected, rtol=1e-8)


def test_iterative_adjoint_on_a_chaotic_map_is_exact_through_the_prefix_property():
    from .helpers import lorenz96_rk4

    step, y0, _, dt, length = lorenz96_rk4(jnp.float64, length=40)
    adjoint = pdyn.ImplicitAdjoint(pdyn.IterativeScan(preconditioner="none"))

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
