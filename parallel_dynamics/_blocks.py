"""What $A_t$ is: the coupling blocks of a linear recurrence, as data.

A linear recurrence $v_t = A_t v_{t-1} + b_t$ over a time axis is determined by its
blocks $A_1, \\dots, A_T$. Each class here stores all $T$ blocks with one structure
(dense, diagonal, $k \\times k$ block-diagonal, identity, zero) and knows the
operations every algorithm needs: apply the blocks to a vector, compose two sets of
blocks (the associative operation of a parallel scan), transpose them, and give the
Kalman smoother its elements. Every method works on any number of leading batch axes,
so the same code serves a sequential `lax.scan` (one block at a time),
`lax.associative_scan` (sliced and recombined blocks), chunked and sharded scans
(blocks reshaped into chunks). The scans and smoothers call these methods and never
test the type of the blocks, so a new structure works everywhere.
"""

import abc

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Inexact


class AbstractBlocks(eqx.Module):
    """Abstract base class for the blocks $A_t$ of a linear recurrence over time.

    The leading axis (or axes) of every array is the time (batch) axis; the trailing
    axes hold one block. A vector is an array of shape `(..., D)`.

    A new structure implements `apply`, `compose`, `transpose` and `as_matrices`;
    with these it works with every scan (parallel, sequential, chunked, sharded) and,
    through its dense matrices, with the Kalman smoother and filter. Overriding
    `identity_like`, `closed_form` and `kalman_blocks` makes those faster for the
    structure, and `is_zero` tells Lineax that the operator is the identity.
    """

    @abc.abstractmethod
    def apply(self, vector: Inexact[Array, "*batch D"]) -> Inexact[Array, "*batch D"]:
        """Computes $A_t v_t$ for every leading index $t$."""

    @abc.abstractmethod
    def compose(self, earlier: "AbstractBlocks") -> "AbstractBlocks":
        """Returns the blocks of $A_t \\circ E_t$ (first `earlier`, then `self`)."""

    @abc.abstractmethod
    def transpose(self) -> "AbstractBlocks":
        """Returns the blocks $A_t^\\top$."""

    @abc.abstractmethod
    def as_matrices(self) -> Inexact[Array, "*batch D D"]:
        """Materialises every block as a dense $D \\times D$ matrix."""

    def conj(self) -> "AbstractBlocks":
        """Returns the complex conjugate blocks."""
        return jtu.tree_map(jnp.conj, self)

    def mask(self, keep: Bool[Array, " T"]) -> "AbstractBlocks":
        """Returns the blocks with $A_t = 0$ wherever `keep[t]` is false. The default
        zeroes every array at those steps: right for a structure whose zero block
        has all-zero arrays."""

        def _mask(leaf):
            shape = keep.shape + (1,) * (leaf.ndim - 1)
            return jnp.where(keep.reshape(shape), leaf, 0)

        return jtu.tree_map(_mask, self)

    def identity_like(self) -> "AbstractBlocks | None":
        """Returns identity blocks with the structure and the batch shape of these,
        the neutral element of `compose`, or `None` (the default) if the structure
        cannot hold the identity. The chunked and sharded scans start their
        compositions from it; without it they start from the first block."""
        return None

    def closed_form(
        self, offsets: Inexact[Array, "T D"], *, reverse: bool
    ) -> Inexact[Array, "T D"] | None:
        """Returns the solution of $v_t = A_t v_{t-1} + b_t$ (or, if `reverse`, of
        $v_t = A_t v_{t+1} + b_t$) when the structure gives it without a scan, or
        `None` (the default). A structure with a closed form must be its own
        composition (`compose` returns it unchanged), as identity and zero blocks are:
        a sharded scan then summarises a chunk of it by the blocks themselves."""
        del offsets, reverse
        return None

    def is_zero(self) -> bool:
        """Whether every block is zero by its structure (known at trace time, not
        read from the values), as for [`parallel_dynamics.ZeroBlocks`][]: the
        recurrence then decouples, and Lineax's structure queries see a
        [`parallel_dynamics.BlockBidiagonalOperator`][] of such blocks as the
        identity (diagonal, symmetric, both triangular). `False` by default."""
        return False

    def kalman_blocks(self):
        """Returns the blocks as the transitions of the Kalman smoother and filter
        ([`parallel_dynamics.KalmanSmoother`][]), which build their elements from
        them. The default is dense $D \\times D$ transitions from `as_matrices`:
        $O(T D^3)$ work."""
        # Imported here: the Kalman smoothers themselves build blocks.
        from ._linear_solver.kalman import DenseKalmanBlocks

        return DenseKalmanBlocks(self.as_matrices())


class DenseBlocks(AbstractBlocks):
    """Dense blocks $A_t \\in \\mathbb{R}^{D \\times D}$: Newton / DEER.

    Memory $O(T D^2)$; composing two blocks costs $O(D^3)$.
    """

    matrices: Inexact[Array, "*batch D D"]

    def apply(self, vector):
        return jnp.einsum("...ij,...j->...i", self.matrices, vector)

    def compose(self, earlier):
        return DenseBlocks(
            jnp.einsum("...ij,...jk->...ik", self.matrices, _as(earlier))
        )

    def transpose(self):
        return DenseBlocks(jnp.swapaxes(self.matrices, -1, -2))

    def as_matrices(self):
        return self.matrices

    def identity_like(self):
        eye = jnp.eye(self.matrices.shape[-1], dtype=self.matrices.dtype)
        return DenseBlocks(jnp.broadcast_to(eye, self.matrices.shape))

    def kalman_blocks(self):
        from ._linear_solver.kalman import DenseKalmanBlocks

        return DenseKalmanBlocks(self.matrices)


