"""Lyapunov-exponent diagnostic."""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parallel_dynamics._diagnostics import lyapunov_exponent  # noqa: E402


def linear_step(y, x, M):
    return M @ y


def test_linear_map_largest_exponent():
    # Non-normal matrix with eigenvalues 1.1, -0.7, 0.3 (spectral norm > 1.1).
    P = jnp.array([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0], [0.3, 0.0, 1.0]])
    M = P @ jnp.diag(jnp.array([1.1, -0.7, 0.3])) @ jnp.linalg.inv(P)
    lle = lyapunov_exponent(linear_step, jnp.ones(3), args=M, length=2000)
    assert lle.shape == ()
    assert lle.dtype == jnp.float64
    assert abs(float(lle) - np.log(1.1)) < 1e-3


def test_diagonal_map_all_exponents():
    d = jnp.array([0.5, 2.0, -1.5, 0.9])
    step = lambda y, x, a: d * y + x
    inputs = jnp.asarray(np.random.default_rng(0).standard_normal((500, 4)))
    lles = lyapunov_exponent(step, jnp.ones(4), inputs, num_exponents=4)
    expected = np.sort(np.log(np.abs(np.asarray(d))))[::-1]
    np.testing.assert_allclose(np.asarray(lles), expected, atol=1e-10)


def test_contracting_tanh_rnn_is_negative():
    rng = np.random.default_rng(1)
    D = 8
    W = jnp.asarray(0.5 * rng.standard_normal((D, D)) / np.sqrt(D))
    U = jnp.asarray(rng.standard_normal((D, 2)))
    step = lambda h, x, a: jnp.tanh(a[0] @ h + a[1] @ x)
    inputs = jnp.asarray(rng.standard_normal((1000, 2)))
    lle = lyapunov_exponent(step, jnp.zeros(D), inputs, (W, U))
    assert float(lle) < -0.1


def _lorenz96_rk4(y, x, forcing):
    dt = 0.01

    def vf(u):
        return (jnp.roll(u, -1) - jnp.roll(u, 2)) * jnp.roll(u, 1) - u + forcing

    k1 = vf(y)
    k2 = vf(y + 0.5 * dt * k1)
    k3 = vf(y + 0.5 * dt * k2)
    k4 = vf(y + dt * k3)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def test_lorenz96_is_chaotic():
    D, F = 10, 8.0
    y = F * jnp.ones(D) + 0.01 * jnp.arange(D)
    y, _ = jax.lax.scan(lambda u, _: (_lorenz96_rk4(u, None, F), None), y, length=500)
    lle = lyapunov_exponent(_lorenz96_rk4, y, args=F, length=2000)
    # With F = 8 the LLE of Lorenz-96 is about 1.7 per unit time for D = 40 and about
    # 1.2 for D = 10 (long runs of this estimator give 1.14-1.19), i.e. ~0.012 per step.
    assert 0.008 < float(lle) < 0.03


def test_pytree_state():
    a = jnp.array([0.5, -1.2])

    def step(y, x, args):
        u, v = y
        return (a * u + x, jnp.tanh(0.8 * v) + u[0])

    # u[0] = 0 and v = 0 stay fixed, so J_t is constant and block triangular with
    # exponents log 1.2, log 0.8 (the v-block at v = 0) and log 0.5.
    y0 = (jnp.array([0.0, 1.0]), jnp.zeros(()))
    lles = lyapunov_exponent(step, y0, jnp.zeros((2000, 2)), num_exponents=3)
    assert lles.shape == (3,)
    np.testing.assert_allclose(np.asarray(lles), np.log([1.2, 0.8, 0.5]), atol=2e-3)
    assert abs(float(lles[0]) - np.log(1.2)) < 1e-10


def test_trajectory_argument_matches_recomputation():
    rng = np.random.default_rng(2)
    D = 5
    W = jnp.asarray(1.5 * rng.standard_normal((D, D)) / np.sqrt(D))
    step = lambda h, x, W: jnp.tanh(W @ h + x)
    inputs = jnp.asarray(rng.standard_normal((300, D)))
    h0 = jnp.full((D,), 0.1)
    _, traj = jax.lax.scan(lambda h, x: (step(h, x, W),) * 2, h0, inputs)
    direct = lyapunov_exponent(step, h0, inputs, W, num_exponents=D)
    given = lyapunov_exponent(step, h0, inputs, W, trajectory=traj, num_exponents=D)
    np.testing.assert_allclose(np.asarray(given), np.asarray(direct), rtol=1e-12)
    assert np.all(np.diff(np.asarray(direct)) <= 0)


