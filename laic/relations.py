"""Ma et al.'s discriminative relational representation: each image described by its relations to the kept nouns.

The relation row of an image is its row of the image-noun relation matrix ``C[i, j] = cos(x_i, v_j)`` over the M'
nouns stage 0 kept (``x_i`` the centred unit image, ``v_j`` the unit noun), centred over the nouns and L2-normalised:
two images are then as similar as the Pearson correlation of their similarity profiles over the nouns. Centring
removes what every noun shares (the text modality's own direction, a per-image constant in the row); the L2 norm
makes the comparison a cosine, as in every other space of laic. The normalisation is chosen once (see
``benchmarks/quality.py --diagnostics``, where softmax rows and uncentred rows are measured beside it), not per set.

By default (``LAIC(usage_weighting="auto")``) each noun is weighted by its **usage** ``w_j`` (:func:`noun_usage`:
the mean over the images of the softmax over the nouns of ``cos(x_i, v_j) / tau``, the text counterparts' softmax
and temperature) wherever the images attend to at least one noun a cluster: the rows are centred by the weighted
mean and compared with the weights (weighted Pearson correlations), so the nouns the images point at carry the
comparison rather than the many kept nouns few images point at (on caltech101-val the usage's effective number of
nouns, the exponential of its entropy, is 139 of the 531 kept). Where the clusters outnumber the attended nouns
(fine-grained classes that share a few broad nouns: ImageNet-4shot attends to 0.5 a cluster) the usage would crowd
the classes together: the weights blend the usage with uniform ones by :func:`usage_share`, a ramp from none of the
usage at half an attended noun a cluster (and below) to all of it at one. benchmarks/QUALITY.md's "The
relational representation" has the figures.

Why this costs O(N·D), not O(N·M'): the centred row is ``Vc x_i`` with ``Vc`` the nouns minus their (weighted) mean,
so the dot product of two rows is ``x_i^T G x_j`` with ``G = Vc^T W Vc`` (D x D; ``W`` the weights, ``1/M'`` each
when uniform). The relation features are therefore ``G^(1/2) x_i``, unit-normalised: a fixed linear map of the centred
image (:func:`relation_map`, computed once in float64 from the kept nouns), whose cosines are exactly those of the
relation rows. No ``N x M'`` matrix is ever formed (the usage is one pass over the images in row blocks), new images
are mapped the same way at predict time, and a process group needs nothing beyond the map (the same on every rank;
the usage is all-reduced, M' numbers). The symmetric square root keeps the features in the image basis (the
directions the nouns vary along stretched, the rest shrunk), so they can stand in for the text counterparts as a
view in stage 1.

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

from laic_kernels.chunks import row_chunks
from laic_kernels.reference.consistent_neighbours import filter_neighbours

from . import profiling
from .distributed.knn import knn_graph as distributed_knn_graph
from .operands import BLOCK_ELEMENTS, knn, unit_rows
from .switches import NEIGHBOUR_FILTERS


def check_neighbour_filter(value) -> None:
    if value not in NEIGHBOUR_FILTERS:
        raise ValueError(f"neighbour_filter must be one of {', '.join(map(repr, NEIGHBOUR_FILTERS))}, got {value!r}")


# The usage weighting's ramp (``usage_weighting="auto"``, :func:`usage_share`) over the attended nouns a cluster (the
# usage's effective number of nouns over K): none up to half an attended noun a cluster, all of it from one.
USAGE_RAMP = (0.5, 1.0)


# Centred, M nouns span at most M - 1 directions: one noun's relation rows are zero, two nouns' point one way or its
# opposite for every image (a review's fit put 500 distinct images in 3 to 6 of 10 clusters with relation_fused=True).
MIN_RELATION_NOUNS = 3


# Below this many kept nouns, relation_fused="auto" warns where it takes a share of the relation features: a view of
# M' - 1 dimensions at most, which helps where the nouns name the images' classes and can hurt where they do not
# (cifar10-500, K = 10, 3 seeds, 12-08: its 10 class names gave ACC 92.5 against 86.0 without the view; 20 random
# nouns of the 1403 65.3 against 76.9 at a share of 0.9, others 72.7 against 74.3, or no share; a QA helper's 30
# random nouns 74.0 against image-only 75.9, 50 about equal, 100 above). The dev sets keep 74 to 1244 nouns.
FEW_RELATION_NOUNS = 50


def few_nouns_warning(relation_fused, share: float, n_nouns: int, n_given: int) -> Optional[str]:
    """What ``relation_fused="auto"`` says where it takes a share of the relation features of fewer than
    FEW_RELATION_NOUNS kept nouns (``n_nouns`` of the ``n_given`` distinct nouns; None otherwise)."""
    if not isinstance(relation_fused, str) or share <= 0 or n_nouns >= FEW_RELATION_NOUNS:
        return None
    return (f"the fused space takes a share of {share:.2g} of its image part from the relation features of only "
            f"{n_nouns} kept nouns (of {n_given} given; relation_fused='auto'): a view that helps where these nouns "
            f"name the images' classes (cifar10 with its 10 class names: ACC 92.5 against 86.0 without it) and can "
            f"hurt where they do not (20 random nouns: 65.3 against 76.9); if yours do not name the classes, pass "
            f"relation_fused=False (laic fit: --relation-fused off) or a larger vocabulary (relation_fused=True "
            f"keeps the view, unsaid)")


def check_auto_switch(name: str, value) -> None:
    """'auto', or a bool (numpy's too, as every on/off option): 1, 0 and other strings are refused."""
    if not (isinstance(value, str) and value == "auto") and not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r} ({type(value).__name__})")


