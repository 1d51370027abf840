r"""Kalman smoothers for one Levenberg–Marquardt (ELK) step.

Every function here returns the posterior mean of the linear-Gaussian state-space model

$$x_t = A_t x_{t-1} + b_t + w_t, \quad w_t \sim \mathcal{N}(0, I), \qquad
o_t = x_t + v_t, \quad v_t \sim \mathcal{N}(0, \lambda_t^{-1} I),$$

for $t = 1, \dots, T$, with $x_0$ known exactly. Equivalently, it returns the minimiser of

$$\sum_{t=1}^T \lVert x_t - A_t x_{t-1} - b_t \rVert^2
+ \sum_{t=1}^T \lambda_t \lVert x_t - o_t \rVert^2,$$

whose normal equations form a block-tridiagonal symmetric positive definite system. With
$A_t$ the Jacobians of a nonlinear recurrence, $b_t$ its linearised offsets and $o_t$ the
current iterate, this is one damped Newton (Levenberg–Marquardt) step: ELK, and quasi-ELK
when the $A_t$ are diagonal. $\lambda = 0$ gives the undamped (DEER) step
$x_t = A_t x_{t-1} + b_t$; $\lambda \to \infty$ gives $x_t = o_t$.

Each smoother comes in two flavours.

- `*_sequential`: a Kalman filter (`lax.scan`) then a Rauch–Tung–Striebel pass
  (`lax.scan(reverse=True)`). $O(T)$ work and depth.
- `*_parallel`: the temporal parallelisation of Särkkä & García-Fernández, "Temporal
  parallelization of Bayesian smoothers", IEEE TAC 2021. Both passes are parallel
  prefix scans over associative elements: $O(T)$ work and $O(\log T)$ depth.

**Filtering elements.** Write $\delta_t = 1 / (1 + \lambda_t)$ and
$\gamma_t = \lambda_t / (1 + \lambda_t)$. Element $t$ is the tuple
$(\bar A, \bar b, C, \eta, J)$ describing
$p(x_t \mid x_{t-1}, o_t) = \mathcal{N}(x_t; \bar A x_{t-1} + \bar b, C)$ and
$p(o_t \mid x_{t-1}) \propto \exp(-\tfrac{1}{2} x_{t-1}^\top J x_{t-1}
+ \eta^\top x_{t-1})$. As the noise covariances are multiples of the identity these are
explicit:

$$\bar A = \delta_t A_t, \quad \bar b = \delta_t b_t + \gamma_t o_t, \quad
C = \delta_t I, \quad \eta = \gamma_t A_t^\top (o_t - b_t), \quad
J = \gamma_t A_t^\top A_t.$$

The first element absorbs the known $x_0$: it is the same with $A_1 \to 0$ and
$b_1 \to A_1 x_0 + b_1$. Two elements, $i$ before $j$, combine as (with
$M = I + C_i J_j$)

$$\begin{aligned}
\bar A_{ij} &= \bar A_j M^{-1} \bar A_i, &
\bar b_{ij} &= \bar A_j M^{-1} (\bar b_i + C_i \eta_j) + \bar b_j, &
C_{ij} &= \bar A_j M^{-1} C_i \bar A_j^\top + C_j, \\
\eta_{ij} &= \bar A_i^\top M^{-\top} (\eta_j - J_j \bar b_i) + \eta_i, &
J_{ij} &= \bar A_i^\top M^{-\top} J_j \bar A_i + J_i. &&
\end{aligned}$$

Only $M$ is factorised, as $\bar A_i^\top M^{-\top} = (M^{-1} \bar A_i)^\top$: one
solve per combination, for the right-hand sides $[\bar A_i, C_i, \bar b_i + C_i \eta_j]$.
$C$ and $J$ are symmetrised after every combination. After the prefix scan, $\bar b$
and $C$ of the $t$-th prefix are the filtering mean $m_t$ and covariance $P_t$.

**Smoothing elements.** $x_t = E_t x_{t+1} + g_t$ with
$E_t = P_t A_{t+1}^\top (A_{t+1} P_t A_{t+1}^\top + I)^{-1}$ and
$g_t = m_t - E_t (A_{t+1} m_t + b_{t+1})$ for $t < T$, and $E_T = 0$, $g_T = m_T$. These
are affine maps, composed by a reverse prefix scan. (The smoothed covariances, the
third component $L$ of the smoothing elements of Särkkä & García-Fernández, are not
needed for the mean, so they are not computed.)

All the matrices solved against, $M = I + C_i J_j$ (eigenvalues in $[1, \infty)$),
$I + \lambda_t P_t^-$ and $A_{t+1} P_t A_{t+1}^\top + I$, are bounded away from
singular, and the elements stay bounded even when the $A_t$ are unstable (as long as
$\lambda_t > 0$): the observations control the growth that a plain scan of the $A_t$
would show.

**Scans.** By default the parallel smoothers combine their elements with
`lax.associative_scan` (a binary tree: about $2 \log_2 T$ levels). Every level is a
separate copy of the combination in the compiled program, and XLA compiles each copy of
each kernel separately, so for the dense smoother the compile time (not the run time)
dominates on CPU: tens of seconds at $T = 20\,000$. `radix=r` instead uses a tree with
$r$ children per node: $\lceil \log_r T \rceil$ levels, each a `lax.scan` of length
$r$ vectorised over the groups plus one vectorised fix-up. That is the same work,
$O(r \log_r T)$ depth, and several times less to compile ($r = 32$: about four times
less for the dense smoother at $T = 20\,000$).

**Precision.** The smoothers use covariance-form Kalman recursions. In single precision,
when $\lambda$ is tiny and the $A_t$ strongly unstable (e.g. $\lambda = 10^{-8}$,
spectral radius $1.5$), the filtering covariances span more than $1/\varepsilon$ and can
lose definiteness; use double precision there. The diagonal smoothers have no such
issue: their variances and informations are positive scalars, combined without
cancellation.

All functions are pure, are jitted, work with `jax.vmap` and autodifferentiation, and
preserve the floating point dtype of their inputs.
"""

