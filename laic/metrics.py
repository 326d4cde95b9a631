"""Clustering metrics for any number of predicted clusters against any number of classes.

ACC matches clusters to classes one-to-one by a maximum-weight matching on the contingency table; clusters left without
a class count as wrong. A negative prediction means no cluster (``laic predict``'s -1 for an unreadable image), in every
function alike, given the least credit each score allows: wrong for ACC; for ARI a cluster of its own (no pair of
them agrees); for NMI the lesser of its two readings, each a cluster of its own and all of them one cluster. Each
reading alone credits them somewhere: as singletons each names its class exactly (on `laic demo`'s 1,000 labels
every prediction -1 scored NMI 0.51, and random predictions, NMI 0.02, scored 0.34 with half of them -1; now 0.00
and 0.03), as one cluster a class whose images were all unreadable is a cluster found. NMI uses the arithmetic mean
of the entropies
(scikit-learn's default); ARI is Hubert and Arabie's adjusted Rand index. All three read the table's non-zero cells only
(at most N of them): a dense classes x clusters table of 1,000 classes and a million distinct predictions held 8 GB.
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import numpy as np

from .io import as_labels, as_truth


class Contingency(NamedTuple):
    """The contingency table's non-zero cells: ``counts[c]`` images of class ``rows[c]`` in cluster ``cols[c]`` (both
    numbered 0, 1, ... over the distinct labels of their side), and the row and column sums."""
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    row_sums: np.ndarray
    col_sums: np.ndarray


def checked_labels(labels_true, labels_pred):
    """Both label arrays checked (truth: non-negative classes, numbers, names or bools; predictions: integers), of
    one length."""
    truth = as_truth("labels_true", labels_true)
    pred = as_labels("labels_pred", labels_pred)
    if truth.shape != pred.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {truth.size} and {pred.size}")
    return truth, pred


def unclustered_as_singletons(pred: np.ndarray) -> np.ndarray:
    """Predictions with each negative one (no cluster) made a cluster of its own (for ARI: no pair of them agrees;
    as one cluster of all of them, a group of one class would be credited as found)."""
    clustered = pred >= 0
    if clustered.all():
        return pred
    ids = np.unique(pred, return_inverse=True)[1]   # 0, 1, ...: no overflow beside ids near 2**63
    return np.where(clustered, ids, ids.max() + 1 + np.cumsum(~clustered))


def contingency(labels_true, labels_pred, unclustered: str = "apart") -> Contingency:
    """The non-zero counts ``C[class, cluster]`` over the distinct labels of each side; negative predictions each a
    cluster of its own (``unclustered="apart"``: :func:`unclustered_as_singletons`) or all one cluster
    (``"together"``)."""
    t, p = checked_labels(labels_true, labels_pred)
    _, ti = np.unique(t, return_inverse=True)
    p = unclustered_as_singletons(p) if unclustered == "apart" else np.where(p >= 0, p, -1)
    _, pi = np.unique(p, return_inverse=True)
    n_cols = int(pi.max()) + 1
    cells, counts = np.unique(ti.astype(np.int64) * n_cols + pi, return_counts=True)   # < N^2: fits int64
    return Contingency(cells // n_cols, cells % n_cols, counts, np.bincount(ti), np.bincount(pi))


def cluster_accuracy(labels_true, labels_pred) -> float:
    """The fraction of images in clusters matched one-to-one to classes (maximum-weight matching); an image with a
    negative prediction (no cluster) counts as wrong."""
    truth, pred = checked_labels(labels_true, labels_pred)
    clustered = pred >= 0
    if not clustered.any():
        return 0.0
    return _matched(contingency(truth[clustered], pred[clustered])) / float(truth.size)


def _matched(table: Contingency) -> float:
    """The images on the maximum-weight one-to-one matching of classes to clusters."""
    # imported here: `laic --help` need not load scipy
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols = table.rows, table.cols
    if len(table.row_sums) > len(table.col_sums):     # the matching covers every node of the smaller side
        rows, cols = cols, rows
    n_small, n_large = sorted((len(table.row_sums), len(table.col_sums)))
    # A maximum-weight matching that need not use every cell, as a full matching: each node of the smaller side also
    # gets an edge of its own to a dummy node, weights are count + 1 (dummy edges 1: every full matching gains the
    # same n_small, and sparse graphs read no weight as no edge).
    dummy = np.arange(n_small)
    graph = coo_matrix((np.r_[table.counts + 1, np.ones(n_small)], (np.r_[rows, dummy], np.r_[cols, n_large + dummy])),
                       shape=(n_small, n_large + n_small)).tocsr()
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph, maximize=True)
    return float(np.asarray(graph[matched_rows, matched_cols]).sum()) - n_small


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """NMI, arithmetic mean of the entropies; of the negative predictions (no cluster), the lesser of the scores
    with each a cluster of its own and with all of them one cluster (see the module docstring)."""
    truth, pred = checked_labels(labels_true, labels_pred)
    readings = ("apart", "together") if (pred < 0).any() else ("apart",)
    return min(_nmi(contingency(truth, pred, unclustered)) for unclustered in readings)


def _nmi(table: Contingency) -> float:
    counts = table.counts.astype(np.float64)
    n = counts.sum()
    h_true, h_pred = _entropy(table.row_sums), _entropy(table.col_sums)
    if h_true == 0 and h_pred == 0:
        return 1.0  # both single-label: identical partitions
    outer = table.row_sums[table.rows].astype(np.float64) * table.col_sums[table.cols]
    mi = float((counts / n * (np.log(counts * n) - np.log(outer))).sum())
    denom = (h_true + h_pred) / 2
    # Clipped to [0, 1]: identical partitions gave 1.0000000000000002 by rounding (a third of random ones).
    return min(1.0, max(0.0, mi / denom)) if denom > 0 else 0.0


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Hubert and Arabie's ARI; a negative prediction (no cluster) is a cluster of its own."""
    from scipy.special import comb

    table = contingency(labels_true, labels_pred)
    n = table.counts.sum()
    sum_cells = comb(table.counts, 2).sum()
    sum_rows = comb(table.row_sums, 2).sum()
    sum_cols = comb(table.col_sums, 2).sum()
    expected = sum_rows * sum_cols / comb(n, 2) if n > 1 else 0.0
    max_index = (sum_rows + sum_cols) / 2
    if max_index == expected:
        return 1.0  # identical trivial partitions (scikit-learn's convention)
    return float((sum_cells - expected) / (max_index - expected))


