"""consistent_neighbours from features: the fused Triton kernel (both k-NN graphs and the filter in one pass) against
the composition it replaces (two ``knn_graph`` calls, then the filter on the lists) and the two bare N×N GEMMs.

'composition (triton)' is what stage 0 ran on GPU before the fused op, and is the baseline where Triton runs;
'triton fused' writes only the filtered neighbours and mask, '+ graphs' also the two neighbour lists (what
``laic.stage0`` runs now: it needs the lists). The work is two products of 2·N²·D flops each (3.4e15 at ImageNet scale: use ``--reps 1``); above
``MAX_REFERENCE_N`` the float32 reference is left out, as in bench_knn_graph. Text features are a noisy copy of the
image features, so that the two spaces partly agree as in real data. 'symmetric' is the CPU's path (both graphs with
each pair's product once, then the filter). The fused rows' note names the tile plan tuning picked on CUDA (timed
while the cases are built, not in the rows).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import laic_kernels
from bench_knn_graph import INTERPRETER_SIZES, MAX_REFERENCE_N, SIZES
from common import Case, feature_dtype, matmul_floor, run_with, sizes_for, triton_runs_here, unit_features


def composition(image: torch.Tensor, text: torch.Tensor, k: int):
    _, image_graph = laic_kernels.knn_graph(image, k)
    _, text_graph = laic_kernels.knn_graph(text, k)
    return laic_kernels.consistent_neighbours(image_graph, text_graph)


def tuned_plan_note(image: torch.Tensor, text: torch.Tensor, k: int, return_graphs: bool) -> str:
    """Which plan the fused kernel runs with on these inputs (tuning it now, when it tunes at all)."""
    from laic_kernels.triton import consistent_neighbours as kernel
    image_units, text_units = kernel.topk_kernel.dot_operands(image, text)
    return f"plan {kernel.tuned_plan(image_units, text_units, k, return_graphs)} of {len(kernel.plans(k))}"


def two_floors(image: torch.Tensor, text: torch.Tensor) -> None:
    matmul_floor(image, image)
    matmul_floor(text, text)


def cases(device: torch.device, scale: str):
    out = []
    dtype = feature_dtype(device)
    for n, d, k in sizes_for(device, scale, SIZES, INTERPRETER_SIZES):
        image = unit_features(n, d, device, dtype, seed=0)
        text = F.normalize(image.float() + unit_features(n, d, device, torch.float32, seed=1), dim=1).to(dtype)
        fused = partial(laic_kernels.consistent_neighbours, image, text, k)
        runs, notes = {}, {}
        if n <= MAX_REFERENCE_N:
            runs["composition (reference)"] = partial(run_with, "reference", composition, image, text, k)
            runs["symmetric"] = partial(run_with, "symmetric", fused)
        runs["torch.matmul floor (both)"] = partial(two_floors, image, text)
        if triton_runs_here(device):
            runs["composition (triton)"] = partial(run_with, "triton", composition, image, text, k)
            runs["triton fused"] = partial(run_with, "triton", fused)
            runs["triton fused + graphs"] = partial(run_with, "triton", fused, return_graphs=True)
            notes = {"triton fused": tuned_plan_note(image, text, k, False),
                     "triton fused + graphs": tuned_plan_note(image, text, k, True)}
        baseline = next(label for label in ("composition (triton)", "composition (reference)",
                                            "torch.matmul floor (both)") if label in runs)
        out.append(Case("consistent_neighbours", f"N={n} D={d} k={k}", str(dtype).replace("torch.", ""), runs,
                        flops=2 * 2.0 * n * n * d, baseline=baseline, notes=notes))
    return out
