"""sinkhorn: the compiled extension (C++ on CPU, CUDA on GPU) against the PyTorch reference.

'public op' runs include the value checks (one device sync); 'no value checks' is the hot-loop call (inside
``laic_kernels.checks.values_checked()``, as stage 1 runs). On CUDA the two launches of the kernel are also timed with the choice forced: one block per
problem, and rows split over the number of blocks ``cuda_row_blocks`` picks (at least 2), to tune that rule."""
from __future__ import annotations

from functools import partial

import torch

import laic_kernels
from common import Case
from laic_kernels import checks
from laic_kernels.sinkhorn import cuda_row_blocks

SIZES = {
    "small": [(1, 256, 10), (1, 512, 10), (64, 256, 100), (1, 4096, 1000)],
    "large": [(1, 8192, 1000), (256, 512, 100), (16, 4096, 1000)],
    "imagenet": [(1, 65536, 1000), (64, 8192, 1000)],
}
N_ITERS = 3
EPS = 0.05


def _public(backend, scores):
    with laic_kernels.use_backend(backend):
        return laic_kernels.sinkhorn(scores, eps=EPS, n_iters=N_ITERS)


def _unchecked(backend, scores):
    with checks.values_checked():
        return _public(backend, scores)


def _op(scores, rows, cols, row_blocks):
    return torch.ops.laic.sinkhorn(scores, rows, cols, EPS, N_ITERS, -1.0, row_blocks)


def _forced_launches(scores):
    """The CUDA kernel with one block per problem and with split rows, called directly (no checks)."""
    import laic_kernels.extension  # noqa: F401  (registers torch.ops.laic)

    g, b, k = scores.shape
    rows = torch.full((g, b), 1.0 / b, device=scores.device)
    cols = torch.full((g, k), 1.0 / k, device=scores.device)
    sm_count = torch.cuda.get_device_properties(scores.device).multi_processor_count
    split = max(2, cuda_row_blocks(g, b, k, sm_count)[0])
    return {"cuda, one block per problem": partial(_op, scores, rows, cols, 1),
            f"cuda, rows split over {split} blocks": partial(_op, scores, rows, cols, split)}


def cases(device: torch.device, scale: str):
    out = []
    for g, b, k in SIZES[scale]:
        scores = torch.rand(g, b, k, device=device) * 2 - 1
        runs = {"reference": partial(_public, "reference", scores),
                "extension": partial(_public, "extension", scores),
                "extension, no value checks": partial(_unchecked, "extension", scores)}
        notes = {}
        if device.type == "cuda":
            runs.update(_forced_launches(scores))
            notes["extension"] = cuda_row_blocks(g, b, k, torch.cuda.get_device_properties(device)
                                                 .multi_processor_count)[1]
        # Each iteration reads the scores twice (column and row step), plus one read and one write for the plan.
        bytes_moved = scores.numel() * 4 * (2 * N_ITERS + 2)
        out.append(Case("sinkhorn", f"G={g} B={b} K={k} iters={N_ITERS}", "float32", runs, bytes=bytes_moved,
                        notes=notes))
    return out
