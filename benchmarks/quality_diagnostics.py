"""``quality.py --diagnostics``: how label-consistent each space's nearest neighbours are (Ma et al.'s Fig. 2 claim,
measured on laic's spaces).

For every set: the fraction of an image's 10 nearest neighbours (cosine, self excluded) that share its label, mean
over images, in each representation stage 0 builds (seed 0; labels only score the graphs, they never reach a fit):
  - CLIP: the raw image features; image: the centred ones (stage 0's image space);
  - text: the text counterparts (softmax noun mixtures, centred); relation: the relation features
    (``laic.relations``: the relation rows over the kept nouns, centred over the nouns and L2-normalised, the nouns
    weighted as the default weights them, ``usage_weighting="auto"``);
  - three other forms of the relation rows, computed densely here to justify the choice: "rel uniform" (every kept
    noun weighted alike, ``usage_weighting=False``), "rel raw" (the rows
    as they are, L2-normalised: Ma et al.'s matrix C) and "rel softmax" (softmax over the nouns at CLIP's
    temperature 0.01, compared by cosine);
  - fused: stage 0's fused space without the relation features (``LAIC(relation_fused=False)``); fused (relation):
    the same with the relation features in place of the image features (``relation_fused=True``); the default,
    ``"auto"``, clusters a blend of the two by the partition agreement (share 1 on most sets);
  - the consistent neighbour sets (image-space lists filtered by the text or the relation graph): their label
    consistency over the kept entries, and how many of the 10 each row keeps on average.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from laic.metrics import neighbour_label_consistency
from laic.relations import filtered_neighbours, fused_view, relation_rows, with_relations
from laic.stage0 import TEXT_TAU, build_semantic_space, fused_features, unit_rows
from laic_kernels import knn_graph

N_NEIGHBOURS = 10
SOFTMAX_TEMPERATURE = 0.01


def knn_consistency(features: torch.Tensor, labels: np.ndarray) -> float:
    _, neighbours = knn_graph(features.float(), N_NEIGHBOURS)
    return neighbour_label_consistency(labels, neighbours)


def set_diagnostics(features: np.ndarray, labels: np.ndarray, nouns: np.ndarray) -> dict:
    k = len(np.unique(labels))
    x = torch.from_numpy(features).float()
    space = with_relations(build_semantic_space(x, torch.from_numpy(nouns).float(), k, seed=0,
                                                n_neighbours=N_NEIGHBOURS), "auto", TEXT_TAU, k)
    kept_nouns = unit_rows(torch.from_numpy(nouns).float()[space.noun_index])
    raw_relations = unit_rows(space.images) @ kept_nouns.t()
    relation_nbrs, relation_mask = filtered_neighbours(space.image_neighbours, space.relations, "relation",
                                                       space.rows)
    out = {"M'": int(space.noun_index.numel()),
           "CLIP": knn_consistency(x, labels),
           "image": neighbour_label_consistency(labels, space.image_neighbours),
           "text": neighbour_label_consistency(labels, space.text_neighbours),
           "relation": knn_consistency(space.relations, labels),
           "rel uniform": knn_consistency(relation_rows(space.images, kept_nouns), labels),
           "rel raw": knn_consistency(raw_relations, labels),
           "rel softmax": knn_consistency(torch.softmax(raw_relations / SOFTMAX_TEMPERATURE, dim=1), labels),
           "fused": knn_consistency(fused_features(space, k), labels),
           "fused (relation)": knn_consistency(fused_features(fused_view(space, 1.0), k), labels),
           "consistent (text)": neighbour_label_consistency(labels, space.neighbours, space.neighbour_mask),
           "kept (text)": float(space.neighbour_mask.sum(1).float().mean()),
           "consistent (relation)": neighbour_label_consistency(labels, relation_nbrs, relation_mask),
           "kept (relation)": float(relation_mask.sum(1).float().mean())}
    # The relation features must rank neighbours as the relation rows do (a cheap self-check of the identity).
    dense = relation_rows(space.images, kept_nouns, space.noun_weighting.weights)
    out["check"] = abs(knn_consistency(dense, labels) - out["relation"])
    return out


def print_diagnostics(loaded, nouns: np.ndarray, threads: int) -> int:
    """Print the table for ``loaded`` = [(name, features, labels), ...] with the vocabulary ``nouns``."""
    start = time.perf_counter()
    print(f"# 10-NN label consistency in % (fraction of an image's {N_NEIGHBOURS} nearest neighbours sharing its "
          f"label; stage 0 at seed 0, {threads} threads). 'kept' = neighbours kept per row by the filter.")
    columns = ["CLIP", "image", "text", "relation", "rel uniform", "rel raw", "rel softmax", "fused",
               "fused (relation)", "consistent (text)", "kept (text)", "consistent (relation)", "kept (relation)"]
    header = ["set", "N", "K", "M'"] + columns
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for name, features, labels in loaded:
        d = set_diagnostics(features, labels, nouns)
        if d["check"] > 0.005:
            raise AssertionError(f"{name}: relation features and dense relation rows disagree by {d['check']:.4f}")
        rows.append(d)
        cells = [f"{d[c]:.1f}" if c.startswith("kept") else f"{100 * d[c]:.1f}" for c in columns]
        print("| " + " | ".join([name, str(len(labels)), str(len(np.unique(labels))), str(d["M'"])] + cells) + " |",
              flush=True)
    means = [np.mean([d[c] for d in rows]) for c in columns]
    cells = [f"{m:.1f}" if c.startswith("kept") else f"{100 * m:.1f}" for c, m in zip(columns, means)]
    print("| mean | | | | " + " | ".join(cells) + " |")
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0
