"""`pdyn.root_find_problem`: the recurrence solvers called through
`optimistix.root_find` directly, against `lax.scan`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import scan_reference, tree_allclose, ZOO


SOLVERS = {
    "deer": pdyn.DEER(),
    "quasi_deer": pdyn.QuasiDEER(),
    "elk": pdyn.ELK(),
    "trust_deer": pdyn.TrustDEER(),
    "sequential": pdyn.Sequential(),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_root_find_matches_lax_scan(name):
    step, y0, inputs, args, length = ZOO["tanh_rnn"](jnp.float64)
    fn, recurrence = pdyn.root_find_problem(step, y0, inputs, args)
    assert isinstance(recurrence, pdyn.Recurrence)
    sol = optx.root_find(
        fn, SOLVERS[name], jnp.zeros((length, 4)), recurrence, max_steps=2 * length
    )
    assert sol.result == optx.RESULTS.successful
    expected = scan_reference(step, y0, inputs, args)
    np.testing.assert_allclose(sol.value, expected, rtol=1e-10, atol=1e-12)


def test_pytree_state_and_no_inputs():
    step, y0, inputs, cell, length = ZOO["lstm"](jnp.float64)
    fn, recurrence = pdyn.root_find_problem(step, y0, inputs, cell)
    size = sum(leaf.size for leaf in jax.tree.leaves(y0))
    sol = optx.root_find(
        fn, pdyn.DEER(), jnp.zeros((length, size)), recurrence, max_steps=length
    )
    got = recurrence.layout.unflatten_trajectory(sol.value)
    assert tree_allclose(
        got, scan_reference(step, y0, inputs, cell), rtol=1e-10, atol=1e-12
    )

    contracting, c0, _, c_args, c_length = ZOO["contracting"](jnp.float64)
    fn, recurrence = pdyn.root_find_problem(
        contracting, c0, None, c_args, length=c_length
    )
    flat0 = recurrence.y0
    init = jnp.broadcast_to(flat0, (c_length, flat0.size))
    sol = optx.root_find(fn, pdyn.QuasiDEER(), init, recurrence, max_steps=c_length)
    expected = scan_reference(contracting, c0, None, c_args, length=c_length)
    assert tree_allclose(
        recurrence.layout.unflatten_trajectory(sol.value),
        expected,
        rtol=1e-10,
        atol=1e-12,
    )


def test_the_same_trajectory_as_solve_under_jit():
    step, y0, inputs, args, length = ZOO["gru"](jnp.float64)

    @jax.jit
    def direct(y0, inputs, args):
        fn, recurrence = pdyn.root_find_problem(step, y0, inputs, args)
        init = jnp.broadcast_to(recurrence.y0, (length, recurrence.y0.size))
        return optx.root_find(fn, pdyn.QuasiDEER(), init, recurrence).value

    np.testing.assert_allclose(
        direct(y0, inputs, args),
        pdyn.solve(step, pdyn.QuasiDEER(), y0, inputs, args).value,
        rtol=1e-12,
        atol=1e-14,
    )


def test_gradients_match_backpropagation_through_lax_scan():
    step, y0, inputs, args, length = ZOO["tanh_rnn"](jnp.float64)

    def parallel(args, inputs):
        fn, recurrence = pdyn.root_find_problem(step, y0, inputs, args)
        sol = optx.root_find(
            fn,
            pdyn.DEER(),
            jnp.zeros((length, 4)),
            recurrence,
            max_steps=length,
            adjoint=pdyn.ImplicitAdjoint(),
        )
        return jnp.sum(jnp.sin(sol.value))

    def sequential(args, inputs):
        return jnp.sum(jnp.sin(scan_reference(step, y0, inputs, args)))

    got = eqx.filter_grad(parallel)(args, inputs)
    expected = eqx.filter_grad(sequential)(args, inputs)
    assert tree_allclose(got, expected, rtol=1e-8, atol=1e-12)
    got = jax.grad(parallel, argnums=1)(args, inputs)
    expected = jax.grad(sequential, argnums=1)(args, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_bad_arguments_raise_naming_the_argument():
    step, y0, inputs, args, _ = ZOO["tanh_rnn"](jnp.float64)
    with pytest.raises(TypeError, match="`step`"):
        pdyn.root_find_problem("tanh", y0, inputs, args)
    with pytest.raises(ValueError, match="length"):
        pdyn.root_find_problem(step, y0, None, args)
    with pytest.raises(ValueError, match="`length=3`"):
        pdyn.root_find_problem(step, y0, inputs, args, length=3)
