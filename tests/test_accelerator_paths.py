"""The accelerator branches of the library, exercised on the CPU.

Some choices depend on the backend: `pdyn.AutoScan` runs the chunked scan (chunks of 8,
unrolled sweeps) on accelerators and the sequential scan on CPU, and so do the reverse
scans of the gradients; `pdyn.MatrixFreeScan` picks its chunk size by backend; the
Kalman smoother of ELK runs in parallel for dense blocks only on accelerators; the
stopping test's max-norm takes a CPU-only row-wise form. CI has no GPU, so here
`jax.default_backend` reports `"gpu"` and every one of those choices takes its
accelerator branch, while the programs still run on the CPU: solves, gradients and
ODE solves are compared with `lax.scan` and Diffrax as everywhere else.

The shapes (T = 29, D = 3) are used by no other test module, so that no trace cached
with the CPU branches by another test (JAX caches the traces of nested `jit`s by
shape) is reused here, nor one of these reused elsewhere.
"""

import collections

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn
from parallel_dynamics._linear_solver import scan_solvers
from parallel_dynamics._linear_solver.matrix_free import (
    default_matrix_free_chunk_size,
)
from parallel_dynamics._scan import default_chunk_size, on_cpu

from .helpers import gru, lstm, scan_reference, tanh_rnn, tree_allclose


LENGTH = 29
SIZE = 3


@pytest.fixture(autouse=True)
def accelerator(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _problem():
    return tanh_rnn(jnp.float64, length=LENGTH, size=SIZE, scale=0.9, key=3)


def _loss(ys):
    return jnp.sum(jnp.sin(ys) * jnp.arange(1, ys.size + 1).reshape(ys.shape))


def test_the_accelerator_branches_are_taken(monkeypatch):
    assert not on_cpu()
    assert default_chunk_size(LENGTH) == 8
    assert default_matrix_free_chunk_size(LENGTH, SIZE) == 16

    # A quasi-DEER solve runs its linear recurrences as chunked scans, and neither
    # it nor its gradient (a matrix-free scan, chunked here) runs a sequential one.
    calls = collections.Counter()

    def counting(name, scan):
        def wrapped(*args, **kwargs):
            calls[name, kwargs.get("reverse", False)] += 1
            return scan(*args, **kwargs)

        return wrapped

    for name in ("chunked_scan", "sequential_scan"):
        scan = getattr(scan_solvers, name)
        monkeypatch.setattr(scan_solvers, name, counting(name, scan))
    step, y0, inputs, args, _ = _problem()
    loss = lambda a: _loss(pdyn.solve(step, pdyn.QuasiDEER(), y0, inputs, a).value)
    jax.make_jaxpr(jax.grad(loss))(args)
    assert calls["chunked_scan", False] >= 1
    assert calls["sequential_scan", False] == calls["sequential_scan", True] == 0


SOLVERS = {
    "DEER": pdyn.DEER(rtol=1e-10, atol=1e-10),
    "QuasiDEER": pdyn.QuasiDEER(rtol=1e-10, atol=1e-10),
    "BlockQuasiDEER": pdyn.BlockQuasiDEER(3, rtol=1e-10, atol=1e-10),
    "ELK": pdyn.ELK(rtol=1e-10, atol=1e-10),
    "QuasiELK": pdyn.QuasiELK(rtol=1e-10, atol=1e-10),
    "Picard": pdyn.Picard(rtol=1e-10, atol=1e-10),
    "DEER matrix-free": pdyn.Newton(
        rtol=1e-10, atol=1e-10, linear_solver=pdyn.MatrixFreeScan()
    ),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_match_lax_scan(name):
    step, y0, inputs, args, _ = _problem()
    sol = jax.jit(lambda a: pdyn.solve(step, SOLVERS[name], y0, inputs, a))(args)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(
        sol.value, scan_reference(step, y0, inputs, args), rtol=1e-9, atol=1e-9
    )


def test_pytree_state_and_vmap():
    step, y0, inputs, cell, length = lstm(jnp.float64, length=LENGTH, key=3)
    batch = jnp.stack([inputs, -inputs, 0.5 * inputs])

    @jax.jit
    @jax.vmap
    def parallel(xs):
        return pdyn.solve(step, pdyn.QuasiDEER(rtol=1e-10, atol=1e-10), y0, xs, cell)

    sol = parallel(batch)
    assert np.all(np.asarray(sol.result._value) == 0)
    expected = jax.vmap(lambda xs: scan_reference(step, y0, xs, cell, length))(batch)
    assert tree_allclose(sol.value, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "name, adjoint",
    [
        ("DEER", pdyn.ImplicitAdjoint()),
        ("QuasiDEER", pdyn.ImplicitAdjoint()),
        # The transposed recurrence as a reverse chunked scan.
        ("QuasiDEER", pdyn.ImplicitAdjoint(pdyn.AutoScan())),
    ],
    ids=["DEER", "QuasiDEER", "QuasiDEER-AutoScan"],
)
def test_gradients_match_backpropagation_through_lax_scan(name, adjoint):
    # The default adjoint is a matrix-free scan, in chunks of 16 steps here.
    step, y0, inputs, args, _ = _problem()
    solver = SOLVERS[name]

    def parallel(y0, inputs, args):
        sol = pdyn.solve(step, solver, y0, inputs, args, adjoint=adjoint)
        return _loss(sol.value)

    def sequential(y0, inputs, args):
        return _loss(scan_reference(step, y0, inputs, args))

    got = jax.jit(jax.grad(parallel, argnums=(0, 1, 2)))(y0, inputs, args)
    expected = jax.grad(sequential, argnums=(0, 1, 2))(y0, inputs, args)
    assert tree_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_float32_stopping_test():
    # The stopping test's norm in its general form (the CPU takes a row-wise one).
    step, y0, inputs, args, _ = gru(jnp.float32, length=LENGTH, hidden=SIZE, key=3)
    sol = pdyn.solve(step, pdyn.QuasiDEER(rtol=1e-6, atol=1e-6), y0, inputs, args)
    assert sol.result == optx.RESULTS.successful
    assert sol.value.dtype == jnp.float32
    assert 2 <= int(sol.stats["num_steps"]) < LENGTH
    np.testing.assert_allclose(
        sol.value, scan_reference(step, y0, inputs, args), rtol=1e-5, atol=1e-5
    )


def test_ode_matches_diffrax():
    def vector_field(t, y, args):
        return jnp.stack([y[1], -args * jnp.sin(y[0]) - 0.1 * y[1], jnp.cos(t) - y[2]])

    terms = dfx.ODETerm(vector_field)
    y0 = jnp.array([1.0, 0.0, 0.5])
    saveat = dfx.SaveAt(steps=True)
    kwargs = dict(t0=0.0, t1=2.9, dt0=0.1, y0=y0, args=2.0, saveat=saveat)
    expected = dfx.diffeqsolve(terms, dfx.Tsit5(), max_steps=LENGTH, **kwargs)
    sol = pdyn.diffeqsolve(
        terms,
        dfx.Tsit5(),
        parallel=pdyn.QuasiDEER(rtol=1e-10, atol=1e-10),
        max_steps=LENGTH,
        **kwargs,
    )
    assert sol.result == dfx.RESULTS.successful
    np.testing.assert_allclose(sol.ys, expected.ys, rtol=1e-8, atol=1e-9)
