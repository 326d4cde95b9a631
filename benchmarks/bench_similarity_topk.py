"""similarity_topk: the fused Triton kernel against the chunked reference and the bare GEMM of the same product.

The floor ('torch.matmul floor') is ``queries @ keys.T`` of the same shape and dtype, written in row chunks into one
reused buffer (at ImageNet scale the whole N×M product, 210 GB in bf16, fits nowhere); it does no top-k at all.
'torch.matmul floor, aligned' is the same product with the keys padded to a multiple of 64 rows, so that the
output rows are 16-byte aligned (cuBLAS's fast tensor-core GEMMs want that; M = 82,115 is not): the time to beat,
and the baseline. 'triton' is the public op (on CUDA with the tile plan tuning picked, named in its note; the
timing is done while the cases are built, so it is not in the row), 'triton <plan>' each tile plan it chooses from.
At ImageNet scale (2·N·M·D = 1.1e14 flops; the reference runs it
in float32) use ``--reps 1``. On CPU the Triton kernel only runs under ``TRITON_INTERPRET=1`` (and then on tiny sizes:
the interpreter is orders of magnitude slower than compiled code); otherwise its row is left out.
"""
from __future__ import annotations

from functools import partial

import torch

import laic_kernels
from common import (ALIGNED_FLOOR, ALIGNED_ROWS, Case, aligned_keys, feature_dtype, matmul_floor, run_with, sizes_for,
                    triton_runs_here, unit_features)

# (N queries, M keys, D, k)
SIZES = {
    "small": [(256, 1000, 64, 10), (2048, 1000, 64, 10)],
    "large": [(10_000, 82_115, 512, 10), (100_000, 82_115, 512, 10), (100_000, 82_115, 512, 128),
              (64, 1_000_000, 512, 10)],
    "imagenet": [(1_281_167, 82_115, 512, 10)],
}
INTERPRETER_SIZES = [(64, 300, 32, 10)]


def plan_runs(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False) -> dict:
    """One run per tile plan of the kernel, labelled 'triton <plan>', to compare with the one tuning picks."""
    from laic_kernels.triton import similarity_topk as kernel
    values = torch.empty(queries.shape[0], k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    return {f"triton {plan}": partial(kernel.similarity_topk_into, queries, keys, k, exclude_self, values, indices,
                                      plan=plan) for plan in kernel.plans(k)}


def tuned_plan_note(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False) -> str:
    """Which plan the public op runs with on these inputs (tuning it now, when it tunes at all)."""
    from laic_kernels.triton import similarity_topk as kernel
    plan = kernel.tuned_plan(*kernel.dot_operands(queries, keys), k, exclude_self)
    return f"plan {plan} of {len(kernel.plans(k))}"


def cases(device: torch.device, scale: str):
    out = []
    dtype = feature_dtype(device)
    for n, m, d, k in sizes_for(device, scale, SIZES, INTERPRETER_SIZES):
        queries = unit_features(n, d, device, dtype, seed=0)
        keys = unit_features(m, d, device, dtype, seed=1)
        padded = aligned_keys(keys)
        runs = {"reference": partial(run_with, "reference", laic_kernels.similarity_topk, queries, keys, k),
                "torch.matmul floor": partial(matmul_floor, queries, keys),
                ALIGNED_FLOOR: partial(matmul_floor, queries, padded)}
        notes = {ALIGNED_FLOOR: f"the baseline (the target: triton within 1.5x of it, vs baseline >= 0.67x); keys "
                                f"padded with zero rows to M = {padded.shape[0]} ({ALIGNED_ROWS}-row multiple)"}
        if triton_runs_here(device):
            runs["triton"] = partial(run_with, "triton", laic_kernels.similarity_topk, queries, keys, k)
            notes["triton"] = tuned_plan_note(queries, keys, k)
            if scale != "imagenet":   # there each plan's compile and 1.28M-row runs crowd out the GPU check's other ops
                runs.update(plan_runs(queries, keys, k))
        out.append(Case("similarity_topk", f"N={n} M={m} D={d} k={k}", str(dtype).replace("torch.", ""), runs,
                        flops=2.0 * n * m * d, notes=notes, baseline=ALIGNED_FLOOR))
    return out
