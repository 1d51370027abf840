"""Scans that solve the linear recurrence $v_t = A_t v_{t-1} + b_t$, $v_0 = 0$.

The recurrence is a composition of affine maps $\\phi_t(v) = A_t v + b_t$. Composition is
associative,

$$(A_2, b_2) \\circ (A_1, b_1) = (A_2 A_1,\\ A_2 b_1 + b_2),$$

so all prefixes $\\phi_t \\circ \\dots \\circ \\phi_1$ follow from one parallel prefix scan
(Blelloch 1990) in $O(\\log T)$ depth; applied to $v_0 = 0$ their offsets are the $v_t$.
The same recurrence can be run sequentially with `lax.scan` ($O(T)$ depth, the least
work), or chunked: sequential inside chunks, vectorised across chunks, with a parallel
scan over the chunk summaries.

The scans of the recurrence take the blocks as an
[`parallel_dynamics.AbstractBlocks`][] and the offsets as a `(T, D)` array, and return
the `(T, D)` solution. `reverse=True` solves the backward recurrence
$v_t = A_t v_{t+1} + b_t$, $v_{T+1} = 0$ instead.

`inclusive_scan` and `radix_scan` at the end are generic: inclusive scans of any
associative `fn` over one packed array, over a tree of a chosen radix (the Kalman
smoothers' elements).
"""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Inexact

from ._blocks import AbstractBlocks, map_time


def on_cpu() -> bool:
    """Whether the default backend is a CPU (the scans are chosen and tuned by it)."""
    return jax.default_backend() == "cpu"


def _flip(blocks: AbstractBlocks, offsets: Array) -> tuple[AbstractBlocks, Array]:
    return map_time(lambda x: jnp.flip(x, axis=0), blocks), jnp.flip(offsets, axis=0)


def _combine(earlier, later):
    blocks_earlier, offsets_earlier = earlier
    blocks_later, offsets_later = later
    blocks = blocks_later.compose(blocks_earlier)
    offsets = blocks_later.apply(offsets_earlier) + offsets_later
    return blocks, offsets


def parallel_scan(
    blocks: AbstractBlocks, offsets: Inexact[Array, "T D"], *, reverse: bool = False
) -> Inexact[Array, "T D"]:
    """Solves the recurrence with `jax.lax.associative_scan`: $O(\\log T)$ depth,
    $O(T)$ block compositions."""
    out = blocks.closed_form(offsets, reverse=reverse)
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
    out = blocks.closed_form(offsets, reverse=reverse)
    if out is not None:
        return out

    def body(carry, block_and_offset):
        block, offset = block_and_offset
        new = block.apply(carry) + offset
        return new, new

    init = jnp.zeros(offsets.shape[1:], offsets.dtype)
    _, out = lax.scan(body, init, (blocks, offsets), reverse=reverse)
    return out


def _summarise_step(carry, block_and_offset):
    state, product = carry
    block, offset = block_and_offset
    return (block.apply(state) + offset, block.compose(product)), None


def summarise(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T *batch D"],
    *,
    reverse: bool = False,
    unroll: int = 1,
) -> tuple[AbstractBlocks, Inexact[Array, "*batch D"]]:
    """The recurrence along axis 0 as one affine map $v \\mapsto P v + e$, by one
    `lax.scan` that runs it from zero and composes the blocks as it goes (nothing is
    stored per step). The axes after the first are batch axes.

    **Returns:**

    The pair $(P, e)$: the composed blocks $P$ and the end state $e$.
    """
    identity = map_time(lambda x: x[0], blocks).identity_like()
    if identity is None:
        # A structure without an identity block: start from the first block.
        i = -1 if reverse else 0
        rest = slice(None, -1) if reverse else slice(1, None)
        init = (offsets[i], map_time(lambda x: x[i], blocks))
        xs = (map_time(lambda x: x[rest], blocks), offsets[rest])
    else:
        init = (jnp.zeros_like(offsets[0]), identity)
        xs = (blocks, offsets)
    (end, product), _ = lax.scan(
        _summarise_step, init, xs, reverse=reverse, unroll=unroll
    )
    return product, end


