"""Timing, memory and reporting helpers shared by every benchmark suite.

Method: each function is jitted, warmed up (compiled and run), then timed with
``jax.block_until_ready`` over repeated runs; the median is reported. Machines are shared and
noisy, so results are read as ratios against peers timed in the same run. Memory is XLA's compiled
temporary allocation, ``jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax

__all__ = [
    "machine_description",
    "compiled_memory",
    "format_table",
    "temp_bytes",
    "timeit",
    "timeit_interleaved",
    "timeit_torch",
    "write_json",
]


def timeit(fn: Callable, *args, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in seconds of ``fn(*args)`` after ``warmup`` calls, blocking on results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(
    fns: dict[str, Callable], *args, repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in seconds of each ``fn(*args)``, timed in interleaved rounds (every
    function once per round, after ``warmup`` calls of each), so that a machine whose speed
    drifts during the run shifts every function alike and the ratios between them hold."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timeit_torch(fn: Callable, *args, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in seconds of a torch callable (synchronising CUDA when present)."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(*args)
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def temp_bytes(fn: Callable, *args) -> int | None:
    """Compiled temporary memory of ``jax.jit(fn)`` on ``args`` (None if XLA does not report it)."""
    memory = compiled_memory(jax.jit(fn).lower(*args).compile())
    return None if memory is None else memory["temp"]


def compiled_memory(compiled) -> dict | None:
    """``{"temp": …, "peak": …}`` in bytes from a compiled program's memory analysis (None if XLA
    does not report it). ``temp``: its temporaries; ``peak``: arguments + outputs + temporaries,
    less the outputs that alias an argument: what the device holds while it runs. The latter is
    comparable to torch's ``max_memory_allocated`` after ``reset_peak_memory_stats`` with the
    inputs allocated: both count the inputs, the results and every temporary of the step."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    temp = int(analysis.temp_size_in_bytes)
    peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + temp
        - analysis.alias_size_in_bytes
    )
    return {"temp": temp, "peak": int(peak)}


def machine_description() -> dict:
    """What the numbers were measured on: backend, device kind, CPU model, core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "commit": _git_commit(),
        "dirty": _git_dirty(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# The code that a result in bench/results describes: the library and every benchmark module
# (the suites, bench.designs, bench.profile, bench.gpu and what they share), not the results.
MEASURED_PATHS = ("kldiv", "bench", ":(exclude)bench/results")


def _git_dirty() -> bool | None:
    """Whether the measured code (``MEASURED_PATHS``) differs from the recorded commit."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *MEASURED_PATHS],
            capture_output=True,
            text=True,
            check=True,
        )
        return bool(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None


def code_changes_since(commit: str | None) -> int | None:
    """Commits that changed the measured code (``MEASURED_PATHS``) after ``commit``: 0 means
    the result describes the current code; None if git cannot tell."""
    if not commit:
        return None
    try:
        out = subprocess.run(
            [
                "git",
                "rev-list",
                "--count",
                f"{commit}..HEAD",
                "--",
                *MEASURED_PATHS,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (missing cells shown as '-')."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def write_json(path: str, suite: str, rows: Sequence[dict], args: dict) -> None:
    """Writes the rows with the machine description and the arguments that produced them."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"suite": suite, "machine": machine_description(), "args": args, "rows": list(rows)},
            f,
            indent=2,
            default=str,
        )
