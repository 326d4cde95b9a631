"""similarity_topk: the k largest dot products of each query with a set of keys, without the N×M matrix."""
from __future__ import annotations

from typing import Tuple

import torch

from . import checks, reference, symmetric
from .backends import Backend, always, dispatch, triton_backend


def _validate(queries, keys, k, exclude_self) -> None:
    checks.true_or_false("exclude_self", exclude_self)    # a string such as "no" would switch it on
    checks.tensor("queries", queries, ndim=2)
    checks.tensor("keys", keys, ndim=2)
    checks.non_empty("queries", queries)
    checks.non_empty("keys", keys)
    checks.same_device(queries=queries, keys=keys)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must have the same feature dimension D, got queries {tuple(queries.shape)}"
                         f" and keys {tuple(keys.shape)}")
    n, m = queries.shape[0], keys.shape[0]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self=True needs queries and keys to be the same set, got N={n} queries and M={m} "
                         "keys; pass exclude_self=False")
    max_k = m - 1 if exclude_self else m
    hint = " (k <= M - 1 with exclude_self)" if exclude_self else " (k <= number of keys M)"
    checks.int_in_range("k", k, 1, max_k, hint)
    checks.finite_dot_products("queries", queries, "keys", keys)


BACKENDS = (
    triton_backend("similarity_topk"),
    symmetric.SIMILARITY_TOPK,       # a set against itself: each pair's product once
    Backend("reference", always, reference.similarity_topk),
)


def similarity_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest dot products per query row, sorted descending.

    Args:
        queries: ``[N, D]`` float tensor.
        keys: ``[M, D]`` float tensor on the same device.
        k: how many to keep, ``1 <= k <= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: queries and keys are the same set; drop index ``i`` from row ``i``.

    Returns:
        ``(values[N, k] float32, indices[N, k] int64)``.
    """
    _validate(queries, keys, k, exclude_self)
    return dispatch("similarity_topk", BACKENDS, queries, keys, k, exclude_self=exclude_self)
