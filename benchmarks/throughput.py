"""Every fast path beside its reference: median ms, effective TFLOP/s or GB/s, peak memory, the machine named.

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

SCALES = ("small", "large", "imagenet")


def available_ops():
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run(ops, device, scale, reps):
    print(f"# laic_kernels throughput on {machine_name(device)}, scale={scale}, median of {reps} runs")
    header = ["op", "shape", "dtype", "backend", "ms", "TFLOP/s", "GB/s", "peak MB", "vs baseline", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for op in ops:
        module = importlib.import_module(f"bench_{op}")
        for case in module.cases(device, scale):
            results = {}
            for label, fn in case.runs.items():
                try:
                    results[label] = measure(fn, device, reps)
                except Exception as exc:  # a backend that cannot take this size: say so, keep going
                    print(f"| {case.op} | {case.shape} | {case.dtype} | {label} | failed: {exc} ||||||")
            base = results.get(case.baseline)
            for label, r in results.items():
                secs = r["ms"] / 1e3
                tflops = case.flops / secs / 1e12 if case.flops else None
                gbs = case.bytes / secs / 1e9 if case.bytes else None
                speedup = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
                row = [case.op, case.shape, case.dtype, label, _fmt(r["ms"], ".3f"), _fmt(tflops, ".2f"),
                       _fmt(gbs, ".1f"), _fmt(r["peak_mb"], ".1f"), speedup, case.notes.get(label, "")]
                print("| " + " | ".join(row) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=None, help=f"ops to run (default all: {', '.join(available_ops())})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=SCALES, default=None,
                        help="problem sizes (default: small on CPU, large on GPU)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale = args.scale or ("large" if device.type == "cuda" else "small")
    ops = args.ops or available_ops()
    unknown = sorted(set(ops) - set(available_ops()))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {available_ops()}")
    run(ops, device, scale, args.reps)


if __name__ == "__main__":
    main()
