"""Clustering metrics for any number of predicted clusters against any number of classes.

ACC matches clusters to classes one-to-one with the Hungarian algorithm (scipy's linear_sum_assignment) on the
contingency table; clusters left without a class count as wrong. NMI uses the arithmetic mean of the entropies
(scikit-learn's default); ARI is Hubert and Arabie's adjusted Rand index.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .io import as_labels, as_truth


def contingency(labels_true, labels_pred) -> np.ndarray:
    """Counts ``C[class, cluster]`` over the distinct labels of each side (classes >= 0: a -1 often marks an
    unlabelled image, which would be counted as one more class)."""
    t = as_truth("labels_true", labels_true)
    p = as_labels("labels_pred", labels_pred)
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {t.size} and {p.size}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    return table


def cluster_accuracy(labels_true, labels_pred) -> float:
    from scipy.optimize import linear_sum_assignment  # imported here: `laic --help` need not load scipy

    table = contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true, labels_pred) -> float:
    table = contingency(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    h_true, h_pred = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_true == 0 and h_pred == 0:
        return 1.0  # both single-label: identical partitions
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * (np.log(table[nz] * n) - np.log(outer[nz]))).sum())
    denom = (h_true + h_pred) / 2
    return max(0.0, mi / denom) if denom > 0 else 0.0


def adjusted_rand_index(labels_true, labels_pred) -> float:
    from scipy.special import comb

    table = contingency(labels_true, labels_pred)
    n = table.sum()
    sum_cells = comb(table, 2).sum()
    sum_rows = comb(table.sum(1), 2).sum()
    sum_cols = comb(table.sum(0), 2).sum()
    expected = sum_rows * sum_cols / comb(n, 2) if n > 1 else 0.0
    max_index = (sum_rows + sum_cols) / 2
    if max_index == expected:
        return 1.0  # identical trivial partitions (scikit-learn's convention)
    return float((sum_cells - expected) / (max_index - expected))


def evaluate(labels_true, labels_pred) -> Dict[str, float]:
    """ACC, NMI and ARI of a clustering against ground-truth labels, as fractions in [0, 1] (ARI may be < 0).

    A negative prediction means no cluster (``laic predict``'s -1 for an unreadable image): such an image counts as
    wrong for ACC and as a cluster of its own for NMI and ARI, never as one cluster of all of them (which a perfect
    score could then match to a class)."""
    truth = as_truth("labels_true", labels_true)
    pred = as_labels("labels_pred", labels_pred)
    if truth.shape != pred.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {truth.size} and {pred.size}")
    clustered = pred >= 0
    if clustered.all():
        acc = cluster_accuracy(truth, pred)
    else:
        acc = float(cluster_accuracy(truth[clustered], pred[clustered]) * clustered.mean()) if clustered.any() else 0.0
        pred = np.where(clustered, pred, pred.max() + 1 + np.cumsum(~clustered))   # singletons
    return {"acc": acc, "nmi": normalized_mutual_info(truth, pred), "ari": adjusted_rand_index(truth, pred)}


def neighbour_label_consistency(labels, neighbours, mask=None) -> float:
    """Mean over rows of the fraction of a row's neighbours that share its label (a diagnostic of a neighbour graph:
    labels only score it). ``neighbours`` is ``[N, k]`` row indices (numpy or torch); ``mask`` (``[N, k]`` bool) marks
    the valid entries of a filtered list, each row needing at least one."""
    y = as_labels("labels", labels)
    nbrs = np.asarray(neighbours.cpu() if hasattr(neighbours, "cpu") else neighbours)
    if nbrs.ndim != 2 or nbrs.shape[0] != y.size:
        raise ValueError(f"neighbours must be [N, k] with N = len(labels) = {y.size}, got shape {nbrs.shape}")
    valid = np.ones(nbrs.shape, bool) if mask is None else np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
    if valid.shape != nbrs.shape or not valid.any(1).all():
        raise ValueError("mask must have the shape of neighbours and at least one True per row")
    same = (y[np.where(valid, nbrs, 0)] == y[:, None]) & valid
    return float((same.sum(1) / valid.sum(1)).mean())
