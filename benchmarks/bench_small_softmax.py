"""small_softmax: ``laic_kernels.small_softmax.softmax`` (the CPU takes the transposed form below SMALL_K columns)
against ``torch.softmax(x, dim=-1)``, forward and forward+backward, at stage 1's shapes (a batch of rows and its
neighbours, 2 x 256 rows, against K clusters). GB/s count the input read and the output written once."""
from __future__ import annotations

import torch

from common import Case
from laic_kernels import small_softmax

# (rows, K): K = 10 and 15 below SMALL_K (transposed on the CPU), 16 and 100 at or above it (the same kernel).
SIZES = {
    "small": [(512, 10), (512, 15), (512, 16), (512, 100)],
    "large": [(512, 10), (512, 100), (512, 1000)],
    "imagenet": [(512, 1000)],
}


def _forward_backward(fn, x, upstream):
    def run():
        return torch.autograd.grad(fn(x), x, upstream)
    return run


def cases(device: torch.device, scale: str):
    out = []
    for rows, k in SIZES[scale]:
        gen = torch.Generator(device=device).manual_seed(rows + k)
        x = torch.randn(rows, k, generator=gen, device=device).requires_grad_(True)
        upstream = torch.randn(rows, k, generator=gen, device=device)
        ours, torchs = small_softmax.softmax, (lambda t: torch.softmax(t, dim=-1))
        nbytes = 2 * 4.0 * rows * k
        out.append(Case("small_softmax fwd", f"rows={rows} K={k}", "float32",
                        {"torch.softmax": lambda x=x: torchs(x.detach()), "laic": lambda x=x: ours(x.detach())},
                        bytes=nbytes, baseline="torch.softmax"))
        out.append(Case("small_softmax fwd+bwd", f"rows={rows} K={k}", "float32",
                        {"torch.softmax": _forward_backward(torchs, x, upstream),
                         "laic": _forward_backward(ours, x, upstream)},
                        bytes=2 * nbytes, baseline="torch.softmax"))
    return out
