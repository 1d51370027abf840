"""What $A_t$ is: the blocks of every exact Jacobian structure against the per-step
Jacobian from `jax.jacfwd`, for one `vmap` over time and for bounded batches of time
steps (a batch size that does not divide $T$)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_dynamics as pdyn
import parallel_dynamics._jacobian as jacobian_module

from .helpers import lorenz96_rk4, ZOO


LENGTH = 13


def _mlp(dtype, length=LENGTH, size=4, hidden=6, key=0):
    """A step whose tangents pass through a second matrix product after the
    nonlinearity, so no entry of its Jacobian can be computed on its own."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    w1 = jax.random.normal(k1, (hidden, size), dtype)
    w2 = jax.random.normal(k2, (size, hidden), dtype) / hidden
    inputs = jax.random.normal(k3, (length, hidden), dtype)

    def step(y, x, weights):
        first, second = weights
        return jnp.tanh(second @ jnp.tanh(first @ y + x))

    return step, jnp.zeros(size, dtype), inputs, (w1, w2), length


CASES = {
    **{name: ZOO[name] for name in ("tanh_rnn", "gru", "lstm", "contracting")},
    "lorenz96": lorenz96_rk4,
    "mlp": _mlp,
}


def _problem(name):
    step, y0, inputs, args, length = CASES[name](jnp.float64, length=LENGTH)
    layout = pdyn.internal.StateLayout.of(y0)
    recurrence = pdyn.Recurrence(
        step=step,
        layout=layout,
        y0=layout.flatten(y0),
        inputs=inputs,
        args=args,
        length=length,
    )
    # Any trajectory: the blocks are Jacobians at these points.
    trajectory = jax.random.normal(
        jax.random.key(7), (length, layout.size), jnp.float64
    )
    previous = recurrence.previous(trajectory)
    jacobians = eqx.filter_jit(
        lambda recurrence, previous: recurrence.map_steps(
            lambda y, x: jax.jacfwd(lambda h: recurrence.step_at(h, x))(y), previous
        )
    )(recurrence, previous)
    return recurrence, previous, jacobians


def _block_mask(size, k):
    group = np.arange(size) // k
    return jnp.asarray(group[:, None] == group[None, :])


def _structures(size):
    out = {
        "dense": (pdyn.DenseJacobian(), jnp.ones((size, size), bool)),
        "exact diagonal": (pdyn.ExactDiagonalJacobian(), jnp.eye(size, dtype=bool)),
        "blocks of 1": (pdyn.BlockDiagonalJacobian(1), jnp.eye(size, dtype=bool)),
    }
    k = next((k for k in range(2, size) if size % k == 0), None)
    if k is not None:
        out[f"blocks of {k}"] = (pdyn.BlockDiagonalJacobian(k), _block_mask(size, k))
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one vmap", "batches"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocks_are_the_jacobian_entries(name, batched, monkeypatch):
    recurrence, previous, jacobians = _problem(name)
    size = recurrence.size
    if batched:
        # Budget of 3 steps' Jacobians: batches of 3 over T = 13, the last one
        # overlapping its predecessor.
        for budget in ("_MAX_JACOBIAN_ENTRIES", "_MAX_RESTRICTED_ENTRIES"):
            monkeypatch.setattr(jacobian_module, budget, 3 * size * size)
    structures = _structures(size)

    @eqx.filter_jit  # traced here, after the budget is set
    def linearise_all(recurrence, previous):
        out = {}
        for label, (structure, _) in structures.items():
            values, blocks = structure.linearise(recurrence, previous, 0)
            out[label] = (values, blocks.as_matrices())
        return out

    values_expected = eqx.filter_jit(lambda r, p: r.evaluate(p))(recurrence, previous)
    for label, (values, matrices) in linearise_all(recurrence, previous).items():
        mask = structures[label][1]
        np.testing.assert_allclose(values, values_expected, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(
            matrices,
            jnp.where(mask, jacobians, 0),
            rtol=1e-12,
            atol=1e-13,
            err_msg=f"{name}: {label}",
        )


def test_short_names_are_aliases():
    assert pdyn.ExactDiagonal is pdyn.ExactDiagonalJacobian
    assert pdyn.StochasticDiagonal is pdyn.StochasticDiagonalJacobian
    assert pdyn.DiagonalFunction is pdyn.DiagonalFunctionJacobian


def test_each_structure_says_whether_it_is_exact():
    assert pdyn.DenseJacobian().exact
    assert pdyn.ExactDiagonalJacobian(elementwise=True).exact
    assert pdyn.BlockDiagonalJacobian(2, blockwise=True).exact
    inexact = [
        pdyn.ExactDiagonalJacobian(),
        pdyn.StochasticDiagonalJacobian(),
        pdyn.DiagonalFunctionJacobian(lambda y, x, args: y),
        pdyn.BlockDiagonalJacobian(2),
        pdyn.IdentityJacobian(),
        pdyn.ZeroJacobian(),
    ]
    assert not any(structure.exact for structure in inexact)
    # The stopping test of a solver follows its structure.
    assert pdyn.DEER().superlinear
    assert not pdyn.QuasiDEER().superlinear
    assert pdyn.QuasiDEER(diagonal="elementwise").superlinear
    assert pdyn.Newton(
        jacobian=pdyn.BlockDiagonalJacobian(2, blockwise=True)
    ).superlinear
    assert not pdyn.Picard().superlinear


def test_an_exact_block_diagonal_jacobian_converges_like_newton():
    # Two independent 2-dimensional tanh RNNs: the Jacobian is block-diagonal, so
    # blockwise blocks are Newton's method, with DEER's iteration count.
    key_w, key_x = jax.random.split(jax.random.key(0))
    weights = 0.9 * jax.random.normal(key_w, (2, 2, 2), jnp.float64)
    inputs = jax.random.normal(key_x, (60, 4), jnp.float64)

    def step(y, x, w):
        return jnp.tanh(jnp.einsum("bij,bj->bi", w, y.reshape(2, 2)).reshape(4) + x)

    y0 = jnp.zeros(4)
    expected = pdyn.solve(step, pdyn.Sequential(), y0, inputs, weights).value
    deer = pdyn.solve(step, pdyn.DEER(), y0, inputs, weights)
    blocks = pdyn.solve(
        step,
        pdyn.Newton(jacobian=pdyn.BlockDiagonalJacobian(2, blockwise=True)),
        y0,
        inputs,
        weights,
    )
    np.testing.assert_allclose(blocks.value, expected, rtol=1e-10, atol=1e-12)
    assert int(blocks.stats["num_steps"]) == int(deer.stats["num_steps"])
