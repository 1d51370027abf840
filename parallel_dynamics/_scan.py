"""Scans that solve the linear recurrence $v_t = A_t v_{t-1} + b_t$, $v_0 = 0$.

The recurrence is a composition of affine maps $\\phi_t(v) = A_t v + b_t$. Composition is
associative,

$$(A_2, b_2) \\circ (A_1, b_1) = (A_2 A_1,\\ A_2 b_1 + b_2),$$

so all prefixes $\\phi_t \\circ \\dots \\circ \\phi_1$ follow from one parallel prefix scan
(Blelloch 1990) in $O(\\log T)$ depth; applied to $v_0 = 0$ their offsets are the $v_t$.
The same recurrence can be run sequentially with `lax.scan` ($O(T)$ depth, the least
work), or chunked: sequential inside chunks, vectorised across chunks, with a parallel
scan over the chunk summaries.

Every function here takes the blocks as an [`parallel_dynamics.AbstractBlocks`][] and the
offsets as a `(T, D)` array, and returns the `(T, D)` solution. `reverse=True` solves the
backward recurrence $v_t = A_t v_{t+1} + b_t$, $v_{T+1} = 0$ instead.
"""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Inexact

from ._blocks import AbstractBlocks, IdentityBlocks, map_time, ZeroBlocks


def _flip(blocks: AbstractBlocks, offsets: Array) -> tuple[AbstractBlocks, Array]:
    return map_time(lambda x: jnp.flip(x, axis=0), blocks), jnp.flip(offsets, axis=0)


def _combine(earlier, later):
    blocks_earlier, offsets_earlier = earlier
    blocks_later, offsets_later = later
    blocks = blocks_later.compose(blocks_earlier)
    offsets = blocks_later.apply(offsets_earlier) + offsets_later
    return blocks, offsets


def _trivial(blocks: AbstractBlocks, offsets: Array, reverse: bool) -> Array | None:
    if isinstance(blocks, ZeroBlocks):
        return offsets
    if isinstance(blocks, IdentityBlocks):
        return lax.cumsum(offsets, axis=0, reverse=reverse)
    return None


def parallel_scan(
    blocks: AbstractBlocks, offsets: Inexact[Array, "T D"], *, reverse: bool = False
) -> Inexact[Array, "T D"]:
    """Solves the recurrence with `jax.lax.associative_scan`: $O(\\log T)$ depth,
    $O(T)$ block compositions."""
    out = _trivial(blocks, offsets, reverse)
    if out is not None:
        return out
    if reverse:
        blocks, offsets = _flip(blocks, offsets)
    _, out = lax.associative_scan(_combine, (blocks, offsets))
    return jnp.flip(out, axis=0) if reverse else out


def sequential_scan(
    blocks: AbstractBlocks, offsets: Inexact[Array, "T D"], *, reverse: bool = False
) -> Inexact[Array, "T D"]:
    """Solves the recurrence with `jax.lax.scan`: $O(T)$ depth, the least work."""
    out = _trivial(blocks, offsets, reverse)
    if out is not None:
        return out

    def body(carry, block_and_offset):
        block, offset = block_and_offset
        new = block.apply(carry) + offset
        return new, new

    init = jnp.zeros(offsets.shape[1:], offsets.dtype)
    _, out = lax.scan(body, init, (blocks, offsets), reverse=reverse)
    return out


def default_chunk_size(length: int) -> int:
    """A chunk size near $\\sqrt{T}$: it balances the sequential work inside a chunk
    against the number of chunk summaries to combine."""
    return max(1, int(math.isqrt(max(length, 1))))


def chunked_scan(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T D"],
    *,
    chunk_size: int | None = None,
    reverse: bool = False,
) -> Inexact[Array, "T D"]:
    """Solves the recurrence in chunks of `chunk_size` steps.

    1. Inside each chunk, run the recurrence sequentially from zero, vectorised across
       the $C = \\lceil T / \\text{chunk\\_size} \\rceil$ chunks, and accumulate the
       chunk's composed map $(\\prod A, v_{\\text{end}})$.
    2. Combine the $C$ chunk summaries with a parallel scan: this gives the state
       entering every chunk.
    3. Add each chunk's carry-in, propagated through the chunk:
       $v_t \\mathrel{+}= (A_t \\cdots A_{\\text{start}}) v_{\\text{in}}$.

    $O(T)$ block applications plus $O(C)$ compositions, and $O(T/C + \\log C)$ depth.
    """
    out = _trivial(blocks, offsets, reverse)
    if out is not None:
        return out
    if reverse:
        blocks, offsets = _flip(blocks, offsets)
    length, size = offsets.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(length)
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def to_chunks(x):
        # Padding with zero blocks and offsets appends steps that leave the carry at
        # zero; their outputs are dropped below.
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        x = x.reshape((num_chunks, chunk_size) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)  # (chunk_size, num_chunks, ...)

    chunk_blocks = map_time(to_chunks, blocks)
    chunk_offsets = to_chunks(offsets)

    # 1. Local recurrences from zero, all chunks at once; `prods` accumulates the
    # composed blocks of each chunk so far (needed for the carry-in fix-up).
    first_block = map_time(lambda x: x[0], chunk_blocks)

    def body(carry, block_and_offset):
        local, prod = carry
        block, offset = block_and_offset
        local = block.apply(local) + offset
        prod = block.compose(prod)
        return (local, prod), (local, prod)

    init_local = chunk_offsets[0]
    (_, _), (local_rest, prods_rest) = lax.scan(
        body,
        (init_local, first_block),
        (map_time(lambda x: x[1:], chunk_blocks), chunk_offsets[1:]),
    )
    local = jnp.concatenate([init_local[None], local_rest], axis=0)
    prods = jax.tree.map(
        lambda a, b: jnp.concatenate([a[None], b], axis=0), first_block, prods_rest
    )
    # 2. Parallel scan over the chunk summaries gives each chunk's final state; the
    # state entering chunk c is the final state of chunk c - 1.
    summary_blocks = map_time(lambda x: x[-1], prods)
    _, chunk_ends = lax.associative_scan(_combine, (summary_blocks, local[-1]))
    carry_in = jnp.concatenate(
        [jnp.zeros((1, size), offsets.dtype), chunk_ends[:-1]], axis=0
    )
    # 3. Carry-in fix-up, vectorised over everything.
    out = local + prods.apply(jnp.broadcast_to(carry_in, local.shape))
    out = jnp.swapaxes(out, 0, 1).reshape((num_chunks * chunk_size, size))[:length]
    return jnp.flip(out, axis=0) if reverse else out
