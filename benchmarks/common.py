"""Shared helpers for benchmarks: machine description, medians, the results file shape of DESIGN.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, torch threads {torch.get_num_threads()}"


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, *, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Best median FLOP/s of square ``torch.mm`` over ``sizes`` — the machine's practical GEMM limit."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = median_time(lambda a=a, b=b: torch.mm(a, b), repeats=repeats)
        best = max(best, 2 * n**3 / t)
    return best


def write_results(name: str, cases: list[dict], *, command: str | None = None) -> Path:
    """Write ``benchmarks/results/NAME.json`` in the shape DESIGN.md ("Measuring") prescribes."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "machine": machine(),
        "torch": torch.__version__.split("+")[0],
        "command": command or "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cases": cases,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