def default_chunk_size(length: int, blocks: AbstractBlocks | None = None) -> int:
    """The chunk size $L$ that [`parallel_dynamics.internal.chunked_scan`][] uses by default.

    A chunked scan makes two sequential sweeps of $L$ steps (each vectorised over the
    $C = \\lceil T / L \\rceil$ chunks) and one parallel scan over the $C$ chunk
    summaries: depth about $2L + 2\\log_2 C$, work $O(T)$. The rule:

    - **on accelerators**, $L = 8$, and each sweep is fully unrolled into one loop
      body. Every sequential step of a loop costs a kernel launch there, so short
      chunks whose sweeps XLA fuses win; the summaries ($T / 8$ of them) are still
      many enough to fill the device. Of $L \\in \\{8, \\dots, 512\\}$, $L = 8$ is
      the fastest or close to it for diagonal blocks, and faster than
      `jax.lax.associative_scan` (`benchmarks/scans.py`; the measurements are on
      the Benchmarks page of the documentation);
    - **on CPU**, $L \\approx \\sqrt{T}$, which balances the two sweeps against the
      summary scan. (A CPU has little parallelism to exploit: there the sequential
      scan is faster than any parallel one, and [`parallel_dynamics.AutoScan`][]
      uses it.)

    In both cases $1 \\leq L \\leq T$.

    **Arguments:**

    - `length`: $T$.
    - `blocks`: the blocks to be scanned (not used by the present rule).

    **Returns:**

    The chunk size, a Python int.
    """
    del blocks
    length = max(int(length), 1)
    if on_cpu():
        return max(1, math.isqrt(length))
    return min(_ACCELERATOR_CHUNK_SIZE, length)


_ACCELERATOR_CHUNK_SIZE = 8
# Steps of a chunk's sequential sweep fused into one loop iteration (lax.scan's
# `unroll`) on accelerators: fewer loop iterations and kernel launches. On CPU
# unrolling measured slower, so the sweeps are not unrolled there.
_UNROLL = 8


