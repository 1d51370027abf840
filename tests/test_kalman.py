import functools as ft
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parallel_dynamics._linear_solver.kalman import (  # noqa: E402
    _SMALL_DENSE,
    _spd_solve,
    block_diagonal_smoother_parallel,
    block_diagonal_smoother_sequential,
    dense_smoother_parallel,
    dense_smoother_sequential,
    diagonal_smoother_parallel,
    diagonal_smoother_sequential,
)


def _named(fn, name):
    fn.__name__ = name
    return fn


# Most tests use T = 37, D = 3 (or 4): compiling the parallel smoothers dominates the
# run time of this file, and the compiled functions are reused across tests.
DENSE = [dense_smoother_parallel, dense_smoother_sequential]
DIAGONAL = [diagonal_smoother_parallel, diagonal_smoother_sequential]
BLOCK = [block_diagonal_smoother_parallel, block_diagonal_smoother_sequential]
# `radix=4` exercises the padding and the recursion of the radix scan.
DENSE_RADIX = [_named(ft.partial(dense_smoother_parallel, radix=4), "dense_radix4")]
DIAGONAL_RADIX = [
    _named(ft.partial(diagonal_smoother_parallel, radix=4), "diagonal_radix4")
]
LAMS = [1e-6, 1.0, 1e6]
SHAPES = [(1, 3), (2, 2), (37, 3)]


def _ids(fns):
    return [fn.__name__ for fn in fns]


#
# References
#


def _normal_equations(A, b, x0, obs, lam):
    """The normal equations $H x = r$ of
    $\\sum_t \\|x_t - A_t x_{t-1} - b_t\\|^2 + \\lambda_t \\|x_t - o_t\\|^2$, and the
    bidiagonal residual operator $L$, offsets $c$ and weights $\\lambda$ that build
    them (residual $L x - c$). `lam` is a scalar or broadcastable to `(T, D)`."""
    A, b, x0, obs = (np.asarray(x, dtype=np.float64) for x in (A, b, x0, obs))
    T, D = b.shape
    N = T * D
    L = np.eye(N)
    for t in range(1, T):
        L[t * D : (t + 1) * D, (t - 1) * D : t * D] = -A[t]
    c = b.copy()
    c[0] += A[0] @ x0
    lam_vec = np.broadcast_to(np.asarray(lam, dtype=np.float64), (T, D)).reshape(N)
    H = L.T @ L + np.diag(lam_vec)
    rhs = L.T @ c.reshape(N) + lam_vec * obs.reshape(N)
    return H, rhs, L, c.reshape(N), lam_vec


def damped_step_matrix(A, b, x0, obs, lam):
    """Reference: builds the dense $(T D) \\times (T D)$ normal equations of the damped
    least-squares problem and solves them with `jnp.linalg.solve`."""
    H, rhs, *_ = _normal_equations(A, b, x0, obs, lam)
    T, D = np.shape(b)
    return jnp.linalg.solve(jnp.asarray(H), jnp.asarray(rhs)).reshape(T, D)


def _least_squares_reference(A, b, x0, obs, lam):
    """A more accurate reference: the same problem as a stacked least-squares problem
    solved by QR (condition number the square root of that of the normal equations)."""
    _, _, L, c, lam_vec = _normal_equations(A, b, x0, obs, lam)
    sqrt_lam = np.sqrt(lam_vec)
    matrix = np.concatenate([L, np.diag(sqrt_lam)])
    vector = np.concatenate([c, sqrt_lam * np.asarray(obs, np.float64).reshape(-1)])
    return np.linalg.lstsq(matrix, vector, rcond=None)[0].reshape(np.shape(b))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