def switched_on(value) -> bool:
    """Whether an on/off switch (or an "auto" one) is set on: True, or numpy's True (a checked switch is one of these,
    False or "auto": :func:`check_auto_switch`)."""
    return value is True or value is np.True_


def check_enough_nouns(n_nouns: int, neighbour_filter, relation_view, relation_fused) -> None:
    """The switches that need the relational representation refused, before any work, for a vocabulary of fewer
    than MIN_RELATION_NOUNS distinct nouns (found after the whole of stage 0 before)."""
    chosen = [said for said, on in (("neighbour_filter='relation' (--neighbour-filter relation)",
                                     neighbour_filter == "relation"),
                                    ("relation_view=True (--relation-view)", switched_on(relation_view)),
                                    ("relation_fused=True (--relation-fused on)", switched_on(relation_fused)))
              if on]
    if chosen and n_nouns < MIN_RELATION_NOUNS:
        raise ValueError(f"{' and '.join(chosen)} need{'s' * (len(chosen) == 1)} the relational representation, "
                         f"which needs at least {MIN_RELATION_NOUNS} distinct nouns, got {n_nouns}; use a larger "
                         "vocabulary, or leave that switch at its default")


def relation_share(relation_fused, text_weight_factor: float, n_nouns: int) -> float:
    """The relation features' share of the fused space's image part: 1 for ``relation_fused=True``, 0 for False, and
    for "auto" the partition agreement's factor of the text weight (``laic.stage0.text_weight_factor``, 0 without
    text): the nouns' view of the images is trusted as far as the nouns' partition follows the images'. "auto" with
    fewer than MIN_RELATION_NOUNS kept nouns (``n_nouns``) is 0."""
    check_auto_switch("relation_fused", relation_fused)
    if isinstance(relation_fused, str):
        return float(text_weight_factor) if n_nouns >= MIN_RELATION_NOUNS else 0.0
    return float(bool(relation_fused))


@dataclasses.dataclass(frozen=True)
class NounWeighting:
    """How the relation rows weight the kept nouns (``LAIC.usage_weighting``): ``share`` of the usage
    (:func:`noun_usage`) and ``1 - share`` uniform; ``attended`` is the usage's effective number of nouns (the
    exponential of its entropy; NaN when the usage was not measured); ``weights [M']`` float64 (None: uniform)."""

    share: float
    attended: float
    weights: Optional[torch.Tensor]


def attended_nouns(usage: torch.Tensor) -> float:
    """The effective number of nouns of a usage (weights summing to 1): the exponential of its entropy."""
    p = usage.double()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


def usage_share(usage_weighting, attended: float, n_clusters: int) -> float:
    """The usage's share of the nouns' weights: 1 for ``usage_weighting=True``, 0 for False, and for "auto" a ramp
    (``USAGE_RAMP``) over the attended nouns a cluster, ``attended / n_clusters``. Weighting by the usage pulls the
    relation space towards the nouns the images attend to; that sharpens it where every cluster has attended nouns of
    its own (caltech101 1.4 a cluster, the other dev sets 2.7-6), and blurs it where the clusters are more than the
    attended nouns (fine-grained classes sharing a few broad ones: ImageNet-4shot, 0.5 a cluster)."""
    check_auto_switch("usage_weighting", usage_weighting)
    if not isinstance(usage_weighting, str):
        return float(bool(usage_weighting))
    low, high = USAGE_RAMP
    return min(1.0, max(0.0, (attended / n_clusters - low) / (high - low)))


