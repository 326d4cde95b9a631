from __future__ import annotations

from typing import Tuple

import torch

from .similarity_topk import similarity_topk


def in_row(values: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """``out[i, a] = values[i, a] in lists[i]``, in O(N·k·log k) time and O(N·k) memory (no N×k×k comparison)."""
    sorted_lists = lists.sort(dim=1).values
    position = torch.searchsorted(sorted_lists, values.contiguous()).clamp_(max=lists.shape[1] - 1)
    return sorted_lists.gather(1, position) == values


def filter_neighbours(image_neighbours: torch.Tensor, text_neighbours: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The consistency filter on two ``[N, k]`` int64 neighbour lists (best first): ``image_neighbours[i, a]`` is kept
    where it also appears in ``text_neighbours[i]``; kept entries are compacted to the left in image-space order, the
    rest is ``-1`` with mask False, and a row where nothing agrees keeps ``image_neighbours[i, 0]``.
    Returns ``(indices[N, k] int64, mask[N, k] bool)``."""
    agree = in_row(image_neighbours, text_neighbours)
    agree[:, 0] |= ~agree.any(dim=1)
    # A stable sort of "not kept" moves the kept entries to the left and keeps their image-space order.
    order = torch.sort((~agree).to(torch.uint8), dim=1, stable=True).indices
    mask = agree.gather(1, order)
    indices = image_neighbours.gather(1, order).masked_fill(~mask, -1)
    return indices, mask


def consistent_neighbours(image_units: torch.Tensor, text_units: torch.Tensor, k: int, return_graphs: bool
                          ) -> Tuple[torch.Tensor, ...]:
    """The composition the fused op replaces: both exact k-NN graphs of unit rows (self excluded), then
    :func:`filter_neighbours`. Returns ``(indices, mask)``, followed by the image- and text-space neighbour lists
    ``[N, k]`` int64 (best first) when ``return_graphs``."""
    _, image_neighbours = similarity_topk(image_units, image_units, k, exclude_self=True)
    _, text_neighbours = similarity_topk(text_units, text_units, k, exclude_self=True)
    indices, mask = filter_neighbours(image_neighbours, text_neighbours)
    return (indices, mask, image_neighbours, text_neighbours) if return_graphs else (indices, mask)