def _check_against_references(x, A, b, x0, obs, lam, tol=1e-10):
    H, rhs, *_ = _normal_equations(A, b, x0, obs, lam)
    ref = damped_step_matrix(A, b, x0, obs, lam)
    # The normal-equations solution is itself only accurate to ~ cond(H) * eps (cond(H)
    # reaches ~1e8 for lam = 1e-6 and unstable A_t).
    ref_tol = max(tol, 10 * np.finfo(np.float64).eps * np.linalg.cond(H))
    assert _rel_err(x, ref) < ref_tol
    assert _rel_err(x, _least_squares_reference(A, b, x0, obs, lam)) < tol
    # Backward error: x solves the normal equations to machine precision.
    x = np.asarray(x, np.float64).reshape(-1)
    residual = np.linalg.norm(H @ x - rhs)
    assert residual / (np.linalg.norm(H, 2) * np.linalg.norm(x)) < 1e-13


#
# Random problems
#


def _random_dense(key, T, D, radius, dtype=jnp.float64):
    """Random A_t, each with spectral radius `radius`."""
    kA, kb, kx, ko = jax.random.split(key, 4)
    A = jax.random.normal(kA, (T, D, D), dtype=jnp.float64)
    rho = jnp.max(jnp.abs(jnp.linalg.eigvals(A)), axis=-1)
    A = A * (radius / rho)[:, None, None]
    b = jax.random.normal(kb, (T, D), dtype=jnp.float64)
    x0 = jax.random.normal(kx, (D,), dtype=jnp.float64)
    obs = 3 * jax.random.normal(ko, (T, D), dtype=jnp.float64)
    return tuple(x.astype(dtype) for x in (A, b, x0, obs))


def _random_diagonal(key, T, D, radius, dtype=jnp.float64):
    """Random a_t, all of modulus `radius`."""
    ka, kb, kx, ko = jax.random.split(key, 4)
    a = radius * jnp.sign(jax.random.normal(ka, (T, D), dtype=jnp.float64))
    b = jax.random.normal(kb, (T, D), dtype=jnp.float64)
    x0 = jax.random.normal(kx, (D,), dtype=jnp.float64)
    obs = 3 * jax.random.normal(ko, (T, D), dtype=jnp.float64)
    return tuple(x.astype(dtype) for x in (a, b, x0, obs))


def _plain_recurrence(A, b, x0):
    def step(x, Ab):
        A_t, b_t = Ab
        x = A_t @ x + b_t
        return x, x

    return jax.lax.scan(step, x0, (A, b))[1]


def _block_to_dense(A):
    T, nb, _, _ = A.shape
    return jnp.stack(
        [jax.scipy.linalg.block_diag(*[A[t, i] for i in range(nb)]) for t in range(T)]
    )


#
# Tests
#


@pytest.mark.parametrize("fn", DENSE + DENSE_RADIX, ids=_ids(DENSE + DENSE_RADIX))
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("radius", [0.9, 1.5])
@pytest.mark.parametrize("T,D", SHAPES)
def test_dense_matches_normal_equations(fn, lam, radius, T, D):
    A, b, x0, obs = _random_dense(jax.random.key(T * D), T, D, radius)
    x = fn(A, b, x0, obs, lam)
    assert x.shape == (T, D)
    assert x.dtype == jnp.float64
    _check_against_references(x, A, b, x0, obs, lam)


@pytest.mark.parametrize(
    "fn", DIAGONAL + DIAGONAL_RADIX, ids=_ids(DIAGONAL + DIAGONAL_RADIX)
)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("radius", [0.9, 1.5])
@pytest.mark.parametrize("T,D", SHAPES)
def test_diagonal_matches_normal_equations(fn, lam, radius, T, D):
    a, b, x0, obs = _random_diagonal(jax.random.key(T + D), T, D, radius)
    A = jax.vmap(jnp.diag)(a)
    x = fn(a, b, x0, obs, lam)
    assert x.shape == (T, D)
    assert x.dtype == jnp.float64
    _check_against_references(x, A, b, x0, obs, lam)


