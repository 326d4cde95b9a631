"""Adaptive semantic centres (Ma et al.): K centres in CLIP's text embedding space, trained so that the images agree
with the pseudo-labels and with their neighbours; the final assignment is the cosine of each image to the centres.

The centres are a function of trainable parameters (:func:`train_centres` takes any such function):
  - embeddings only (:func:`continuous_centres`): K free unit vectors in the text embedding space, initialised from
    each cluster's noun mixture (the mean of its members' text counterparts) and kept within a trust region of that
    start (a spherical cap: cosine to the start >= ``min_cosine``), so that they stay near the nouns that made them;
  - with a text tower (``laic.prompt_centres``): K category-wise learnable prompts passed through the frozen tower.

The objective, on unit image features against the unit centres at CLIP's logit scale:
  - cross-entropy on the pseudo-labels of each cluster's most confident members (``confident_fraction``);
  - consistency: an image and one of its neighbours (each neighbour list given) put mass on the same cluster
    (``-log <p_i, p_j>``, SCAN's term);
  - balance: the negative entropy of the running cluster shares (``laic.stage1.running_balance``).
The same trainer serves SIC's image-space head (``laic.pseudo_labels``), with image-space centres.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .stage0 import text_counterparts, unit_rows
from .stage1 import FusedAdam, running_balance, sample_neighbours

CLIP_LOGIT_SCALE = 100.0   # CLIP's learned logit scale (exp(4.6052)): the sharpness of its zero-shot cosine logits
SPACES = ("clip", "image")  # unit raw CLIP features (text centres), or centred image features (image centres)


@dataclass
class CentresConfig:
    steps: int = 100               # optimiser steps (one batch each)
    batch_size: int = 1024
    lr: float = 1e-2
    confident_fraction: float = 0.5  # of each cluster's members, whose pseudo-label is a target
    consistency_weight: float = 1.0
    balance_weight: float = 1.0
    share_momentum: float = 0.9
    min_cosine: float = 0.9        # continuous centres: trust region, cosine to the initial centre
    scale: float = CLIP_LOGIT_SCALE


# The text-space centres' settings (continuous and prompts), measured on the dev sets (ACC, seed 0; 300 steps): the
# cross-entropy alone moved ACC by -0.1 to +1.7 against the partition it starts from; adding the consistency and
# balance terms (weight 1 each, or 0.1) cost 0.5 to 6 points (caltech101-val: 62.8 against 69.0). Both stay available.
TEXT_CENTRES = CentresConfig(steps=300, consistency_weight=0.0, balance_weight=0.0)


@dataclass
class CentreAssignment:
    """What assigns images once the centres are learned: softmax of ``scale`` x the cosine between the images (in
    ``space``: "clip" = unit raw features, "image" = centred unit features) and the unit ``centres [K, D]``."""

    centres: torch.Tensor
    space: str
    scale: float

    def features(self, raw: torch.Tensor, image_mean: torch.Tensor) -> torch.Tensor:
        x = unit_rows(raw)
        return unit_rows(x - image_mean) if self.space == "image" else x

    def probabilities(self, raw: torch.Tensor, image_mean: torch.Tensor) -> torch.Tensor:
        x = self.features(raw, image_mean).to(self.centres)
        return torch.softmax(self.scale * x @ self.centres.t(), dim=1)

    def state(self) -> Dict:
        return {"centres": self.centres.detach().cpu(), "space": self.space, "scale": float(self.scale)}

    @classmethod
    def from_state(cls, state: Dict, device=None) -> "CentreAssignment":
        return cls(state["centres"].to(device), str(state["space"]), float(state["scale"]))


@dataclass
class CentresResult:
    centres: torch.Tensor          # [K, D] unit, detached
    probabilities: torch.Tensor    # [N, K]
    labels: torch.Tensor           # [N] int64 argmax of the cosine to the centres
    history: Dict[str, list]
    scale: float = CLIP_LOGIT_SCALE


def confident_rows(probs: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool [N]: each cluster's ``fraction`` most confident members (by their probability of their own label; at
    least one per non-empty cluster)."""
    confidence = probs.gather(1, labels[:, None]).squeeze(1)
    order = torch.argsort(confidence, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_labels, sorted_labels)
    quota = torch.round(fraction * torch.bincount(labels, minlength=probs.shape[1]).float()).clamp_min(1)
    keep = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    keep[order[rank < quota[sorted_labels]]] = True
    return keep


