"""The bounded (batched over time) evaluation of the step: the same values as one
`vmap`, and the same trajectories whether or not the solvers batch."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import parallel_dynamics as pdyn
import parallel_dynamics._jacobian as jacobian
import parallel_dynamics._problem as problem


def _step(y, x, w):
    return jnp.tanh(w * y + x)


def _recurrence(length, size, with_inputs=True):
    y0 = jnp.zeros(size)
    inputs = jr.normal(jr.key(0), (length, size)) if with_inputs else None
    layout = problem.StateLayout.of(y0)
    step = (
        (lambda y, x, w: _step(y, x, w))
        if with_inputs
        else (lambda y, x, w: _step(y, 0.3, w))
    )
    return problem.Recurrence(
        step=step,
        layout=layout,
        y0=y0,
        inputs=inputs,
        args=jnp.array(0.7),
        length=length,
    )


@pytest.mark.parametrize("with_inputs", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 10, 50, 64])
def test_map_in_batches_matches_vmap(with_inputs, batch_size):
    length, size = 50, 3
    recurrence = _recurrence(length, size, with_inputs)
    ys = jr.normal(jr.key(1), (length, size))

    def fn(y, x):
        value = recurrence.step_at(y, x)
        return value, {"twice": 2 * value}

    expected = recurrence.map_steps(fn, ys)
    got = problem.map_in_batches(fn, (ys,), recurrence.inputs, batch_size)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def test_bounded_residual_matches_residual():
    recurrence = _recurrence(37, 4)
    trajectory = jr.normal(jr.key(2), (37, 4))
    expected = recurrence.residual(trajectory)
    # A budget of one step's worth of entries forces batches of one step.
    got = recurrence.map_steps(
        lambda y, y_prev, x: y - recurrence.step_at(y_prev, x),
        trajectory,
        recurrence.previous(trajectory),
        entries_per_step=10,
        budget=30,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        recurrence.residual(trajectory, bounded=True), expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "solver",
    [
        pdyn.QuasiDEER(rtol=1e-6, atol=1e-6),
        pdyn.QuasiDEER(rtol=1e-6, atol=1e-6, diagonal="stochastic"),
        pdyn.DEER(rtol=1e-6, atol=1e-6),
    ],
    ids=["quasideer", "quasideer-stochastic", "deer"],
)
def test_batched_solves_match_unbatched(solver, monkeypatch):
    length, size = 203, 3
    xs = jr.normal(jr.key(3), (length, size))
    y0 = jnp.zeros(size)
    unbatched = pdyn.solve(_step, solver, y0, xs, 0.7)
    # Budgets small enough that every pass runs in batches, of sizes that do not
    # divide T.
    monkeypatch.setattr(problem, "MAX_STEP_ENTRIES", 16 * size * 10)
    monkeypatch.setattr(jacobian, "_MAX_STEP_ENTRIES", 16 * size * 10)
    monkeypatch.setattr(jacobian, "_MAX_JACOBIAN_ENTRIES", size * size * 9)
    monkeypatch.setattr(jacobian, "_MAX_RESTRICTED_ENTRIES", size * size * 9)
    calls = []
    original = problem.map_in_batches

    def counted(fn, arrays, inputs, batch_size):
        calls.append(batch_size)
        return original(fn, arrays, inputs, batch_size)

    monkeypatch.setattr(problem, "map_in_batches", counted)
    # A new step function: `pdyn.solve` compiles afresh with the smaller budgets.
    batched = pdyn.solve(lambda y, x, w: _step(y, x, w), solver, y0, xs, 0.7)
    reference = jax.lax.scan(lambda y, x: (_step(y, x, 0.7),) * 2, y0, xs)[1]
    np.testing.assert_allclose(batched.value, unbatched.value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched.value, reference, rtol=1e-4, atol=1e-4)
    assert batched.result == unbatched.result
    # The linearisation and the final residual ran in batches.
    assert len(calls) >= 2 and all(b < length and length % b for b in calls)
