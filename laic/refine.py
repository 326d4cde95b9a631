"""Optional steps after stages 0 and 1, both off by default: SIC's pseudo-labels from image-semantic relations
(``LAIC(pseudo_labels="semantic")``, ``laic.pseudo_labels``) and Ma et al.'s adaptive semantic centres
(``LAIC(semantic_centres=True)``: prompts through the text tower when one is at hand, ``laic.prompt_centres``, else
continuous centres in the text embedding space, ``laic.semantic_centres``).

SIC's partition replaces the one it starts from only when stage 1's label-free test accepts it
(``laic.stage1.stage1_decision``: the fused-space k-means distortion up by at most 5%, at least 97% of the
non-empty clusters kept).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from laic_kernels import checks

from .distributed.failure import CollectiveError
from .pseudo_labels import sic_fit
from .semantic_centres import CentreAssignment, continuous_centres
from .stage1 import stage1_decision
from .switches import PSEUDO_LABELS


def check_options(semantic_centres, pseudo_labels) -> None:
    checks.true_or_false("semantic_centres", semantic_centres)
    if pseudo_labels not in PSEUDO_LABELS:
        raise ValueError(f"pseudo_labels must be one of {', '.join(map(repr, PSEUDO_LABELS))}, got {pseudo_labels!r}")


def check_one_process(semantic_centres, pseudo_labels) -> None:
    """On a process group, before stage 0: the refinements run in one process only (refused after stages 0 and 1
    before, naming both options whichever was set). Every rank raises it alike: reported once."""
    chosen = [f"pseudo_labels={pseudo_labels!r}"] * (pseudo_labels != "kmeans") + \
        ["semantic_centres=True"] * bool(semantic_centres)
    if chosen:
        one = len(chosen) == 1
        raise CollectiveError(f"{' and '.join(chosen)} run{'s' * one} in one process only; fit outside a process "
                              f"group, or leave {'it at its default' if one else 'them at their defaults'} there")


def refine_partition(model, space, images: torch.Tensor, fused: torch.Tensor, probs: torch.Tensor, n_clusters: int,
                     seed: int, text_tower=None) -> Tuple[Optional[CentreAssignment], torch.Tensor, Dict]:
    """(the centre assignment that replaces the model's own, or None; the training images' probabilities; a report)
    after the options of ``model`` (a LAIC) on the stage-0 ``space``, the raw ``images`` and the partition
    ``probs``. ``text_tower`` is ``(open_clip model, tokenizer)`` or None."""
    assignment, report = None, {}
    labels = probs.argmax(1)
    if model.pseudo_labels == "semantic":
        result, rows = sic_fit(space, images, labels, n_clusters, tau=model.text_tau, seed=seed)
        decision = stage1_decision(fused, labels, result.labels, n_clusters)
        report["semantic_pseudo_labels"] = dict(decision, pseudo_labelled=int(len(rows)))
        if decision["kept"]:
            assignment = CentreAssignment(result.centres, "image", result.scale)
            probs, labels = result.probabilities, result.labels
    if model.semantic_centres:
        if text_tower is not None:
            from .prompt_centres import prompt_centres   # only then: it needs open_clip
            result = prompt_centres(text_tower, images, space.nouns, model.noun_names_, labels, probs,
                                    space.neighbours, space.neighbour_mask, n_clusters, tau=model.text_tau,
                                    seed=seed)
            report["semantic_centres"] = "prompts"
        else:
            result, _ = continuous_centres(images, space.nouns, labels, probs, space.neighbours,
                                           space.neighbour_mask, n_clusters, tau=model.text_tau, seed=seed)
            report["semantic_centres"] = "continuous"
        report["semantic_centres_moved"] = float((result.labels != labels).float().mean())
        assignment = CentreAssignment(result.centres, "clip", result.scale)
        probs = result.probabilities
    return assignment, probs, report