def evaluate(labels_true, labels_pred) -> Dict[str, float]:
    """ACC, NMI and ARI of a clustering against ground-truth labels, as fractions in [0, 1] (ARI may be < 0).

    A negative prediction means no cluster (``laic predict``'s -1 for an unreadable image): such an image counts as
    wrong for ACC, as a cluster of its own for ARI, and for NMI the lesser of those two readings (each its own
    cluster, all one cluster), as in each function alone (see the module docstring)."""
    truth, pred = checked_labels(labels_true, labels_pred)
    return {"acc": cluster_accuracy(truth, pred), "nmi": normalized_mutual_info(truth, pred),
            "ari": adjusted_rand_index(truth, pred)}


def neighbour_label_consistency(labels, neighbours, mask=None) -> float:
    """Mean over rows of the fraction of a row's neighbours that share its label (a diagnostic of a neighbour graph:
    labels only score it). ``neighbours`` is ``[N, k]`` row indices (numpy or torch); ``mask`` (``[N, k]`` bool) marks
    the valid entries of a filtered list, each row needing at least one."""
    y = as_labels("labels", labels)
    nbrs = np.asarray(neighbours.cpu() if hasattr(neighbours, "cpu") else neighbours)
    if nbrs.ndim != 2 or nbrs.shape[0] != y.size:
        raise ValueError(f"neighbours must be [N, k] with N = len(labels) = {y.size}, got shape {nbrs.shape}")
    if not np.issubdtype(nbrs.dtype, np.integer):
        raise ValueError(f"neighbours must hold row indices (integers), got dtype {nbrs.dtype}")
    valid = np.ones(nbrs.shape, bool) if mask is None else np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
    if valid.shape != nbrs.shape or not valid.any(1).all():
        raise ValueError("mask must have the shape of neighbours and at least one True per row")
    # A -1 (faiss's "no neighbour") indexed the last row without a word: mark such entries False in the mask.
    outside = valid & ((nbrs < 0) | (nbrs >= y.size))
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise ValueError(f"neighbours[{row}, {col}] = {nbrs[row, col]} is not a row index in [0, {y.size}); mark "
                         "missing neighbours False in mask")
    same = (y[np.where(valid, nbrs, 0)] == y[:, None]) & valid
    return float((same.sum(1) / valid.sum(1)).mean())
