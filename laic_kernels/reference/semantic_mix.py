from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..chunks import row_chunks
from .similarity_topk import top_k_lower_index_first


def semantic_mix(images: torch.Tensor, nouns: torch.Tensor, tau: float, *, topk: Optional[int] = None) -> torch.Tensor:
    """Each image's text counterpart: ``normalize(softmax(images @ nouns.T / tau) @ nouns)`` per row, in float32.

    With ``topk``, the softmax runs over each row's ``topk`` most similar nouns only, chosen by similarity (equal
    similarities by the lower noun index), not by logit: dividing by ``tau`` can round two different similarities to
    one logit, and the kernels rank the similarities. Stable for small ``tau`` (the softmax subtracts the row
    maximum).
    """
    nouns32 = nouns.float()
    out = torch.empty(images.shape[0], nouns.shape[1], dtype=torch.float32, device=images.device)
    for start, stop in row_chunks(images.shape[0], nouns.shape[0]):
        sims = images[start:stop].float() @ nouns32.t()
        if topk is None:
            mixed = torch.softmax(sims / tau, dim=1) @ nouns32
        else:
            top_sims, top_idx = top_k_lower_index_first(sims, topk)   # ties as the kernels break them
            weights = torch.softmax(top_sims / tau, dim=1)
            mixed = torch.einsum("nk,nkd->nd", weights, nouns32[top_idx])
        out[start:stop] = F.normalize(mixed, dim=1)
    return out
