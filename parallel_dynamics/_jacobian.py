"""What $A_t$ is: how the solvers approximate $J_t = \\partial f / \\partial y$.

Each class evaluates the step at every $t$ together with the blocks $A_t$ of one
structure. None of them builds a dense $(TD) \\times (TD)$ anything; the quasi ones never
hold more than $O(T D)$ memory at once (plus a bounded work buffer).
"""

import abc
import math
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
from ._problem import MAX_STEP_ENTRIES as _MAX_STEP_ENTRIES, Recurrence
from ._validation import check_count


# Work buffer for per-step Jacobians: at most this many Jacobian entries are computed
# in one batch of time steps. Bounds the memory of the structures that keep only part
# of each D x D Jacobian, and keeps the dense structure's working set (its tangents are
# a few times larger than the Jacobians) small enough for the caches: on a CPU, batches
# of 2^22 entries measured about 30% faster than one batch over all T at D = 64.
_MAX_JACOBIAN_ENTRIES = 2**22
# The same budget for the structures that keep only the diagonal or the k x k diagonal
# blocks (see `_step_and_restricted_products`), counted as full Jacobian entries. For
# RNN cells XLA computes only the kept entries and nothing of this size exists, so
# batching only costs (a GRU at D = 64, T = 10^4: 1.5 times slower in batches of 2^22
# entries than in one `vmap`); for steps whose tangents pass through a matrix product
# after a nonlinearity the whole Jacobian is formed, and this bounds it.
_MAX_RESTRICTED_ENTRIES = 2**26