class DiagonalBlocks(AbstractBlocks):
    """Diagonal blocks $A_t = \\operatorname{diag}(a_t)$: quasi-Newton / quasi-DEER.

    Memory $O(T D)$; every operation is elementwise.
    """

    diagonal: Inexact[Array, "*batch D"]

    def apply(self, vector):
        return self.diagonal * vector

    def compose(self, earlier):
        return DiagonalBlocks(self.diagonal * _as(earlier))

    def transpose(self):
        return self

    def as_matrices(self):
        size = self.diagonal.shape[-1]
        return self.diagonal[..., None] * jnp.eye(size, dtype=self.diagonal.dtype)

    def identity_like(self):
        return DiagonalBlocks(jnp.ones_like(self.diagonal))

    def kalman_blocks(self):
        from ._linear_solver.kalman import DiagonalKalmanBlocks

        return DiagonalKalmanBlocks(self.diagonal)


class BlockDiagonalBlocks(AbstractBlocks):
    """Block-diagonal blocks: each $A_t$ has $D / k$ dense $k \\times k$ blocks on its
    diagonal.

    Memory $O(T D k)$; composing costs $O(D k^2)$.
    """

    blocks: Inexact[Array, "*batch nb k k"]

    def apply(self, vector):
        nb, k = self.blocks.shape[-3:-1]
        split = vector.reshape(vector.shape[:-1] + (nb, k))
        out = jnp.einsum("...bij,...bj->...bi", self.blocks, split)
        return out.reshape(vector.shape)

    def compose(self, earlier):
        return BlockDiagonalBlocks(
            jnp.einsum("...bij,...bjk->...bik", self.blocks, _as(earlier))
        )

    def transpose(self):
        return BlockDiagonalBlocks(jnp.swapaxes(self.blocks, -1, -2))

    def as_matrices(self):
        nb, k = self.blocks.shape[-3:-1]
        eye = jnp.eye(nb, dtype=self.blocks.dtype)
        dense = jnp.einsum("...bij,bc->...bicj", self.blocks, eye)
        return dense.reshape(self.blocks.shape[:-3] + (nb * k, nb * k))

    def identity_like(self):
        eye = jnp.eye(self.blocks.shape[-1], dtype=self.blocks.dtype)
        return BlockDiagonalBlocks(jnp.broadcast_to(eye, self.blocks.shape))

    def kalman_blocks(self):
        from ._linear_solver.kalman import BlockDiagonalKalmanBlocks

        return BlockDiagonalKalmanBlocks(self.blocks)


class IdentityBlocks(AbstractBlocks):
    """$A_t = I$ for every $t$: Picard iteration. Stores no arrays; a scan over these
    blocks is a cumulative sum."""

    length: int = eqx.field(static=True)
    size: int = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def apply(self, vector):
        return vector

    def compose(self, earlier):
        del earlier
        return self

    def transpose(self):
        return self

    def as_matrices(self):
        eye = jnp.eye(self.size, dtype=self.dtype)
        return jnp.broadcast_to(eye, (self.length, self.size, self.size))

    def mask(self, keep):
        diagonal = jnp.ones((self.length, self.size), self.dtype)
        return DiagonalBlocks(jnp.where(keep[:, None], diagonal, 0))

    def identity_like(self):
        return self

    def closed_form(self, offsets, *, reverse):
        return lax.cumsum(offsets, axis=0, reverse=reverse)

    def kalman_blocks(self):
        from ._linear_solver.kalman import DiagonalKalmanBlocks

        return DiagonalKalmanBlocks(jnp.ones((self.length, self.size), self.dtype))


class ZeroBlocks(AbstractBlocks):
    """$A_t = 0$ for every $t$: Jacobi (plain fixed-point) iteration. Stores no arrays;
    the recurrence decouples and its solution is the right-hand side itself."""

    length: int = eqx.field(static=True)
    size: int = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def apply(self, vector):
        return jnp.zeros_like(vector)

    def compose(self, earlier):
        del earlier
        return self

    def transpose(self):
        return self

    def as_matrices(self):
        return jnp.zeros((self.length, self.size, self.size), self.dtype)

    def mask(self, keep):
        del keep
        return self

    def closed_form(self, offsets, *, reverse):
        del reverse
        return offsets

    def is_zero(self):
        return True

    def kalman_blocks(self):
        from ._linear_solver.kalman import DiagonalKalmanBlocks

        return DiagonalKalmanBlocks(jnp.zeros((self.length, self.size), self.dtype))


def _as(blocks: AbstractBlocks) -> Array:
    (leaf,) = jtu.tree_leaves(blocks)
    return leaf


def blocks_length(blocks: AbstractBlocks) -> int | None:
    """The length of the leading (time) axis, if the blocks store arrays."""
    leaves = jtu.tree_leaves(blocks)
    if len(leaves) == 0:
        return blocks.length  # pyright: ignore[reportAttributeAccessIssue]
    return leaves[0].shape[0]


def map_time(fn, blocks: AbstractBlocks) -> AbstractBlocks:
    """Applies `fn` to the time axis of every array in `blocks` (slicing, rolling,
    reshaping into chunks, ...)."""
    return jtu.tree_map(fn, blocks)


def mask_time(blocks: AbstractBlocks, keep: Bool[Array, " T"]) -> AbstractBlocks:
    """Sets $A_t = 0$ wherever `keep[t]` is false, decoupling $t$ from $t - 1$."""
    return blocks.mask(keep)
