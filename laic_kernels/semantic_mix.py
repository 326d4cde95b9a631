"""semantic_mix: each image's text counterpart, a softmax mixture of its most similar nouns."""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, reference
from .backends import Backend, always, dispatch, triton_backend

LOG2_E = 1.4426950408889634


def _validate(images, nouns, tau, topk) -> None:
    checks.tensor("images", images, ndim=2)
    checks.tensor("nouns", nouns, ndim=2)
    checks.non_empty("images", images)
    checks.non_empty("nouns", nouns)
    checks.same_device(images=images, nouns=nouns)
    if images.shape[1] != nouns.shape[1]:
        raise ValueError(f"images and nouns must have the same feature dimension D, got images {tuple(images.shape)}"
                         f" and nouns {tuple(nouns.shape)}")
    checks.positive("tau", tau)
    if LOG2_E / float(tau) >= checks.FLOAT32_MAX:   # the kernels scale by log2(e) / tau in float32: inf, then NaN
        raise ValueError(f"tau = {float(tau):g} is too small: log2(e) / tau must be a finite float32 (tau >= "
                         f"{LOG2_E / checks.FLOAT32_MAX:.3g}); scale the features and tau up together")
    if topk is not None:
        checks.int_in_range("topk", topk, 1, nouns.shape[0], " (topk <= number of nouns M, or None for all)")
    magnitudes = checks.finite_dot_products("images", images, "nouns", nouns, divided_by=("tau", float(tau)))
    # The mixture is a weighted mean of noun rows: its squared norm must stay a float32 too (nouns of 1e30 gave
    # zero rows where unit rows were due).
    if magnitudes is not None and nouns.shape[1] * magnitudes[1] ** 2 >= checks.FLOAT32_MAX / 2:
        raise ValueError(f"nouns reach {magnitudes[1]:.3g} in magnitude: at D = {nouns.shape[1]} the norm of their "
                         f"mixture may overflow float32; scale the nouns down (normalise the rows)")


BACKENDS = (
    triton_backend("semantic_mix"),
    Backend("reference", always, reference.semantic_mix),
)


def semantic_mix(images: torch.Tensor, nouns: torch.Tensor, tau: float, *, topk: Optional[int] = None
                 ) -> torch.Tensor:
    """``normalize(softmax(images @ nouns.T / tau) @ nouns)`` per row, as ``[N, D]`` float32.

    Args:
        images: ``[N, D]`` image embeddings.
        nouns: ``[M, D]`` noun embeddings on the same device.
        tau: softmax temperature (> 0); stable down to 0.005 and below.
        topk: if given, the softmax covers each row's ``topk`` most similar nouns only.

    Rows are unit but where a mixture's norm falls below the 1e-12 that ``F.normalize`` takes for zero: all-zero
    nouns mix to zero rows, nouns of length 1e-13 to rows of length about 0.03, and a mixture that cancels comes out
    short or zero, on every backend as in the definition. Unit noun rows, as CLIP's, mix to unit rows but where
    they cancel exactly.
    """
    _validate(images, nouns, tau, topk)
    return dispatch("semantic_mix", BACKENDS, images, nouns, float(tau), topk=topk)
