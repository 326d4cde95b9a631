"""Shared timing for the benchmarks: every op contributes ``cases(device, scale)`` from ``bench_<op>.py``."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import laic_kernels
from laic_kernels.backends import triton_interpreting


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


# ------------------------------------------------------------------------------------------------------------------
# What the kernel benchmarks share: inputs, sizes by device, the backend a row runs on, and the GEMM floor.

# The floor writes at most this many output elements per matmul call (2 GiB in bf16).
FLOOR_CHUNK_ELEMENTS = 1 << 30


def run_with(backend: str, fn, *args, **kwargs):
    with laic_kernels.use_backend(backend):
        return fn(*args, **kwargs)


def matmul_floor(queries: torch.Tensor, keys: torch.Tensor) -> None:
    """``queries @ keys.T`` in row chunks into one reused buffer: the bare GEMM cost of the product."""
    rows = max(1, FLOOR_CHUNK_ELEMENTS // keys.shape[0])
    out = torch.empty(min(rows, queries.shape[0]), keys.shape[0], dtype=queries.dtype, device=queries.device)
    keys_t = keys.t()
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start:start + rows]
        torch.matmul(chunk, keys_t, out=out[:chunk.shape[0]])


# cuBLAS's fastest tensor-core GEMMs want 16-byte-aligned leading dimensions: a [rows, 82115] bf16 output is not
# (164,230 bytes a row), and the first H200 run's floor reached 12% of the square GEMM's rate.
ALIGNED_ROWS = 64
ALIGNED_FLOOR = "torch.matmul floor, aligned"


def aligned_keys(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` with zero rows appended up to a multiple of ALIGNED_ROWS (the same product, an aligned output)."""
    extra = -keys.shape[0] % ALIGNED_ROWS
    return torch.cat([keys, keys.new_zeros(extra, keys.shape[1])]) if extra else keys


def triton_runs_here(device: torch.device) -> bool:
    return device.type == "cuda" or triton_interpreting()


def sizes_for(device: torch.device, scale: str, sizes: dict, interpreter_sizes: list) -> list:
    if device.type == "cpu" and triton_interpreting():
        return interpreter_sizes
    return sizes[scale]


def feature_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the tensor-core path the targets are about); float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def unit_features(n: int, d: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, device=device), dim=1).to(dtype)