@pytest.mark.parametrize("fn", BLOCK, ids=_ids(BLOCK))
@pytest.mark.parametrize("lam", LAMS + ["per block"])
@pytest.mark.parametrize("radius", [0.9, 1.5])
def test_block_diagonal_matches_normal_equations(fn, lam, radius):
    T, nb, k = 16, 3, 2
    A, _, _, _ = _random_dense(jax.random.key(7), T * nb, k, radius)
    A = A.reshape(T, nb, k, k)
    _, b, x0, obs = _random_dense(jax.random.key(8), T, nb * k, radius)
    # One value per step and block (always an array, so that one compilation serves).
    if lam == "per block":
        key = jax.random.key(9)
        lam = 10.0 ** jax.random.uniform(key, (T, nb), minval=-6, maxval=6)
    else:
        lam = jnp.full((T, nb), lam, dtype=jnp.float64)
    x = fn(A, b, x0, obs, lam)
    assert x.shape == (T, nb * k)
    lam_full = jnp.repeat(lam, k, axis=1)
    _check_against_references(x, _block_to_dense(A), b, x0, obs, lam_full)


@pytest.mark.parametrize("fn", DIAGONAL, ids=_ids(DIAGONAL))
def test_diagonal_array_lam(fn):
    T, D = 37, 3
    a, b, x0, obs = _random_diagonal(jax.random.key(3), T, D, 1.2)
    A = jax.vmap(jnp.diag)(a)
    lam = 10.0 ** jax.random.uniform(jax.random.key(4), (T, D), minval=-6, maxval=6)
    _check_against_references(fn(a, b, x0, obs, lam), A, b, x0, obs, lam)
    # One value per step.
    lam = lam[:, :1]
    _check_against_references(fn(a, b, x0, obs, lam), A, b, x0, obs, lam)


@pytest.mark.parametrize("fn", DENSE, ids=_ids(DENSE))
def test_dense_per_step_lam(fn):
    T, D = 37, 3
    A, b, x0, obs = _random_dense(jax.random.key(5), T, D, 1.2)
    lam = 10.0 ** jax.random.uniform(jax.random.key(6), (T,), minval=-6, maxval=6)
    x = fn(A, b, x0, obs, lam)
    _check_against_references(x, A, b, x0, obs, lam[:, None])


@pytest.mark.parametrize("fn", DENSE + DIAGONAL, ids=_ids(DENSE + DIAGONAL))
def test_limits(fn):
    T, D = 37, 3
    A, b, x0, obs = _random_dense(jax.random.key(11), T, D, 0.8)
    if fn in DIAGONAL:
        A = jnp.diagonal(A, axis1=1, axis2=2)
        plain = _plain_recurrence(jax.vmap(jnp.diag)(A), b, x0)
    else:
        plain = _plain_recurrence(A, b, x0)
    # lam -> infinity: no move away from the observations.
    assert _rel_err(fn(A, b, x0, obs, 1e12), obs) < 1e-10
    # lam -> 0: the undamped (Newton / DEER) step, the plain recurrence.
    assert _rel_err(fn(A, b, x0, obs, 1e-12), plain) < 1e-9
    assert _rel_err(fn(A, b, x0, obs, 0.0), plain) < 1e-12


@pytest.mark.parametrize("fn", DENSE + DIAGONAL, ids=_ids(DENSE + DIAGONAL))
def test_float32(fn):
    T, D = 37, 3
    diagonal = fn in DIAGONAL
    make = _random_diagonal if diagonal else _random_dense
    # Stable dynamics: close to float64.
    args32 = make(jax.random.key(12), T, D, 0.9, dtype=jnp.float32)
    args64 = tuple(x.astype(jnp.float64) for x in args32)
    for lam in (1e-8, 1e-6, 1.0, 1e6, 1e8):
        x32 = fn(*args32, lam)
        assert x32.dtype == jnp.float32
        assert _rel_err(x32, fn(*args64, lam)) < 1e-4
    # Unstable dynamics, extreme damping: finite, and as close to float64 as the
    # conditioning of the problem allows. (Strongly unstable dynamics with tiny lam
    # need float64 for the dense smoothers: see the module documentation.)
    args32 = make(jax.random.key(13), T, D, 1.5 if diagonal else 1.2, jnp.float32)
    args64 = tuple(x.astype(jnp.float64) for x in args32)
    for lam in (1e-8, 1e8):
        x32 = fn(*args32, lam)
        assert jnp.all(jnp.isfinite(x32))
        assert _rel_err(x32, fn(*args64, lam)) < 1e-3