def to_chunks(x: Array, chunk_size: int, *, edge: bool = False) -> Array:
    """`x`, with a leading time axis of length $T$, as `(chunk_size, num_chunks, ...)`:
    chunk $c$ holds steps $cL, \\dots, cL + L - 1$. The end is padded to a whole number
    of chunks with zeros, or with copies of the last step if `edge`."""
    pad = -x.shape[0] % chunk_size
    if pad:
        if edge:
            fill = jnp.repeat(x[-1:], pad, axis=0)
        else:
            fill = jnp.zeros((pad,) + x.shape[1:], x.dtype)
        x = jnp.concatenate([x, fill], axis=0)
    x = x.reshape((-1, chunk_size) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def from_chunks(x: Array, length: int) -> Array:
    """The inverse of `to_chunks`: the first `length` steps, time axis first."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((-1,) + x.shape[2:])[:length]


def entering_chunks(leaving: Array, reverse: bool) -> Array:
    """The state entering every chunk from the states `leaving` them: the one leaving
    its predecessor (its successor, if `reverse`); zero for the first chunk."""
    zero = jnp.zeros_like(leaving[:1])
    if reverse:
        return jnp.concatenate([leaving[1:], zero], axis=0)
    return jnp.concatenate([zero, leaving[:-1]], axis=0)


def chunked_scan(
    blocks: AbstractBlocks,
    offsets: Inexact[Array, "T D"],
    *,
    chunk_size: int | None = None,
    reverse: bool = False,
) -> Inexact[Array, "T D"]:
    """Solves the recurrence in chunks of $L$ = `chunk_size` steps (ALGORITHMS.md §7).

    Split the time axis into $C = \\lceil T / L \\rceil$ chunks (the last one padded
    with $A = 0$, $b = 0$ steps, which leave the state at zero and are dropped).

    1. **Chunk summaries.** One sequential sweep over the $L$ steps of a chunk,
       vectorised across the $C$ chunks, runs the recurrence from zero and composes
       the chunk's blocks: chunk $c$ becomes the affine map
       $v \\mapsto P_c v + e_c$ with $P_c = A_{\\text{last}} \\cdots A_{\\text{first}}$
       and $e_c$ its end state from zero. Only these $C$ summaries are kept: no
       per-step products are stored.
    2. **Carry-ins.** A parallel prefix scan over the $C$ summaries gives the state
       entering every chunk, in $O(\\log C)$ depth.
    3. **Fix-up.** A second sequential sweep, again vectorised across chunks, reruns
       the recurrence $v_t = A_t v_{t-1} + b_t$ inside every chunk from its carry-in,
       applying blocks to vectors only.

    Work: $2T$ block applications and about $T$ block compositions (for dense blocks
    $O(T D^3)$, like the parallel scan; for diagonal blocks everything is
    elementwise). Depth $O(L + \\log C)$. Extra memory: $O(C)$ summaries, i.e.
    $O(C D^2)$ for dense blocks, besides the output.

    **Arguments:**

    - `blocks`: the blocks $A_1, \\dots, A_T$.
    - `offsets`: the `(T, D)` right-hand sides $b_t$.
    - `chunk_size`: $L$, clipped to $[1, T]$. By default $L = 8$ on accelerators,
        with each sweep fully unrolled into one loop body (every sequential step costs
        a kernel launch there), and $L \\approx \\sqrt{T}$ on CPU (which balances
        the sweeps against the summary scan; on a CPU the sequential scan is faster
        still). See `default_chunk_size`.
    - `reverse`: solve $v_t = A_t v_{t+1} + b_t$, $v_{T+1} = 0$ instead.

    **Returns:**

    The `(T, D)` solution $v_1, \\dots, v_T$.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        blocks = pdyn.DiagonalBlocks(0.9 * jnp.ones((1000, 4)))
        v = pdyn.internal.chunked_scan(blocks, jnp.ones((1000, 4)), chunk_size=32)
        ```
    """
    out = blocks.closed_form(offsets, reverse=reverse)
    if out is not None:
        return out
    length = offsets.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(length, blocks)
    chunk_size = max(1, min(int(chunk_size), length))
    unroll = 1 if on_cpu() else max(1, min(_UNROLL, chunk_size))

    # Zero blocks and offsets appended at the end: the padded steps come after step T
    # in a forward scan (their outputs are dropped) and before it in a reverse scan
    # (where they leave the state entering step T at zero).
    def chunks(x):
        return to_chunks(x, chunk_size)

    chunk_blocks = map_time(chunks, blocks)
    chunk_offsets = chunks(offsets)

    # 1. Chunk summaries, all chunks at once.
    products, ends = summarise(
        chunk_blocks, chunk_offsets, reverse=reverse, unroll=unroll
    )
    # 2. The state leaving every chunk, by a parallel scan over the summaries; the
    # state entering a chunk is the one leaving its predecessor.
    _, chunk_ends = lax.associative_scan(_combine, (products, ends), reverse=reverse)
    carry_in = entering_chunks(chunk_ends, reverse)

    # 3. Rerun every chunk from its carry-in, applying blocks to vectors only.
    def sweep(state, block_and_offset):
        block, offset = block_and_offset
        state = block.apply(state) + offset
        return state, state

    _, out = lax.scan(
        sweep, carry_in, (chunk_blocks, chunk_offsets), reverse=reverse, unroll=unroll
    )
    return from_chunks(out, length)


def sequential_inclusive_scan(fn, elems):
    """Inclusive scan along axis 0 with `lax.scan`, `fn` being applied to whole slices
    `elems[k]` (it is batched over their leading axis)."""

    def body(carry, elem):
        carry = fn(carry, elem)
        return carry, carry

    _, rest = lax.scan(body, elems[0], elems[1:])
    return jnp.concatenate([elems[:1], rest])


def radix_scan(fn, elems, identity, radix):
    """Inclusive scan along axis 0 over a tree with `radix` children per node."""
    n, *shape = elems.shape
    shape = tuple(shape)
    if n <= radix:
        return sequential_inclusive_scan(fn, elems[:, None])[:, 0]
    num_groups = -(-n // radix)
    pad = num_groups * radix - n
    elems = jnp.concatenate([elems, jnp.broadcast_to(identity, (pad,) + shape)])
    # (radix, num_groups, ...): scan inside every group, all groups at once.
    groups = jnp.swapaxes(elems.reshape((num_groups, radix) + shape), 0, 1)
    local = sequential_inclusive_scan(fn, groups)
    # Scan the group totals, then prepend each group's carry-in.
    totals = radix_scan(fn, local[-1], identity, radix)
    carry = jnp.broadcast_to(totals[:-1], (radix, num_groups - 1) + shape)
    fixed = fn(carry.reshape((-1,) + shape), local[:, 1:].reshape((-1,) + shape))
    local = jnp.concatenate(
        [local[:, :1], fixed.reshape((radix, num_groups - 1) + shape)], axis=1
    )
    return jnp.swapaxes(local, 0, 1).reshape((num_groups * radix,) + shape)[:n]


def inclusive_scan(fn, elems, identity, radix, *, reverse=False):
    """Inclusive scan of `elems` (a single array) along axis 0, with the conventions of
    `lax.associative_scan`: `fn(x, y)` is batched over axis 0 and `x` comes first in
    scan order. `identity` is the identity element of `fn`, used for padding. With
    `radix=None` it is `lax.associative_scan`; otherwise `radix_scan`."""
    if radix is None:
        return lax.associative_scan(fn, elems, reverse=reverse)
    if reverse:
        elems = jnp.flip(elems, axis=0)
    out = radix_scan(fn, elems, identity.astype(elems.dtype), radix)
    return jnp.flip(out, axis=0) if reverse else out