def noun_weighting(images: torch.Tensor, nouns: torch.Tensor, usage_weighting, tau: float, n_clusters: int,
                   rows=None) -> NounWeighting:
    """The kept nouns' weights for ``usage_weighting`` ('auto', True or False): the usage at ``tau`` measured (unless
    False), its share (:func:`usage_share`), and the blend of usage and uniform weights (None when uniform)."""
    check_auto_switch("usage_weighting", usage_weighting)
    if usage_weighting is False or usage_weighting is np.False_:
        return NounWeighting(0.0, float("nan"), None)
    usage = noun_usage(images, nouns, tau, rows)
    attended = attended_nouns(usage)
    share = usage_share(usage_weighting, attended, n_clusters)
    if share <= 0.0:
        return NounWeighting(share, attended, None)
    return NounWeighting(share, attended, share * usage + (1.0 - share) / usage.shape[0])


def made_relations(images: torch.Tensor, nouns: torch.Tensor, usage_weighting, tau: float, n_clusters: int,
                   rows=None) -> Tuple[torch.Tensor, torch.Tensor, NounWeighting]:
    """The kept nouns' relation map, the centred images' relation features and the nouns' weighting
    (:func:`noun_weighting`), in one profiled step. ``rows``: the row blocks of a process group (the usage is that of
    all ranks' rows, and the map is rank 0's on every rank: an eigensolver on another machine's LAPACK or GPU may
    differ in the last bits, as the noun basis and the null reference's axes may)."""
    with profiling.step("relation features", "graphs"):
        weighting = noun_weighting(images, nouns, usage_weighting, tau, n_clusters, rows)
        rmap = relation_map(nouns, weighting.weights)
        if rows is not None:
            rmap = rows.broadcast_from_main(rmap.contiguous())
        return rmap, relation_features(images, rmap), weighting


def with_relations(space, usage_weighting, tau: float, n_clusters: int):
    """``space`` with its relation map, features and noun weighting (computed here, by :func:`made_relations`,
    unless it has them already)."""
    if space.relations is not None:
        return space
    rmap, relations, weighting = made_relations(space.images, space.nouns, usage_weighting, tau, n_clusters,
                                                space.rows)
    return dataclasses.replace(space, relation_map=rmap, relations=relations, noun_weighting=weighting)


def blended_images(images: torch.Tensor, relations: Optional[torch.Tensor], share: float) -> torch.Tensor:
    """The fused space's image part: unit rows of ``(1 - share) * images + share * relations`` (both unit rows);
    ``images`` itself at share 0 and ``relations`` itself at share 1 (no rounding on the way)."""
    if share <= 0.0:
        return images
    if relations is None:
        raise ValueError("the fused space needs the relation features for a relation share above 0; add them to the "
                         "semantic space with laic.relations.with_relations")
    if share >= 1.0:
        return relations
    return unit_rows((1.0 - share) * images + share * relations)


def noun_usage(images: torch.Tensor, nouns: torch.Tensor, tau: float, rows=None) -> torch.Tensor:
    """Each kept noun's share of the images' attention, ``[M']`` float64 summing to 1: the mean over the images of
    ``softmax_j(cos(x_i, v_j) / tau)``, ``x_i`` the centred unit image, ``v_j`` the unit noun (the text counterparts'
    softmax and temperature, on the centred images). Streamed in row blocks, never ``[N, M']`` at once; with
    ``rows`` (a process group's row blocks) the mean is over all ranks' rows. In float32 on every device: a
    half-precision product rounds its output too (bfloat16 keeps 8 bits: 1e-3 of a cosine of 0.3, 0.2 of a logit
    at tau = 0.005), and the pass is one ``[N, D] x [D, M']`` product, small beside the graphs."""
    keys = unit_rows(nouns)
    usage = torch.zeros(nouns.shape[0], dtype=torch.float64, device=images.device)
    for start, stop in row_chunks(images.shape[0], nouns.shape[0], BLOCK_ELEMENTS):
        logits = (unit_rows(images[start:stop]) @ keys.t()) / tau
        usage += torch.softmax(logits, dim=1).sum(0, dtype=torch.float64)
    if rows is not None:
        rows.sum_(usage)
    return usage / usage.sum()


