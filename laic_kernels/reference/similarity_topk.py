from __future__ import annotations

from typing import Tuple

import torch

from ..chunks import row_chunks


def similarity_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest dot products ``queries[i] · keys[j]`` per query row, sorted descending, computed in float32;
    equal values by lower key index (the kernels' rule: ties go the same way on every backend and in
    ``laic.distributed``'s merges).

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
        values[start:stop], indices[start:stop] = top_k_lower_index_first(sims, k)
    return values, indices


def top_k_lower_index_first(sims: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(sims, k)`` along dim 1, but where values tie the lower index comes first, also at the k-th place
    (torch.topk leaves the order of ties unspecified).

    Where a row's k-th and (k+1)-th values differ, its top-k set is unique and only its order among ties needs
    fixing, on k+1 candidates; only the rows with a tie across the k-th place (rare in real data) take the
    full-width path, whose passes over the whole row cost several times the product that made it."""
    if k == 1:     # (the k-means assignment) max returns the first of equal maxima
        values, indices = sims.max(dim=1, keepdim=True)
        return values, indices
    if k >= sims.shape[1]:
        return _top_k_full_width(sims, k)
    values, indices = torch.topk(sims, k + 1, dim=1, largest=True, sorted=True)
    by_index = indices.sort(dim=1).values
    by_value = torch.sort(sims.gather(1, by_index), dim=1, descending=True, stable=True)
    values, indices = by_value.values[:, :k], by_index.gather(1, by_value.indices[:, :k])
    tied = (by_value.values[:, k - 1] == by_value.values[:, k]).nonzero()[:, 0]
    # In blocks of rows: every row may tie (each image given twice: its two copies tie at the k-th place of every
    # row near them), and the full-width path over a whole tile held a copy of it, an int64 running count of twice
    # its size and several masks (5x the tile's documented memory, 418 against 66 MiB at 4096 rows).
    step = max(1, FULL_WIDTH_BLOCK_ELEMENTS // sims.shape[1])
    for start in range(0, tied.numel(), step):
        rows = tied[start:start + step]
        values[rows], indices[rows] = _top_k_full_width(sims.index_select(0, rows), k)
    return values, indices


# Elements of the rows the full-width path takes at once (1 MB of float32; its temporaries are a few times that).
FULL_WIDTH_BLOCK_ELEMENTS = 1 << 18


def _top_k_full_width(sims: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    kth = torch.topk(sims, k, dim=1, largest=True, sorted=True).values[:, -1:]
    above, tied = sims > kth, sims == kth
    # int32: a count along a row (at most its width), half the memory of cumsum's int64
    take = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= k - above.sum(1, keepdim=True)))
    chosen = take.nonzero()[:, 1].view(-1, k)      # exactly k per row, in increasing index order
    chosen_values = sims.gather(1, chosen)
    order = torch.sort(chosen_values, dim=1, descending=True, stable=True).indices
    return chosen_values.gather(1, order), chosen.gather(1, order)
