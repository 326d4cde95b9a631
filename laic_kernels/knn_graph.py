"""knn_graph: exact cosine k nearest neighbours of every row (the neighbour graph).

It never builds the N×N similarity matrix: it is ``similarity_topk`` of the L2-normalised features against themselves
with ``exclude_self``, so it runs on whichever backend ``similarity_topk`` picks (the fused Triton kernel on GPU, the
``symmetric`` backend elsewhere, which computes each pair's product once). ``consistent_neighbours`` builds two such graphs and filters them in one pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks
from .similarity_topk import similarity_topk

# Half-precision features stay in their dtype (tensor cores); anything else is compared in float32.
_KEEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows are normalised a block of this many elements at a time (64 MB in float32): the float32 copy of half-precision
# features and its normalised rows, 2.6 GB each at 1.28M x 512, never exist whole.
UNIT_BLOCK_ELEMENTS = 1 << 24
# F.normalize's default floor on the norm (a zero row stays zero).
NORMALIZE_EPS = 1e-12


def exactly_rescaled(rows: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``rows [N, D]`` (finite), each row multiplied by the power of two that brings its largest
    magnitude into [0.5, 1): exact (the direction does not move by a bit), in float64 for float64 rows (whatever
    their range, they then fit float32's) and float32 otherwise."""
    # In place where autograd need not see it: .float() copies half-precision rows, so that copy is scaled itself.
    in_place = not _needs_grad(rows)
    fresh = rows.dtype not in (torch.float32, torch.float64)
    x = rows.float() if fresh else rows
    with torch.no_grad():
        low, high = checks.extremes(x, dim=1, keepdim=True)
        _, exponent = torch.frexp(torch.maximum(high, -low))
        # In two factors: 2^-exponent alone is beyond the dtype for the largest and the subnormal magnitudes.
        first = torch.div(exponent, 2, rounding_mode="floor")
        down, rest = _power_of_two(-first, x.dtype), _power_of_two(first - exponent, x.dtype)
    if not in_place:
        return x * down * rest
    return (x.mul_(down) if fresh else x * down).mul_(rest)


def unit_float32(rows: torch.Tensor) -> torch.Tensor:
    """``rows [N, D]`` (finite, any float dtype) scaled to unit L2 norm, in float32; an all-zero row stays zero.

    The rows are first :func:`exactly_rescaled`: float32's sum of squares then neither overflows (entries of 1e20 gave
    an infinite norm, so a zero row) nor falls under ``F.normalize``'s floor of 1e-12 (entries of 1e-15 came out far
    from unit). Scaling by a power of two is exact, so an ordinary row comes out bit for bit as
    ``F.normalize(rows.float())`` makes it (the same norm and division, in place: one [N, D] temporary, the
    output)."""
    x = exactly_rescaled(rows).float()
    norms = x.norm(dim=1, keepdim=True).clamp_min(NORMALIZE_EPS)
    return x / norms if _needs_grad(rows) else x.div_(norms)


def _needs_grad(rows: torch.Tensor) -> bool:
    """Whether autograd records operations on ``rows`` (then nothing may be done in place)."""
    return rows.requires_grad and torch.is_grad_enabled()


def _power_of_two(n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** n`` for integers ``n`` in the normal range of ``dtype`` (float32 or float64), built from its bits
    (exact, where ``pow`` and ``exp2`` need not be)."""
    if dtype == torch.float64:
        return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def unit_rows(features: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows scaled to unit L2 norm (:func:`unit_float32`), a block of rows at a time, in ``dtype`` (default: half
    precision where the input was half, float32 otherwise; no float32 copy of all the rows is made for a half-precision
    output). An all-zero row stays zero: its cosine with everything is 0."""
    if dtype is None:
        dtype = features.dtype if features.dtype in _KEEP_DTYPES else torch.float32
    out = torch.empty(features.shape, dtype=dtype, device=features.device)
    rows = max(1, UNIT_BLOCK_ELEMENTS // max(1, features.shape[1]))
    for start in range(0, features.shape[0], rows):
        out[start:start + rows] = unit_float32(features[start:start + rows])
    return out


def knn_graph(features: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact ``k`` nearest neighbours of every row by cosine similarity, the row itself excluded.

    Args:
        features: ``[N, D]`` float tensor (any scale: rows are L2-normalised here), ``N >= 2``.
        k: neighbours per row, ``1 <= k <= N - 1``.

    Returns:
        ``(values[N, k] float32, indices[N, k] int64)``: cosine similarities sorted descending and the neighbours'
        row indices (distinct, never ``i`` in row ``i``).
    """
    validate_features("features", features, k)
    unit = unit_rows(features)
    return similarity_topk(unit, unit, k, exclude_self=True)


def validate_features(name: str, features, k) -> None:
    checks.tensor(name, features, ndim=2)
    checks.non_empty(name, features)
    if features.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows to have neighbours, got shape {tuple(features.shape)}")
    checks.int_in_range("k", k, 1, features.shape[0] - 1, " (k <= N - 1: a row is not its own neighbour)")
    checks.finite(name, features)