import abc
import functools
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Inexact

from .._blocks import AbstractBlocks, BlockDiagonalBlocks, DenseBlocks, DiagonalBlocks
from .._scan import inclusive_scan


#
# Shared helpers
#


def _symmetrise(x: Array) -> Array:
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def _dtype(*arrays: ArrayLike) -> jnp.dtype:
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    return dtype


def _weights(lam: Array) -> tuple[Array, Array]:
    """Returns $\\delta = 1 / (1 + \\lambda)$ and $\\gamma = \\lambda / (1 + \\lambda)$,
    both computed without cancellation."""
    delta = 1 / (1 + lam)
    gamma = lam * delta
    return delta, gamma


def _check_dense(A, b, x0, obs, name):
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"`{name}` expects `A` of shape (T, D, D), got {A.shape}.")
    T, D, _ = A.shape
    for arr, label in ((b, "b"), (obs, "obs")):
        if arr.shape != (T, D):
            raise ValueError(
                f"`{name}` expects `{label}` of shape {(T, D)}, got {arr.shape}."
            )
    if x0.shape != (D,):
        raise ValueError(f"`{name}` expects `x0` of shape {(D,)}, got {x0.shape}.")


def _check_diagonal(a, b, x0, obs, name):
    if a.ndim != 2:
        raise ValueError(f"`{name}` expects `a` of shape (T, D), got {a.shape}.")
    T, D = a.shape
    for arr, label in ((b, "b"), (obs, "obs")):
        if arr.shape != (T, D):
            raise ValueError(
                f"`{name}` expects `{label}` of shape {(T, D)}, got {arr.shape}."
            )
    if x0.shape != (D,):
        raise ValueError(f"`{name}` expects `x0` of shape {(D,)}, got {x0.shape}.")


def _canonicalise(A, b, x0, obs, lam, lam_shape):
    A, b, x0, obs = map(jnp.asarray, (A, b, x0, obs))
    dtype = _dtype(A, b, x0, obs)
    A, b, x0, obs = (x.astype(dtype) for x in (A, b, x0, obs))
    lam = jnp.broadcast_to(jnp.asarray(lam, dtype=dtype), lam_shape)
    return A, b, x0, obs, lam


def _check_radix(radix, name):
    if radix is not None and (not isinstance(radix, int) or radix < 2):
        raise ValueError(f"`{name}` expects `radix` to be None or an int >= 2.")


#
# Dense smoothers
#


# The parallel scans carry each element as a single packed array, rather than a tuple:
# `lax.associative_scan` slices, pads and interleaves every leaf at every level, and
# with one leaf instead of five the compiled program is several times smaller (and
# compiles several times faster on CPU). The element types below name the parts and
# are the only place that knows how they are packed.


class DenseFilterElement(NamedTuple):
    """A dense filtering element $(\\bar A, C, \\bar b, J, \\eta)$ (see the module
    documentation), with any leading batch axes. After the prefix scan, `b` and `C`
    are the filtering mean and covariance."""

    A: Inexact[Array, "*batch D D"]
    C: Inexact[Array, "*batch D D"]
    b: Inexact[Array, "*batch D"]
    J: Inexact[Array, "*batch D D"]
    eta: Inexact[Array, "*batch D"]

    def pack(self) -> Inexact[Array, "*batch D 3*D+2"]:
        """`[A | C | b | J | eta]`, shape `(..., D, 3D + 2)`."""
        parts = (self.A, self.C, self.b[..., None], self.J, self.eta[..., None])
        return jnp.concatenate(parts, axis=-1)

    @classmethod
    def unpack(cls, packed: Inexact[Array, "*batch D 3*D+2"]) -> "DenseFilterElement":
        D = packed.shape[-2]
        A, C, b, J, eta = jnp.split(packed, [D, 2 * D, 2 * D + 1, 3 * D + 1], axis=-1)
        return cls(A, C, b[..., 0], J, eta[..., 0])

    @classmethod
    def identity(cls, size: int, dtype) -> "DenseFilterElement":
        """The neutral element of `_dense_filter_combine`."""
        zeros = jnp.zeros((size, size), dtype)
        vector = jnp.zeros((size,), dtype)
        return cls(jnp.eye(size, dtype=dtype), zeros, vector, zeros, vector)


class DenseSmootherElement(NamedTuple):
    """A dense smoothing element, the affine map $x_t = E_t x_{t+1} + g_t$, with any
    leading batch axes."""

    E: Inexact[Array, "*batch D D"]
    g: Inexact[Array, "*batch D"]

    def pack(self) -> Inexact[Array, "*batch D D+1"]:
        """`[E | g]`, shape `(..., D, D + 1)`: the matrix of the affine map."""
        return jnp.concatenate([self.E, self.g[..., None]], axis=-1)

    @classmethod
    def unpack(cls, packed: Inexact[Array, "*batch D D+1"]) -> "DenseSmootherElement":
        return cls(packed[..., :-1], packed[..., -1])

    @classmethod
    def identity(cls, size: int, dtype) -> "DenseSmootherElement":
        return cls(jnp.eye(size, dtype=dtype), jnp.zeros((size,), dtype))