@pytest.mark.parametrize(
    "fn", DENSE + DIAGONAL + BLOCK, ids=_ids(DENSE + DIAGONAL + BLOCK)
)
def test_jit_and_vmap(fn):
    # Same shapes as the tests above, so that the unbatched calls reuse their
    # compilations.
    batch = 3
    keys = jax.random.split(jax.random.key(14), batch)
    lams = [1e-3, 1.0, 1e3]
    if fn in BLOCK:
        T, nb, k = 16, 3, 2
        A, _, _, _ = _random_dense(jax.random.key(15), batch * T * nb, k, 1.1)
        A = A.reshape(batch, T, nb, k, k)
        rest = [_random_dense(key, T, nb * k, 1.1)[1:] for key in keys]
        args = (A,) + tuple(jnp.stack(x) for x in zip(*rest))
        lam = jnp.stack([jnp.full((T, nb), x, dtype=jnp.float64) for x in lams])
    else:
        T, D = 37, 3
        make = _random_diagonal if fn in DIAGONAL else _random_dense
        args = tuple(jnp.stack(x) for x in zip(*[make(k, T, D, 1.1) for k in keys]))
        lam = jnp.array(lams)
    out = jax.jit(jax.vmap(fn))(*args, lam)
    assert out.shape == (batch,) + args[1].shape[1:]
    for i in range(batch):
        lam_i = lam[i] if fn in BLOCK else lams[i]
        single = fn(*(x[i] for x in args), lam_i)
        assert _rel_err(out[i], single) < 1e-12


@pytest.mark.parametrize("fn", DENSE, ids=_ids(DENSE))
def test_grad_matches_reference(fn):
    T, D = 5, 2
    A, b, x0, obs = _random_dense(jax.random.key(15), T, D, 1.2)

    def reference(A, b, x0, obs, lam):
        T, D = b.shape
        L = jnp.eye(T * D)
        for t in range(1, T):
            L = L.at[t * D : (t + 1) * D, (t - 1) * D : t * D].set(-A[t])
        c = b.at[0].add(A[0] @ x0).reshape(-1)
        H = L.T @ L + lam * jnp.eye(T * D)
        return jnp.linalg.solve(H, L.T @ c + lam * obs.reshape(-1)).reshape(T, D)

    def loss(f):
        return lambda *args: jnp.sum(jnp.sin(f(*args)))

    argnums = (0, 1, 2, 3, 4)
    grads = jax.jit(jax.grad(loss(fn), argnums))(A, b, x0, obs, 0.3)
    grads_ref = jax.jit(jax.grad(loss(reference), argnums))(A, b, x0, obs, 0.3)
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 1e-9


@pytest.mark.parametrize("fn", DIAGONAL, ids=_ids(DIAGONAL))
def test_diagonal_grad(fn):
    T, D = 5, 2
    a, b, x0, obs = _random_diagonal(jax.random.key(16), T, D, 1.2)

    def dense(a, b, x0, obs, lam):
        return dense_smoother_sequential(jax.vmap(jnp.diag)(a), b, x0, obs, lam)

    def loss(f):
        return lambda a, obs, lam: jnp.sum(jnp.sin(f(a, b, x0, obs, lam)))

    grads = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(a, obs, 0.3)
    grads_ref = jax.jit(jax.grad(loss(dense), (0, 1, 2)))(a, obs, 0.3)
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < 1e-10


