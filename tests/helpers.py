"""A zoo of step maps and reference computations shared by the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """`True` when the two PyTrees have one structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True)
    )


def tree_max_abs_diff(x, y) -> float:
    diffs = jtu.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), x, y)
    return float(max(jtu.tree_leaves(diffs)))


def scan_reference(step, y0, inputs, args, length=None):
    """The trajectory by `lax.scan`: the ground truth for every solver."""

    def body(y, x):
        new = step(y, x, args)
        return new, new

    _, ys = jax.lax.scan(body, y0, inputs, length=length)
    return ys


# --- step maps: each returns (step, y0, inputs, args, length) -------------------


def tanh_rnn(dtype, length=40, size=4, scale=0.9, key=0):
    k1, k2, k3 = jr.split(jr.key(key), 3)
    # A Python float is weakly typed: a float32 weight stays float32 under x64.
    weight = scale * jr.normal(k1, (size, size), dtype) / float(np.sqrt(size))
    inputs = jr.normal(k2, (length, size), dtype)
    y0 = 0.1 * jr.normal(k3, (size,), dtype)

    def step(y, x, w):
        return jnp.tanh(w @ y + x)

    return step, y0, inputs, weight, length


def gru(dtype, length=40, hidden=4, features=3, key=0):
    k1, k2 = jr.split(jr.key(key))
    cell = eqx.nn.GRUCell(features, hidden, key=k1, dtype=dtype)
    inputs = jr.normal(k2, (length, features), dtype)

    def step(h, x, cell):
        return cell(x, h)

    return step, jnp.zeros(hidden, dtype), inputs, cell, length


def lstm(dtype, length=40, hidden=3, features=2, key=0):
    """A tuple state `(h, c)`."""
    k1, k2 = jr.split(jr.key(key))
    cell = eqx.nn.LSTMCell(features, hidden, key=k1, dtype=dtype)
    inputs = jr.normal(k2, (length, features), dtype)

    def step(hc, x, cell):
        return cell(x, hc)

    y0 = (jnp.zeros(hidden, dtype), jnp.zeros(hidden, dtype))
    return step, y0, inputs, cell, length


def contracting(dtype, length=40, size=3, key=0):
    """A strongly contracting map with dict state and no inputs."""
    weight = 0.3 * jr.normal(jr.key(key), (size, size), dtype) / float(np.sqrt(size))

    def step(state, x, w):
        del x
        a, b = state["a"], state["b"]
        return {"a": jnp.sin(w @ a) + 0.1 * b, "b": 0.5 * jnp.cos(a)}

    y0 = {"a": jnp.ones(size, dtype), "b": jnp.zeros(size, dtype)}
    return step, y0, None, weight, length


def lorenz96_rk4(dtype, length=100, size=5, forcing=8.0, dt=0.01, key=0):
    """Lorenz-96 integrated with one RK4 step per time step: a chaotic map."""

    def vector_field(y):
        return (jnp.roll(y, -1) - jnp.roll(y, 2)) * jnp.roll(y, 1) - y + forcing

    def step(y, x, dt):
        del x
        k1 = vector_field(y)
        k2 = vector_field(y + 0.5 * dt * k1)
        k3 = vector_field(y + 0.5 * dt * k2)
        k4 = vector_field(y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    y0 = forcing + 0.01 * jr.normal(jr.key(key), (size,), dtype)
    return step, y0, None, jnp.asarray(dt, dtype), length


ZOO = {
    "tanh_rnn": tanh_rnn,
    "gru": gru,
    "lstm": lstm,
    "contracting": contracting,
}


def robertson(t, y, args):
    """Robertson's stiff chemical kinetics (rates 0.04, 1e4, 3e7), a Diffrax vector
    field."""
    y1, y2, y3 = y
    return jnp.stack(
        [
            -0.04 * y1 + 1e4 * y2 * y3,
            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
            3e7 * y2**2,
        ]
    )
