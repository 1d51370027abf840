"""What every benchmark section shares: the GRU problem, interleaved timing, the
environment record, JSON output and memory measurements.

Timing rule: on a shared, noisy machine absolute times drift, so every comparison is
measured *side by side*: all the functions of a group are warmed up (compiled) and
then called round-robin, and a ratio is the median of the run-by-run ratios.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Ratios to lax.scan of the papers' reference implementation on a 2-core CPU (GRU,
# T = 10^4, float32, max error 1e-4); the CPU target is at most half of each.
REFERENCE_RATIOS = {
    "quasi": {4: 4.5, 16: 6.2, 64: 7.8},
    "deer": {4: 34.0, 16: 14.0, 64: 102.0},
}
MAX_ERROR = 1e-4


# --------------------------------------------------------------------------- problem


def gru_step(h, x, cell):
    return cell(x, h)


def make_gru(length: int, size: int, dtype=jnp.float32):
    """The benchmark problem of issues 2 and 6: an untrained `eqx.nn.GRUCell(D, D)`
    (key 0), standard-normal inputs `(T, D)` (key 1, see `standard_normal`), zero
    initial state."""
    cell = eqx.nn.GRUCell(size, size, key=jax.random.key(0), dtype=dtype)
    xs = standard_normal(jax.random.key(1), length, size, dtype)
    y0 = jnp.zeros(size, dtype)
    return cell, xs, y0


INPUT_CHUNK = 10_000


def standard_normal(key, length: int, size: int, dtype=jnp.float32):
    """Standard-normal `(T, D)` inputs drawn in blocks of `INPUT_CHUNK` steps (block
    `i` from `fold_in(key, i)`), so that drawing 10^6 x 64 inputs does not leave a
    gigabyte of random-number temporaries in the resident memory the solves are
    measured against."""
    chunk = min(INPUT_CHUNK, length)
    count = -(-length // chunk)

    @jax.jit
    def draw():
        blocks = jax.lax.map(
            lambda i: jax.random.normal(
                jax.random.fold_in(key, i), (chunk, size), dtype
            ),
            jnp.arange(count),
        )
        return blocks.reshape(count * chunk, size)[:length]

    return draw()


def make_lax_scan(step: Callable = gru_step):
    """`jax.lax.scan` over the step, jitted: the sequential reference."""

    @jax.jit
    def scan(y0, xs, args):
        def body(h, x):
            new = step(h, x, args)
            return new, new

        return jax.lax.scan(body, y0, xs)[1]

    return scan


# --------------------------------------------------------------------------- timing


def time_interleaved(
    fns: dict[str, Callable],
    *,
    budget_s: float = 4.0,
    min_runs: int = 5,
    max_runs: int = 21,
) -> dict[str, list[float]]:
    """Calls every function once (warm-up and compilation), then round-robin `n`
    times, with `n` chosen so that the rounds take about `budget_s` (clipped to
    `[min_runs, max_runs]`). Returns the wall times in seconds of the timed calls."""
    warm = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        warm[name] = time.perf_counter() - start
    per_round = max(sum(warm.values()), 1e-6)
    runs = int(np.clip(math.ceil(budget_s / per_round), min_runs, max_runs))
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - start)
    finally:
        if gc_enabled:
            gc.enable()
    return times


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples)) * 1e3


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """The median of the run-by-run ratios: robust to load that drifts over time."""
    return float(np.median(np.asarray(samples) / np.asarray(reference)))


def xla_memory_mb(jitted: Callable, *args) -> float | None:
    """The buffers XLA allocates for one call of a jitted function (arguments, outputs
    and temporaries, from `compiled.memory_analysis()`), in MB. A compile-time figure:
    it needs no run and is deterministic; the resident memory of a whole process is
    measured separately with `/usr/bin/time -v`."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    total = (
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 1e6


