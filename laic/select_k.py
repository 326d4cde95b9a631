"""Choosing the number of clusters K without labels: ``LAIC(n_clusters="auto")`` and ``laic fit --k auto``.

    from laic.select_k import select_k
    result = select_k(space, k_range=(2, 1000), seed=0)    # space: laic.stage0.build_semantic_space(...)
    result.k, result.scores                                   # the choice, and [(k, score), ...] by increasing k

The criterion is a gap in silhouette (:func:`score_k`): the mean cosine silhouette of the fused k-means partition
with K clusters (the partition ``LAIC`` starts from), less the silhouette that the same procedure reaches on a
structureless reference (:func:`null_reference`: Gaussian rows with the mean and covariance of the fused space, as
in Tibshirani's gap statistic, with the data's exact copies, smoothed over their own neighbours as the fused space
is; both silhouettes count each copied image once). A point's silhouette is
``(b - a) / max(a, b)``, with ``a`` its mean cosine distance to the rest of its cluster (less its nearest image, so
that a pair of near-copies does not vouch for itself) and ``b`` that to the
nearest other cluster: it rewards clusters that are tight *and* apart (splitting a real group brings the halves
close, so ``b`` drops; merging two groups raises ``a``). Subtracting the reference removes what any cloud of that
shape scores: a high silhouette at K = 2 for an elongated cloud, and the clumps that neighbour smoothing makes at
large K (where each row is averaged with its N / K - 1 nearest neighbours, k-means recovers those very groups).
What is left rewards structure beyond the data's shape. Measured on the 8 CLIP dev sets (true K 10 to 1000; the labels
only scored the choice): the plain silhouette in the fused space peaked at K = 217 and 423 on the two DTD sets (47
classes), in a fixed 10-neighbour-smoothed space it chose K = 3 on ImageNet-4shot (1000 classes), and unsmoothed it
preferred K = 2 on CIFAR-10; the gap chose within [0.67, 1.5] times the true K in 22 of 24 fits (8 sets x 3 seeds:
``python benchmarks/quality.py --auto-k``, 12-07 with the nearest image left out, 21 just before it; 22 on 12-06, 21
on 12-05, 20 on 12-04; misses: caltech101-val K = 66 of 100 and dtd-test 96 of 47, seed 1 each). DTD's curves (47
textures) are flat from about 44 to 150: textures have no sharper scale than that, and restart noise decides. A
choice at an end of the range, or a curve within restart noise of the reference, is reported (:func:`doubts`).
The silhouette needs no N x N matrix: with unit rows the mean distance to a cluster is ``1 - x . sum(cluster) /
size``, one ``[N, K]`` product.

Only the k-means partition depends on K; everything else is shared by all candidates: centring, noun filtering (a fixed
number of semantic centres, that of the geometric middle of the range), text counterparts, the neighbour graphs, the
agreement, and the reference with its neighbour graph. The search is coarse to fine: a geometric grid over the range
(ratio :data:`COARSE_RATIO`: 2, 4, 8, ...), then :data:`REFINE_ROUNDS` rounds that try the two candidates a
square-rooted step either side of the best so far (ratios 1.41, then 1.19): ceil(log2(hi / lo)) + 5 candidates at most
instead of hi - lo + 1; a range no wider than that is searched whole (a narrow range's interior was never scored: the
steps rounded back onto its ends), and a wider one within a ratio of 2 (400:499) refines from its own ratio. Each
candidate costs :data:`SEARCH_RESTARTS` single-restart k-means runs on the data up to K = :data:`MANY_CLUSTERS` (their
silhouettes averaged: from one restart to the next the silhouette varies by 0.01 to 0.02 there, as much as the curve
does near its top; beyond, one run: fewer restarts for many clusters, as ``laic.model.default_n_init``) and one on the
reference, each capped at :data:`SEARCH_MAX_ITER` Lloyd iterations. The final model is then an ordinary fit at the
chosen K (the usual restarts, stage 1), identical to ``LAIC(n_clusters=chosen K)``. On a process group (``LAIC.fit``
inside one, ``laic fit --k auto`` under torchrun) each rank holds its rows: the k-means runs, the silhouettes (clusters'
sums all-reduced) and the reference (its mean and covariance summed in float64, its draws made in blocks of rows that
each rank draws alike, its neighbours found round the ring) are all ranks' rows', the curve one process's up to float
reduction order. The default range is 2 to N / :data:`MIN_MEAN_CLUSTER_SIZE`, at most :data:`MAX_DEFAULT_K`: the finest
partition worth asking for has a handful of images per cluster (ImageNet with 4 images per class has K = N / 4), and a
user without a guess of K should not have to supply an upper bound for the search to reach it; but a candidate costs N x
K (k-means and silhouette, on the data and the reference), so the top of the range decides the search's time, and beyond
a few thousand clusters N / 4 would make it hours: at N = 10,000 on one CPU thread (12-05) the candidates K = 1307 and
2500 took 47 of the search's 100 s, and N = 100,000 would have searched up to K = 25,000. 2048 holds the usual
benchmarks' class counts (ImageNet's 1000 with room above it); a wider search is one ``k_range`` away, and a choice at
the top is warned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from laic_kernels import checks
from laic_kernels.chunks import row_chunks

from . import profiling
from .distributed.failure import CollectiveError
from .distributed.knn import knn_graph as distributed_knn_graph
from .distributed.knn import neighbour_mean
from .distributed.rows import RowBlocks
from .operands import BLOCK_ELEMENTS, knn
from .runtime import MAX_SEED
from .stage0 import (SemanticSpace, first_copy_index, fused_features, n_smoothing_neighbours, spherical_kmeans,
                     unit_rows)

AUTO = "auto"
MIN_K = 2
MIN_MEAN_CLUSTER_SIZE = 4      # default upper end of the search: N // 4 (clusters of 4 images on average) ...
MAX_DEFAULT_K = 2048           # ... up to this many (the search's time grows with N x its largest K)
MIN_IMAGES_FOR_AUTO = 2 * MIN_MEAN_CLUSTER_SIZE  # fewer images leave no range to search (2 <= K <= N // 4)
COARSE_RATIO = 2.0             # geometric step of the first pass
REFINE_ROUNDS = 2              # then the step's square root, around the best so far, this many times (to 2^(1/4))
SEARCH_RESTARTS = 2            # single-restart k-means runs per candidate up to K = 100, their silhouettes averaged
MANY_CLUSTERS = 100            # above this K one run suffices (its silhouette already averages over many clusters)
SEARCH_MAX_ITER = 20           # Lloyd iterations per run (the criterion needs a good partition, not the last swap)
NULL_SEED_OFFSET = 7919        # the reference's draws differ from every other use of the seed
NULL_BLOCK_ROWS = 65536        # the reference is drawn in blocks of rows, each from a generator of its own
CHUNK_ROWS = 4096              # rows of the [N, K] similarity product computed at once
# A best score below this is within restart noise (0.01 to 0.02 from one restart to the next, above) of the
# structureless reference: isotropic random rows score within +-0.03 at every K at D = 16 to 512; the dev sets'
# peaks are 0.1 or more. Not below D = 16 (reviews, 12-05: +0.04 to +0.10 at D = 2, +0.043 at D = 4, +0.036 at D = 8,
# no doubt raised): in few dimensions structureless rows leave gaps that a silhouette rewards. Nor for one elongated
# Gaussian (axis scales 1/sqrt(i): +0.05 to +0.10 at K = 2, 12-06): the reference, normalised after its draw, is
# rounder than such a cloud; a reference shaped to match it cost 4 of 33 dev-set choices (benchmarks/QUALITY.md).
NO_STRUCTURE_SCORE = 0.03


@dataclass
class KSelection:
    """The outcome of the search: the chosen ``k``, every candidate's ``(k, score)`` by increasing k, and the
    range searched."""

    k: int
    scores: List[Tuple[int, float]] = field(default_factory=list)
    k_range: Tuple[int, int] = (MIN_K, MIN_K)
    n_images: Optional[int] = None     # N, where known: a range up to N - 1 cannot be widened


# ------------------------------------------------------------------------------------------------------------------
# The range


def is_auto(n_clusters) -> bool:
    return isinstance(n_clusters, str) and n_clusters == AUTO


def default_k_range(n_images: int) -> Tuple[int, int]:
    return MIN_K, max(MIN_K, min(MAX_DEFAULT_K, n_images // MIN_MEAN_CLUSTER_SIZE))


def check_k_range(k_range: Optional[Sequence[int]], n_images: int, name: str = "k_range") -> Tuple[int, int]:
    """``k_range`` as ``(lo, hi)`` checked against N (None: :func:`default_k_range`); a ValueError naming ``name``
    for a range that is not two ints, is empty, or leaves [2, N - 1]."""
    if n_images < MIN_IMAGES_FOR_AUTO:
        raise ValueError(f"n_clusters='auto' (--k auto) needs at least {MIN_IMAGES_FOR_AUTO} images to search K, "
                         f"got {n_images}; pass an explicit number of clusters instead")
    if k_range is None:
        lo, hi = default_k_range(n_images)
        if lo == hi:   # N = 8 to 11: "auto" would be K = 2 without a search (and without a word)
            raise ValueError(f"n_clusters='auto' (--k auto) searches {MIN_K} to N // {MIN_MEAN_CLUSTER_SIZE} clusters "
                             f"by default, K = {MIN_K} alone at N = {n_images}; pass an explicit number of clusters, "
                             "or a range (k_range, --k-range LO:HI)")
        return lo, hi
    # (a tuple or list: range(2, 4) passed as its items (2, 3), then a model file refused to hold it)
    if not isinstance(k_range, (tuple, list)):
        raise ValueError(f"{name} must be a pair (lo, hi) of ints as a tuple or a list, got {type(k_range).__name__} "
                         f"{k_range!r}; pass (lo, hi), both ends searched")
    if len(k_range) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi) of ints, got {k_range!r}")
    lo, hi = k_range
    for value in (lo, hi):
        if not checks.is_int(value):
            raise ValueError(f"{name} must be a pair (lo, hi) of ints, got {k_range!r}")
    lo, hi = int(lo), int(hi)
    shown = f"{lo}:{hi}" if name.startswith("--") else f"({lo}, {hi})"    # as the user wrote it: --k-range LO:HI
    if lo > hi:
        raise ValueError(f"{name} {shown} is empty: its low end must be at most its high end")
    if lo < MIN_K or hi > n_images - 1:
        # K = N leaves every image alone: silhouette 0 by convention, which beat every K of a negative curve.
        raise ValueError(f"{name} {shown} must lie within [{MIN_K}, N - 1 = {n_images - 1}] (N = {n_images} "
                         "images; a silhouette needs a cluster of two images at least)")
    return lo, hi


def geometric_grid(lo: int, hi: int, ratio: float) -> List[int]:
    """Distinct integers from ``lo`` to ``hi`` (both included), about ``ratio`` apart in log scale."""
    if lo >= hi:
        return [lo]
    steps = max(1, math.ceil(math.log(hi / lo) / math.log(ratio)))
    return sorted({int(round(lo * (hi / lo) ** (i / steps))) for i in range(steps + 1)})


# ------------------------------------------------------------------------------------------------------------------
# The criterion


# Cosine distances below this are rounding noise of the float32 "1 - dot / size" (unit rows, sums of many rows).
SILHOUETTE_RESOLUTION = 1e-5


def silhouette(features: torch.Tensor, labels: torch.Tensor, n_clusters: int,
               rows: Optional[RowBlocks] = None, counted: Optional[torch.Tensor] = None,
               nearest: Optional[NearestImages] = None) -> float:
    """Mean cosine silhouette of ``labels`` on ``features`` (as scikit-learn's ``silhouette_score(...,
    metric="cosine")``; points alone in their cluster score 0). ``O(N K D)``: with unit rows the mean cosine distance
    of a point to a cluster is ``1 - x . sum(cluster) / size`` (less the point itself for its own cluster). On a
    process group (``rows``) this rank holds its rows of both; the clusters' sums and the mean are all ranks'.
    ``counted`` (bool ``[N]``): only these rows, as if the others were not there (scikit-learn's score of
    ``features[counted]``); all when None. ``nearest`` (:func:`nearest_images` of these features): each point's
    nearest other image is left out of the point's own cluster's mean distance where it shares the cluster; a point
    with no other image left there scores 0, as one alone (:func:`score_k` says why)."""
    x = unit_rows(features)
    rows = rows if rows is not None else RowBlocks(x.shape[0])
    kept = slice(None) if counted is None else counted
    counts = rows.sum_(torch.bincount(labels[kept], minlength=n_clusters).to(x.dtype))
    sums = rows.sum_(torch.zeros(n_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, labels[kept], x[kept]))
    nearest_shares = None if nearest is None else _shares_the_cluster(nearest, labels, rows)
    total = x.new_zeros(())
    for start in range(0, x.shape[0], CHUNK_ROWS):
        chunk, own = x[start:start + CHUNK_ROWS], labels[start:start + CHUNK_ROWS]
        dots = chunk @ sums.t()                                               # [n, K]
        # The point itself left out (a row not counted scores, wrongly, but is left out of the total below).
        own_dot = dots.gather(1, own[:, None])[:, 0] - (chunk * chunk).sum(1)
        others = counts[own] - 1
        if nearest is not None:   # and its nearest image, where that shares its cluster
            shares = nearest_shares[start:start + CHUNK_ROWS]
            own_dot = own_dot - torch.where(shares, nearest.dot[start:start + CHUNK_ROWS], torch.zeros_like(own_dot))
            others = others - shares.to(others.dtype)
        a = 1.0 - own_dot / others.clamp_min(1)
        other = 1.0 - dots / counts.clamp_min(1)
        other.scatter_(1, own[:, None], float("inf"))
        other[:, counts == 0] = float("inf")
        # Distances are clipped at 0 (as scikit-learn's cosine_distances): "1 - dot / size" of near-duplicates rounds
        # below it. A point whose own and nearest other cluster both lie within float32's rounding of it cannot be
        # told apart from either: it scores 0 (before, (b - a) / max(a, b) of rounding noise gave scores of 1e4).
        a, b = a.clamp_min(0), other.min(1).values.clamp_min(0)
        spread = torch.maximum(a, b)
        s = torch.where(spread > SILHOUETTE_RESOLUTION, (b - a) / spread.clamp_min(SILHOUETTE_RESOLUTION), 0.0)
        scored = others > 0 if counted is None else (others > 0) & counted[start:start + CHUNK_ROWS]
        total = total + torch.where(scored, s, torch.zeros_like(s)).sum()
    return rows.total(total) / (rows.n_rows if counted is None else rows.total(counted.sum()))


@dataclass
class NearestImages:
    """Each of this rank's points' nearest other image (:func:`nearest_images`): its global row index, whether it is
    counted, and its dot product with the point in the features the silhouette scores."""

    index: torch.Tensor     # [n] int64
    counted: torch.Tensor   # [n] bool
    dot: torch.Tensor       # [n]


def nearest_images(features: torch.Tensor, neighbours: torch.Tensor, counted: Optional[torch.Tensor],
                   rows: RowBlocks) -> NearestImages:
    """For :func:`silhouette`: each point's first neighbour in ``neighbours`` (global indices, best first) that is
    counted, that is another image and not an exact copy of the point's own (the copy would tie first, and being
    left out of the sums already, leave the point's near-copies in); where none is, the list's first, marked not
    counted, so that nothing is left out for the point. Its row is fetched by :func:`neighbour_mean` (the mean of
    one row is that row): round the ring on a process group (as the smoothing's neighbour means go, once per
    features), a block of rows at a time in one process."""
    x = unit_rows(features)
    if counted is None:
        index, is_counted = neighbours[:, 0], torch.ones(neighbours.shape[0], dtype=torch.bool, device=x.device)
    else:
        listed = rows.all_gather(counted.to(torch.uint8))[neighbours]     # [n, k] (uint8: any backend, and argmax)
        first = listed.argmax(1, keepdim=True)                            # the first counted one (0 where none is)
        index, is_counted = neighbours.gather(1, first)[:, 0], listed.gather(1, first)[:, 0].bool()
    blocks = [(0, x.shape[0])] if rows.distributed else row_chunks(x.shape[0], x.shape[1], BLOCK_ELEMENTS)
    dot = torch.cat([torch.linalg.vecdot(x[start:stop], neighbour_mean(x, index[start:stop, None], rows.group))
                     for start, stop in blocks])
    return NearestImages(index, is_counted, dot)


def _shares_the_cluster(nearest: NearestImages, labels: torch.Tensor, rows: RowBlocks) -> torch.Tensor:
    """Bool ``[n]``: each point's nearest image is counted and in the point's cluster (its label fetched as a float
    column, exact below 2^24 clusters)."""
    theirs = neighbour_mean(labels.float()[:, None], nearest.index[:, None], rows.group)[:, 0]
    return nearest.counted & (theirs == labels.float())


@dataclass
class NullReference:
    """A cloud without cluster structure, shaped like the data: Gaussian rows with the mean and covariance of the
    (unsmoothed) fused space, unit-normalised, with their own neighbour lists. On a process group a rank holds its
    rows (``rows``: the data's row blocks), the neighbours' indices being global."""

    features: torch.Tensor     # [N, 2D] unit rows
    neighbours: torch.Tensor   # [N, n_neighbours]
    rows: RowBlocks


def null_reference(space: SemanticSpace, seed: int = 0) -> NullReference:
    """The structureless reference the criterion subtracts (see the module docstring); drawn from ``seed``, the
    same rows at any number of processes (:func:`reference_draws`; the mean and covariance summed in float64).
    Made in row blocks: beyond its own ``[N, 2D]`` float32 rows it holds a block at a time (the whole fused space
    in float64 and four ``[N, 2D]`` temporaries before, 37 GB at N = 1.28M)."""
    rows = space.rows
    n, width = space.images.shape[0], space.images.shape[1] + space.texts.shape[1]
    device = space.images.device

    def fused(start, stop):   # float64 rows of the unsmoothed fused space
        return torch.cat([space.images[start:stop], space.text_weight * space.texts[start:stop]], dim=1).double()

    blocks = list(row_chunks(n, width, BLOCK_ELEMENTS))
    total = torch.zeros(width, dtype=torch.float64, device=device)
    for start, stop in blocks:
        total += fused(start, stop).sum(0)
    mean = rows.sum_(total) / rows.n_rows
    covariance = torch.zeros(width, width, dtype=torch.float64, device=device)
    for start, stop in blocks:
        centred = fused(start, stop) - mean
        covariance += centred.t() @ centred
    covariance = rows.sum_(covariance) / rows.n_rows    # [2D, 2D]: O(N D^2), any N
    # Rank 0's axes on every rank: another solver build could flip an eigenvector's sign on one machine.
    variances, axes = (rows.broadcast_from_main(t.contiguous()) for t in torch.linalg.eigh(covariance))
    scale, to_data, shift = variances.clamp_min(0).sqrt().float(), axes.float().t(), mean.float()
    cloud = torch.empty(n, width, dtype=torch.float32, device=device)
    for lo, hi, drawn in _drawn_blocks(rows.start, n, rows.n_rows, width, seed):
        for start, stop in row_chunks(hi - lo, width, BLOCK_ELEMENTS):
            draws = drawn[start:stop].to(device)
            cloud[lo + start:lo + stop] = unit_rows((draws * scale) @ to_data + shift)
    if space.distinct is not None:
        cloud = _copied_as_the_data(cloud, space.images, rows)
    k = space.image_neighbours.shape[1]
    # The pipeline's search (half-precision candidates re-scored in float32 on a GPU), as the data's graphs and the
    # process group's ring search: the same lists at any number of processes, and tensor cores on a GPU.
    _, neighbours = distributed_knn_graph(cloud, k, rows.group) if rows.distributed else knn(cloud, k)
    return NullReference(cloud, neighbours, rows)


def _copied_as_the_data(cloud: torch.Tensor, images: torch.Tensor, rows: RowBlocks) -> torch.Tensor:
    """The reference with the data's exact copies: a row that repeats an earlier image takes that image's reference
    row, and the silhouette then counts each once, as the data's (:func:`score_k`). N distinct reference rows made a
    denser cloud than the data's distinct images, whose silhouette fell faster with K: a set given five times over
    chose the top of its range (24 of 24 on 100 CIFAR-10 images, 18 and 13 for the set once; 12-06, ad hoc). On a
    process group every rank holds the whole cloud for a moment (the rows its copies repeat may lie anywhere)."""
    source = rows.all_gather(cloud) if rows.distributed else cloud
    return source[first_copy_index(images, rows)]


def reference_draws(start: int, count: int, n_rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows ``start`` to ``start + count`` of the reference's standard normal draws ``[n_rows, width]`` (float32,
    CPU): drawn in blocks of :data:`NULL_BLOCK_ROWS` rows, each from a generator of its own, so that a process draws
    the blocks its rows lie in, and the rows are the same at any number of processes."""
    out = torch.empty(count, width, dtype=torch.float32)   # whatever torch's default dtype
    for lo, hi, drawn in _drawn_blocks(start, count, n_rows, width, seed):
        out[lo:hi] = drawn
    return out


def _drawn_blocks(start: int, count: int, n_rows: int, width: int, seed: int):
    """:func:`reference_draws` a generator block at a time: ``(lo, hi, rows)``, the draws of rows ``start + lo`` to
    ``start + hi``."""
    for block in range(start // NULL_BLOCK_ROWS, -(-(start + count) // NULL_BLOCK_ROWS)):
        first = block * NULL_BLOCK_ROWS
        size = min(NULL_BLOCK_ROWS, n_rows - first)
        generator = torch.Generator().manual_seed(_block_seed(seed, block))
        drawn = torch.randn(size, width, generator=generator, dtype=torch.float32)
        lo, hi = max(start, first), min(start + count, first + size)
        yield lo - start, hi - start, drawn[lo - first:hi - first]


def _block_seed(seed: int, block: int) -> int:
    """Block 0 draws from the seed the whole reference was drawn from before it came in blocks (one process's draws
    below 65,536 rows are unchanged); the others from 32-bit seeds mixed from (seed, block), as torch's CPU
    generator keeps 32 bits of its seed."""
    if block == 0:
        return int(seed) + NULL_SEED_OFFSET
    return int(np.random.SeedSequence([int(seed), NULL_SEED_OFFSET, block]).generate_state(1)[0])


def null_features(null: NullReference, n_clusters: int) -> torch.Tensor:
    """The reference smoothed as ``laic.stage0.fused_features`` smooths the data for ``n_clusters`` clusters."""
    width = null.neighbours.shape[1]
    neighbours = null.neighbours[:, :n_smoothing_neighbours(null.rows.n_rows, n_clusters, width)]
    if not neighbours.shape[1]:
        return null.features
    return unit_rows(null.features + neighbour_mean(null.features, neighbours, null.rows.group))


# ------------------------------------------------------------------------------------------------------------------
# The search


def score_k(space: SemanticSpace, null: NullReference, k: int, seed: int,
            counted: Optional[torch.Tensor] = None) -> float:
    """The criterion for one candidate K: the silhouette of the fused k-means partition with ``k`` clusters, less
    that of the same procedure on the structureless reference (on a process group: of all ranks' rows).
    ``counted`` (``space.distinct``: :func:`laic.stage0.first_copies`): the data's rows its silhouette counts; a copy
    of an image sits beside its twin at cosine distance 0 and scores near 1 wherever the two share a cluster, so
    copies pushed the choice up to the range's top (a set given twice over: K = 125 of 125 instead of 9).
    Near-copies (a burst of photos, a re-encoded one) are not copies, but a pair of them scores near 1 alike, so
    each point's silhouette leaves out its nearest image (in the image space's graph; the reference's in its own):
    a pair alone in a cluster scores 0, and a pair within a larger cluster is scored by the rest of it. 10% of
    the rows added as near-copies at cosine 0.98 sent DTD's 47 classes to K = 391 / 261 (test / val), now 85 / 47;
    30% at 0.98 sent cifar10-500 to 162, now 11; of 24 clean dev-set fits 22 chose as before, dtd-val seed 1 152
    -> 62 (into the band) and ImageNet-4shot seed 2 1000 -> 707 (in it either way) (``benchmarks/QUALITY.md``,
    "Near-copies"). Many near-copies still raise K (30% of the rows at 0.98: dtd-test at the top of its range, 550,
    dtd-val at 270 of 366; pairs alone too, drawn without replacement: a review's check), and leaving out two
    neighbours lost ImageNet-4shot's K (4 images a class)."""
    rows = space.rows

    def partition(features, run):
        # Wrapped into the seeds k-means takes (random_state = MAX_SEED made the second restart's seed 2**32).
        return spherical_kmeans(features, k, n_init=1, max_iter=SEARCH_MAX_ITER, seed=(seed + run) % (MAX_SEED + 1),
                                group=rows.group).labels

    fused = fused_features(space, k)
    nearest = nearest_images(fused, space.image_neighbours, counted, rows)
    runs = SEARCH_RESTARTS if k <= MANY_CLUSTERS else 1
    data = 0.0
    for run in range(runs):
        labels = partition(fused, run)
        if bool((rows.sum_(torch.bincount(labels, minlength=k)) == 0).any()):
            return float("-inf")    # fewer distinct rows than k: no partition into k clusters to score
        data += silhouette(fused, labels, k, rows, counted, nearest) / runs
    cloud = null_features(null, k)
    # (its copies the data's: counted alike; each point's nearest image in its own graph)
    reference = silhouette(cloud, partition(cloud, 0), k, rows, counted,
                           nearest_images(cloud, null.neighbours, counted, rows))
    # With the data's copies, a reference of few distinct rows may have no partition into k clusters to score (two
    # images copied 25 times each): no structure, 0.
    score = data - (reference if math.isfinite(reference) else 0.0)
    return score if math.isfinite(score) else float("-inf")


def select_k(space: SemanticSpace, k_range: Tuple[int, int], seed: int = 0) -> KSelection:
    """Coarse-to-fine search of K in ``k_range`` (already checked) on a built semantic space; the best score wins
    (ties: the smaller K)."""
    lo, hi = k_range
    with profiling.step("structureless reference", "graphs"):
        null = null_reference(space, seed)
        counted = space.distinct   # (None: no copies, every row counts)
    scores = {}

    def evaluate(ks):
        for k in ks:
            if k not in scores:
                with profiling.step(f"K = {k}", "k-means"):   # a profile's step, and a line of progress
                    scores[k] = score_k(space, null, k, seed, counted)

    def best():
        return max(scores, key=lambda k: (scores[k], -k))

    grid = geometric_grid(lo, hi, COARSE_RATIO)
    if hi - lo + 1 <= len(grid) + 2 * REFINE_ROUNDS:   # a range no wider than the search's budget: every K
        grid = list(range(lo, hi + 1))
    evaluate(grid)
    # Refined from the grid's own step: a range narrower than the coarse ratio (490:499) has its two ends alone on the
    # grid, and steps of x 1.41 around them rounded back onto the ends (its interior was never scored).
    step = COARSE_RATIO if len(grid) > 2 else hi / lo
    for _ in range(REFINE_ROUNDS):
        step = math.sqrt(step)
        centre = best()
        evaluate(sorted({min(hi, max(lo, int(round(centre / step)))), min(hi, max(lo, int(round(centre * step))))}))
    ordered = sorted(scores.items())
    chosen = best()
    return KSelection(k=chosen, scores=[(k, float(s)) for k, s in ordered], k_range=(lo, hi),
                      n_images=space.rows.n_rows)


def check_some_scored(selection: KSelection) -> None:
    """Refuse a search none of whose candidates could be scored: its K would be no choice at all (a fit went on with
    it and left clusters empty, exit status 0, after warning so). Raised alike on every rank of a group (the scores
    are the group's)."""
    lo, hi = selection.k_range
    if not any(math.isfinite(s) for _, s in selection.scores):
        raise CollectiveError(f"no K in the range searched ({lo}:{hi}) could be scored (each left clusters empty: "
                              "fewer distinct rows than K); lower the range (k_range, --k-range) or check the "
                              "features")


def doubts(selection: KSelection) -> List[str]:
    """What makes the choice doubtful, in words (none for a clear peak inside the range): the best score at an end
    of the range (the curve may go on rising beyond it: widen it, unless no score is clear of restart noise, for
    which a wider range is no remedy), or no score clear of restart noise (no structure). A search with some score
    (:func:`check_some_scored`)."""
    check_some_scored(selection)    # (a caller of select_k, as LAIC.fit does first)
    lo, hi = selection.k_range
    best = max(s for _, s in selection.scores if math.isfinite(s))
    structureless = best < NO_STRUCTURE_SCORE
    said = []
    if lo < hi and selection.k in (lo, hi) and (selection.k == hi or lo > MIN_K):
        end = "upper" if selection.k == hi else "lower"
        if selection.k == hi and selection.n_images is not None and hi >= selection.n_images - 1:
            said.append(f"K = {selection.k}, the upper end of the range searched ({lo}:{hi}) and the most a "
                        f"silhouette can score (N - 1), scored best: the images barely group (clusters of about one "
                        f"image); K = {selection.k} is a weak choice")
        elif not structureless:
            said.append(f"K = {selection.k}, the {end} end of the range searched ({lo}:{hi}), scored best: the best "
                        f"K may lie beyond it; widen the range (k_range, --k-range) to see")
    if structureless:
        # (far below the reference: a few distinct rows copied many times, each copy counted once, score -1)
        relation = f"within {NO_STRUCTURE_SCORE} of" if best > -NO_STRUCTURE_SCORE else "below"
        said.append(f"every K scored {relation} a structureless reference (best {best:+.3f}): the features show no "
                    f"clear cluster structure, and K = {selection.k} is a weak choice")
    return said


def search_centres_k(k_range: Tuple[int, int]) -> int:
    """The K that sizes the shared noun filtering (its number of semantic centres): the range's geometric middle."""
    lo, hi = k_range
    return max(lo, int(round(math.sqrt(lo * hi))))


def format_scores(scores: Sequence[Tuple[int, float]], chosen: int, width: int = 40) -> str:
    """The score curve as text lines (k, score, a bar), the chosen K marked: what ``laic fit --k auto`` prints."""
    values = [s for _, s in scores if math.isfinite(s)] or [0.0]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    lines = [f"K search, {len(scores)} candidates from {scores[0][0]} to {scores[-1][0]}: silhouette of the fused "
             "partition less a structureless reference's (higher is better)"]
    for k, s in scores:
        mark = "  <- chosen" if k == chosen else ""
        if not math.isfinite(s):
            lines.append(f"{k:>7}  {'-':>7}  (not scored: clusters left empty, or no finite silhouette){mark}")
            continue
        bar = "#" * (1 + int(round((width - 1) * (s - low) / span)))
        lines.append(f"{k:>7}  {s:+.4f}  {bar}{mark}")
    return "\n".join(lines)
