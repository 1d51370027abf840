"""What $A_t$ is: how the solvers approximate $J_t = \\partial f / \\partial y$.

Each class evaluates the step at every $t$ together with the blocks $A_t$ of one
structure. None of them builds a dense $(TD) \\times (TD)$ anything; the quasi ones never
hold more than $O(T D)$ memory at once (plus a bounded work buffer).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Inexact, Int, PRNGKeyArray, PyTree

from ._blocks import (
    AbstractBlocks,
    BlockDiagonalBlocks,
    DenseBlocks,
    DiagonalBlocks,
    IdentityBlocks,
    ZeroBlocks,
)
from ._problem import Recurrence


# Work buffer for per-step Jacobians: at most this many entries are materialised at
# once when a structure only keeps part of each D x D Jacobian.
_MAX_JACOBIAN_ENTRIES = 2**24


def _step_and_jacobian(recurrence: Recurrence, y: Array, x: PyTree):
    def fn(_y):
        out = recurrence.step_at(_y, x)
        return out, out

    jacobian, value = jax.jacfwd(fn, has_aux=True)(y)
    return value, jacobian


def _map_bounded(
    recurrence: Recurrence, fn: Callable, previous: Array, entries_per_step: int
):
    """`vmap`s `fn(y_{t-1}, x_t)` over time, in sequential batches when one vmap would
    materialise more than `_MAX_JACOBIAN_ENTRIES` Jacobian entries."""
    length = previous.shape[0]
    if length * entries_per_step <= _MAX_JACOBIAN_ENTRIES:
        return recurrence.map_steps(fn, previous)
    batch_size = max(1, _MAX_JACOBIAN_ENTRIES // entries_per_step)
    if recurrence.inputs is None:
        return jax.lax.map(lambda y: fn(y, None), previous, batch_size=batch_size)
    return jax.lax.map(
        lambda yx: fn(*yx), (previous, recurrence.inputs), batch_size=batch_size
    )


class AbstractJacobian(eqx.Module):
    """Abstract base class for the structure of $A_t \\approx J_t$."""

    @abc.abstractmethod
    def linearise(
        self, recurrence: Recurrence, previous: Inexact[Array, "T D"], iteration: Int
    ) -> tuple[Inexact[Array, "T D"], AbstractBlocks]:
        """Evaluates $f(y_{t-1}, x_t)$ and the blocks $A_t$ at every $t$.

        **Arguments:**

        - `recurrence`: the [`parallel_dynamics.Recurrence`][] being solved.
        - `previous`: $(y_0, \\dots, y_{T-1})$ as a `(T, D)` array.
        - `iteration`: the solver's iteration counter (seeds stochastic estimates).

        **Returns:**

        A pair of the `(T, D)` step values and an
        [`parallel_dynamics.AbstractBlocks`][].
        """


class DenseJacobian(AbstractJacobian):
    """$A_t = J_t$, the full $D \\times D$ Jacobian (Newton; DEER). Computed with one
    batched forward-mode pass of $D$ tangents per step. Memory $O(T D^2)$."""

    def linearise(self, recurrence, previous, iteration):
        del iteration
        values, matrices = recurrence.map_steps(
            lambda y, x: _step_and_jacobian(recurrence, y, x), previous
        )
        return values, DenseBlocks(matrices)


class ExactDiagonal(AbstractJacobian):
    """$A_t = \\operatorname{diag}(J_t)$, exactly (quasi-Newton; quasi-DEER).

    In general this costs $D$ tangent evaluations per step, done in bounded batches so
    that memory stays $O(T D)$. When the step is *elementwise* (its Jacobian is
    diagonal by construction, as in ParaRNN's cells), set `elementwise=True`: one
    Jacobian-vector product with a vector of ones then gives the diagonal exactly.
    """

    elementwise: bool = False

    def linearise(self, recurrence, previous, iteration):
        del iteration
        if self.elementwise:
            values, diagonal = jax.jvp(
                recurrence.evaluate, (previous,), (jnp.ones_like(previous),)
            )
            return values, DiagonalBlocks(diagonal)

        def fn(y, x):
            value, jacobian = _step_and_jacobian(recurrence, y, x)
            return value, jnp.diagonal(jacobian)

        size = recurrence.size
        values, diagonal = _map_bounded(recurrence, fn, previous, size * size)
        return values, DiagonalBlocks(diagonal)


class StochasticDiagonal(AbstractJacobian):
    """$A_t \\approx \\operatorname{diag}(J_t)$ by Hutchinson-style probing:
    $\\operatorname{diag}(J) \\approx \\frac1k \\sum_{i=1}^k v_i \\odot (J v_i)$ with
    Rademacher vectors $v_i$ (Bekas et al. 2007; used for parallel MCMC by Zoltowski
    et al. 2025). Costs `num_probes` Jacobian-vector products per iteration, whatever
    $D$ is; unbiased, but noisy when $J_t$ is far from diagonal. The probes are drawn
    afresh at each iteration from `key` folded with the iteration number, so a solve is
    deterministic given `key`.
    """

    num_probes: int = 1
    key: PRNGKeyArray = eqx.field(default_factory=lambda: jr.key(0))

    def __check_init__(self):
        if self.num_probes < 1:
            raise ValueError(f"`num_probes` must be at least 1, got {self.num_probes}.")

    def linearise(self, recurrence, previous, iteration):
        key = jr.fold_in(self.key, iteration)
        shape = (self.num_probes,) + previous.shape
        probes = jr.rademacher(key, shape, dtype=previous.dtype)
        values, linear = jax.linearize(recurrence.evaluate, previous)
        products = jax.vmap(linear)(probes)
        return values, DiagonalBlocks(jnp.mean(probes * products, axis=0))


class DiagonalFunction(AbstractJacobian):
    """$A_t = \\operatorname{diag}(d(y_{t-1}, x_t, \\theta))$ from a user-supplied
    function `diagonal_fn(y_prev, x_t, args)` returning a PyTree with the structure of
    the state: the diagonal of $\\partial f / \\partial y$, or any diagonal
    approximation of it. One extra pass of a (usually cheap) function per iteration.
    """

    diagonal_fn: Callable

    def linearise(self, recurrence, previous, iteration):
        del iteration
        layout = recurrence.layout

        def fn(y, x):
            value = recurrence.step_at(y, x)
            diagonal = self.diagonal_fn(layout.unflatten(y), x, recurrence.args)
            return value, layout.flatten(diagonal)

        values, diagonal = recurrence.map_steps(fn, previous)
        return values, DiagonalBlocks(diagonal)


class BlockDiagonalJacobian(AbstractJacobian):
    """$A_t$ = the $k \\times k$ diagonal blocks of $J_t$ (block quasi-Newton), for
    states made of $D / k$ groups of $k$ coupled components (e.g. the $(h, c)$ pairs of
    an LSTM laid out blockwise, or multi-head cells). Memory $O(T D k)$, scan cost
    $O(T D k^2)$. `block_size` must divide $D$.
    """

    block_size: int

    def __check_init__(self):
        if self.block_size < 1:
            raise ValueError(f"`block_size` must be positive, got {self.block_size}.")

    def linearise(self, recurrence, previous, iteration):
        del iteration
        size, k = recurrence.size, self.block_size
        if size % k != 0:
            raise ValueError(
                f"`block_size` ({k}) must divide the state size D = {size}."
            )
        num_blocks = size // k

        def fn(y, x):
            value, jacobian = _step_and_jacobian(recurrence, y, x)
            jacobian = jacobian.reshape(num_blocks, k, num_blocks, k)
            return value, jnp.einsum("aiaj->aij", jacobian)

        values, blocks = _map_bounded(recurrence, fn, previous, size * size)
        return values, BlockDiagonalBlocks(blocks)


class IdentityJacobian(AbstractJacobian):
    """$A_t = I$ (Picard iteration): no derivatives at all; the linear solve is a
    cumulative sum."""

    def linearise(self, recurrence, previous, iteration):
        del iteration
        values = recurrence.evaluate(previous)
        length, size = previous.shape
        return values, IdentityBlocks(length, size, previous.dtype)


class ZeroJacobian(AbstractJacobian):
    """$A_t = 0$ (Jacobi / plain fixed-point iteration $y_t \\leftarrow f(y_{t-1},
    x_t)$): no derivatives and no scan."""

    def linearise(self, recurrence, previous, iteration):
        del iteration
        values = recurrence.evaluate(previous)
        length, size = previous.shape
        return values, ZeroBlocks(length, size, previous.dtype)
