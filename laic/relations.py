"""Ma et al.'s discriminative relational representation: each image described by its relations to the kept nouns.

The relation row of an image is its row of the image-noun relation matrix ``C[i, j] = cos(x_i, v_j)`` over the M'
nouns stage 0 kept (``x_i`` the centred unit image, ``v_j`` the unit noun), centred over the nouns and L2-normalised:
two images are then as similar as the Pearson correlation of their similarity profiles over the nouns. Centring
removes what every noun shares (the text modality's own direction, a per-image constant in the row); the L2 norm
makes the comparison a cosine, as in every other space of laic. The normalisation is chosen once (see
``benchmarks/quality.py --diagnostics``, where softmax rows and uncentred rows are measured beside it), not per set.

Why this costs O(N·D), not O(N·M'): the centred row is ``Vc x_i`` with ``Vc`` the nouns minus their mean, so the
dot product of two rows is ``x_i^T G x_j`` with ``G = Vc^T Vc`` (D x D). The relation features are therefore
``G^(1/2) x_i``, unit-normalised: a fixed linear map of the centred image (:func:`relation_map`, computed once in
float64 from the kept nouns), whose cosines are exactly those of the relation rows. No ``N x M'`` matrix is ever
formed, new images are mapped the same way at predict time, and a process group needs nothing beyond the map (the
same on every rank). The symmetric square root keeps the features in the image basis (the directions the nouns
vary along stretched, the rest shrunk), so they can stand in for the text counterparts as a view in stage 1.

Used behind LAIC switches (all off by default):
  - ``neighbour_filter="relation"``: the consistent neighbours are the image-space neighbours that the relation-space
    kNN graph agrees with (instead of the text-counterpart graph's);
  - ``relation_view``: stage 1's second head sees the relation features instead of the text counterparts;
  - ``relation_fused``: the relation features stand for the images in the fused space.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from laic_kernels.reference.consistent_neighbours import filter_neighbours

from .distributed.knn import knn_graph as distributed_knn_graph
from .operands import knn, unit_rows

# The space whose kNN graph keeps (filters) the image-space neighbours: the text counterparts' (stage 0's default),
# the relation features' (this module), or none (every image-space neighbour is kept).
NEIGHBOUR_FILTERS = ("text", "relation", "none")


def check_neighbour_filter(value) -> None:
    if value not in NEIGHBOUR_FILTERS:
        raise ValueError(f"neighbour_filter must be one of {', '.join(map(repr, NEIGHBOUR_FILTERS))}, got {value!r}")


def relation_map(nouns: torch.Tensor) -> torch.Tensor:
    """The ``[D, D]`` float32 map ``G^(1/2)``, ``G = Vc^T Vc / M'`` (``Vc``: the unit nouns minus their mean), such
    that ``unit(x @ map)`` has the cosines of the centred, L2-normalised relation rows of ``x``. Needs two or more
    nouns (one noun's centred row is zero)."""
    if nouns.dim() != 2 or nouns.shape[0] < 2:
        raise ValueError(f"the relational representation needs at least 2 kept nouns, got {tuple(nouns.shape)}; "
                         "use a larger vocabulary, or leave LAIC's neighbour_filter='text', relation_view=False and "
                         "relation_fused=False")
    v = unit_rows(nouns).double()
    centred = v - v.mean(0)
    gram = centred.t() @ centred / v.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    root = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.t()
    return root.float()


def relation_features(images: torch.Tensor, rmap: torch.Tensor) -> torch.Tensor:
    """Unit relation features ``[N, D]`` float32 of centred unit images (cosines = those of the relation rows)."""
    return unit_rows(images.float() @ rmap.to(images.device))


def relation_rows(images: torch.Tensor, nouns: torch.Tensor) -> torch.Tensor:
    """The relation rows themselves, ``[N, M']`` (centred over the nouns, L2-normalised): the definition that
    :func:`relation_features` computes without them. For tests and diagnostics only: never called by a fit."""
    rows = unit_rows(images) @ unit_rows(nouns).t()
    return unit_rows(rows - rows.mean(1, keepdim=True))


def filtered_neighbours(image_neighbours: torch.Tensor, relations: Optional[torch.Tensor], neighbour_filter: str,
                        rows) -> Tuple[torch.Tensor, torch.Tensor]:
    """(consistent neighbours, mask) of this rank's rows for the "relation" or "none" filter: the image-space lists
    kept where the relation-space kNN graph (same k) agrees, or all of them."""
    if neighbour_filter == "none":
        return image_neighbours.clone(), torch.ones_like(image_neighbours, dtype=torch.bool)
    k = image_neighbours.shape[1]
    if rows.distributed:
        _, relation_neighbours = distributed_knn_graph(relations, k, rows.group)
    else:
        _, relation_neighbours = knn(relations, k)
    return filter_neighbours(image_neighbours, relation_neighbours)


def fused_view(space, relation_fused: bool):
    """The semantic space whose images make the fused space: with ``relation_fused``, the relation features (the
    neighbour lists, which smooth them, stay the image space's)."""
    if not relation_fused:
        return space
    if space.relations is None:
        raise ValueError("relation_fused needs the relation features in the semantic space; build it with "
                         "relations=True")
    return dataclasses.replace(space, images=space.relations)


def relation_view(space):
    """The semantic space with the relation features as stage 1's second view (in place of the text counterparts);
    ``space`` must carry them (``build_semantic_space(..., relations=True)``)."""
    if space.relations is None:
        raise ValueError("relation_view needs the relation features in the semantic space; build it with "
                         "relations=True")
    return dataclasses.replace(space, texts=space.relations)
