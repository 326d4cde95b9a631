"""From cluster probabilities to what a user gets: the rows of clusters the fit left empty renormalised over the
others, and cluster ids, with -1 for an image that could not be read. Shared by ``LAIC.predict_proba``, stage 2 and
``laic predict``."""
from __future__ import annotations

import numpy as np


def without_empty_clusters(probs: np.ndarray, cluster_sizes) -> np.ndarray:
    """``probs [N, K]`` with the clusters that hold none of the fitted images (``cluster_sizes[k] == 0``) at 0 and
    the rows renormalised: a new image goes to a cluster the fit found, not to an empty one that a head still
    scores. NaN rows (images that could not be read) stay NaN."""
    empty = np.asarray(cluster_sizes) == 0
    if not empty.any():
        return probs
    kept = np.where(empty[None, :], 0, probs).astype(probs.dtype, copy=False)
    total = kept.sum(axis=1, keepdims=True)
    # A row whose whole mass sat on empty clusters (underflow of the others' tiny shares) has nothing left to
    # renormalise: it gets the non-empty clusters alike, not 0/0.
    lost = total == 0
    kept = np.where(lost & ~empty[None, :], 1, kept)
    return (kept / np.where(lost, (~empty).sum(), total)).astype(probs.dtype, copy=False)


def labels_of(probs: np.ndarray) -> np.ndarray:
    """Cluster ids (int64) of probability rows; -1 for a NaN row (an image that could not be read)."""
    labels = np.nan_to_num(probs, nan=-1.0).argmax(1).astype(np.int64)
    labels[np.isnan(probs).any(1)] = -1
    return labels
