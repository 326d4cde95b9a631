from __future__ import annotations

from typing import Tuple

import torch

from ._chunks import row_chunks


def similarity_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest dot products ``queries[i] · keys[j]`` per query row, sorted descending, computed in float32.

    ``exclude_self`` (queries and keys are the same set) drops ``j == i`` from row ``i``.
    Returns ``(values[N, k] float32, indices[N, k] int64)``.
    """
    n, m = queries.shape[0], keys.shape[0]
    keys_t = keys.float().t()
    values = torch.empty(n, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=queries.device)
    for start, stop in row_chunks(n, m):
        sims = queries[start:stop].float() @ keys_t
        if exclude_self:
            rows = torch.arange(stop - start, device=queries.device)
            sims[rows, rows + start] = float("-inf")
        v, i = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        values[start:stop] = v
        indices[start:stop] = i
    return values, indices