def centres_loss(logits: torch.Tensor, neighbour_logits: Sequence[torch.Tensor], targets: torch.Tensor,
                 shares: torch.Tensor, config: CentresConfig) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """(loss, new running shares, terms) of one batch; ``targets`` is -1 where a row has no pseudo-label."""
    # The mean over the labelled rows by a mask (0 when none is): no data-dependent branch, no read of the device.
    labelled = (targets >= 0).float()
    ce = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    ce = (ce * labelled).sum() / labelled.sum().clamp_min(1)
    probs = torch.softmax(logits, dim=1)
    consistency = logits.sum() * 0
    for other in neighbour_logits:
        agree = (probs * torch.softmax(other, dim=1)).sum(1)
        consistency = consistency - agree.clamp_min(1e-8).log().mean() / len(neighbour_logits)
    balance, shares = running_balance(probs, shares, config.share_momentum)
    loss = ce + config.consistency_weight * consistency + config.balance_weight * balance
    return loss, shares, {"ce": ce.detach(), "consistency": consistency.detach(), "balance": balance.detach()}


def without_subnormals(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with its float32 subnormal entries (below 1.2e-38) at 0. At CLIP's logit scale of 100 over hundreds
    of clusters the softmax's far entries are subnormal, and so are their gradients; the product that carries them
    to the centres took 21 of a 25 s fit on an Intel CPU, which multiplies subnormals on a slow path (K = 500, 500
    images, pseudo_labels="semantic"; with torch.set_flush_denormal(True) the fit took 2.8 s). They are far below
    any other entry's rounding, so nothing they carry is lost."""
    return torch.where(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0, grad)


def train_centres(features: torch.Tensor, centre_fn: Callable[[], torch.Tensor], params: List[torch.Tensor],
                  labels: torch.Tensor, confident: torch.Tensor,
                  neighbour_lists: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]], *,
                  config: CentresConfig, seed: int = 0,
                  project: Optional[Callable[[], None]] = None) -> CentresResult:
    """Train ``params`` (through ``centre_fn() -> [K, D]`` centres) on unit ``features [N, D]``: cross-entropy on
    ``labels`` where ``confident``, consistency with one neighbour of each list (``(neighbours [N, k], mask or
    None)``), balance. ``project`` (no gradient) runs after each step, e.g. back into a trust region."""
    n = features.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    targets = torch.where(confident, labels, torch.full_like(labels, -1))
    optimiser = FusedAdam(params, lr=config.lr, weight_decay=0.0)   # (stage 1's Adam: no torch.optim, see there)
    with torch.no_grad():
        k = int(centre_fn().shape[0])
    shares = torch.bincount(labels, minlength=k).float().to(features.device).clamp_min(1.0) / n
    shares = shares / shares.sum()
    history: Dict[str, list] = {"loss": [], "ce": [], "consistency": [], "balance": []}
    batch_size = min(config.batch_size, n)
    # Every step's batch and neighbour draws, made on the CPU generator and moved to the device before the loop.
    batches = torch.empty(config.steps, batch_size, dtype=torch.int64)
    for step in range(config.steps):
        batches[step] = torch.randperm(n, generator=generator)[:batch_size]
    uniforms = torch.rand(config.steps, len(neighbour_lists), batch_size, generator=generator, dtype=torch.float32)
    batches, uniforms = batches.to(features.device), uniforms.to(features.device)
    for rows, draws in zip(batches, uniforms):
        nbrs = [sample_neighbours(lst, mask, rows, u) for (lst, mask), u in zip(neighbour_lists, draws)]
        centres = unit_rows(centre_fn())
        logits = config.scale * features[torch.cat([rows, *nbrs])] @ centres.t()
        logits.register_hook(without_subnormals)
        logits, *nbr_logits = logits.split(len(rows))
        loss, shares, terms = centres_loss(logits, nbr_logits, targets[rows], shares, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if project is not None:
            with torch.no_grad():
                project()
        history["loss"].append(loss.detach())
        for name, value in terms.items():
            history[name].append(value)
    with torch.no_grad():
        centres = unit_rows(centre_fn()).detach()
        probs = torch.softmax(config.scale * features @ centres.t(), dim=1)
    history = {name: torch.stack(values).tolist() if values else [] for name, values in history.items()}
    return CentresResult(centres, probs, probs.argmax(1), history, config.scale)


# ------------------------------------------------------------------------------------------------------------------
# Embeddings only: continuous centres in the text embedding space


def cluster_mean_directions(features: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Unit mean of each cluster's rows ``[K, D]`` (an empty cluster: the mean of all rows)."""
    sums = torch.zeros(n_clusters, features.shape[1], dtype=features.dtype, device=features.device).index_add_(
        0, labels, features)
    empty = torch.bincount(labels, minlength=n_clusters) == 0
    sums[empty] = features.mean(0)
    return unit_rows(sums)


def project_to_cap(centres: torch.Tensor, origins: torch.Tensor, min_cosine: float) -> torch.Tensor:
    """Unit rows of ``centres`` moved onto the spherical cap ``cos(c, origin) >= min_cosine`` around the unit
    ``origins`` (the nearest point of the cap: along the great circle towards the origin)."""
    c = unit_rows(centres)
    cos = (c * origins).sum(1, keepdim=True)
    outside = cos < min_cosine
    tangent = unit_rows(c - cos * origins)
    on_edge = min_cosine * origins + (1.0 - min_cosine ** 2) ** 0.5 * tangent
    return torch.where(outside, unit_rows(on_edge), c)


def continuous_centres(images: torch.Tensor, nouns: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                       neighbours: torch.Tensor, neighbour_mask: torch.Tensor, n_clusters: int, *, tau: float,
                       seed: int = 0, config: Optional[CentresConfig] = None) -> Tuple[CentresResult, torch.Tensor]:
    """K free centres in the text embedding space (``images`` unit raw CLIP features, ``nouns`` the unit kept
    nouns), initialised from each cluster's noun mixture and trained in the trust region of ``config.min_cosine``.
    Returns (the result, the initial centres)."""
    config = config or TEXT_CENTRES
    x = unit_rows(images)
    origins = cluster_mean_directions(text_counterparts(x, nouns, tau), labels, n_clusters)
    weights = torch.nn.Parameter(origins.clone())

    def project():
        weights.copy_(project_to_cap(weights, origins, config.min_cosine))

    confident = confident_rows(probs, labels, config.confident_fraction)
    result = train_centres(x, lambda: weights, [weights], labels, confident, [(neighbours, neighbour_mask)],
                           config=config, seed=seed, project=project)
    return result, origins


def nearest_noun_names(centres: torch.Tensor, nouns: torch.Tensor, names: Sequence[str], top: int) -> List[List[str]]:
    """Per centre, the ``top`` distinct names of the nouns of highest cosine (both in the raw text embedding
    space)."""
    return names_by_score(unit_rows(centres) @ unit_rows(nouns).t(), names, top)


def names_by_score(scores: torch.Tensor, names: Sequence[str], top: int) -> List[List[str]]:
    """Per row of ``scores`` ``[K, M]`` (a cluster against the nouns), the ``top`` distinct names of its best nouns,
    best first (fewer where the nouns have fewer names): nouns of one name (a name's WordNet synsets, kept with
    ``dedupe=False``) named a cluster "bank, bank, bank". Only as many nouns are ranked as that takes."""
    width = min(top, scores.shape[1])
    while True:
        order = scores.topk(width, dim=1).indices.cpu().tolist()
        named = [_distinct(names[j] for j in row)[:top] for row in order]
        if width == scores.shape[1] or all(len(row) == top for row in named):
            return named
        width = min(4 * width, scores.shape[1])


def _distinct(names) -> List[str]:
    return list(dict.fromkeys(names))