def test_bad_arguments():
    A, b, x0, obs = _random_dense(jax.random.key(17), 5, 2, 0.9)
    with pytest.raises(ValueError):
        dense_smoother_parallel(A, b[:, :1], x0, obs, 1.0)
    with pytest.raises(ValueError):
        dense_smoother_sequential(A[:, 0], b, x0, obs, 1.0)
    with pytest.raises(ValueError):
        diagonal_smoother_parallel(b, b, x0[:1], obs, 1.0)
    with pytest.raises(ValueError):
        dense_smoother_parallel(A, b, x0, obs, 1.0, radix=1)


# The default (`lax.associative_scan`) dense smoother takes tens of seconds to compile
# at this size on CPU (see the module documentation), so it runs with `-m slow` only.
@pytest.mark.parametrize(
    "radix", [32, pytest.param(None, marks=pytest.mark.slow)], ids=["radix32", "assoc"]
)
def test_long_unstable_sequence(radix):
    # T = 20,000 with spectral radius 1.05: a plain product of the A_t overflows, the
    # Kalman elements stay bounded thanks to the observations.
    T, D = 20_000, 2
    A, b, x0, obs = _random_dense(jax.random.key(18), T, D, 1.05)
    a, _, _, _ = _random_diagonal(jax.random.key(19), T, D, 1.05)
    assert not jnp.all(jnp.isfinite(jnp.cumprod(a, axis=0)))
    for parallel, sequential, transition in (
        (dense_smoother_parallel, dense_smoother_sequential, A),
        (diagonal_smoother_parallel, diagonal_smoother_sequential, a),
    ):
        for lam in (1e-6, 1.0):
            start = time.perf_counter()
            x = parallel(transition, b, x0, obs, lam, radix=radix)
            x = jax.block_until_ready(x)
            elapsed = time.perf_counter() - start
            print(f"{parallel.__name__}, radix={radix}, lam={lam}: {elapsed:.2f}s")
            x_seq = sequential(transition, b, x0, obs, lam)
            assert jnp.all(jnp.isfinite(x))
            assert _rel_err(x, x_seq) < 1e-8


@pytest.mark.parametrize(
    "fn, make",
    [
        (dense_smoother_parallel, "dense"),
        (dense_smoother_sequential, "dense"),
        (diagonal_smoother_parallel, "diagonal"),
        (diagonal_smoother_sequential, "diagonal"),
    ],
    ids=["dense_parallel", "dense_sequential", "diag_parallel", "diag_sequential"],
)
@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_filter_means_are_truncated_least_squares(fn, make, lam):
    # The filtering mean at t is the last state of the smoother of the problem cut at t.
    T, D = 9, 3
    if make == "dense":
        A, b, x0, obs = _random_dense(jax.random.key(21), T, D, 1.3)
        dense_A = A
    else:
        A, b, x0, obs = _random_diagonal(jax.random.key(22), T, D, 1.3)
        dense_A = jax.vmap(jnp.diag)(A)
    filtered = fn(A, b, x0, obs, lam, smooth=False)
    for t in range(1, T + 1):
        ref = _least_squares_reference(dense_A[:t], b[:t], x0, obs[:t], lam)
        assert _rel_err(filtered[t - 1], ref[-1]) < 1e-10
    smoothed = fn(A, b, x0, obs, lam)
    assert _rel_err(smoothed[-1], filtered[-1]) < 1e-12
    assert _rel_err(smoothed[0], filtered[0]) > 1e-6


