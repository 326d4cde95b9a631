"""semantic_mix: the fused Triton kernels against the chunked reference and the bare GEMM ``images @ nouns.T``.

TFLOP/s counts one N×M×D GEMM (2·N·M·D), the floor's work, so that the ms column compares directly with the target
"within 2.5× of the GEMM time"; the fused kernel does a second product (weights @ nouns) on top of it. The ``topk``
rows run similarity_topk and then the gather-and-mix kernel.
"""
from __future__ import annotations

from functools import partial

import torch

import laic_kernels
from common import Case, feature_dtype, matmul_floor, run_with, sizes_for, triton_runs_here, unit_features

TAU = 0.01
# (N images, M nouns, D, topk or None)
SIZES = {
    "small": [(256, 1000, 64, None), (256, 1000, 64, 10), (256, 1000, 512, None)],
    "large": [(10_000, 82_115, 512, None), (100_000, 82_115, 512, None), (100_000, 82_115, 512, 10),
              (10_000, 82_115, 768, None)],
    "imagenet": [(1_281_167, 82_115, 512, None), (1_281_167, 82_115, 512, 10)],
}
INTERPRETER_SIZES = [(64, 300, 64, None), (64, 300, 64, 10)]


def cases(device: torch.device, scale: str):
    out = []
    dtype = feature_dtype(device)
    for n, m, d, topk in sizes_for(device, scale, SIZES, INTERPRETER_SIZES):
        images = unit_features(n, d, device, dtype, seed=0)
        nouns = unit_features(m, d, device, dtype, seed=1)
        mix = partial(laic_kernels.semantic_mix, images, nouns, TAU, topk=topk)
        runs = {"reference": partial(run_with, "reference", mix),
                "torch.matmul floor": partial(matmul_floor, images, nouns)}
        if triton_runs_here(device):
            runs["triton"] = partial(run_with, "triton", mix)
        out.append(Case("semantic_mix", f"N={n} M={m} D={d} topk={topk} tau={TAU}", str(dtype).replace("torch.", ""),
                        runs, flops=2.0 * n * m * d))
    return out