def rademacher(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
    """Independent Rademacher ($\\pm 1$ with equal probability) entries, from one random
    bit each.

    `jax.random.rademacher` draws a 32-bit word per entry; on a CPU that costs about a
    third of a step evaluation of a small RNN. Here $\\lceil n / 32 \\rceil$ words are
    drawn and each of their bits gives one sign: the same distribution (the bits of
    `jax.random.bits` are independent and uniform) for a 32nd of the random numbers.
    """
    size = math.prod(shape)
    words = jr.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = 2 * bits.reshape(-1)[:size].astype(dtype) - 1
    return signs.reshape(shape)


def _step_and_jacobian(recurrence: Recurrence, y: Array, x: PyTree):
    def fn(_y):
        out = recurrence.step_at(_y, x)
        return out, out

    jacobian, value = jax.jacfwd(fn, has_aux=True)(y)
    return value, jacobian


def _step_and_restricted_products(
    recurrence: Recurrence, y: Array, x: PyTree, restrict: Callable
) -> tuple[Array, Array]:
    """$f(y, x)$ and `restrict(J e_j, j)` for every basis vector $e_j$, stacked.

    The step is linearised once and its linear map pushed through the basis vectors
    under `vmap`, each product cut down at once to the entries that are kept. Where
    a step's tangents are elementwise after its matrix products (RNN cells), XLA then
    computes only those entries instead of the whole $D \\times D$ Jacobian: for
    `eqx.nn.GRUCell` at $T = 10^4$ the $4 \\times 4$ diagonal blocks measured 3 to 5
    times faster ($D = 16, 64$, CPU) than cutting them out of `jax.jacfwd`. The full
    Jacobian is still faster from `jax.jacfwd`.
    """
    value, linear = jax.linearize(lambda _y: recurrence.step_at(_y, x), y)
    size = y.shape[0]
    basis = jnp.eye(size, dtype=y.dtype)
    products = jax.vmap(lambda e, j: restrict(linear(e), j))(basis, jnp.arange(size))
    return value, products


def _step_and_diagonal(recurrence: Recurrence, y: Array, x: PyTree):
    """$f(y, x)$ and the diagonal of $J$, as entries $0, D + 1, 2 (D + 1), \\dots$ of
    the flattened products $J e_j$.

    A static strided slice: XLA fuses it into the products and computes only the
    diagonal entries for RNN cells, as with `_step_and_restricted_products`, but
    without the gather that indexing column $j$ at $j$ becomes, which XLA:CPU does
    not vectorise. For `eqx.nn.GRUCell` at $T = 10^4$ the linearisation measured
    1.3 times faster at $D = 16$ and 1.15 times at $D = 64$ (CPU) than with the
    gather. (The same slicing for $k \\times k$ blocks made XLA form the whole
    Jacobian, so the blocks keep the gather.)
    """
    value, columns = _step_and_restricted_products(
        recurrence, y, x, lambda column, j: column
    )
    size = y.shape[0]
    return value, columns.reshape(size * size)[:: size + 1]


def _map_bounded(
    recurrence: Recurrence,
    fn: Callable,
    entries_per_step: int,
    *arrays: Array,
    budget: int | None = None,
):
    """`vmap`s `fn(*arrays_t, x_t)` over time, in sequential batches of time steps when
    one `vmap` would materialise more than `budget` entries (`entries_per_step`
    estimates them for one step; the default budget is `_MAX_JACOBIAN_ENTRIES`); see
    `parallel_dynamics._problem.map_in_batches`."""
    if budget is None:
        budget = _MAX_JACOBIAN_ENTRIES
    return recurrence.map_steps(
        fn, *arrays, entries_per_step=entries_per_step, budget=budget
    )


def _step_width(recurrence: Recurrence) -> int:
    return recurrence.step_width()


def _evaluate_bounded(recurrence: Recurrence, previous: Array) -> Array:
    """$f(y_{t-1}, x_t)$ for every $t$, in bounded batches of time steps."""
    return _map_bounded(
        recurrence,
        recurrence.step_at,
        _step_width(recurrence),
        previous,
        budget=_MAX_STEP_ENTRIES,
    )


class AbstractJacobian(eqx.Module):
    """Abstract base class for the structure of $A_t \\approx J_t$."""

    @property
    def exact(self) -> bool:
        """Whether $A_t = J_t$ exactly for the steps it is used with, so that Newton's
        iteration with it converges quadratically (and its stopping test may save the
        last iteration). `False` unless a structure says otherwise."""
        return False

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
    batched forward-mode pass of $D$ tangents per step, over bounded batches of time
    steps. Memory $O(T D^2)$ for the blocks, plus a bounded work buffer."""

    @property
    def exact(self) -> bool:
        return True

    def linearise(self, recurrence, previous, iteration):
        del iteration
        size = recurrence.size
        values, matrices = _map_bounded(
            recurrence,
            lambda y, x: _step_and_jacobian(recurrence, y, x),
            size * size,
            previous,
        )
        return values, DenseBlocks(matrices)


class ExactDiagonalJacobian(AbstractJacobian):
    """$A_t = \\operatorname{diag}(J_t)$, exactly (quasi-Newton; quasi-DEER).

    In general this costs up to $D$ tangent evaluations per step, done in bounded
    batches so that memory stays $O(T D)$; for steps whose tangents are elementwise
    after their matrix products (RNN cells) XLA computes only the diagonal entries,
    about the cost of one Jacobian-vector product. When the step is *elementwise*
    (its Jacobian is diagonal by construction, as in ParaRNN's cells), set
    `elementwise=True`: one Jacobian-vector product with a vector of ones then gives
    the diagonal exactly.
    """

    elementwise: bool = False

    @property
    def exact(self) -> bool:
        # An elementwise step's Jacobian is its diagonal.
        return self.elementwise

    def linearise(self, recurrence, previous, iteration):
        del iteration
        if self.elementwise:

            def one_jvp(y, x):
                step = lambda _y: recurrence.step_at(_y, x)
                return jax.jvp(step, (y,), (jnp.ones_like(y),))

            values, diagonal = _map_bounded(
                recurrence,
                one_jvp,
                _step_width(recurrence),
                previous,
                budget=_MAX_STEP_ENTRIES,
            )
            return values, DiagonalBlocks(diagonal)

        size = recurrence.size
        values, diagonal = _map_bounded(
            recurrence,
            lambda y, x: _step_and_diagonal(recurrence, y, x),
            size * size,
            previous,
            budget=_MAX_RESTRICTED_ENTRIES,
        )
        return values, DiagonalBlocks(diagonal)


class StochasticDiagonalJacobian(AbstractJacobian):
    """$A_t \\approx \\operatorname{diag}(J_t)$ by Hutchinson-style probing:
    $\\operatorname{diag}(J) \\approx \\frac1k \\sum_{i=1}^k v_i \\odot (J v_i)$ with
    Rademacher vectors $v_i$ (Bekas et al. 2007; used for parallel MCMC by Zoltowski
    et al. 2025). Costs `num_probes` Jacobian-vector products per iteration, whatever
    $D$ is; unbiased, but noisy when $J_t$ is far from diagonal. The probes are drawn
    afresh at each iteration from `key` folded with the iteration number, so a solve is
    deterministic given `key`.

    One iteration costs one Jacobian-vector product that also returns the step values
    (`jax.jvp`) per probe, the values being computed once, and drawing the probes, which
    takes one random bit per entry (see `parallel_dynamics._jacobian.rademacher`).
    """

    num_probes: int = 1
    key: PRNGKeyArray = eqx.field(default_factory=lambda: jr.key(0))

    def __check_init__(self):
        check_count("num_probes", self.num_probes)

    def linearise(self, recurrence, previous, iteration):
        key = jr.fold_in(self.key, iteration)
        length, size = previous.shape
        probes = rademacher(key, (length, self.num_probes, size), previous.dtype)

        def fn(y, v, x):
            step = lambda _y: recurrence.step_at(_y, x)
            if self.num_probes == 1:
                value, product = jax.jvp(step, (y,), (v[0],))
                return value, v[0] * product
            # The value is computed once for all the probes of a step.
            value, products = jax.vmap(
                lambda u: jax.jvp(step, (y,), (u,)), out_axes=(None, 0)
            )(v)
            return value, jnp.mean(v * products, axis=0)

        width = _step_width(recurrence) * self.num_probes
        values, diagonal = _map_bounded(
            recurrence, fn, width, previous, probes, budget=_MAX_STEP_ENTRIES
        )
        return values, DiagonalBlocks(diagonal)


class DiagonalFunctionJacobian(AbstractJacobian):
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

        values, diagonal = _map_bounded(
            recurrence, fn, _step_width(recurrence), previous, budget=_MAX_STEP_ENTRIES
        )
        return values, DiagonalBlocks(diagonal)


class BlockDiagonalJacobian(AbstractJacobian):
    """$A_t$ = the $k \\times k$ diagonal blocks of $J_t$ (block quasi-Newton), for
    states made of $D / k$ groups of $k$ coupled components (e.g. the $(h, c)$ pairs of
    an LSTM laid out blockwise, or multi-head cells). Memory $O(T D k)$, scan cost
    $O(T D k^2)$. `block_size` must divide $D$. When the step is *blockwise* (its
    Jacobian is block-diagonal by construction: independent groups or heads), set
    `blockwise=True`: the blocks are then the whole Jacobian, and Newton's iteration
    with them converges quadratically.
    """

    block_size: int
    blockwise: bool = False

    @property
    def exact(self) -> bool:
        return self.blockwise

    def __check_init__(self):
        check_count("block_size", self.block_size)

    def linearise(self, recurrence, previous, iteration):
        del iteration
        size, k = recurrence.size, self.block_size
        if size % k != 0:
            raise ValueError(
                f"`block_size` ({k}) must divide the state size D = {size}."
            )
        num_blocks = size // k

        def in_block(column, j):
            # Column j of J restricted to the rows of the block it belongs to.
            return jax.lax.dynamic_slice_in_dim(column, (j // k) * k, k)

        def fn(y, x):
            value, columns = _step_and_restricted_products(recurrence, y, x, in_block)
            # columns[a k + l, i] = J[a k + i, a k + l]
            return value, columns.reshape(num_blocks, k, k).transpose(0, 2, 1)

        values, blocks = _map_bounded(
            recurrence, fn, size * size, previous, budget=_MAX_RESTRICTED_ENTRIES
        )
        return values, BlockDiagonalBlocks(blocks)


class IdentityJacobian(AbstractJacobian):
    """$A_t = I$ (Picard iteration): no derivatives at all; the linear solve is a
    cumulative sum."""

    def linearise(self, recurrence, previous, iteration):
        del iteration
        values = _evaluate_bounded(recurrence, previous)
        length, size = previous.shape
        return values, IdentityBlocks(length, size, previous.dtype)


class ZeroJacobian(AbstractJacobian):
    """$A_t = 0$ (Jacobi / plain fixed-point iteration $y_t \\leftarrow f(y_{t-1},
    x_t)$): no derivatives and no scan."""

    def linearise(self, recurrence, previous, iteration):
        del iteration
        values = _evaluate_bounded(recurrence, previous)
        length, size = previous.shape
        return values, ZeroBlocks(length, size, previous.dtype)


ExactDiagonal = ExactDiagonalJacobian
"""An alias of [`parallel_dynamics.ExactDiagonalJacobian`][] (the same class)."""

StochasticDiagonal = StochasticDiagonalJacobian
"""An alias of [`parallel_dynamics.StochasticDiagonalJacobian`][] (the same class)."""

DiagonalFunction = DiagonalFunctionJacobian
"""An alias of [`parallel_dynamics.DiagonalFunctionJacobian`][] (the same class)."""
