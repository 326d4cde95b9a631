"""Softmax and log-softmax over the last dimension that stay fast on the CPU when that dimension is short.

torch's CPU kernel vectorises along the softmax dimension and takes a scalar path when it holds fewer elements
than a vector: at K = 10 clusters a [512, K] softmax took 94 us against 14 us for the same softmax along the other
dimension of the transpose, forward and backward together 169 against 87 us (an ad hoc timing, torch 2.14, one
thread, float32); ``python benchmarks/throughput.py --ops small_softmax`` (2 threads, benchmarks/RESULTS.md) has
1.9x / 2.3x forward at K = 10 / 15 and 1.3x with the backward. From K = 16 on the direct kernel is as fast or
faster. Stage 1 takes about ten of them a step at K = 10, forward and backward.
"""
from __future__ import annotations

import torch

# Below this many elements along the softmax dimension the CPU takes the transposed form.
SMALL_K = 16


def _transposed(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() >= 2 and x.shape[-1] < SMALL_K


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=-1)`` (differentiable), contiguous."""
    if _transposed(x):
        return torch.softmax(x.transpose(-1, -2), dim=-2).transpose(-1, -2).contiguous()
    return torch.softmax(x, dim=-1)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.log_softmax(x, dim=-1)`` (differentiable), contiguous."""
    if _transposed(x):
        return torch.log_softmax(x.transpose(-1, -2), dim=-2).transpose(-1, -2).contiguous()
    return torch.log_softmax(x, dim=-1)


def softmax_backward(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient reaching the logits of ``probs = softmax(logits)`` (last dimension) from ``grad``, the gradient of
    ``probs``: ``probs * (grad - <grad, probs>)`` per row, in torch's fused kernel (at K = 1000 twenty times faster
    than those four elementwise steps), contiguous."""
    if _transposed(probs):
        return torch.ops.aten._softmax_backward_data(grad.transpose(-1, -2), probs.transpose(-1, -2), -2,
                                                     probs.dtype).transpose(-1, -2).contiguous()
    return torch.ops.aten._softmax_backward_data(grad, probs, -1, probs.dtype)
