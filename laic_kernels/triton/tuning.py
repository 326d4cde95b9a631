"""Tile plans chosen by timing them on the device: once per process and kind of problem.

A kernel's best tile sizes depend on the GPU (SMs, registers, shared memory, how well loads overlap the tensor cores)
in ways only a measurement settles, and the project is developed on machines without one. So a kernel with several
candidate plans (all tested for the same answers) asks :func:`fastest`: on a large CUDA problem each candidate runs on
a probe-sized slice of the caller's own input, once to compile and warm it, then ``REPS`` times between two CUDA
events, and the fastest is remembered under the problem's kind (what the best plan depends on: device, dtype, widths,
the probe's shape; not N). Off CUDA and on small problems the first candidate, the kernel's default, runs untimed;
while a CUDA graph is being captured, the plan remembered for the kind, else the default.

Every plan gives the same answer (each tile's similarities are the same dot products in the same feature order, and
the top-k of a set does not depend on the order it streams in), so tuning changes only the speed.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, Sequence, TypeVar

import torch

Plan = TypeVar("Plan")

# Only problems of at least this many multiply-adds (1.8e13) are tuned. By arithmetic from similarity_topk's rate
# measured on the H200 (237 TFLOP/s, benchmarks/RESULTS.md; not a timing of the tuning): such a problem takes 0.15 s
# or more, and timing four plans, four runs each, on the probe below about 0.15 s once (plus each plan's compile on
# a machine without Triton's cache).
TUNE_MIN_MACS = 1 << 44
# The probe: the first rows and keys of the caller's input, 1.1e12 multiply-adds at D = 512.
PROBE_ROWS = 1 << 16
PROBE_KEYS = 1 << 15
REPS = 3

_CHOSEN: Dict[Hashable, object] = {}


def worth_tuning(device: torch.device, macs: int) -> bool:
    """Whether a call of ``macs`` multiply-adds on ``device`` picks its plan by timing (large CUDA problems)."""
    return device.type == "cuda" and macs >= TUNE_MIN_MACS


def fastest(kind: Hashable, candidates: Sequence[Plan], run: Callable[[Plan], None]) -> Plan:
    """The candidate that ``run`` (one call of the kernel on the probe, on the current CUDA stream) finishes fastest,
    timed the first time ``kind`` is asked for and remembered. While a CUDA graph is being captured nothing is timed
    (timing synchronises): the remembered plan, else the default. A candidate that fails (e.g. more shared memory
    than this GPU has) is never picked; when all fail, the default is returned (and not remembered) and its call raises
    the error."""
    if len(candidates) == 1:
        return candidates[0]
    if kind not in _CHOSEN:
        if capturing():
            return candidates[0]
        times = [milliseconds(run, candidate) for candidate in candidates]
        if min(times) == math.inf:     # nothing ran (e.g. out of memory for the probe): not remembered
            return candidates[0]
        _CHOSEN[kind] = candidates[times.index(min(times))]
    return _CHOSEN[kind]


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never where CUDA is unavailable)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def milliseconds(run: Callable[[Plan], None], candidate: Plan) -> float:
    """Mean time of ``run(candidate)`` over ``REPS`` runs after one untimed run (the compile); infinite when it
    fails."""
    try:
        run(candidate)
    except Exception:  # noqa: BLE001  (any failure of a candidate only rules it out; the default's is raised later)
        return math.inf
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        run(candidate)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / REPS


def chosen() -> Dict[Hashable, object]:
    """The plans picked so far in this process, by problem kind (benchmarks print them)."""
    return dict(_CHOSEN)
