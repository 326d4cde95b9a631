"""SIC's pseudo-labels from image-semantic relations (Cai et al., "Semantic-Enhanced Image Clustering", AAAI 2023),
and its consistency learning in the image and semantic spaces (``LAIC(pseudo_labels="semantic")``).

  1. relations: each image's relation vector over the kept nouns is the softmax of its cosines to them (temperature
     ``tau``, the weights of its text counterpart);
  2. semantic centres: cluster c's centre is the noun mixture of its members' mean relation vector,
     ``unit(mean_{i in c} r_i @ nouns)``: a point of the text embedding space made of the nouns the cluster relates to;
  3. image-semantic relations: the softmax of each image's cosine to the semantic centres at CLIP's logit scale;
  4. pseudo-labels: for each cluster the ``m = round(fraction * N / K)`` (at least 1) images of highest relation to
     its centre; an image chosen by several clusters keeps the one it relates to most (ties: the lower cluster);
  5. consistency learning: a cosine head on the centred image features (``laic.semantic_centres.train_centres``),
     cross-entropy on the pseudo-labels, each image agreeing with a neighbour in the image space and one in the
     semantic (text-counterpart) space, balanced cluster shares.
The partition the semantic centres start from is the one stages 0 and 1 produced.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .semantic_centres import (CLIP_LOGIT_SCALE, CentresConfig, CentresResult, cluster_mean_directions,
                               train_centres)
from .stage0 import unit_rows

RELATION_ROWS = 4096   # rows of relation vectors formed at once (N x M' is never formed whole)


def semantic_centres(images: torch.Tensor, nouns: torch.Tensor, labels: torch.Tensor, n_clusters: int,
                     tau: float) -> torch.Tensor:
    """Unit semantic centres ``[K, D]``: each cluster's mean relation vector (softmax over the nouns of cosine / tau,
    ``images`` and ``nouns`` unit raw CLIP features) mixed over the nouns. A cluster without members gets the mean
    of all rows' relations."""
    x, v = unit_rows(images), unit_rows(nouns)
    weights = torch.zeros(n_clusters, v.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], RELATION_ROWS):
        block = slice(start, start + RELATION_ROWS)
        relations = torch.softmax(x[block] @ v.t() / tau, dim=1)
        weights.index_add_(0, labels[block], relations)
    counts = torch.bincount(labels, minlength=n_clusters)
    empty = counts == 0
    if bool(empty.any()):
        weights[empty] = weights.sum(0) / x.shape[0]
    return unit_rows(weights @ v)


def relation_probabilities(images: torch.Tensor, centres: torch.Tensor,
                           scale: float = CLIP_LOGIT_SCALE) -> torch.Tensor:
    """Softmax over the clusters of ``scale`` x the cosine of each unit image to each semantic centre."""
    return torch.softmax(scale * unit_rows(images) @ unit_rows(centres).t(), dim=1)


def confident_pseudo_labels(probs: torch.Tensor, fraction: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, labels): for each cluster the ``max(1, round(fraction * N / K))`` rows of highest probability in its
    column (ties: lower row first), an image chosen by several clusters keeping the one of highest probability
    (ties: the lower cluster). Rows sorted ascending."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n, k = probs.shape
    m = min(n, max(1, round(fraction * n / k)))
    # topk's order among equal values is not specified: a stable sort of each column decides ties by row.
    top = torch.argsort(probs.t(), dim=1, descending=True, stable=True)[:, :m]      # [K, m]
    chosen = torch.zeros(n, k, dtype=torch.bool, device=probs.device)
    chosen[top, torch.arange(k, device=probs.device)[:, None].expand(-1, m)] = True
    masked = torch.where(chosen, probs, torch.full_like(probs, -1.0))
    labels = masked.argmax(1)   # the first of equal maxima: the lower cluster
    best = masked.gather(1, labels[:, None]).squeeze(1)
    rows = (best >= 0).nonzero().flatten()
    return rows, labels[rows]


def sic_fit(space, raw_images: torch.Tensor, labels: torch.Tensor, n_clusters: int, *, tau: float, seed: int = 0,
            fraction: float = 0.5, config: Optional[CentresConfig] = None) -> Tuple[CentresResult, torch.Tensor]:
    """SIC on a stage-0 ``space`` starting from the partition ``labels``: pseudo-labels from the image-semantic
    relations, then the image-space cosine head trained on them with consistency in the image and semantic spaces.
    Returns (the head's result on the centred images, the pseudo-labelled rows)."""
    config = config or CentresConfig()
    raw = unit_rows(raw_images)
    centres = semantic_centres(raw, space.nouns, labels, n_clusters, tau)
    rows, pseudo = confident_pseudo_labels(relation_probabilities(raw, centres), fraction)
    # The partition where no pseudo-label is (masked out of the loss by ``confident``): train_centres starts its
    # running cluster shares from ``targets``, which counted every such row in cluster 0 (a placeholder of zeros).
    targets = labels.clone()
    targets[rows] = pseudo
    confident = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    confident[rows] = True
    start = cluster_mean_directions(space.images[rows], pseudo, n_clusters)
    weights = torch.nn.Parameter(start.clone())
    graphs = [(space.image_neighbours, None), (space.text_neighbours, None)]
    result = train_centres(space.images, lambda: weights, [weights], targets, confident, graphs, config=config,
                           seed=seed)
    return result, rows