def test_float32_state_stays_float32():
    lle = lyapunov_exponent(
        linear_step,
        jnp.ones(2, jnp.float32),
        args=jnp.eye(2, dtype=jnp.float32) * 2,
        length=10,
    )
    assert lle.dtype == jnp.float32
    assert float(lle) == pytest.approx(np.log(2.0), rel=1e-6)


def test_errors():
    y0 = jnp.ones(3)
    with pytest.raises(ValueError, match="`length`"):
        lyapunov_exponent(linear_step, y0, args=jnp.eye(3))
    with pytest.raises(ValueError, match="`num_exponents`"):
        lyapunov_exponent(linear_step, y0, args=jnp.eye(3), length=5, num_exponents=4)
    with pytest.raises(ValueError, match="`num_exponents`"):
        lyapunov_exponent(linear_step, y0, args=jnp.eye(3), length=5, num_exponents=0)
    with pytest.raises(ValueError, match="`inputs`"):
        lyapunov_exponent(linear_step, y0, jnp.zeros((4, 3)), jnp.eye(3), length=5)


def test_state_leaves_must_be_floating_arrays_of_at_least_32_bits():
    # `ravel_pytree` would promote an integer leaf into the flat state and cast it
    # back for the step, so its Jacobian column would be zero: an exponent of -inf,
    # no error.
    def step(y, x, args):
        return 2.0 * y[0], y[1] + 1

    with pytest.raises(TypeError, match=r"`y0`.*\[1\].*int"):
        lyapunov_exponent(step, (jnp.ones(2), jnp.array(1)), length=5)
    with pytest.raises(TypeError, match=r"Half.*`y0`"):
        lyapunov_exponent(
            linear_step, jnp.ones(2, jnp.float16), None, jnp.eye(2), length=5
        )
    with pytest.raises(TypeError, match=r"Complex.*`y0`"):
        lyapunov_exponent(linear_step, jnp.ones(2, complex), None, jnp.eye(2), length=5)
    # Python floats are still accepted as scalar leaves.
    lle = lyapunov_exponent(lambda y, x, a: 0.5 * y, 1.0, length=5)
    assert float(lle) == pytest.approx(np.log(0.5))


def test_step_output_and_trajectory_must_have_the_layout_of_the_state():
    # Leaves of shapes (2,) and (1,) returned as (1,) and (2,): the same flat size, so
    # `ravel_pytree` would silently permute the state and the exponent be wrong.
    def swapped(y, x, args):
        return 0.5 * y[1], 2.0 * y[0]

    y0 = (jnp.ones(2), jnp.ones(1))
    with pytest.raises(ValueError, match=r"`step`.*shapes"):
        lyapunov_exponent(swapped, y0, length=5)
    with pytest.raises(ValueError, match=r"`step`.*structure"):
        lyapunov_exponent(lambda y, x, a: (y[:1], y[1:]), jnp.ones(2), length=5)
    with pytest.raises(TypeError, match=r"`step` must be callable"):
        lyapunov_exponent(3, jnp.ones(2), length=5)
    M = jnp.eye(2)
    traj = (jnp.zeros((5, 1)), jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"`trajectory`"):
        lyapunov_exponent(linear_step, jnp.ones(2), None, M, trajectory=traj)
    # A trajectory in another floating dtype is cast, as documented.
    lle = lyapunov_exponent(
        linear_step, jnp.ones(2), None, 2 * M, trajectory=jnp.zeros((5, 2), jnp.float32)
    )
    assert float(lle) == pytest.approx(np.log(2.0))


def test_integer_arguments():
    M = jnp.diag(jnp.array([2.0, 0.5]))
    lles = lyapunov_exponent(
        linear_step, jnp.ones(2), None, M, length=np.int64(4), num_exponents=np.int32(2)
    )
    np.testing.assert_allclose(lles, np.log([2.0, 0.5]), rtol=1e-12)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="`length`"):
            lyapunov_exponent(linear_step, jnp.ones(2), None, M, length=bad)
        with pytest.raises(ValueError, match="`num_exponents`"):
            lyapunov_exponent(
                linear_step, jnp.ones(2), None, M, length=3, num_exponents=bad
            )
