"""Shared timing for the benchmarks: every op contributes ``cases(device, scale)`` from ``bench_<op>.py``."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class Case:
    """One problem size of one op. ``runs`` maps a backend label (e.g. 'reference', 'triton', 'torch.matmul floor')
    to a zero-argument callable; ``flops`` / ``bytes`` give the work for effective TFLOP/s and GB/s."""

    op: str
    shape: str
    dtype: str
    runs: Dict[str, Callable[[], object]]
    flops: Optional[float] = None
    bytes: Optional[float] = None
    baseline: str = "reference"
    notes: Dict[str, str] = field(default_factory=dict)
    # Untimed runs before the timed ones, per label (default 1: Triton's compile, cuBLAS's first call). 0 for a
    # plain torch.matmul that takes many seconds at ImageNet scale, which the GEMM-peak run has already warmed up.
    warmups: Dict[str, int] = field(default_factory=dict)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1, short_run_ms: float = 0.0,
            budget_ms: float = 0.0, max_reps: int = 0) -> Dict[str, float]:
    """Median wall time in ms over ``reps`` runs (where the first timed run is under ``short_run_ms``: as many as
    fit in ``budget_ms``, at most ``max_reps``), and peak extra device memory in MiB (CUDA only); the run count
    is returned as "reps"."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak_mb = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    target = reps
    while len(times) < target:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) == 1 and times[0] < short_run_ms:
            target = max(reps, min(max_reps, int(budget_ms / max(times[0], 1e-3))))
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"ms": statistics.median(times), "peak_mb": peak_mb, "reps": len(times)}
