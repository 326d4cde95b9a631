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

Used behind LAIC switches:
  - ``relation_fused`` (on by default, "auto"): the fused space's image part moves from the centred images towards
    the relation features by :func:`relation_share`, the share of the text weight that the partition agreement lets
    through (``laic.stage0.text_weight_factor``): all of the way where the nouns' K-means partition follows the
    images' (most sets), none where it is no better than random nouns' (a vocabulary of random vectors: the image
    features as they are), in between where the vocabulary misses the domain's own nouns. The relation features are
    the nouns' view of the images, so they are trusted as far as the nouns are. True: the relation features whatever
    the agreement; False: the centred images;
  - ``neighbour_filter="relation"`` (off): the consistent neighbours are the image-space neighbours that the
    relation-space kNN graph agrees with (instead of the text-counterpart graph's);
  - ``relation_view`` (off): stage 1's second head sees the relation features instead of the text counterparts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
import torch

from laic_kernels.reference.consistent_neighbours import filter_neighbours

from . import profiling
from .distributed.knn import knn_graph as distributed_knn_graph
from .operands import knn, unit_rows

# The space whose kNN graph keeps (filters) the image-space neighbours: the text counterparts' (stage 0's default),
# the relation features' (this module), or none (every image-space neighbour is kept).
NEIGHBOUR_FILTERS = ("text", "relation", "none")


def check_neighbour_filter(value) -> None:
    if value not in NEIGHBOUR_FILTERS:
        raise ValueError(f"neighbour_filter must be one of {', '.join(map(repr, NEIGHBOUR_FILTERS))}, got {value!r}")


def check_relation_fused(value) -> None:
    """'auto', or a bool (numpy's too, as every on/off option): 1, 0 and other strings are refused."""
    if not (isinstance(value, str) and value == "auto") and not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"relation_fused must be 'auto', True or False, got {value!r} ({type(value).__name__})")


def relation_share(relation_fused, text_weight_factor: float, n_nouns: int) -> float:
    """The relation features' share of the fused space's image part: 1 for ``relation_fused=True``, 0 for False, and
    for "auto" the partition agreement's factor of the text weight (``laic.stage0.text_weight_factor``, 0 without
    text): the nouns' view of the images is trusted as far as the nouns' partition follows the images'. "auto" with
    fewer than 2 kept nouns (``n_nouns``) is 0: one noun's centred relation row is zero."""
    check_relation_fused(relation_fused)
    if isinstance(relation_fused, str):
        return float(text_weight_factor) if n_nouns >= 2 else 0.0
    return float(bool(relation_fused))


def made_relations(images: torch.Tensor, nouns: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kept nouns' relation map and the centred images' relation features (one profiled step)."""
    with profiling.step("relation features", "graphs"):
        rmap = relation_map(nouns)
        return rmap, relation_features(images, rmap)


def with_relations(space):
    """``space`` with its relation map and features (computed here unless it has them already)."""
    if space.relations is not None:
        return space
    rmap, relations = made_relations(space.images, space.nouns)
    return dataclasses.replace(space, relation_map=rmap, relations=relations)


def blended_images(images: torch.Tensor, relations: Optional[torch.Tensor], share: float) -> torch.Tensor:
    """The fused space's image part: unit rows of ``(1 - share) * images + share * relations`` (both unit rows);
    ``images`` itself at share 0 and ``relations`` itself at share 1 (no rounding on the way)."""
    if share <= 0.0:
        return images
    if relations is None:
        raise ValueError("the fused space needs the relation features for a relation share above 0; build the "
                         "semantic space with relations=True")
    if share >= 1.0:
        return relations
    return unit_rows((1.0 - share) * images + share * relations)


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


def fused_view(space, share: float):
    """The semantic space whose images make the fused space: :func:`blended_images` with the relation ``share``
    (:func:`relation_share`); the neighbour lists, which smooth them, stay the image space's."""
    if share <= 0.0:
        return space
    return dataclasses.replace(space, images=blended_images(space.images, space.relations, share))


def relation_view(space):
    """The semantic space with the relation features as stage 1's second view (in place of the text counterparts);
    ``space`` must carry them (``build_semantic_space(..., relations=True)``)."""
    if space.relations is None:
        raise ValueError("relation_view needs the relation features in the semantic space; build it with "
                         "relations=True")
    return dataclasses.replace(space, texts=space.relations)
