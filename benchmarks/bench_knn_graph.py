"""knn_graph: the exact cosine k-NN graph on the fused similarity_topk kernel and on the symmetric backend (each pair's
product once: the CPU's path), against the chunked reference and the bare N×N GEMM of the same features (in row
chunks, output rows aligned: at N = 1.28M the N×N matrix would be 3.3 TB in bf16).

At ImageNet scale the product alone is 2·N²·D = 1.7e15 flops, so run that scale with ``--reps 1``; the float32
reference (1.7e15 flops off the tensor cores, then ``torch.topk`` over 1.28M-wide rows) is left out there to keep the
run short, and the floor is the baseline instead.
"""
from __future__ import annotations

from functools import partial

import torch

import laic_kernels
from bench_similarity_topk import tuned_plan_note
from common import (ALIGNED_FLOOR, Case, aligned_keys, feature_dtype, matmul_floor, run_with, sizes_for,
                    triton_runs_here, unit_features)

# (N, D, k)
SIZES = {
    "small": [(1000, 64, 10), (2000, 512, 10), (12_000, 512, 10)],   # the last: 3 tiles of the symmetric backend
    "large": [(10_000, 512, 10), (100_000, 512, 10), (100_000, 512, 50)],
    "imagenet": [(1_281_167, 512, 10)],
}
INTERPRETER_SIZES = [(200, 32, 10)]
# Above this N the float32 reference is not timed (see the module docstring).
MAX_REFERENCE_N = 200_000


def cases(device: torch.device, scale: str):
    out = []
    dtype = feature_dtype(device)
    for n, d, k in sizes_for(device, scale, SIZES, INTERPRETER_SIZES):
        features = unit_features(n, d, device, dtype, seed=0)
        graph = partial(laic_kernels.knn_graph, features, k)
        runs = {}
        if n <= MAX_REFERENCE_N:
            runs["reference"] = partial(run_with, "reference", graph)
            runs["symmetric"] = partial(run_with, "symmetric", graph)    # each pair's product once
        # The N x N product with 64-row-aligned output rows (common.ALIGNED_FLOOR: the unaligned one
        # took 19 s on an H200 at N = 1.28M, 12% of the square GEMM's rate).
        keys = aligned_keys(features)
        runs[ALIGNED_FLOOR] = partial(matmul_floor, features, keys)
        notes = {ALIGNED_FLOOR: f"keys padded with zero rows to {keys.shape[0]}"
                                + ("" if "reference" in runs else f"; reference not timed above N={MAX_REFERENCE_N}, "
                                                                  "floor not warmed up; the baseline")}
        if triton_runs_here(device):
            runs["triton"] = partial(run_with, "triton", graph)
            notes["triton"] = tuned_plan_note(features, features, k, exclude_self=True)
        out.append(Case("knn_graph", f"N={n} D={d} k={k}", str(dtype).replace("torch.", ""), runs,
                        flops=2.0 * n * n * d, baseline="reference" if "reference" in runs else ALIGNED_FLOOR,
                        notes=notes, warmups={} if "reference" in runs else {ALIGNED_FLOOR: 0}))
    return out