def checked_weights(n_nouns: int, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` as float64 summing to 1, after checking there is one finite, non-negative weight a noun."""
    if weights.shape != (n_nouns,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
            or float(weights.sum()) <= 0:
        raise ValueError(f"weights must be {n_nouns} finite, non-negative numbers with a positive sum (one per kept "
                         f"noun), got shape {tuple(weights.shape)}")
    weights = weights.double()
    return weights / weights.sum()


def relation_map(nouns: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``[D, D]`` float32 map ``G^(1/2)``, such that ``unit(x @ map)`` has the cosines of the relation rows of
    ``x`` (:func:`relation_rows`): ``G = Vc^T Vc / M'`` with ``Vc`` the unit nouns minus their mean (the nouns
    weighted alike), or with ``weights`` (one non-negative weight a noun: :func:`noun_weighting`'s blend of the
    usage and uniform weights) ``G = Vc^T W Vc``, ``W`` the normalised weights and ``Vc`` the nouns minus their
    weighted mean. Needs MIN_RELATION_NOUNS nouns or more."""
    if nouns.dim() != 2 or nouns.shape[0] < MIN_RELATION_NOUNS:
        got = nouns.shape[0] if nouns.dim() == 2 else 0
        raise ValueError(f"the relational representation needs at least {MIN_RELATION_NOUNS} distinct kept nouns "
                         f"(fewer span under 2 directions once centred), got {got}; keep more nouns (a larger "
                         "nouns_per_centre, or a larger vocabulary), or leave LAIC's neighbour_filter='text', "
                         "relation_view=False and relation_fused=False")
    v = unit_rows(nouns).double()
    if weights is None:
        weights = torch.full((v.shape[0],), 1.0 / v.shape[0], dtype=v.dtype, device=v.device)
    else:
        weights = checked_weights(v.shape[0], weights.to(v.device))
    return gram_root((v - weights @ v) * weights.sqrt()[:, None]).float()


def gram_root(a: torch.Tensor) -> torch.Tensor:
    """``(AᵀA)^(1/2)`` ``[D, D]`` of ``a`` ``[M, D]``, from the eigen-decomposition of the smaller of ``AᵀA`` and
    ``AAᵀ``. With fewer rows than columns (fewer kept nouns than dimensions: 74 to 389 on the dev sets below
    K = 100, against D = 512) it is ``Aᵀ (AAᵀ)^(-1/2) A`` over the non-zero eigenvalues of ``AAᵀ`` (``A = U S Wᵀ``
    gives ``(AᵀA)^(1/2) = W S Wᵀ = Aᵀ U S⁻¹ Uᵀ A``; the others add nothing to ``AᵀA``): an M x M eigenproblem in
    place of a D x D one (float64 eigh at D = 512 was 19 ms of a 400 ms fit on 500 images)."""
    m, d = a.shape
    if m >= d:
        eigenvalues, eigenvectors = torch.linalg.eigh(a.t() @ a)
        return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.t()
    eigenvalues, eigenvectors = torch.linalg.eigh(a @ a.t())
    # Eigenvalues at the rounding level of the largest are zeros (centred rows leave at least one).
    nonzero = eigenvalues > eigenvalues[-1] * m * torch.finfo(a.dtype).eps
    inverse_root = torch.where(nonzero, eigenvalues.clamp_min(torch.finfo(a.dtype).tiny).rsqrt(), 0.0)
    projected = eigenvectors.t() @ a                       # Uᵀ A, [M, D]
    return (projected.t() * inverse_root) @ projected


def relation_features(images: torch.Tensor, rmap: torch.Tensor) -> torch.Tensor:
    """Unit relation features ``[N, D]`` float32 of centred unit images (cosines = those of the relation rows)."""
    return unit_rows(images.float() @ rmap.to(images.device))


def relation_rows(images: torch.Tensor, nouns: torch.Tensor, weights: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """The relation rows themselves, ``[N, M']``: the cosines to the nouns, centred over the nouns, unit rows; with
    ``weights`` (one a noun) centred by the nouns' weighted mean and each column scaled by the square root of its
    noun's weight (their cosines are then the weighted Pearson correlations of the images' similarity profiles). The
    definition that :func:`relation_features` computes without them; for tests and diagnostics only: never called by
    a fit."""
    rows = unit_rows(images) @ unit_rows(nouns).t()
    if weights is None:
        return unit_rows(rows - rows.mean(1, keepdim=True))
    weights = checked_weights(nouns.shape[0], weights.to(images.device))
    rows = rows.double()
    return unit_rows((rows - rows @ weights[:, None]) * weights.sqrt()).float()


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
    # At share 1 the images are the relation features, whose rows lie in the kept nouns' span (stage 0's
    # noun_span_basis): the fused space can take them in its coordinates.
    return dataclasses.replace(space, images=blended_images(space.images, space.relations, share),
                               images_in_noun_span=share >= 1.0)


def relation_view(space):
    """The semantic space with the relation features as stage 1's second view (in place of the text counterparts);
    ``space`` must carry them (:func:`with_relations`)."""
    if space.relations is None:
        raise ValueError("relation_view needs the relation features in the semantic space; add them with "
                         "laic.relations.with_relations")
    return dataclasses.replace(space, texts=space.relations)
