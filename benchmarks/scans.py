"""The linear recurrence alone: chunked scan against the associative and sequential
scans, for diagonal, block-diagonal and dense blocks.

Every scan solves $v_t = A_t v_{t-1} + b_t$ for the same random, contracting blocks;
the group of one (structure, T, D) is timed interleaved, so the ratios to the
sequential `lax.scan` are side by side. The chunked scan runs with its automatic chunk
size and with a few fixed ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

import parallel_dynamics as pdyn
from parallel_dynamics._scan import default_chunk_size

from .common import error_message, fmt, median_ms, paired_ratio, time_interleaved


QUICK_CASES = (
    ("diagonal", 10_000, 16),
    ("diagonal", 100_000, 64),
    ("block k=4", 10_000, 16),
    ("dense", 10_000, 16),
)
FULL_CASES = QUICK_CASES + (
    ("diagonal", 1_000_000, 16),
    ("diagonal", 100_000, 256),
    ("block k=4", 100_000, 64),
    ("dense", 10_000, 64),
    ("dense", 100_000, 16),
)
CHUNK_SIZES = (16, 64, 256)
# Blocks larger than this (entries) are not benchmarked here.
MAX_ENTRIES = 2e8


def make_blocks(structure: str, length: int, size: int, dtype=jnp.float32):
    key = jr.key(0)
    if structure == "diagonal":
        return pdyn.DiagonalBlocks(jr.uniform(key, (length, size), dtype, -0.95, 0.95))
    if structure.startswith("block"):
        k = int(structure.split("=")[1])
        scale = 0.9 / k**0.5
        return pdyn.BlockDiagonalBlocks(
            scale * jr.normal(key, (length, size // k, k, k), dtype)
        )
    scale = 0.9 / size**0.5
    return pdyn.DenseBlocks(scale * jr.normal(key, (length, size, size), dtype))


def _entries(structure: str, length: int, size: int) -> float:
    if structure == "diagonal":
        return length * size
    if structure.startswith("block"):
        return length * size * int(structure.split("=")[1])
    return length * size * size


def run_case(structure: str, length: int, size: int, budget_s: float) -> list[dict]:
    if _entries(structure, length, size) > MAX_ENTRIES:
        return [
            {
                "structure": structure,
                "T": length,
                "D": size,
                "skipped": f"blocks of {_entries(structure, length, size):.1e} "
                f"entries exceed {MAX_ENTRIES:.0e}",
            }
        ]
    blocks = make_blocks(structure, length, size)
    offsets = jr.normal(jr.key(1), (length, size), jnp.float32)
    reference = jax.jit(pdyn.internal.sequential_scan)
    expected = reference(blocks, offsets)
    auto_size = default_chunk_size(length, blocks)
    variants = {
        "sequential": reference,
        "associative": jax.jit(pdyn.internal.parallel_scan),
        f"chunked auto (L={auto_size})": jax.jit(pdyn.internal.chunked_scan),
    }
    for chunk in CHUNK_SIZES:
        if chunk != auto_size and chunk < length:
            variants[f"chunked L={chunk}"] = jax.jit(
                lambda b, o, chunk=chunk: pdyn.internal.chunked_scan(
                    b, o, chunk_size=chunk
                )
            )
    variants["AutoScan"] = jax.jit(
        lambda b, o: pdyn.AutoScan()._solve(b, o, reverse=False)
    )
    rows = []
    fns = {}
    errors = {}
    for name, fn in variants.items():
        try:
            out = jax.block_until_ready(fn(blocks, offsets))
            errors[name] = float(
                jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected))
            )
            fns[name] = lambda fn=fn: fn(blocks, offsets)
        except Exception as e:
            rows.append(
                {
                    "structure": structure,
                    "T": length,
                    "D": size,
                    "scan": name,
                    "error": error_message(e),
                }
            )
    times = time_interleaved(fns, budget_s=budget_s, min_runs=5, max_runs=15)
    for name in fns:
        rows.append(
            {
                "structure": structure,
                "T": length,
                "D": size,
                "scan": name,
                "ms": median_ms(times[name]),
                "x_sequential": paired_ratio(times[name], times["sequential"]),
                "rel_error": errors[name],
                "runs": len(times[name]),
            }
        )
    return rows


def run(quick: bool, budget_s: float = 3.0) -> dict:
    cases = QUICK_CASES if quick else FULL_CASES
    print(
        "\n== Scans: v_t = A_t v_{t-1} + b_t alone, float32 (x seq = time / "
        "sequential lax.scan, interleaved) =="
    )
    print(
        f"{'structure':<10} {'T':>8} {'D':>4} {'scan':<24} {'ms':>9} {'x seq':>7} "
        f"{'rel err':>8}"
    )
    rows: list[dict] = []
    for structure, length, size in cases:
        case_rows = run_case(structure, length, size, budget_s)
        rows.extend(case_rows)
        for r in case_rows:
            if "skipped" in r:
                print(f"{structure:<10} {length:>8} {size:>4} skipped: {r['skipped']}")
            elif "error" in r:
                print(
                    f"{structure:<10} {length:>8} {size:>4} {r['scan']:<24} "
                    f"FAILED {r['error']}"
                )
            else:
                print(
                    f"{structure:<10} {length:>8} {size:>4} {r['scan']:<24} "
                    f"{r['ms']:>9.3f} {r['x_sequential']:>7.2f} "
                    f"{fmt(r['rel_error'], '.0e', 8)}",
                    flush=True,
                )
    return {"rows": rows, "chunk_sizes": list(CHUNK_SIZES)}