@pytest.mark.parametrize(
    "fn", [block_diagonal_smoother_parallel, block_diagonal_smoother_sequential]
)
def test_block_diagonal_filter(fn):
    T = 6
    A, b, x0, obs = _random_dense(jax.random.key(23), T, 2, 1.2)
    A2, _, _, _ = _random_dense(jax.random.key(24), T, 2, 0.7)
    blocks = jnp.stack([A, A2], axis=1)
    b, x0, obs = (jnp.concatenate([x, 2 * x], axis=-1) for x in (b, x0, obs))
    filtered = fn(blocks, b, x0, obs, 0.5, smooth=False)
    first = dense_smoother_sequential(
        A, b[:, :2], x0[:2], obs[:, :2], 0.5, smooth=False
    )
    second = dense_smoother_sequential(
        A2, b[:, 2:], x0[2:], obs[:, 2:], 0.5, smooth=False
    )
    assert _rel_err(filtered, jnp.concatenate([first, second], axis=-1)) < 1e-12


# The sequential dense smoother solves its per-step systems in plain XLA operations
# up to D = _SMALL_DENSE and with LAPACK above: both sides of the threshold.
SMALL_DIMS = [1, 2, 3, 5, 8, _SMALL_DENSE, _SMALL_DENSE + 1]


def _random_dense_numpy(seed, T, D, radius):
    """As `_random_dense`, drawn with NumPy (`jnp.linalg.eigvals` compiles for every
    new shape)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((T, D, D))
    A *= (radius / np.max(np.abs(np.linalg.eigvals(A)), axis=-1))[:, None, None]
    return (
        A,
        rng.standard_normal((T, D)),
        rng.standard_normal(D),
        rng.standard_normal((T, D)),
    )


@pytest.mark.parametrize("D", SMALL_DIMS)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_dense_sequential_around_small_threshold(D, dtype):
    T = 12
    # One damping per step from 1e-6 (nearly undamped: normal equations with condition
    # number up to ~1e8) to 1e6, in one compilation.
    lam = np.random.default_rng(0).permutation(np.geomspace(1e-6, 1e6, T))
    radius = 1.3 if dtype == jnp.float64 else 0.9
    args = [x.astype(dtype) for x in _random_dense_numpy(D, T, D, radius)]
    x = dense_smoother_sequential(*args, lam.astype(dtype))
    assert x.dtype == dtype
    if dtype == jnp.float64:
        _check_against_references(x, *args, lam[:, None])
    else:
        ref = _least_squares_reference(*args, lam[:, None])
        assert _rel_err(x, ref) < 1e-4


@pytest.mark.parametrize("D", [1, 3, 8])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_spd_solve(D, dtype):
    # Ill-conditioned symmetric positive definite matrices, with the smallest
    # eigenvalue not first, against a float64 LAPACK solve of the same rounded matrix.
    cond = 1e10 if dtype == jnp.float64 else 1e4
    rng = np.random.default_rng(D)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    eigenvalues = rng.permutation(np.geomspace(1, cond, D))
    a = ((q * eigenvalues) @ q.T).astype(dtype)
    a = (a + a.T) / 2
    b = rng.standard_normal((D, 3)).astype(dtype)
    x = jax.jit(_spd_solve)(a, b)
    assert x.dtype == dtype
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = np.linalg.solve(a64, b64)
    eps = np.finfo(dtype).eps
    assert _rel_err(x, ref) < 10 * D * np.linalg.cond(a64) * eps
    # Backward error: small residual relative to |a| |x|.
    residual = np.abs(a64 @ np.asarray(x, np.float64) - b64)
    assert np.max(residual / (np.abs(a64) @ np.abs(np.asarray(x, np.float64)))) < (
        10 * D * eps
    )


@pytest.mark.parametrize("D", [_SMALL_DENSE, _SMALL_DENSE + 1])
def test_dense_sequential_lapack_only_above_threshold(D):
    A, b = jnp.zeros((4, D, D)), jnp.zeros((4, D))
    text = dense_smoother_sequential.lower(A, b, b[0], b, 1.0).as_text()
    assert ("lapack" in text) == (D > _SMALL_DENSE)
