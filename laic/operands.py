"""What the kernels multiply: unit rows, the operand precision chosen by device (half precision on GPUs), and the
nearest-row searches that keep half precision's speed without its rounding (:func:`top_similar`, :func:`knn`).

Why the searches re-score: a bfloat16 cosine is off by up to about 1e-3 at D = 512 (2e-4 in the median), while
the gap between an image's 10th and 11th text-space neighbours is under 1e-3 for 45% of the rows of caltech101-val
(text counterparts of images that pick the same few nouns nearly coincide). Searched in bfloat16 alone, those
neighbour lists, the noun-to-centre choices and the k-means assignments would be bfloat16's. So the half-precision
path finds ``k + RESCORE_MARGIN`` candidates with half-precision operands (tensor cores: the N x M and N x N
products) and chooses among them by float32 similarity, at an O(N (k + margin) D) cost: its choices are the float32
search's except between candidates whose float32 similarities differ only in rounding (exact duplicates among the
text counterparts). Those remain, and stage 0 with its k-means restarts is chaotic in the small: any change in the
last bits (even the agreement scalar moved by 1e-3) moves a seed's clustering to another near-equal optimum. The
half-precision path's quality is therefore compared with float32's over many seeds (benchmarks/quality.py --half).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Tuple

import torch

from laic_kernels import checks, knn_graph, similarity_topk
from laic_kernels.knn_graph import unit_float32, validate_features
from laic_kernels.knn_graph import unit_rows as unit_rows_in_blocks
from laic_kernels.chunks import row_chunks


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 unit rows of ``x``, whatever its scale (``laic_kernels.knn_graph.unit_float32``)."""
    return unit_float32(x)


