"""sinkhorn: the compiled extension (C++ on CPU, CUDA on GPU) against the PyTorch reference."""
from __future__ import annotations

from functools import partial

import torch

import laic_kernels
from common import Case

SIZES = {
    "small": [(1, 512, 10), (64, 256, 100), (1, 4096, 1000)],
    "large": [(1, 8192, 1000), (256, 512, 100), (16, 4096, 1000)],
    "imagenet": [(1, 65536, 1000), (64, 8192, 1000)],
}
N_ITERS = 3


def _run(backend, scores):
    with laic_kernels.use_backend(backend):
        return laic_kernels.sinkhorn(scores, eps=0.05, n_iters=N_ITERS)


def cases(device: torch.device, scale: str):
    out = []
    for g, b, k in SIZES[scale]:
        scores = torch.rand(g, b, k, device=device) * 2 - 1


        # Each iteration reads the scores twice (column and row step), plus one read and one write for the plan.
        bytes_moved = scores.numel() * 4 * (2 * N_ITERS + 2)
        out.append(Case("sinkhorn", f"G={g} B={b} K={k} iters={N_ITERS}", "float32",
                        {b: partial(_run, b, scores) for b in ("reference", "extension")},
                        bytes=bytes_moved))
    return out
