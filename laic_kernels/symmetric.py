"""The ``symmetric`` backend: the k nearest rows of a set among itself, each pair's product computed once.

A neighbour graph compares a set of rows with itself (``similarity_topk(x, x, k, exclude_self=True)``), so its
similarity matrix is symmetric: the reference computes every product twice, once for each row of the pair. Here the
rows are cut into tiles and only the tiles on and above the diagonal are multiplied; tile ``(A, B)`` serves row
block A (its best k along the rows, as the reference takes them) and row block B (its columns: only the entries at or
above each B row's current k-th best can enter its list, a small set once every row has its own tile's best, and
those are merged in). About half the N²·D multiply-adds of the reference (the diagonal tiles are whole), for the
CPU (where the graphs are the fit's largest step at large N) and for GPUs without Triton.

Exactness: the same choice as the reference (k largest values, equal values by lower index, also at the k-th
place: a merge of exact per-tile choices under a total order is exact), on the products as computed. Each
similarity is one float32 dot product; the reference computes ``x_j·x_i`` for row j where this backend reuses
``x_i·x_j``, and BLAS rounds one product differently in the last bit with the shape of the matrix product it is
part of (a diagonal tile against a smaller last one): equal rows (duplicates) may then tie differently than in the
reference, a lower index no longer first (seen with tiles of 4 rows; at the default tile, not found).

Memory: one ``T x T`` float32 tile (T = :func:`tile_rows`, 4096 with the references' default chunk of 256 MB: a
quarter of it), its mask, the running ``[N, k]`` lists and at most ``MAX_CANDIDATES_PER_LIST`` candidates per list
entry.

Products must be finite (``similarity_topk`` refuses features whose products could overflow float32;
``knn_graph`` and ``consistent_neighbours`` normalise the rows): the lists start as ``(-inf, -1)`` places that a
finite product always displaces.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .backends import Backend, no_backward_why_not
from . import chunks
from .reference.consistent_neighbours import filter_neighbours
from .reference.similarity_topk import top_k_lower_index_first


# Beyond this many candidates per list entry a tile's columns take their own best k (a strided top-k, three to four
# times a row top-k's time): a tile pair then merges at most 4 k candidates per row however many rows tie.
MAX_CANDIDATES_PER_LIST = 4


def tile_rows() -> int:
    """Rows of a tile: a ``T x T`` float32 tile holds a quarter of the references' chunk (read at each call)."""
    return max(1, math.isqrt(chunks.MAX_CHUNK_ELEMENTS // 4))


def _best_first(values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, k: int, n_rows: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` entries of each of ``n_rows`` rows from flat ``(row, value, index)`` triples (every row holding
    at least ``k``; a row's real indices distinct, its unfilled ``(-inf, -1)`` places alike): ordered by row, then
    value descending, then index."""
    order = torch.argsort(indices, stable=True)
    order = order[torch.argsort(values[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    sorted_rows = rows[order]
    rank = torch.arange(len(order), device=rows.device) - torch.searchsorted(sorted_rows, sorted_rows)
    keep = order[rank < k]
    return values[keep].view(n_rows, k), indices[keep].view(n_rows, k)


def _merge(best_values: torch.Tensor, best_indices: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
           indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running ``[n, k]`` lists merged with candidates ``(rows[c], values[c], indices[c])`` (columns not yet in
    the lists)."""
    n, k = best_values.shape
    own_rows = torch.arange(n, device=rows.device).repeat_interleave(k)
    return _best_first(torch.cat([best_values.flatten(), values]), torch.cat([best_indices.flatten(), indices]),
                       torch.cat([own_rows, rows]), k, n)


def _merge_rows(best_values, best_indices, sims: torch.Tensor, offset: int):
    """Merge each row's best entries of ``sims`` (columns ``offset`` on)."""
    n, k = best_values.shape
    values, indices = top_k_lower_index_first(sims, min(k, sims.shape[1]))
    rows = torch.arange(n, device=sims.device).repeat_interleave(values.shape[1])
    return _merge(best_values, best_indices, rows, values.flatten(), indices.flatten() + offset)


def _merge_columns(best_values, best_indices, sims: torch.Tensor, offset: int):
    """Merge each column of ``sims`` (the rows of the block whose lists these are) with the entries that can enter
    its list: those at or above its current k-th best (rows ``offset`` on). Where ties at the k-th best make those
    many (rows repeated many times: up to the whole tile), each column's own best k instead."""
    above = sims >= best_values[:, -1][None, :]
    # count_nonzero, not sum: a bool sum widens to int64 first (an ad hoc timing, 2 threads, one 4096 x 4096 tile:
    # 40 ms against 2 ms; benchmarks/RESULTS.md has the scale run before and after).
    if int(above.count_nonzero()) > MAX_CANDIDATES_PER_LIST * best_values.numel():
        return _merge_rows(best_values, best_indices, sims.t(), offset)
    row, column = above.nonzero(as_tuple=True)
    return _merge(best_values, best_indices, column, sims[row, column], row + offset)


def self_topk(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``similarity_topk(x, x, k, exclude_self=True)`` (float32 values, ties by lower index), computing each pair's
    product once. ``1 <= k <= N - 1``."""
    n, tile = x.shape[0], tile_rows()
    x = x.float()
    values = torch.full((n, k), float("-inf"), dtype=torch.float32, device=x.device)
    indices = torch.full((n, k), -1, dtype=torch.int64, device=x.device)
    blocks = [(start, min(n, start + tile)) for start in range(0, n, tile)]
    # The diagonal tiles first: every row then holds its own tile's best, and few entries of the other tiles
    # reach its k-th best.
    for start, stop in blocks:
        sims = x[start:stop] @ x[start:stop].t()
        sims.fill_diagonal_(float("-inf"))
        if stop - start > k:     # k others in the tile: its best k are the lists so far, as the reference takes them
            block_values, block_indices = top_k_lower_index_first(sims, k)
            values[start:stop], indices[start:stop] = block_values, block_indices + start
        else:
            values[start:stop], indices[start:stop] = _merge_rows(values[start:stop], indices[start:stop], sims,
                                                                  start)
    for a, (start_a, stop_a) in enumerate(blocks):
        for start_b, stop_b in blocks[a + 1:]:
            sims = x[start_a:stop_a] @ x[start_b:stop_b].t()
            values[start_a:stop_a], indices[start_a:stop_a] = _merge_rows(
                values[start_a:stop_a], indices[start_a:stop_a], sims, start_b)
            values[start_b:stop_b], indices[start_b:stop_b] = _merge_columns(
                values[start_b:stop_b], indices[start_b:stop_b], sims, start_a)
    return values, indices


def _similarity_topk_why_not(queries, keys, k, *, forced, exclude_self=False) -> Optional[str]:
    if not exclude_self:
        return "it searches a set among itself (exclude_self=True)"
    if keys is not queries:
        return "queries and keys are different tensors (it reads one set: pass the same tensor twice)"
    return no_backward_why_not(queries)


def _similarity_topk(queries, keys, k, *, exclude_self=False):
    return self_topk(queries, k)


def _consistent_neighbours_why_not(image, text, k, return_graphs, *, forced) -> Optional[str]:
    # Every output is int64 or bool, which carries no gradient: features that require grad lose nothing here (they
    # were sent to the reference, 'which differentiates it', for outputs no backend differentiates).
    return None


def _consistent_neighbours(image, text, k, return_graphs):
    """Both graphs by :func:`self_topk`, then the reference's filter."""
    _, image_neighbours = self_topk(image, k)
    _, text_neighbours = self_topk(text, k)
    indices, mask = filter_neighbours(image_neighbours, text_neighbours)
    return (indices, mask, image_neighbours, text_neighbours) if return_graphs else (indices, mask)


SIMILARITY_TOPK = Backend("symmetric", _similarity_topk_why_not, _similarity_topk)
CONSISTENT_NEIGHBOURS = Backend("symmetric", _consistent_neighbours_why_not, _consistent_neighbours)