def lexicographic_order(rows: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts finite ``rows`` ``[R, D]`` lexicographically (by the first column, then the
    second, ...; -0.0 and 0.0 are one value; equal rows keep their order), on the rows' device: each row's rank
    among the distinct rows (``torch.unique`` over rows sorts them lexicographically), then a stable sort of the
    ranks. One device read on a GPU (the number of distinct rows). A stable sort a column, from the last to the
    first, made the same order in D sorts: 15 against 0.6 ms at R = 145, D = 512 on one CPU thread, 1.6 s against
    0.1 s at R = 20,000 (an ad hoc timing, 12-07)."""
    _, rank = torch.unique(rows, dim=0, sorted=True, return_inverse=True)
    return torch.argsort(rank, stable=True)


def fixed_directions(dim: int, count: int) -> torch.Tensor:
    """``count`` unit directions of ``dim`` dimensions (float64 columns ``[dim, count]``, on the CPU), the same in
    every process: projections on them are numbers of a row that do not depend on where it stands in its set (the
    value order of the kept nouns, near-copy search)."""
    directions = torch.randn(dim, count, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    return directions / directions.norm(dim=0)


_forced_operand_dtype: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "laic_operand_dtype", default=None)


def operand_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the operands stage 0 hands to the kernels (similarity_topk, semantic_mix, the graphs, the
    k-means assignment) on ``device``: bfloat16 on CUDA sm80+ (tensor cores; range as float32), float16 on older
    GPUs, float32 on the CPU (no half-precision speed-up there). The kernels accumulate in float32 and return
    float32; the nearest-row searches re-score their candidates in float32 (:func:`top_similar`), and everything
    that feeds training (centres, counterparts, fused features) stays float32.
    :func:`half_operands` overrides the choice (measurement only: benchmarks/quality.py --half)."""
    forced = _forced_operand_dtype.get()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


@contextlib.contextmanager
def half_operands(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Use ``dtype`` operands on every device inside the block (to measure on the CPU what the GPU path's
    rounding does to the clustering)."""
    token = _forced_operand_dtype.set(dtype)
    try:
        yield
    finally:
        _forced_operand_dtype.reset(token)


# Row blocks of streamed passes (neighbour averaging, Lloyd sums) hold at most this many elements: 64 MB of float32
# temporaries, whatever N.
BLOCK_ELEMENTS = 1 << 24


def unit_operands(x: torch.Tensor) -> torch.Tensor:
    """Unit rows of ``x`` in :func:`operand_dtype`, normalised in float32 row blocks (no float32 copy of all of
    ``x`` when the operands are half precision)."""
    return unit_rows_in_blocks(x, dtype=operand_dtype(x.device))


def best_by_value(values: torch.Tensor, indices: torch.Tensor, m: int, *, largest: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` best ``(value, index)`` pairs along the last dimension: largest (or smallest) values first, equal
    values by lower index (the rule of the ``similarity_topk`` kernel). ``indices`` must be distinct per row."""
    by_index = torch.sort(indices, dim=-1).indices
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    order = torch.sort(values, dim=-1, descending=largest, stable=True).indices[..., :m]
    return values.gather(-1, order), indices.gather(-1, order)


# The half-precision search keeps this many candidates beyond the k asked for. The float32 k-th best is lost only
# if bfloat16 rounding (a cosine error of 2e-4 in the median, 1.3e-3 at most, between CLIP images and nouns at
# D = 512) moves it below k + RESCORE_MARGIN others. 6, because the Triton top-k keeps a power-of-two list on chip
# (16 slots for the graphs' k = 10): the 16 candidates fill slots the 10 already take (by the kernel's design; not
# timed on a GPU yet).
RESCORE_MARGIN = 6
# Re-scoring blocks gather [rows, k + margin, D] float32 key rows: up to 256 MB at once, so that at N = 1.28M a pass
# is a few hundred blocks, not thousands of small launches.
RESCORE_BLOCK_ELEMENTS = 1 << 26


def n_candidates(k: int, n_keys: int, exclude_self: bool = False, margin: int = RESCORE_MARGIN) -> int:
    """How many candidates the half-precision search keeps for the best ``k``: ``k + margin``, at most the keys
    there are (less the row itself with ``exclude_self``)."""
    return min(k + margin, n_keys - int(exclude_self))


def top_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False,
                margin: int = RESCORE_MARGIN, query_operands: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``similarity_topk(queries, keys, k)`` of float32 unit rows, as the float32 search finds it (float32 values,
    ties by lower index) on every device. In float32 operands (:func:`operand_dtype`) it is that call. In half
    precision the kernel finds ``k + margin`` candidates with half-precision operands and the best ``k`` of them by
    float32 dot product are returned. ``query_operands``: the queries' half-precision operands, when the caller
    searches several key blocks with the same queries (cast here otherwise: one pass over the rows)."""
    if operand_dtype(queries.device) == torch.float32:
        return similarity_topk(queries, keys, k, exclude_self=exclude_self)
    checks.int_in_range("k", k, 1, keys.shape[0] - int(exclude_self),
                        " (a row is not its own neighbour)" if exclude_self else " (at most the number of keys)")
    wide = n_candidates(k, keys.shape[0], exclude_self, margin)
    if query_operands is None:
        query_operands = unit_operands(queries)
    key_operands = query_operands if keys is queries else unit_operands(keys)
    _, candidates = similarity_topk(query_operands, key_operands, wide, exclude_self=exclude_self)
    return rescored(queries, keys, candidates, k)


def search_operands(queries: torch.Tensor) -> Optional[torch.Tensor]:
    """The half-precision operands :func:`top_similar` would cast ``queries`` to (None in float32 operands), for a
    caller that searches several key blocks with the same queries."""
    return None if operand_dtype(queries.device) == torch.float32 else unit_operands(queries)


def rescored(queries: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, k: int
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each query's ``candidates`` (distinct key indices, at least ``k``) by float32 dot product,
    best first, ties by lower index; in row blocks (never all ``[N, candidates, D]`` key rows at once). A product
    and a sum, not a batched matmul: ``torch.set_float32_matmul_precision("high")`` would round that to TF32."""
    n, wide = candidates.shape
    if wide < k:
        raise ValueError(f"candidates must hold at least k = {k} columns, got {wide}")
    values = torch.empty(n, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=queries.device)
    for start, stop in row_chunks(n, wide * keys.shape[1], RESCORE_BLOCK_ELEMENTS):
        block = candidates[start:stop]
        sims = (queries[start:stop, None, :].float() * keys[block].float()).sum(-1)
        values[start:stop], indices[start:stop] = best_by_value(sims, block, k, largest=True)
    return values, indices


def knn(features: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``knn_graph(features, k)`` (cosine, self excluded) as the float32 search finds it, on every device."""
    if operand_dtype(features.device) == torch.float32:
        return knn_graph(features, k)
    validate_features("features", features, k)
    unit = unit_rows(features)
    return top_similar(unit, unit, k, exclude_self=True)
