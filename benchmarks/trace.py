"""Reading a `jax.profiler` trace: the complete events of some calls of a jitted
function, and the traced durations of every leaf instruction of its program."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import tempfile
from collections.abc import Callable

import jax

from .hlo import Program


def trace_events(fn: Callable, args, solves: int) -> list[dict]:
    """The complete events (`ph == "X"`) of `solves` calls of `fn`, traced."""
    with tempfile.TemporaryDirectory(prefix="pdyn_profile_") as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(solves):
                jax.block_until_ready(fn(*args))
        path = glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def op_durations(events, program: Program) -> dict[str, list[float]]:
    """The traced durations (microseconds) of every leaf instruction's events."""
    durations = collections.defaultdict(list)
    for e in events:
        if e["name"] in program.instructions:
            durations[e["name"]].append(e["dur"])
    containers = {
        name
        for name, inside in program.bodies.items()
        if name in durations and any(member in durations for member in inside)
    }
    return {n: d for n, d in durations.items() if n not in containers}