def _dense_filter_element(A, b, obs, lam):
    delta, gamma = _weights(lam)
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return DenseFilterElement(
        delta * A,
        delta * eye,
        delta * b + gamma * obs,
        gamma * (A.T @ A),
        gamma * (A.T @ (obs - b)),
    ).pack()


def _eliminate(ab: Array, k, rows: Array) -> Array:
    """One Gauss–Jordan step on the augmented matrix `ab = [a | b]`: row `k` scaled to
    a unit pivot, column `k` cleared in every other row."""
    row = ab[k] / ab[k, k]
    ab = ab - jnp.where(rows == k, 0, ab[:, k])[:, None] * row[None, :]
    return ab.at[k].set(row)


def _gauss_jordan_solve(a: Array, b: Array) -> Array:
    """`jnp.linalg.solve(a, b)` for one small `(D, D)` system (`b` of shape `(D,)` or
    `(D, K)`) by Gauss-Jordan elimination with partial pivoting, in plain XLA
    operations: no LAPACK custom call.

    The sharded Kalman smoother uses it under `jax.vmap`. XLA:CPU's batched LAPACK
    kernels (`lapack_dgetrf_ffi`, ...) split a large batch into tasks on the intra-op
    thread pool and block that pool thread until they finish; with several emulated
    host devices running their shards concurrently on the same pool, every pool
    thread can end up blocked this way and the program deadlocks.
    """
    D = a.shape[0]
    vector = b.ndim == 1
    ab = jnp.concatenate([a, b[:, None] if vector else b], axis=1)
    rows = jnp.arange(D)

    def step(k, ab):
        column = jnp.abs(ab[:, k])
        pivot = jnp.argmax(jnp.where(rows >= k, column, -1))
        swap = (rows == k).astype(ab.dtype) - (rows == pivot).astype(ab.dtype)
        ab = ab + swap[:, None] * (ab[pivot] - ab[k])[None, :]
        return _eliminate(ab, k, rows)

    ab = lax.fori_loop(0, D, step, ab, unroll=D <= 16)
    x = ab[:, D:]
    return x[:, 0] if vector else x


# Up to this state dimension the sequential dense smoother works in plain elementwise
# XLA operations (`_spd_solve`, `_fused_matmul`), above it with LAPACK (a Cholesky
# factorisation: 0.8-1x the time of LU at D = 12-24) and dots. On CPU every dot and
# LAPACK call in a scan body is a separate library call costing microseconds per time
# step whatever D; the elementwise operations fuse into a few kernels, but the
# unrolled elimination needs 2D of them in sequence, each costing more as D grows.
# Measured on a shared 2-core CPU (T = 10^4, whole smoother, time per step relative to
# LU and dots): float32 0.25x at D = 4, 0.5-0.85x at D = 8, 0.6x at D = 10, 1.1-1.3x
# at D = 12, 1.4-1.6x at D = 16; float64 0.34x, 0.74x, 1.0x, 1.55x at D = 4, 8, 10, 12.
_SMALL_DENSE = 10


def _spd_solve(a: Array, b: Array) -> Array:
    r"""`jnp.linalg.solve(a, b)` for one small symmetric positive definite `(D, D)`
    system (`b` of shape `(D, K)`), by Gauss–Jordan elimination without pivoting,
    unrolled, in plain XLA operations that fuse with their neighbours.

    Without pivoting because $a$ is positive definite: every pivot is a diagonal entry
    of a Schur complement of $a$, itself positive definite, so the pivots are at least
    $\lambda_{\min}(a)$ and the eliminated entries do not grow (growth factor 1, as in
    a Cholesky factorisation). The forward error is then of order
    $\operatorname{cond}(a) \varepsilon$, as with LAPACK; the systems solved here have
    $\lambda_{\min}(a) \geq 1$. A Cholesky solve would need $3D$ dependent steps (the
    factorisation and two triangular solves) where this needs $D$, and measured slower.
    """
    D = a.shape[0]
    ab = jnp.concatenate([a, b], axis=1)
    rows = jnp.arange(D)
    for k in range(D):
        ab = _eliminate(ab, k, rows)
    return ab[:, D:]


def _cholesky_solve(a: Array, b: Array) -> Array:
    """`jnp.linalg.solve(a, b)` for a symmetric positive definite `a`, with LAPACK."""
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), b)


def _fused_matmul(a: Array, b: Array) -> Array:
    """`a @ b` (`b` a matrix or a vector) as a broadcast product and a sum: no dot, so
    that XLA fuses it with the elementwise operations around it."""
    if b.ndim == 1:
        return jnp.sum(a * b, axis=-1)
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _dense_filter_combine(earlier, later, solve=jnp.linalg.solve):
    A_i, C_i, b_i, J_i, eta_i = DenseFilterElement.unpack(earlier)
    A_j, C_j, b_j, J_j, eta_j = DenseFilterElement.unpack(later)
    D = b_i.shape[0]
    # The products below act on side-by-side matrices, five in all.
    # [C_i J_j | C_i eta_j]
    CJ = C_i @ jnp.concatenate([J_j, eta_j[:, None]], axis=1)
    # One solve with M = I + C_i J_j gives everything: the terms with
    # M^{-T} = (I + J_j C_i)^{-1} are transposes, A_i^T M^{-T} = (M^{-1} A_i)^T.
    M = jnp.eye(D, dtype=earlier.dtype) + CJ[:, :D]
    # [M^{-1} A_i | M^{-1} C_i | M^{-1} (b_i + C_i eta_j)]
    MA = solve(M, jnp.concatenate([A_i, C_i, (b_i + CJ[:, D])[:, None]], axis=1))
    # [A_j M^{-1} A_i | A_j M^{-1} C_i | A_j M^{-1} (b_i + C_i eta_j)]
    AMA = A_j @ MA
    C = _symmetrise(AMA[:, D : 2 * D] @ A_j.T) + C_j
    b = AMA[:, 2 * D] + b_j
    # [J_j A_i | J_j b_i]
    JA = J_j @ jnp.concatenate([A_i, b_i[:, None]], axis=1)
    # [A_i^T M^{-T} J_j A_i | A_i^T M^{-T} (eta_j - J_j b_i)]
    AMJ = MA[:, :D].T @ jnp.concatenate(
        [JA[:, :D], (eta_j - JA[:, D])[:, None]], axis=1
    )
    J = _symmetrise(AMJ[:, :D]) + J_i
    eta = AMJ[:, D] + eta_i
    return DenseFilterElement(AMA[:, :D], C, b, J, eta).pack()


