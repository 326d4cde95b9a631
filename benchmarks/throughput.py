"""Every fast path beside its reference: median ms, effective TFLOP/s or GB/s, peak memory, the machine named.

TFLOP/s are also given as a percentage of this device's peak, measured in the same run by a square ``torch.matmul``
of the case's dtype (the GEMMs and their rates are named in the table's header). They count each case's useful work
(the products its definition needs, in each bench's ``cases``), alike for every backend of the case: one that
computes more (consistency_loss's reference forms the whole 2K x 2K product, a third more than counted) or less
(the symmetric kNN graph computes half the 2N²D) is not credited otherwise, so within a case they compare as
inverse times.

    python benchmarks/throughput.py                       # all ops, sizes for this machine (small on CPU)
    python benchmarks/throughput.py --ops sinkhorn --scale large --reps 10

Each op's cases live in benchmarks/bench_<op>.py as ``cases(device, scale) -> list[Case]``. Speed targets are read
from this table (see benchmarks/RESULTS.md), never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib
import math
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine_name, measure  # noqa: E402
from laic.runtime import resolve_device  # noqa: E402

SCALES = ("small", "large", "imagenet")


def available_ops():
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# Runs shorter than this are repeated until they fill the budget (up to MAX_REPS): one sample of a 0.1 ms call
# between two synchronisations says little.
SHORT_RUN_MS = 20.0
SHORT_RUN_BUDGET_MS = 200.0
MAX_REPS = 100

# Side of the square GEMM that measures the peak: large enough to saturate an H200, quick on the 2-core CPU.
PEAK_GEMM_SIZE = {"cuda": 8192, "cpu": 1024}


def gemm_peak_tflops(dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """TFLOP/s of an n×n by n×n ``torch.matmul`` in ``dtype`` on ``device`` (median of ``reps``)."""
    n = PEAK_GEMM_SIZE.get(device.type, PEAK_GEMM_SIZE["cpu"])
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    ms = measure(lambda: torch.matmul(a, b, out=out), device, reps)["ms"]
    return 2.0 * n ** 3 / (ms / 1e3) / 1e12


# The dtypes the cases use, whose GEMM peak is measured before any op (bf16 and fp16: the GPU's operands).
PEAK_DTYPES = {"cuda": ("float32", "bfloat16", "float16"), "cpu": ("float32",)}
# The peak GEMM takes ~1.4 ms on an H200: one sample of it would scale every "% peak" by its noise.
PEAK_REPS = 20


def gemm_peaks(dtype_names, device: torch.device, reps: int) -> dict:
    """Peak TFLOP/s per dtype name (as in ``Case.dtype``); names that are not a torch float dtype are skipped."""
    peaks = {}
    for name in sorted(set(dtype_names)):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            peaks[name] = gemm_peak_tflops(dtype, device, reps)
    return peaks


HEADER = ["op", "shape", "dtype", "backend", "ms", "TFLOP/s", "% peak", "GB/s", "peak MiB", "vs baseline", "notes"]


def run(ops, device, scale, reps):
    """The peaks first, then each op set up and timed in turn (its rows printed as they come, its tensors freed
    before the next op's): an op that fails to set up costs its own rows only."""
    peaks = gemm_peaks(PEAK_DTYPES.get(device.type, PEAK_DTYPES["cpu"]), device, max(reps, PEAK_REPS))
    n = PEAK_GEMM_SIZE.get(device.type, PEAK_GEMM_SIZE["cpu"])
    peak_text = ", ".join(f"{name} {tflops:.2f} TFLOP/s" for name, tflops in peaks.items()) or "none needed"
    print(f"# laic_kernels throughput on {machine_name(device)}, scale={scale}, median of {reps} runs (of more "
          f"where a run takes under {SHORT_RUN_MS:g} ms: as many as fit in {SHORT_RUN_BUDGET_MS:g} ms, up to "
          f"{MAX_REPS})")
    print(f"# % peak: TFLOP/s over this run's {n}x{n}x{n} torch.matmul of the same dtype (median of "
          f"{max(reps, PEAK_REPS)}): {peak_text}")
    print("# vs baseline: the baseline row's ms over this row's (above 1: faster); each op names its baseline in "
          "its notes")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for op in ops:
        try:
            cases = importlib.import_module(f"bench_{op}").cases(device, scale)
        except Exception as exc:   # e.g. the extension that did not build: this op's rows only
            cells = [op, "-", "-", "-", f"failed to set up: {type(exc).__name__}: {exc}"]
            print("| " + " | ".join(cells + [""] * (len(HEADER) - len(cells))) + " |", flush=True)
            continue
        case = None
        for case in cases:
            print_case(case, peaks, device, reps)
        del case, cases   # the loop variable too: it holds the last case's tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_case(case, peaks: dict, device, reps: int) -> None:
    results = {}
    for label, fn in case.runs.items():
        try:
            results[label] = measure(fn, device, reps, warmup=case.warmups.get(label, 1), short_run_ms=SHORT_RUN_MS,
                                     budget_ms=SHORT_RUN_BUDGET_MS, max_reps=MAX_REPS)
        except Exception as exc:  # a backend that cannot take this size: say so, keep going
            cells = [case.op, case.shape, case.dtype, label, f"failed: {exc}"]
            print("| " + " | ".join(cells + [""] * (len(HEADER) - len(cells))) + " |")
    base = results.get(case.baseline)
    for label, r in results.items():
        secs = r["ms"] / 1e3
        tflops = case.flops / secs / 1e12 if case.flops else None
        percent = 100 * tflops / peaks[case.dtype] if tflops is not None and case.dtype in peaks else None
        gbs = case.bytes / secs / 1e9 if case.bytes else None
        speedup = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        row = [case.op, case.shape, case.dtype, label, _fmt(r["ms"], ".3f"), _fmt(tflops, ".2f"), _fmt(percent, ".1f"),
               _fmt(gbs, ".1f"), _fmt(r["peak_mb"], ".1f"), speedup, case.notes.get(label, "")]
        print("| " + " | ".join(row) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=None, help=f"ops to run (default all: {', '.join(available_ops())})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=SCALES, default=None,
                        help="problem sizes (default: small on CPU, large on GPU)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per row, at least 1 (the median is shown)")
    args = parser.parse_args(argv)
    if args.reps < 1:   # (every row said "failed: no median for empty data")
        parser.error(f"--reps must be at least 1, got {args.reps}")
    try:   # (a bad or absent device was a torch traceback)
        device = resolve_device(args.device, "--device")
    except ValueError as exc:
        parser.error(str(exc))
    scale = args.scale or ("large" if device.type == "cuda" else "small")
    if args.ops == []:   # (--ops with no names ran every op)
        parser.error(f"--ops needs at least one op; choose from {available_ops()} (or leave --ops out: all)")
    ops = args.ops or available_ops()
    unknown = sorted(set(ops) - set(available_ops()))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {available_ops()}")
    run(ops, device, scale, args.reps)


if __name__ == "__main__":
    main()