def device_peak_mb() -> float | None:
    """Peak bytes in use on the default device, where the backend reports it (GPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 1e6


# --------------------------------------------------------------------------- records


def environment() -> dict:
    """Where and with what the numbers were measured."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "equinox": eqx.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "load_average": _load_average(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def backend_tag() -> str:
    """`cpu`, or the accelerator's kind (e.g. `gpu-nvidia-h100-80gb-hbm3`)."""
    if jax.default_backend() == "cpu":
        return "cpu"
    kind = jax.devices()[0].device_kind.lower()
    return jax.default_backend() + "-" + re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def fmt(value, spec: str, width: int, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{missing:>{width}}"
    return f"{value:>{width}{spec}}"


def error_message(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# --------------------------------------------------------------------------- memory


def _proc_status_mb(field: str) -> float | None:
    """`VmRSS` (now) or `VmHWM` (peak so far) of this process in MB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1.024e-3  # KiB -> MB
    except OSError:
        pass
    return None


def rss_now_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def rss_peak_mb() -> float | None:
    return _proc_status_mb("VmHWM")


def run_measured(module_args: list[str], timeout_s: float, tag: str = "RESULT") -> dict:
    """Runs `python -m <module_args>` under `/usr/bin/time -v` in a process group of
    its own (so that a timeout ends it and its children, by id) and returns the peak
    resident set size, the exit status and the JSON line `<tag> {...}` it printed."""
    command = [sys.executable, "-m", *module_args]
    time_binary = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    time_binary = time_binary or shutil.which("time")
    if time_binary is not None:
        command = [time_binary, "-v", *command]
    record: dict = {"command": " ".join(command[2 if time_binary else 0 :])}
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        timed_out = True
    record["elapsed_s"] = round(time.perf_counter() - start, 2)
    record["returncode"] = process.returncode
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stderr)
    if match:
        record["peak_rss_mb"] = int(match.group(1)) / 1e3
    child = None
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            child = json.loads(line[len(tag) + 1 :])
    if child is not None:
        record["child"] = child
        if "peak_rss_mb" not in record and child.get("ru_maxrss_mb") is not None:
            record["peak_rss_mb"] = child["ru_maxrss_mb"]
    if timed_out:
        record["status"] = f"timeout after {timeout_s:.0f} s"
    elif "Command terminated by signal 9" in stderr or process.returncode in (-9, 137):
        record["status"] = "killed (SIGKILL: out of memory?)"
    elif child is None or process.returncode != 0:
        tail = [line for line in stderr.splitlines() if line.strip()][-3:]
        record["status"] = f"failed (exit {process.returncode}): " + " | ".join(tail)
    else:
        record["status"] = child.get("status", "ok")
    return record


def gru_diagonal(h, x, cell):
    """The exact diagonal of $\\partial h' / \\partial h$ for `eqx.nn.GRUCell`, in
    closed form: a "cheap diagonal" (about one step evaluation) for
    `pdyn.QuasiDEER(diagonal=gru_diagonal)`.

    With $r = \\sigma(\\cdot)$, $z = \\sigma(\\cdot)$, $n = \\tanh(a_n + r (W_{hn} h +
    b_{hn}))$ and $h' = n + z (h - n)$:
    $\\partial h'_i / \\partial h_i = (1 - z_i)\\, \\partial n_i/\\partial h_i + z_i +
    (h_i - n_i)\\, \\partial z_i / \\partial h_i$.
    """
    size = h.shape[-1]
    bias = cell.bias if cell.use_bias else 0
    bias_n = cell.bias_n if cell.use_bias else 0
    igates = jnp.split(cell.weight_ih @ x + bias, 3)
    hgates = jnp.split(cell.weight_hh @ h, 3)
    r = jax.nn.sigmoid(igates[0] + hgates[0])
    z = jax.nn.sigmoid(igates[1] + hgates[1])
    hn = hgates[2] + bias_n
    n = jnp.tanh(igates[2] + r * hn)
    diag = jnp.diagonal(cell.weight_hh.reshape(3, size, size), axis1=1, axis2=2)
    dr = r * (1 - r) * diag[0]
    dz = z * (1 - z) * diag[1]
    dn = (1 - n**2) * (dr * hn + r * diag[2])
    return (1 - z) * dn + z + (h - n) * dz


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"