def _dense_smoother_element(
    m, P, A_next, b_next, solve=jnp.linalg.solve, matmul=jnp.matmul
):
    eye = jnp.eye(A_next.shape[-1], dtype=A_next.dtype)
    AP = matmul(A_next, P)
    S = _symmetrise(matmul(AP, A_next.T)) + eye
    # E = P A^T S^{-1}, so E^T = S^{-1} A P (S and P symmetric).
    E = solve(S, AP).T
    g = m - matmul(E, matmul(A_next, m) + b_next)
    return E, g


def _dense_smoother_combine(later, earlier):
    # With `reverse=True`, `lax.associative_scan` passes the element later in time
    # first. Composes x_s = E_e x_m + g_e after x_m = E_l x_r + g_l: the packed
    # `later` is the matrix [E_l | g_l] of its map.
    E, g = DenseSmootherElement.unpack(earlier)
    return (E @ later).at[:, -1].add(g)


@functools.partial(jax.jit, static_argnames=("radix", "smooth"))
def dense_smoother_parallel(
    A: Inexact[ArrayLike, "T D D"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T"],
    *,
    radix: int | None = None,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean in $O(\log T)$ depth, with the temporal parallelisation of
    Särkkä & García-Fernández (2021).

    Minimises
    $\sum_t \lVert x_t - A_t x_{t-1} - b_t \rVert^2 + \lambda_t \lVert x_t - o_t \rVert^2$
    over $x_1, \dots, x_T$, given $x_0$. Two parallel prefix scans: a forward one over
    the filtering elements and a reverse one over the smoothing elements (see the
    module documentation). $O(T D^3)$ work, $O(T D^2)$ memory.

    **Arguments:**

    - `A`: the transition matrices $A_t$, shape `(T, D, D)`.
    - `b`: the offsets $b_t$, shape `(T, D)`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda_t \geq 0$, a scalar or an array
        of shape `(T,)`. Strictly positive values keep the filter bounded for unstable
        $A_t$.
    - `radix`: `None` (default) to combine the elements with `lax.associative_scan`
        (smallest depth), or an integer $r \geq 2$ to use a tree with $r$ children per
        node (same work, $O(r \log_r T)$ depth, much faster to compile: see the module
        documentation). Static.
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    A, b, x0, obs = map(jnp.asarray, (A, b, x0, obs))
    _check_dense(A, b, x0, obs, "dense_smoother_parallel")
    _check_radix(radix, "dense_smoother_parallel")
    A, b, x0, obs, lam = _canonicalise(A, b, x0, obs, lam, A.shape[:1])
    # The first element absorbs the known x_0.
    A_eff = A.at[0].set(0)
    b_eff = b.at[0].add(A[0] @ x0)
    elems = jax.vmap(_dense_filter_element)(A_eff, b_eff, obs, lam)
    D = A.shape[-1]
    identity = DenseFilterElement.identity(D, A.dtype).pack()
    elems = inclusive_scan(jax.vmap(_dense_filter_combine), elems, identity, radix)
    filtered = DenseFilterElement.unpack(elems)
    m, P = filtered.b, filtered.C
    if not smooth:
        return m
    E, g = jax.vmap(_dense_smoother_element)(m[:-1], P[:-1], A[1:], b[1:])
    # The last element is x_T = m_T.
    E = jnp.concatenate([E, jnp.zeros_like(P[-1:])])
    elems = DenseSmootherElement(E, jnp.concatenate([g, m[-1:]])).pack()
    identity = DenseSmootherElement.identity(D, A.dtype).pack()
    elems = inclusive_scan(
        jax.vmap(_dense_smoother_combine), elems, identity, radix, reverse=True
    )
    return DenseSmootherElement.unpack(elems).g


@functools.partial(jax.jit, static_argnames="smooth")
def dense_smoother_sequential(
    A: Inexact[ArrayLike, "T D D"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T"],
    *,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean in $O(T)$ depth: a Kalman filter then a
    Rauch–Tung–Striebel pass.

    Same problem and arguments as `dense_smoother_parallel`,
    with the least work, $O(T D^3)$, and the fewest synchronisations: the method of
    choice on CPU. Up to $D = 10$ its per-step solves and products are elementwise
    operations that XLA fuses in the scan body, several times faster on CPU than a
    LAPACK call per step. The filter update uses
    $P_t = (I + \lambda_t P_t^-)^{-1} P_t^-$ and
    $m_t = (I + \lambda_t P_t^-)^{-1} (m_t^- + \lambda_t P_t^- o_t)$, where
    $m_t^- = A_t m_{t-1} + b_t$ and $P_t^- = A_t P_{t-1} A_t^\top + I$, and
    $m_0 = x_0$, $P_0 = 0$.

    **Arguments:**

    - `A`: the transition matrices $A_t$, shape `(T, D, D)`.
    - `b`: the offsets $b_t$, shape `(T, D)`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda_t \geq 0$, a scalar or an array
        of shape `(T,)`.
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    A, b, x0, obs = map(jnp.asarray, (A, b, x0, obs))
    _check_dense(A, b, x0, obs, "dense_smoother_sequential")
    A, b, x0, obs, lam = _canonicalise(A, b, x0, obs, lam, A.shape[:1])
    D = x0.shape[0]
    eye = jnp.eye(D, dtype=x0.dtype)
    # Both systems solved, G below and S in the smoothing gains, are symmetric positive
    # definite with eigenvalues at least 1.
    if D <= _SMALL_DENSE:
        solve, matmul = _spd_solve, _fused_matmul
    else:
        solve, matmul = _cholesky_solve, jnp.matmul

    def filter_step(carry, inputs):
        m, P = carry
        A_t, b_t, obs_t, lam_t = inputs
        m_pred = matmul(A_t, m) + b_t
        P_pred = _symmetrise(matmul(matmul(A_t, P), A_t.T)) + eye
        # G = I + lam P_pred is symmetric as lam_t is a scalar.
        G = eye + lam_t * P_pred
        m_rhs = m_pred + lam_t * matmul(P_pred, obs_t)
        sol = solve(G, jnp.concatenate([P_pred, m_rhs[:, None]], 1))
        P = _symmetrise(sol[:, :D])
        m = sol[:, D]
        return (m, P), (m, P)

    init = (x0, jnp.zeros((D, D), x0.dtype))
    _, (m, P) = lax.scan(filter_step, init, (A, b, obs, lam))
    if not smooth:
        return m

    # The smoothing gains depend on the filter alone: one batched solve for all of
    # them, then a backward pass that is only an affine recurrence.
    element = functools.partial(_dense_smoother_element, solve=solve, matmul=matmul)
    E, g = jax.vmap(element)(m[:-1], P[:-1], A[1:], b[1:])

    def smoother_step(x_next, inputs):
        E_t, g_t = inputs
        x = matmul(E_t, x_next) + g_t
        return x, x

    _, x = lax.scan(smoother_step, m[-1], (E, g), reverse=True)
    return jnp.concatenate([x, m[-1:]])


#
# Diagonal smoothers
#


class DiagonalFilterElement(NamedTuple):
    """A diagonal filtering element: the diagonals $(a, c, j, b, \\eta)$ of
    $(\\bar A, C, J, \\bar b, \\eta)$, each of shape `(..., D)`. After the prefix
    scan, `b` and `c` are the filtering means and variances."""

    a: Inexact[Array, "*batch D"]
    c: Inexact[Array, "*batch D"]
    j: Inexact[Array, "*batch D"]
    b: Inexact[Array, "*batch D"]
    eta: Inexact[Array, "*batch D"]

    def pack(self) -> Inexact[Array, "*batch 5 D"]:
        """`[a, c, j, b, eta]` stacked, shape `(..., 5, D)`."""
        return jnp.stack(self, axis=-2)

    @classmethod
    def unpack(cls, packed: Inexact[Array, "*batch 5 D"]) -> "DiagonalFilterElement":
        return cls(*(packed[..., k, :] for k in range(5)))

    @classmethod
    def identity(cls, size: int, dtype) -> "DiagonalFilterElement":
        """The neutral element of `_diagonal_filter_combine`."""
        zeros = jnp.zeros((size,), dtype)
        return cls(jnp.ones((size,), dtype), zeros, zeros, zeros, zeros)


class DiagonalSmootherElement(NamedTuple):
    """A diagonal smoothing element, the map $x_t = e_t \\odot x_{t+1} + g_t$."""

    e: Inexact[Array, "*batch D"]
    g: Inexact[Array, "*batch D"]

    def pack(self) -> Inexact[Array, "*batch 2 D"]:
        """`[e, g]` stacked, shape `(..., 2, D)`."""
        return jnp.stack(self, axis=-2)

    @classmethod
    def unpack(cls, packed: Inexact[Array, "*batch 2 D"]) -> "DiagonalSmootherElement":
        return cls(packed[..., 0, :], packed[..., 1, :])

    @classmethod
    def identity(cls, size: int, dtype) -> "DiagonalSmootherElement":
        return cls(jnp.ones((size,), dtype), jnp.zeros((size,), dtype))


def _diagonal_filter_element(a, b, obs, lam):
    delta, gamma = _weights(lam)
    return DiagonalFilterElement(
        delta * a,
        jnp.broadcast_to(delta, a.shape),
        gamma * a * a,
        delta * b + gamma * obs,
        gamma * a * (obs - b),
    ).pack()


def _diagonal_filter_combine(earlier, later):
    a_i, c_i, j_i, b_i, eta_i = DiagonalFilterElement.unpack(earlier)
    a_j, c_j, j_j, b_j, eta_j = DiagonalFilterElement.unpack(later)
    # s = 1 / (1 + c_i j_j) is the scalar M^{-1}. c and j are nonnegative, so nothing
    # below cancels except through the data.
    s = 1 / (1 + c_i * j_j)
    a = a_j * s * a_i
    c = a_j * a_j * s * c_i + c_j
    j = a_i * a_i * s * j_j + j_i
    b = a_j * s * (b_i + c_i * eta_j) + b_j
    eta = a_i * s * (eta_j - j_j * b_i) + eta_i
    return DiagonalFilterElement(a, c, j, b, eta).pack()


def _diagonal_smoother_element(m, p, a_next, b_next):
    e = p * a_next / (a_next * a_next * p + 1)
    g = m - e * (a_next * m + b_next)
    return e, g


def _diagonal_smoother_combine(later, earlier):
    e_l, g_l = DiagonalSmootherElement.unpack(later)
    e_e, g_e = DiagonalSmootherElement.unpack(earlier)
    return DiagonalSmootherElement(e_e * e_l, e_e * g_l + g_e).pack()


@functools.partial(jax.jit, static_argnames=("radix", "smooth"))
def diagonal_smoother_parallel(
    a: Inexact[ArrayLike, "T D"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T #D"],
    *,
    radix: int | None = None,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean for diagonal transitions $A_t = \operatorname{diag}(a_t)$,
    in $O(\log T)$ depth.

    The problem splits into $D$ independent scalar smoothers (quasi-ELK). Same
    elements as `dense_smoother_parallel`,
    with elementwise arithmetic only: $O(T D)$ work and memory.

    **Arguments:**

    - `a`: the diagonals $a_t$ of the transition matrices, shape `(T, D)`.
    - `b`: the offsets $b_t$, shape `(T, D)`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda \geq 0$, a scalar or an array
        broadcastable to `(T, D)` (e.g. shape `(T, 1)` for one value per step).
    - `radix`: `None` (default) to combine the elements with `lax.associative_scan`
        (smallest depth), or an integer $r \geq 2$ to use a tree with $r$ children per
        node (same work, $O(r \log_r T)$ depth, much faster to compile: see the module
        documentation). Static.
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    a, b, x0, obs = map(jnp.asarray, (a, b, x0, obs))
    _check_diagonal(a, b, x0, obs, "diagonal_smoother_parallel")
    _check_radix(radix, "diagonal_smoother_parallel")
    a, b, x0, obs, lam = _canonicalise(a, b, x0, obs, lam, a.shape)
    a_eff = a.at[0].set(0)
    b_eff = b.at[0].add(a[0] * x0)
    elems = _diagonal_filter_element(a_eff, b_eff, obs, lam)
    D = a.shape[-1]
    identity = DiagonalFilterElement.identity(D, a.dtype).pack()
    elems = inclusive_scan(_diagonal_filter_combine, elems, identity, radix)
    filtered = DiagonalFilterElement.unpack(elems)
    m, p = filtered.b, filtered.c
    if not smooth:
        return m
    e, g = _diagonal_smoother_element(m[:-1], p[:-1], a[1:], b[1:])
    # The last element is x_T = m_T.
    e = jnp.concatenate([e, jnp.zeros_like(m[-1:])])
    elems = DiagonalSmootherElement(e, jnp.concatenate([g, m[-1:]])).pack()
    identity = DiagonalSmootherElement.identity(D, a.dtype).pack()
    elems = inclusive_scan(
        _diagonal_smoother_combine, elems, identity, radix, reverse=True
    )
    return DiagonalSmootherElement.unpack(elems).g


@functools.partial(jax.jit, static_argnames="smooth")
def diagonal_smoother_sequential(
    a: Inexact[ArrayLike, "T D"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T #D"],
    *,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean for diagonal transitions $A_t = \operatorname{diag}(a_t)$,
    in $O(T)$ depth: a Kalman filter then a Rauch–Tung–Striebel pass, elementwise.

    **Arguments:**

    - `a`: the diagonals $a_t$ of the transition matrices, shape `(T, D)`.
    - `b`: the offsets $b_t$, shape `(T, D)`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda \geq 0$, a scalar or an array
        broadcastable to `(T, D)` (e.g. shape `(T, 1)` for one value per step).
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    a, b, x0, obs = map(jnp.asarray, (a, b, x0, obs))
    _check_diagonal(a, b, x0, obs, "diagonal_smoother_sequential")
    a, b, x0, obs, lam = _canonicalise(a, b, x0, obs, lam, a.shape)

    def filter_step(carry, inputs):
        m, p = carry
        a_t, b_t, obs_t, lam_t = inputs
        m_pred = a_t * m + b_t
        p_pred = a_t * a_t * p + 1
        g = 1 / (1 + lam_t * p_pred)
        p = g * p_pred
        m = g * (m_pred + lam_t * p_pred * obs_t)
        return (m, p), (m, p)

    init = (x0, jnp.zeros_like(x0))
    _, (m, p) = lax.scan(filter_step, init, (a, b, obs, lam))
    if not smooth:
        return m

    def smoother_step(x_next, inputs):
        e, g = _diagonal_smoother_element(*inputs)
        x = e * x_next + g
        return x, x

    _, x = lax.scan(smoother_step, m[-1], (m[:-1], p[:-1], a[1:], b[1:]), reverse=True)
    return jnp.concatenate([x, m[-1:]])


#
# Block-diagonal smoothers
#


def _block_diagonal(dense_fn, name, A, b, x0, obs, lam):
    A, b, x0, obs = map(jnp.asarray, (A, b, x0, obs))
    if A.ndim != 4 or A.shape[2] != A.shape[3]:
        raise ValueError(
            f"`{name}` expects `A` of shape (T, D//k, k, k), got {A.shape}."
        )
    T, nb, k, _ = A.shape
    D = nb * k
    for arr, label in ((b, "b"), (obs, "obs")):
        if arr.shape != (T, D):
            raise ValueError(
                f"`{name}` expects `{label}` of shape {(T, D)}, got {arr.shape}."
            )
    if x0.shape != (D,):
        raise ValueError(f"`{name}` expects `x0` of shape {(D,)}, got {x0.shape}.")
    A, b, x0, obs, lam = _canonicalise(A, b, x0, obs, lam, (T, nb))
    x = jax.vmap(dense_fn, in_axes=(1, 1, 0, 1, 1), out_axes=1)(
        A, b.reshape(T, nb, k), x0.reshape(nb, k), obs.reshape(T, nb, k), lam
    )
    return x.reshape(T, D)


@functools.partial(jax.jit, static_argnames=("radix", "smooth"))
def block_diagonal_smoother_parallel(
    A: Inexact[ArrayLike, "T B k k"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T #B"],
    *,
    radix: int | None = None,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean for block-diagonal transitions, in $O(\log T)$ depth.

    $A_t = \operatorname{blockdiag}(A_{t,1}, \dots, A_{t,B})$ with $k \times k$ blocks,
    $D = B k$: the problem splits into $B$ independent $k$-dimensional smoothers, each
    solved by `dense_smoother_parallel`.
    $O(T D k^2)$ work.

    **Arguments:**

    - `A`: the diagonal blocks $A_{t,i}$, shape `(T, B, k, k)`.
    - `b`: the offsets $b_t$, shape `(T, D)`; block $i$ is `b[:, i*k:(i+1)*k]`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda \geq 0$, a scalar or an array
        broadcastable to `(T, B)` (one value per step and block).
    - `radix`: `None` (default) to combine the elements with `lax.associative_scan`
        (smallest depth), or an integer $r \geq 2$ to use a tree with $r$ children per
        node (same work, $O(r \log_r T)$ depth, much faster to compile: see the module
        documentation). Static.
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    _check_radix(radix, "block_diagonal_smoother_parallel")
    dense_fn = functools.partial(dense_smoother_parallel, radix=radix, smooth=smooth)
    name = "block_diagonal_smoother_parallel"
    return _block_diagonal(dense_fn, name, A, b, x0, obs, lam)


@functools.partial(jax.jit, static_argnames="smooth")
def block_diagonal_smoother_sequential(
    A: Inexact[ArrayLike, "T B k k"],
    b: Inexact[ArrayLike, "T D"],
    x0: Inexact[ArrayLike, " D"],
    obs: Inexact[ArrayLike, "T D"],
    lam: Inexact[ArrayLike, "*#T #B"],
    *,
    smooth: bool = True,
) -> Inexact[Array, "T D"]:
    r"""Kalman smoother mean for block-diagonal transitions, in $O(T)$ depth.

    As `block_diagonal_smoother_parallel`,
    with each block solved by
    `dense_smoother_sequential`.

    **Arguments:**

    - `A`: the diagonal blocks $A_{t,i}$, shape `(T, B, k, k)`.
    - `b`: the offsets $b_t$, shape `(T, D)`; block $i$ is `b[:, i*k:(i+1)*k]`.
    - `x0`: the known initial state $x_0$, shape `(D,)`.
    - `obs`: the observations $o_t$, shape `(T, D)`.
    - `lam`: the observation precision (damping) $\lambda \geq 0$, a scalar or an array
        broadcastable to `(T, B)` (one value per step and block).
    - `smooth`: `True` (default) for the smoothed means; `False` stops after the
        filter and returns the filtering means $\mathbb{E}[x_t \mid o_{1:t}]$. Static.

    **Returns:**

    The smoothed means $\mathbb{E}[x_t \mid o_{1:T}]$, shape `(T, D)`, in the dtype of
    the inputs.
    """
    return _block_diagonal(
        functools.partial(dense_smoother_sequential, smooth=smooth),
        "block_diagonal_smoother_sequential",
        A,
        b,
        x0,
        obs,
        lam,
    )


#
# The smoothers by block structure
#


def _smooth(
    parallel_fn,
    sequential_fn,
    transitions,
    offsets,
    observations,
    damping,
    *,
    parallel,
    smooth,
    radix,
):
    x0 = jnp.zeros(offsets.shape[1:], offsets.dtype)
    if parallel:
        fn = functools.partial(parallel_fn, radix=radix)
    else:
        fn = sequential_fn
    return fn(transitions, offsets, x0, observations, damping, smooth=smooth)


def _per_component(damping):
    """One damping per step, shape `(T,)`, as `(T, 1)` to broadcast over components or
    blocks; a scalar as it is."""
    return damping[:, None] if jnp.ndim(damping) == 1 else damping


# The sharded smoother runs its pieces inside `jax.shard_map`, where the dense solves
# avoid LAPACK (see `_gauss_jordan_solve`).
_sharded_dense_combine = functools.partial(
    _dense_filter_combine, solve=_gauss_jordan_solve
)
_sharded_dense_smoother_element = functools.partial(
    _dense_smoother_element, solve=_gauss_jordan_solve
)


class AbstractKalmanBlocks(eqx.Module):
    """The transitions $A_t$ of the Kalman smoother and filter, in the form that their
    elements use; [`parallel_dynamics.AbstractBlocks.kalman_blocks`][] makes them.

    `smooth` runs the whole smoother on one device. The other methods are the pieces
    from which `parallel_dynamics.internal.sharded_kalman_smooth` assembles it across
    devices: the filtering elements (packed arrays, see `DenseFilterElement` and
    `DiagonalFilterElement`) with their combination and identity, the filtering means,
    and the smoothing elements as the blocks of a reverse recurrence. Every array has
    a leading time axis.
    """

    # Whether the elements hold matrices, combined at a cubic cost in their size: on a
    # CPU the sequential passes are then the faster ones.
    matrix_elements: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def smooth(
        self,
        offsets: Inexact[Array, "T D"],
        observations: Inexact[Array, "T D"],
        damping: Inexact[ArrayLike, "*#T"],
        *,
        parallel: bool,
        smooth: bool,
        radix: int | None,
    ) -> Inexact[Array, "T D"]:
        """The smoother means (filter means if not `smooth`) with $x_0 = 0$."""

    @abc.abstractmethod
    def filter_elements(self, offsets, observations, damping) -> Array:
        """The packed filtering elements of every step (`damping` of shape `(T,)`)."""

    @abc.abstractmethod
    def combine(self, earlier: Array, later: Array) -> Array:
        """Combines two packed filtering elements (no time axis), `earlier` first."""

    @abc.abstractmethod
    def filter_identity(self, dtype) -> Array:
        """The packed neutral element of `combine`."""

    @abc.abstractmethod
    def filtered_means(self, elements: Array) -> Inexact[Array, "T D"]:
        """The filtering means, from the prefixes of the filtering elements."""

    @abc.abstractmethod
    def smoothing(
        self, elements: Array, offsets_next: Inexact[Array, "T D"]
    ) -> tuple[AbstractBlocks, Inexact[Array, "T D"]]:
        """The smoothing elements $x_t = E_t x_{t+1} + g_t$ as blocks and offsets, from
        the filtering prefixes `elements` at $t$, these transitions being $A_{t+1}$ and
        `offsets_next` being $b_{t+1}$."""


class DenseKalmanBlocks(AbstractKalmanBlocks):
    """Dense $D \\times D$ transitions: the $D$-dimensional smoother (ELK)."""

    transitions: Inexact[Array, "T D D"]
    matrix_elements: ClassVar[bool] = True

    def smooth(self, offsets, observations, damping, **kwargs):
        return _smooth(
            dense_smoother_parallel,
            dense_smoother_sequential,
            self.transitions,
            offsets,
            observations,
            damping,
            **kwargs,
        )

    def filter_elements(self, offsets, observations, damping):
        return jax.vmap(_dense_filter_element)(
            self.transitions, offsets, observations, damping
        )

    def combine(self, earlier, later):
        return _sharded_dense_combine(earlier, later)

    def filter_identity(self, dtype):
        return DenseFilterElement.identity(self.transitions.shape[-1], dtype).pack()

    def filtered_means(self, elements):
        return DenseFilterElement.unpack(elements).b

    def smoothing(self, elements, offsets_next):
        filtered = DenseFilterElement.unpack(elements)
        gain, offset = jax.vmap(_sharded_dense_smoother_element)(
            filtered.b, filtered.C, self.transitions, offsets_next
        )
        return DenseBlocks(gain), offset


class BlockDiagonalKalmanBlocks(AbstractKalmanBlocks):
    """Block-diagonal transitions with $k \\times k$ blocks: $D / k$ independent
    $k$-dimensional smoothers."""

    transitions: Inexact[Array, "T B k k"]
    matrix_elements: ClassVar[bool] = True

    def smooth(self, offsets, observations, damping, **kwargs):
        return _smooth(
            block_diagonal_smoother_parallel,
            block_diagonal_smoother_sequential,
            self.transitions,
            offsets,
            observations,
            _per_component(damping),
            **kwargs,
        )

    def _split(self, x):
        return x.reshape(x.shape[:1] + self.transitions.shape[1:3])

    def filter_elements(self, offsets, observations, damping):
        return jax.vmap(jax.vmap(_dense_filter_element))(
            self.transitions,
            self._split(offsets),
            self._split(observations),
            jnp.broadcast_to(damping[:, None], self.transitions.shape[:2]),
        )

    def combine(self, earlier, later):
        return jax.vmap(_sharded_dense_combine)(earlier, later)

    def filter_identity(self, dtype):
        num_blocks, k = self.transitions.shape[1:3]
        one = DenseFilterElement.identity(k, dtype).pack()
        return jnp.broadcast_to(one, (num_blocks,) + one.shape)

    def filtered_means(self, elements):
        means = DenseFilterElement.unpack(elements).b
        return means.reshape(means.shape[0], -1)

    def smoothing(self, elements, offsets_next):
        filtered = DenseFilterElement.unpack(elements)
        gain, offset = jax.vmap(jax.vmap(_sharded_dense_smoother_element))(
            filtered.b, filtered.C, self.transitions, self._split(offsets_next)
        )
        return BlockDiagonalBlocks(gain), offset.reshape(offset.shape[0], -1)


class DiagonalKalmanBlocks(AbstractKalmanBlocks):
    """Diagonal transitions $A_t = \\operatorname{diag}(a_t)$: $D$ independent scalar
    smoothers (quasi-ELK)."""

    transitions: Inexact[Array, "T D"]
    matrix_elements: ClassVar[bool] = False

    def smooth(self, offsets, observations, damping, **kwargs):
        return _smooth(
            diagonal_smoother_parallel,
            diagonal_smoother_sequential,
            self.transitions,
            offsets,
            observations,
            _per_component(damping),
            **kwargs,
        )

    def filter_elements(self, offsets, observations, damping):
        return _diagonal_filter_element(
            self.transitions, offsets, observations, damping[:, None]
        )

    def combine(self, earlier, later):
        return _diagonal_filter_combine(earlier, later)

    def filter_identity(self, dtype):
        return DiagonalFilterElement.identity(self.transitions.shape[-1], dtype).pack()

    def filtered_means(self, elements):
        return DiagonalFilterElement.unpack(elements).b

    def smoothing(self, elements, offsets_next):
        filtered = DiagonalFilterElement.unpack(elements)
        gain, offset = _diagonal_smoother_element(
            filtered.b, filtered.c, self.transitions, offsets_next
        )
        return DiagonalBlocks(gain), offset
