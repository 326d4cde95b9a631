"""consistency_loss, forward and forward+backward: the fused Triton kernels, the closed-form backend (the reference
with its gradient written out) and the compiled CPU kernel of the same closed form ('extension', the CPU's path up to
K = 50) against the eager PyTorch reference and ``torch.compile`` of the reference.

Labels: 'triton' and 'reference' are the implementations themselves (no input checks); 'public op' is
``laic_kernels.consistency_loss`` as a caller sees it (checks, then the automatic backend), so the gap to the
implementation it picks is the cost of the checks. 'triton' runs on CUDA, and on the CPU only when TRITON_INTERPRET=1
is set (the interpreter is far slower than the reference: a correctness run, not a speed figure).
Targets (issue 4, one H200): at B=8192, K=1000, D=512 forward+backward >= 3x eager and >= 1.5x compiled with at most
half the peak memory; at B=512, K=10 (launch-bound) forward+backward under 100 us.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import laic_kernels
from common import Case
from laic_kernels import closed_form, reference
from laic_kernels.backends import extension_import_error, triton_import_error, triton_interpreting

# (B, K, D)
SIZES = {
    # stage-1 batches (B = 256) at K = 10 and 47 (the 500-image and DTD dev sets) and at ImageNet's K = 1000
    "small": [(256, 10, 512), (256, 47, 512), (512, 10, 512), (1024, 100, 512), (256, 1000, 512)],
    "large": [(8192, 1000, 512), (512, 10, 512)],
    # stage 1's own call at ImageNet's K (B = 256), then a large batch: on an H200 (2026-12-04) the Triton kernel took
    # 159 ms forward+backward at B = 65536 against closed_form's 39 (benchmarks/RESULTS.md); B = 256 is not yet timed.
    "imagenet": [(256, 1000, 512), (65536, 1000, 512)],
}


def _inputs(b, k, d, device):
    logits = [torch.randn(b, k, device=device) * 3 for _ in range(4)]
    feats = [F.normalize(torch.randn(b, d, device=device), dim=1) for _ in range(2)]
    return [t.requires_grad_(True) for t in logits + feats]


def _forward(fn, tensors):
    with torch.no_grad():
        return fn(*tensors)[0]


def _forward_backward(fn, tensors):
    loss = fn(*tensors)[0]
    return torch.autograd.grad(loss, tensors)


def _public_op(*tensors):
    return laic_kernels.consistency_loss(*tensors)


def _implementations(device, scale: str):
    runs = {"reference": reference.consistency_loss, "closed_form": closed_form.consistency_loss,
            "public op": _public_op}
    if scale != "imagenet":
        # Not at ImageNet sizes: its compiles took most of the first GPU check's throughput step, and its
        # forward+backward failed there under torch 2.11 (benchmarks/RESULTS.md).
        runs["torch.compile(reference)"] = torch.compile(reference.consistency_loss)
    if extension_import_error() is None and device.type == "cpu":
        runs["extension"] = closed_form.compiled_consistency_loss
    if triton_import_error() is None and (device.type == "cuda" or triton_interpreting()):
        from laic_kernels.triton import consistency_loss as kernel
        runs["triton"] = kernel.consistency_loss
    return runs


def cases(device: torch.device, scale: str):
    out = []
    implementations = _implementations(device, scale)
    for b, k, d in SIZES[scale]:
        tensors = _inputs(b, k, d, device)
        # The products that dominate: PᵀP, QᵀQ, PᵀQ and PᵀU, QᵀV forward, and the centres' K×K similarity μνᵀ
        # (2K²D, independent of B: a third of the work at B = 256, K = 1000); the backward's row pass does about
        # twice the B-sized part (P·W for three K×K matrices, U·Mᵀ and P·M for the centres) and two K×K×D products.
        forward_flops = 2.0 * b * (3 * k * k + 2 * k * d) + 2.0 * k * k * d
        backward_flops = 2.0 * b * (4 * k * k + 4 * k * d) + 4.0 * k * k * d
        shape = f"B={b} K={k} D={d}"
        out.append(Case("consistency_loss fwd", shape, "float32",
                        {label: partial(_forward, fn, tensors) for label, fn in implementations.items()},
                        flops=forward_flops))
        out.append(Case("consistency_loss fwd+bwd", shape, "float32",
                        {label: partial(_forward_backward, fn, tensors) for label, fn in implementations.items()},
                        flops=forward_flops + backward_flops))
    return out
