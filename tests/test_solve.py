"""Every solver against the sequential `lax.scan` trajectory."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import scan_reference, tree_allclose, tree_max_abs_diff, ZOO


def _solvers():
    return {
        "deer": pdyn.DEER(),
        "quasi_deer": pdyn.QuasiDEER(),
        "quasi_deer_stochastic": pdyn.QuasiDEER(diagonal="stochastic", num_probes=2),
        "block_quasi_deer": pdyn.Newton(jacobian=pdyn.BlockDiagonalJacobian(1)),
        "picard": pdyn.Picard(),
        "jacobi": pdyn.Jacobi(),
        "sequential": pdyn.Sequential(),
        "deer_chunked": pdyn.DEER(linear_solver=pdyn.ChunkedScan()),
        "deer_sequential_scan": pdyn.DEER(linear_solver=pdyn.SequentialScan()),
    }


SOLVERS = _solvers()


def _tolerance(dtype):
    # Each solver stops once its update is below eps^0.7 relative; the remaining error
    # is a small multiple of that.
    return (5e-4, 5e-4) if dtype == jnp.float32 else (1e-8, 1e-8)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("model", list(ZOO))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_solver_matches_lax_scan(name, model, dtype):
    if dtype == jnp.float32 and model in ("tanh_rnn", "contracting"):
        pytest.skip("float32 is covered on the GRU and LSTM")
    step, y0, inputs, args, length = ZOO[model](dtype)
    expected = scan_reference(step, y0, inputs, args, length=length)
    sol = pdyn.solve(step, SOLVERS[name], y0, inputs, args, length=length)
    assert sol.result == optx.RESULTS.successful
    rtol, atol = _tolerance(dtype)
    assert tree_allclose(sol.value, expected, rtol=rtol, atol=atol), tree_max_abs_diff(
        sol.value, expected
    )
    for leaf, ref in zip(
        jax.tree.leaves(sol.value), jax.tree.leaves(expected), strict=True
    ):
        assert leaf.dtype == ref.dtype and leaf.shape == ref.shape
    assert 1 <= int(sol.stats["num_steps"]) <= length
    assert sol.stats["max_steps"] == length
    assert float(sol.stats["residual_norm"]) < 10 * atol


def test_deer_converges_quadratically_and_quasi_linearly():
    step, y0, inputs, args, _ = ZOO["gru"](jnp.float64, length=200)
    deer = pdyn.solve(step, pdyn.DEER(), y0, inputs, args)
    quasi = pdyn.solve(step, pdyn.QuasiDEER(), y0, inputs, args)
    jacobi = pdyn.solve(step, pdyn.Jacobi(), y0, inputs, args)
    assert int(deer.stats["num_steps"]) <= 8
    assert int(deer.stats["num_steps"]) < int(quasi.stats["num_steps"])
    assert int(quasi.stats["num_steps"]) <= int(jacobi.stats["num_steps"])


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("name", ["deer", "quasi_deer", "jacobi", "sequential"])
def test_tiny_lengths(length, name):
    step, y0, inputs, args, _ = ZOO["gru"](jnp.float64, length=length)
    expected = scan_reference(step, y0, inputs, args)
    sol = pdyn.solve(step, SOLVERS[name], y0, inputs, args)
    assert sol.value.shape == (length, 4)
    assert tree_allclose(sol.value, expected, rtol=1e-10, atol=1e-12)
    assert int(sol.stats["num_steps"]) <= length


@pytest.mark.parametrize("name", ["deer", "quasi_deer", "picard", "jacobi"])
def test_prefix_guarantee_with_max_steps_equal_to_length(name):
    # Lorenz-96 is chaotic: the quasi methods are slow, but T iterations are exact.
    from .helpers import lorenz96_rk4

    step, y0, inputs, args, length = lorenz96_rk4(jnp.float64, length=30)
    expected = scan_reference(step, y0, inputs, args, length=length)
    solver = {
        "deer": pdyn.DEER,
        "quasi_deer": pdyn.QuasiDEER,
        "picard": pdyn.Picard,
        "jacobi": pdyn.Jacobi,
    }[name](rtol=0.0, atol=0.0)
    sol = pdyn.solve(step, solver, y0, inputs, args, length=length)
    assert sol.result == optx.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= length
    assert tree_allclose(sol.value, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["deer", "quasi_deer", "picard"])
def test_init_at_the_answer_converges_at_once(name):
    step, y0, inputs, args, _ = ZOO["lstm"](jnp.float64)
    expected = scan_reference(step, y0, inputs, args)
    sol = pdyn.solve(step, SOLVERS[name], y0, inputs, args, init=expected)
    assert int(sol.stats["num_steps"]) <= 2
    assert tree_allclose(sol.value, expected, rtol=1e-12, atol=1e-12)


def test_jit_and_vmap_over_a_batch_of_sequences():
    step, y0, inputs, args, _ = ZOO["gru"](jnp.float64)
    batch_inputs = jnp.stack([inputs, -inputs, 0.5 * inputs])
    batch_y0 = jnp.stack([y0, y0 + 0.1, y0 - 0.2])

    @jax.jit
    def batched(y0s, xs):
        solve = lambda y, x: pdyn.solve(step, pdyn.DEER(), y, x, args).value
        return jax.vmap(solve)(y0s, xs)

    got = batched(batch_y0, batch_inputs)
    for i in range(3):
        expected = scan_reference(step, batch_y0[i], batch_inputs[i], args)
        np.testing.assert_allclose(got[i], expected, rtol=1e-9, atol=1e-10)


def test_pytree_inputs_and_no_inputs():
    def step(y, x, args):
        return jnp.tanh(args["w"] * y + x["a"] - 2 * x["b"][:, 0])

    inputs = {
        "a": jr.normal(jr.key(0), (20, 3)),
        "b": jr.normal(jr.key(1), (20, 3, 2)),
    }
    args = {"w": jnp.array([0.5, -0.3, 0.9])}
    y0 = jnp.zeros(3)
    expected = scan_reference(step, y0, inputs, args)
    sol = pdyn.solve(step, pdyn.QuasiDEER(), y0, inputs, args)
    assert tree_allclose(sol.value, expected, rtol=1e-9, atol=1e-9)

    def autonomous(y, x, args):
        assert x is None
        return 0.5 * jnp.sin(y)

    expected = scan_reference(autonomous, y0 + 1, None, None, length=15)
    sol = pdyn.solve(autonomous, pdyn.DEER(), y0 + 1, length=15)
    assert tree_allclose(sol.value, expected, rtol=1e-10, atol=1e-12)


def test_step_closing_over_arrays_and_module_steps():
    weight = jnp.array([[0.5, 0.2], [-0.3, 0.4]])
    step = lambda y, x, args: jnp.tanh(weight @ y + x)
    inputs = jr.normal(jr.key(2), (25, 2))
    expected = scan_reference(step, jnp.zeros(2), inputs, None)
    sol = pdyn.solve(step, pdyn.DEER(), jnp.zeros(2), inputs)
    np.testing.assert_allclose(sol.value, expected, rtol=1e-10)

    class Cell(eqx.Module):
        weight: jax.Array

        def __call__(self, y, x, args):
            return jnp.tanh(self.weight @ y + x)

    sol = pdyn.solve(Cell(weight), pdyn.QuasiDEER(), jnp.zeros(2), inputs)
    np.testing.assert_allclose(sol.value, expected, rtol=1e-9)


def test_user_diagonal_and_elementwise_diagonal():
    decay = jnp.linspace(0.1, 0.9, 5)

    def step(y, x, args):
        return jnp.tanh(decay * y + x)

    def diagonal(y, x, args):
        return decay * (1 - jnp.tanh(decay * y + x) ** 2)

    inputs = jr.normal(jr.key(3), (60, 5))
    expected = scan_reference(step, jnp.zeros(5), inputs, None)
    for solver in (
        pdyn.QuasiDEER(diagonal=diagonal),
        pdyn.QuasiDEER(diagonal="elementwise"),
    ):
        sol = pdyn.solve(step, solver, jnp.zeros(5), inputs)
        np.testing.assert_allclose(sol.value, expected, rtol=1e-9)
        # A diagonal map with its exact diagonal is Newton's method.
        assert int(sol.stats["num_steps"]) <= 8


def test_block_diagonal_jacobian_is_exact_for_block_maps():
    # Two decoupled 2-d blocks: block quasi-Newton is Newton here.
    w = jnp.array([[0.5, -0.8], [0.7, 0.3]])

    def step(y, x, args):
        pairs = y.reshape(2, 2)
        return jnp.tanh(pairs @ w.T + x.reshape(2, 2)).reshape(4)

    inputs = jr.normal(jr.key(4), (50, 4))
    expected = scan_reference(step, jnp.zeros(4), inputs, None)
    block = pdyn.solve(step, pdyn.BlockQuasiDEER(2), jnp.zeros(4), inputs)
    deer = pdyn.solve(step, pdyn.DEER(), jnp.zeros(4), inputs)
    np.testing.assert_allclose(block.value, expected, rtol=1e-10)
    assert int(block.stats["num_steps"]) == int(deer.stats["num_steps"])


def test_stochastic_diagonal_is_deterministic_given_key():
    step, y0, inputs, args, _ = ZOO["gru"](jnp.float32)
    solver = pdyn.QuasiDEER(diagonal="stochastic", key=jr.key(42))
    a = pdyn.solve(step, solver, y0, inputs, args)
    b = pdyn.solve(step, solver, y0, inputs, args)
    np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def test_solvers_work_with_optimistix_root_find_directly():
    step, y0, inputs, args, length = ZOO["tanh_rnn"](jnp.float64)
    expected = scan_reference(step, y0, inputs, args)
    layout = pdyn.internal.StateLayout.of(y0)
    recurrence = pdyn.Recurrence(
        step=step, layout=layout, y0=y0, inputs=inputs, args=args, length=length
    )
    sol = optx.root_find(
        lambda y, rec: rec.residual(y),
        pdyn.DEER(),
        jnp.zeros((length, 4)),
        args=recurrence,
        max_steps=length,
    )
    np.testing.assert_allclose(sol.value, expected, rtol=1e-10)


def test_verbose_prints_progress(capfd):
    step, y0, inputs, args, _ = ZOO["tanh_rnn"](jnp.float64, length=10)
    pdyn.solve(step, pdyn.DEER(verbose=True), y0, inputs, args)
    jax.effects_barrier()
    out = capfd.readouterr().out
    assert "DEER step 1: residual norm" in out


def test_stopping_rule_is_not_fooled_by_a_blown_up_iterate():
    from parallel_dynamics._solver.base import converged

    # Newton near the root: the rate says the last update (10x tolerance) left an error
    # of 0.1x tolerance.
    assert bool(converged(jnp.array(3), jnp.array(10.0), jnp.array(1e3)))
    # After an iterate blew up, a huge update looks like a tiny rate (DEER on the
    # AR-GRU case in float32 reaches this with a trajectory of size 1e29).
    assert not bool(converged(jnp.array(3), jnp.array(1.7e8), jnp.array(3.4e29)))
    assert not bool(converged(jnp.array(3), jnp.array(0.5), jnp.array(0.6)))
    assert bool(converged(jnp.array(3), jnp.array(0.05), jnp.array(0.6)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape", [(7, 1), (13, 4), (1000, 16), (20, 32)])
def test_rowwise_max_abs_is_the_max_norm(shape, dtype):
    from parallel_dynamics._solver.base import _rowwise, _rowwise_max_abs

    x = jr.normal(jr.key(sum(shape)), shape, dtype)
    assert _rowwise(x)
    for values in (x, -jnp.abs(x) - 1, jnp.abs(x)):
        got = jax.jit(lambda v: _rowwise_max_abs(v)[0])(values)
        assert got.dtype == values.dtype
        assert got == optx.max_norm(values)
    # Empty, wider or not (T, D): the stopping test uses the norm itself.
    for other in ((0, 3), (20, 33), (3, 2, 5), (4,)):
        assert not _rowwise(jnp.zeros(other, dtype))
    solver = pdyn.QuasiDEER()
    assert solver.scaled_size(jnp.zeros((0, 3), dtype), jnp.zeros((0, 3), dtype)) == 0


@pytest.mark.parametrize("size", [3, 40])  # the row-wise CPU path and the other one
def test_scaled_size_and_finite(size):
    solver = pdyn.QuasiDEER(rtol=1e-3, atol=1e-4)
    y = jr.normal(jr.key(0), (50, size))
    update = jr.normal(jr.key(1), (50, size))
    expected = optx.max_norm(update / (1e-4 + 1e-3 * jnp.abs(y)))
    fn = jax.jit(solver.scaled_size_and_finite)
    size_, finite = fn(y, update, y - update)
    assert size_ == expected and bool(finite)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for row in (0, 17, 49):
            new_y = (y - update).at[row, size - 1].set(bad)
            assert not bool(fn(y, update, new_y)[1])


@pytest.mark.parametrize("name", ["deer", "quasi_deer", "picard"])
def test_backpropagating_through_the_iterations(name):
    """`optimistix.RecursiveCheckpointAdjoint` differentiates the loop itself, the
    stopping test included; its row-wise reduction on CPU must be differentiable."""
    w = 0.5 * jr.normal(jr.key(0), (3, 3))
    xs = jr.normal(jr.key(1), (8, 3))
    y0 = 0.1 * jnp.ones(3)

    def step(y, x, w):
        return jnp.tanh(w @ y + x)

    def loss(w, solve):
        return jnp.sum(jnp.sin(solve(w)))

    def solve(w):
        adjoint = optx.RecursiveCheckpointAdjoint()
        return pdyn.solve(step, SOLVERS[name], y0, xs, w, adjoint=adjoint).value

    expected = jax.grad(loss)(w, lambda w: scan_reference(step, y0, xs, w))
    np.testing.assert_allclose(jax.grad(loss)(w, solve), expected, atol=1e-8)


def test_scaled_size_with_the_default_norm():
    solver = pdyn.QuasiDEER(rtol=1e-3, atol=1e-4)
    y = jr.normal(jr.key(0), (50, 3))
    update = jr.normal(jr.key(1), (50, 3))
    expected = optx.max_norm(update / (1e-4 + 1e-3 * jnp.abs(y)))
    assert jax.jit(solver.scaled_size)(y, update) == expected
    two = pdyn.QuasiDEER(rtol=1e-3, atol=1e-4, norm=optx.two_norm)
    np.testing.assert_allclose(
        two.scaled_size(y, update),
        optx.two_norm(update / (1e-4 + 1e-3 * jnp.abs(y))),
        rtol=1e-12,
    )


@pytest.mark.parametrize("size", [3, 40])  # the row-wise CPU path and the other one
def test_scaled_size_of_a_still_component_without_scale(size):
    # `atol = 0` and a component of the trajectory that is exactly zero and does not
    # move: its entry is 0 / 0, which must count as zero, not as NaN.
    solver = pdyn.QuasiDEER(rtol=1e-3, atol=0.0)
    y = 1 + jr.uniform(jr.key(0), (50, size))
    update = jr.normal(jr.key(1), (50, size))
    y, update = y.at[:, 1].set(0), update.at[:, 1].set(0)
    others = jnp.delete(update, 1, axis=1) / (1e-3 * jnp.delete(y, 1, axis=1))
    expected = optx.max_norm(others)
    size_, finite = jax.jit(solver.scaled_size_and_finite)(y, update, y - update)
    assert size_ == expected and bool(finite)
    assert jax.jit(solver.scaled_size)(y, update) == expected
    # A moving component without scale is infinitely far from converged.
    assert jax.jit(solver.scaled_size)(y, update.at[3, 1].set(1e-30)) == jnp.inf


@pytest.mark.parametrize("solver", [pdyn.DEER, pdyn.QuasiDEER])
def test_zero_atol_with_a_component_that_stays_zero(solver):
    # Such a component's scaled update is 0 / 0, which counts as zero: a NaN norm
    # would keep the solve running for all T iterations (correct by the prefix
    # guarantee, but T times the work).
    def step(y, x, args):
        del args
        return jnp.stack([jnp.tanh(0.5 * y[0]) + x[0], 0.5 * y[1]])

    inputs = jnp.full((40, 1), 0.01)
    y0 = jnp.zeros(2)
    sol = pdyn.solve(step, solver(rtol=1e-8, atol=0.0), y0, inputs)
    assert int(sol.stats["num_steps"]) < 20
    np.testing.assert_allclose(
        sol.value, scan_reference(step, y0, inputs, None), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("name", ["deer", "quasi_deer", "block_quasi_deer"])
def test_infinite_derivative_where_the_step_is_finite(name):
    # sqrt has an infinite derivative at 0: A_1 = J(y0) is infinite for y0 = 0 (it
    # multiplies Delta_0 = 0, and inf * 0 made the scans NaN), and so is every A_t at
    # the default initial guess y_t = y0. Such entries are replaced by zero, which
    # keeps a valid quasi-Newton iteration, instead of failing with `nonfinite`.
    def step(y, x, args):
        del args
        return jnp.sqrt(y) + x

    inputs = jnp.linspace(0.5, 1.5, 40).reshape(20, 2)
    y0 = jnp.zeros(2)
    sol = pdyn.solve(step, SOLVERS[name], y0, inputs)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(
        sol.value, scan_reference(step, y0, inputs, None), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize(
    "solver", [pdyn.QuasiDEER, pdyn.Jacobi, pdyn.DEER, pdyn.QuasiELK, pdyn.ELK]
)
def test_small_updates_of_a_non_contracting_iteration_do_not_stop_it(solver):
    # A rotation by 90 degrees has a zero diagonal, so quasi-DEER is a Jacobi
    # iteration here, which does not contract: from this initial guess (residual 1e-7
    # everywhere, error 1e-7 t, rotating with the map) every update has the size of
    # the residual, below tolerance, while the error travels forward one step per
    # iteration. Stopping after the first update (quasi-ELK: after its first
    # undamped check) would leave an error of 2e-5, 20 times the tolerance.
    rotation = jnp.array([[0.0, -1.0], [1.0, 0.0]])

    def step(y, x, args):
        del args
        return rotation @ y + x

    length = 200
    inputs = 0.01 * jr.normal(jr.key(0), (length, 2))
    y0 = jnp.array([1.0, 0.0])
    expected = scan_reference(step, y0, inputs, None)
    turns = jnp.arange(1, length + 1) % 4
    drift = jnp.stack([jnp.cos(turns * jnp.pi / 2), jnp.sin(turns * jnp.pi / 2)], 1)
    init = expected + 1e-7 * jnp.arange(1, length + 1)[:, None] * jnp.round(drift)
    sol = pdyn.solve(
        step, solver(rtol=1e-6, atol=1e-6), y0, inputs, init=init, throw=False
    )
    assert sol.result == optx.RESULTS.successful
    assert float(jnp.max(jnp.abs(sol.value - expected))) <= 1e-6
