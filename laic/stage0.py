"""Stage 0, the semantic space: noun filtering, text counterparts and neighbour graphs (spherical k-means is
``laic.kmeans``, the operand precision ``laic.operands``).

Everything here is training-free and runs on whichever device the features are on (CPU or CUDA); the heavy parts go
through ``laic_kernels`` (``similarity_topk`` for every nearest-centre assignment, ``semantic_mix`` for the text
counterparts, ``knn_graph`` / ``consistent_neighbours`` for the graphs).

The pieces, in the order :func:`build_semantic_space` runs them:
  1. centring: the features of one encoder share a large common direction (the "cone" of contrastive embeddings);
     subtracting the data mean and re-normalising spreads the clusters over the sphere. The mean is kept so that new
     images are centred the same way at predict time.
  2. noun filtering: about ``max(3K, N/300)`` semantic centres by spherical k-means on the images
     (:func:`noun_centres`); each noun goes to its nearest centre and each centre keeps its ``nouns_per_centre`` best
     nouns (:func:`filter_nouns`). Nouns far from every image group (most of a large vocabulary) are dropped.
  3. text counterparts: each image's softmax mixture of the kept nouns (``semantic_mix``, tau 0.005).
  4. neighbour graphs: k nearest neighbours in image space and in text space; the consistent neighbours are the
     image-space ones the text space agrees with.
  5. the agreement: how much the text space's neighbour lists agree with the image space's (see
     :func:`text_agreement`), beyond the agreement that a random vocabulary of the same size, filtered by the same
     centres, reaches (:func:`null_agreement`: a text counterpart is a function of its image, so even meaningless
     nouns agree somewhat, the more so for being the ones nearest the images). It sets the text modality's
     weight in the fused representation and in stage 1. A vocabulary that misses the domain maps different-looking
     images to the same few nouns, agrees no better than random nouns, and the text side then counts for nothing.
     Real nouns that miss the domain's own (breeds, textures) still agree locally (near images pick the same nearby
     nouns) while merging the domain's classes, so the weight is also scaled by the partition agreement
     (:func:`partition_agreement`): how far the K-means partitions of the image and text spaces agree (NMI) beyond
     the partition of the random vocabulary's text counterparts (:func:`text_weight_factor`). Where many rows are
     exact copies of others (``COPIED_SHARE_COUNTED_ONCE``) the neighbour agreement counts each image once.
  6. the fused representation (:func:`fused_features`): image and weighted text features, each smoothed over its
     image-space neighbours; spherical k-means on it is the training-free partition that stage 1 starts from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from laic_kernels import consistent_neighbours, semantic_mix
from laic_kernels.chunks import row_chunks
from laic_kernels.reference.consistent_neighbours import filter_neighbours, in_row

from . import profiling, relations as relational
from .distributed.knn import knn_graph as distributed_knn_graph, neighbour_mean
from .distributed.failure import CollectiveError
from .distributed.rows import RowBlocks, row_sample
# Stage 0's building blocks, importable from here as the stage's parts.
from .kmeans import KMeansResult, spherical_kmeans  # noqa: F401
from .inputs import first_equal_rows
from .operands import (BLOCK_ELEMENTS, fixed_directions, knn, lexicographic_order, n_candidates, operand_dtype,
                       rescored, top_similar, unit_operands, unit_rows)

TEXT_TAU = 0.005          # temperature of the noun mixture (text counterparts)
NOUNS_PER_CENTRE = 5      # nouns kept per semantic centre
N_NEIGHBOURS = 10         # neighbours per image in the graphs
NULL_AGREEMENT_ROWS = 16384   # rows sampled for the random-noun agreement beyond this N (see null_agreement)
# k-means restarts of each partition behind the partition agreement. One is enough: over 5 seeds the calibrated
# agreement's spread was about the same with 1 and with 3 restarts (0.01 to 0.03 on the dev sets), at a third of the
# cost (with 3 the agreement took 0.4 s of a 2.3 s fit on dtd-test).
PARTITION_INIT = 1
PARTITION_ROWS = 16384    # rows sampled for the partition agreement beyond this N (at least 20 a cluster)
# The text weight's ramp over the calibrated partition agreement (text_weight_factor): none at or below the low end,
# all of the neighbour agreement from the high end. Measured with the 7 dev sets below K = 1000 and vocabularies that
# miss their domain (benchmarks/quality.py --missing-nouns): see benchmarks/QUALITY.md.
PARTITION_AGREEMENT_RAMP = (0.15, 0.30)


# ------------------------------------------------------------------------------------------------------------------
# Nouns, text counterparts, graphs


def centre_features(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Unit rows of ``unit(features) - mean``: the same transform for fitting and for new images."""
    return unit_rows(unit_rows(features) - mean)


def n_semantic_centres(n_images: int, n_clusters: int) -> int:
    return min(n_images, max(3 * n_clusters, n_images // 300))


def noun_centres(images: torch.Tensor, n_clusters: int, *, seed: int = 0, group=None) -> torch.Tensor:
    """The semantic centres that choose the nouns (``[C, D]`` unit rows, C = :func:`n_semantic_centres`): spherical
    k-means on the images, one restart and a few iterations (only their rough layout matters), plain (not greedy)
    seeding: with thousands of centres the greedy trials would dominate stage 0's time for no visible gain here.
    With ``group``, ``images`` is this rank's block of rows and every rank gets the same centres. A centre for
    every image (fewer than 3 images a cluster) is every image: a k-means with one centre a row ends there, after
    its seeding's N draws (20 s of a fit at N = 10,000, K = 5,000)."""
    rows = RowBlocks(images.shape[0], group)
    n_centres = n_semantic_centres(rows.n_rows, n_clusters)
    if n_centres == rows.n_rows:
        return rows.all_gather(unit_rows(images))
    return spherical_kmeans(unit_rows(images), n_centres, n_init=1, max_iter=10, seed=seed, greedy=False,
                            group=group).centres


def filter_nouns(nouns: torch.Tensor, centres: torch.Tensor, nouns_per_centre: int = NOUNS_PER_CENTRE
                 ) -> torch.Tensor:
    """Indices (int64, in :func:`in_canonical_order`) of the nouns that describe the images: each noun goes to its
    nearest semantic centre (:func:`noun_centres`) and each centre keeps its ``nouns_per_centre`` most similar
    nouns. Nouns far from every image group (most of a large vocabulary) are dropped."""
    units = unit_rows(nouns)
    sims, nearest = top_similar(units, centres, 1)
    sims, nearest = sims[:, 0], nearest[:, 0]
    # Sort by (centre, -similarity, a key of the noun's values); the rank within each centre's run decides what is
    # kept. The key breaks ties of similarity (nouns a rounding apart under two names) by value, not by the
    # vocabulary's order.
    order = torch.argsort(_value_key(units), stable=True)
    order = order[torch.argsort(sims[order], descending=True, stable=True)]
    order = order[torch.argsort(nearest[order], stable=True)]
    sorted_centres = nearest[order]
    run_start = torch.searchsorted(sorted_centres, sorted_centres, right=False)
    rank = torch.arange(len(order), device=order.device) - run_start
    return in_canonical_order(nouns, order[rank < nouns_per_centre])


def _value_key(units: torch.Tensor) -> torch.Tensor:
    """A number of each row that only equal rows share (up to a float64 coincidence): its projection on a fixed
    direction."""
    direction = fixed_directions(units.shape[1], 1)[:, 0].to(units.device)
    return torch.cat([block.double() @ direction for block in units.split(8192)])   # 32 MB at D = 512


def in_canonical_order(nouns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``index`` (rows of ``nouns``) reordered by their unit rows' values (lexicographically: first coordinate, then
    second, ...), an order of the noun set that the vocabulary's row order does not change. The kept nouns' order
    is that of every sum over them (the counterparts' mixtures, the noun span's basis) and such a sum's rounding
    moves the fit as a seed does: a vocabulary given in another order (a list made from a Python set is in another
    order in every process) gave another partition (ARI 0.69 on dtd-val against the same nouns in file order).
    Only copies of one direction tie (kept in the given order, and the same vector either way)."""
    return index[lexicographic_order(unit_rows(nouns.index_select(0, index)))]


def text_counterparts(images: torch.Tensor, nouns: torch.Tensor, tau: float = TEXT_TAU) -> torch.Tensor:
    """Each image's text counterpart (float32): the unit softmax mixture of the nouns (``semantic_mix``, operands
    in :func:`operand_dtype`: the mixture is a weighted mean, not a choice, and bfloat16 moves it by a cosine of
    4e-6 in the median, 4e-4 at most, on caltech101-val)."""
    return semantic_mix(unit_operands(images), unit_operands(nouns), tau)


def text_agreement(image_neighbours: torch.Tensor, text_neighbours: torch.Tensor,
                   rows: Optional[RowBlocks] = None, n_rows: Optional[int] = None) -> float:
    """Fraction of image-space neighbours that are also text-space neighbours, rescaled so that chance is 0 and
    identical graphs are 1 (clipped to [0, 1]). Chance overlap of two random k-lists among N-1 rows is k/(N-1).
    With ``rows`` (the row blocks of a process group) the lists are this rank's and the fraction is over all rows.
    In one process, ``n_rows`` is N when the lists are those of a sample of the rows (default: the lists' length)."""
    n, k = image_neighbours.shape
    both = in_row(image_neighbours, text_neighbours).float()
    if rows is not None and rows.distributed:
        n = rows.n_rows
        overlap = rows.total(both) / (n * k)
    else:
        n = n if n_rows is None else n_rows
        overlap = float(both.mean())
    chance = k / max(1, n - 1)
    if chance >= 1.0:       # every list holds every other row: the graphs carry no information
        return 0.0
    return max(0.0, min(1.0, (overlap - chance) / (1.0 - chance)))


# Two 64-bit hashes a row (over its float32 bits, random odd coefficients, mod 2^64): rows that agree in both are
# taken for copies of each other. Two different rows agree by chance with odds of about 2^-128, or 2^-66 for rows whose
# bits differ in multiples of 2^31 only (a row and its sign-flipped copy).
_HASH_SEED = 20261205


def _row_hashes(bits: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` int64: each row of int32 ``bits`` times each column of ``coefficients`` ``[D, 2]``, its products
    and sums wrapping around (mod 2^64). On the CPU numpy's integer matrix product (6x torch's products and sums:
    0.2 against 1.3 s at 100k x 512, 2 threads, an ad hoc timing; every fit hashes its rows); CUDA has no integer
    matrix product."""
    if bits.device.type == "cpu":
        return torch.from_numpy(bits.numpy().astype(np.int64) @ coefficients.numpy())
    return _row_hashes_by_products(bits, coefficients)


def _row_hashes_by_products(bits: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    block = bits.to(torch.int64)
    return torch.stack([(block * coefficients[:, h]).sum(1) for h in range(coefficients.shape[1])], dim=1)


def first_copies(images: torch.Tensor, rows: Optional[RowBlocks] = None) -> torch.Tensor:
    """Bool ``[n]``: which of this rank's rows are the first copy of their image among all ranks' rows (in rank
    order); a row repeating an earlier one exactly (the same image twice) is False. By the rows' bits, hashed in row
    blocks: any number of processes agrees with one."""
    rows = rows if rows is not None else RowBlocks(images.shape[0])
    own = torch.arange(rows.start, rows.start + images.shape[0], device=images.device)
    return first_copy_index(images, rows) == own


def first_copy_index(images: torch.Tensor, rows: Optional[RowBlocks] = None) -> torch.Tensor:
    """Int64 ``[n]``: for each of this rank's rows, the index among all ranks' rows (in rank order) of the first row
    equal to it bit for bit: its own where no earlier row repeats it (see :func:`first_copies`)."""
    rows = rows if rows is not None else RowBlocks(images.shape[0])
    bits = images.float().contiguous().view(torch.int32)
    coefficients = torch.from_numpy(np.random.default_rng(_HASH_SEED).integers(
        -2**63, 2**63 - 1, size=(bits.shape[1], 2), dtype=np.int64) | 1).to(images.device)
    hashes = torch.empty(bits.shape[0], 2, dtype=torch.int64, device=images.device)
    for start, stop in row_chunks(bits.shape[0], 2 * bits.shape[1], BLOCK_ELEMENTS):
        hashes[start:stop] = _row_hashes(bits[start:stop], coefficients)
    return first_equal_rows(rows.all_gather(hashes))[rows.start:rows.start + images.shape[0]]


def distinct_images(images: torch.Tensor, rows: RowBlocks) -> Optional[torch.Tensor]:
    """:func:`first_copies` of this rank's rows, or None where no row of any rank repeats another."""
    first = first_copies(images, rows)
    return None if rows.total(~first) == 0 else first


# From this share of the rows repeating others the neighbour agreement is measured among the distinct images, on
# graphs of their own (the graph step's work again). Copies of an image fill each other's lists in every space alike,
# real nouns' or random ones' (exact copies tie, and the lower index wins in each), so they say nothing of the nouns:
# half the demo's rows copies of 30 of its images gave a raw agreement of 0.24 against the random nouns' 0.40, and
# the text side was dropped with a warning blaming the nouns; food101-train with 9 copies to each image, the same.
# Below it they move the agreement about as a reseeding does (12-06, ad hoc: 9-23% copies of a few rows of
# cifar10-500, dtd-val and food101-train moved it by 0.01 to 0.02; 33% of cifar10-500 by 0.03).
COPIED_SHARE_COUNTED_ONCE = 0.1


def _agreement_among(distinct: torch.Tensor, images: torch.Tensor, texts: torch.Tensor, k: int, rows: RowBlocks):
    """(the distinct images' row blocks, their image-space lists among themselves, the raw agreement of their image
    and text graphs): what :func:`text_agreement` and :func:`null_agreement` read where many images repeat
    (``COPIED_SHARE_COUNTED_ONCE``)."""
    blocks = RowBlocks(int(distinct.sum()), rows.group, width=images.shape[1])
    k = min(k, blocks.n_rows - 1)
    _, _, image_nbrs, text_nbrs = _graphs(images[distinct], texts[distinct], k, blocks)
    return blocks, image_nbrs, text_agreement(image_nbrs, text_nbrs, blocks)



# ------------------------------------------------------------------------------------------------------------------
# The whole stage


@dataclass
class SemanticSpace:
    """What stage 0 hands to stage 1 (all tensors on the features' device)."""

    mean: torch.Tensor               # [D] mean of the unit image features (centring for new images)
    images: torch.Tensor             # [N, D] centred unit image features
    texts: torch.Tensor              # [N, D] centred unit text counterparts
    text_mean: torch.Tensor          # [D] mean of the raw text counterparts (centring for new images)
    noun_index: torch.Tensor         # [M'] indices of the kept nouns in the vocabulary
    nouns: torch.Tensor              # [M', D] unit embeddings of the kept nouns
    image_neighbours: torch.Tensor   # [N, k] image-space neighbours, best first
    text_neighbours: torch.Tensor    # [N, k] text-space neighbours, best first
    neighbours: torch.Tensor         # [N, k] consistent neighbours, -1 padded
    neighbour_mask: torch.Tensor     # [N, k] bool, at least one True per row
    agreement: float                 # neighbour overlap of the two spaces beyond a random vocabulary's, in [0, 1]
    # The rows' blocks: with a process group the [N, ...] tensors here are this rank's block of rows (neighbour
    # indices are global), while means, nouns and agreements are those of all rows.
    rows: RowBlocks
    raw_agreement: float = 0.0       # chance-corrected overlap with the real nouns (over agreement_images)
    null_agreement: float = 0.0      # the same with random nouns (see null_agreement)
    neighbour_agreement: float = 0.0  # raw_agreement calibrated by null_agreement
    partition_agreement: float = 0.0  # calibrated NMI of the image and text partitions (partition_agreement)
    partition_null_nmi: float = 0.0   # the NMI of the image and random nouns' partitions behind it
    text_weight_factor: float = 1.0   # agreement = neighbour_agreement x this (0 without text)
    raw_texts: Optional[torch.Tensor] = None  # [N, D] unit text counterparts before centring, when asked for
    relations: Optional[torch.Tensor] = None  # [N, D] unit relation features (laic.relations), when made
    relation_map: Optional[torch.Tensor] = None  # [D, D] the map that makes them from centred images
    noun_weighting: Optional[relational.NounWeighting] = None  # how the map weights the kept nouns
    noun_basis: Optional[torch.Tensor] = None  # [D, M'] orthonormal basis of the kept nouns' span (noun_span_basis)
    distinct: Optional[torch.Tensor] = None  # [n] bool, the first copy of each image (distinct_images); None: no copies
    agreement_images: int = 0        # the images the neighbour agreement counts: all, or the distinct where many repeat
    images_in_noun_span: bool = False  # the image rows lie in that span (the relation features: relations.fused_view)

    @property
    def text_weight(self) -> float:
        """Scale of the text rows in the fused space: the cosine of two fused rows is then
        ``(s_image + agreement * s_text) / (1 + agreement)``, i.e. text similarity counts as much as it agrees."""
        return math.sqrt(self.agreement)


def text_features(images: torch.Tensor, nouns: torch.Tensor, text_mean: torch.Tensor, tau: float = TEXT_TAU
                  ) -> torch.Tensor:
    """Centred unit text counterparts of (unit, uncentred) images: the same transform at fit and predict time."""
    return unit_rows(text_counterparts(images, nouns, tau) - text_mean)


# Unit rows less than this apart (Euclidean) are one direction up to float32 rounding (about 1e-7 for unit rows of
# D = 512). Measured on the difference: a test of their cosine against 1 - 1e-6 sat at float32's resolution near 1,
# and refused rows 1e-3 apart (features sharing an offset of 1000 times their spread: k-means on them was fine).
SAME_DIRECTION = 1e-5


def check_directions_differ(x: torch.Tensor, rows: RowBlocks) -> None:
    """Refuse unit rows ``x`` (this rank's block of ``rows``) that all point one way: centring leaves them rounding
    noise, and every partition of noise is as good as any other (the K search scored NaN and failed on it)."""
    first = rows.take(x, torch.zeros(1, dtype=torch.int64, device=x.device))
    apart = torch.zeros(1, dtype=torch.int64, device=x.device)
    for start, stop in row_chunks(x.shape[0], x.shape[1], BLOCK_ELEMENTS):   # no N x D difference at once
        apart += ((x[start:stop] - first).norm(dim=1) > SAME_DIRECTION).sum()
    apart = rows.sum_(apart)
    if int(apart[0]) == 0:
        raise CollectiveError(f"image_features: all {rows.n_rows} rows point the same way (each scaled to unit "
                              "length), so there is nothing to cluster; pass features of different images")


def build_semantic_space(image_features: torch.Tensor, noun_features: torch.Tensor, n_clusters: int, *,
                         seed: int = 0, n_neighbours: int = N_NEIGHBOURS, tau: float = TEXT_TAU,
                         nouns_per_centre: int = NOUNS_PER_CENTRE, keep_raw_texts: bool = False,
                         neighbour_filter: str = "text", use_text: bool = True,
                         partition_weighting: bool = True, usage_weighting="auto",
                         group=None) -> SemanticSpace:
    """Stage 0 on ``image_features [N, D]``; with ``group`` (a torch.distributed process group) on this rank's block
    of rows, the graphs, means and agreements being those of all ranks' rows together. ``neighbour_filter`` is the
    space whose kNN graph filters the image-space neighbours into the consistent ones (``laic.relations.
    NEIGHBOUR_FILTERS``; the "relation" filter makes the relation features here and keeps them in the space, every
    other use makes them after stage 0: ``laic.relations.with_relations``).
    ``use_text=False`` (the image-only ablation) sets the agreement to 0 and skips the partition agreement;
    ``partition_weighting=False`` (its ablation) skips it too and keeps the neighbour agreement as the weight.
    ``usage_weighting`` ('auto', True, False) weights the nouns of the relation features by their usage at ``tau``
    (``laic.relations.noun_weighting``)."""
    relational.check_neighbour_filter(neighbour_filter)
    x = unit_rows(image_features)
    rows = RowBlocks(x.shape[0], group, width=x.shape[1])
    check_directions_differ(x, rows)
    with profiling.step("noun filtering", "k-means"):
        centres = noun_centres(x, n_clusters, seed=seed, group=group)
        noun_index = filter_nouns(noun_features, centres, nouns_per_centre)
    nouns = unit_rows(noun_features[noun_index])
    basis = shared_span_basis(nouns, rows)
    mean = row_mean(x, rows)
    with profiling.step("text counterparts", "counterparts"):
        raw_text = text_counterparts(x, nouns, tau)
    text_mean = row_mean(raw_text, rows)
    images = unit_rows(x - mean)
    texts = unit_rows(raw_text - text_mean)
    k = min(n_neighbours, rows.n_rows - 1)
    with profiling.step("neighbour graphs", "graphs"):
        text_coordinates = in_basis(texts, basis)
        neighbours, mask, image_nbrs, text_nbrs = _graphs(images, text_coordinates, k, rows)
        distinct = distinct_images(images, rows)   # (the K search counts each image once)
        counted = None   # the agreements' rows: all, or the distinct images where many repeat
        if distinct is not None and rows.total(distinct) < (1 - COPIED_SHARE_COUNTED_ONCE) * rows.n_rows:
            counted = distinct
            among, among_nbrs, raw = _agreement_among(distinct, images, text_coordinates, k, rows)
        else:
            among, among_nbrs, raw = rows, image_nbrs, text_agreement(image_nbrs, text_nbrs, rows)
        del text_coordinates   # (not held through the steps below: N x M' floats where the nouns' span is smaller)
    rmap = rel = weighting = None
    if neighbour_filter == "relation":
        rmap, rel, weighting = relational.made_relations(images, nouns, usage_weighting, tau, n_clusters, rows)
    if neighbour_filter != "text":
        with profiling.step("neighbour filter", "graphs"):
            neighbours, mask = relational.filtered_neighbours(image_nbrs, rel, neighbour_filter, rows)
    with profiling.step("null agreement (random nouns)", "graphs"):
        null_texts = null_text_features(x, centres, noun_features.shape[0], nouns_per_centre, tau, seed, rows)
        null = null_agreement(null_texts if counted is None else null_texts[counted], among_nbrs, seed, among)
    partitions, null_nmi, factor = 0.0, 0.0, float(use_text)
    if use_text and partition_weighting:
        with profiling.step("partition agreement", "k-means"):
            real_nmi, null_nmi = partition_nmis(images, texts, null_texts, n_clusters, seed, rows,
                                                text_basis=basis)
        partitions = calibrated_agreement(real_nmi, null_nmi)
        factor = text_weight_factor(partitions)
    del null_texts
    neighbour = calibrated_agreement(raw, null)
    return SemanticSpace(mean=mean, images=images, texts=texts, text_mean=text_mean, noun_index=noun_index,
                         nouns=nouns, image_neighbours=image_nbrs, text_neighbours=text_nbrs, neighbours=neighbours,
                         neighbour_mask=mask, agreement=neighbour * factor, raw_agreement=raw,
                         null_agreement=null, neighbour_agreement=neighbour, partition_agreement=partitions,
                         partition_null_nmi=null_nmi,
                         text_weight_factor=factor, raw_texts=raw_text if keep_raw_texts else None, rows=rows,
                         relations=rel, relation_map=rmap, noun_weighting=weighting, noun_basis=basis,
                         distinct=distinct, agreement_images=among.n_rows)


def row_mean(x: torch.Tensor, rows: RowBlocks) -> torch.Tensor:
    """The mean row of all ranks' rows (of ``x`` in one process), in the dtype of ``x``.

    Summed in float64, a row block at a time: a float32 sum depends in its last bits on how the rows are split over
    ranks, and the demo's text counterparts (near-duplicates) reordered their neighbour lists on that difference
    (80 of 750 labels moved between 1 and 2 processes). Rounded once from float64, the mean is the same whatever the
    split (but for a float64 sum that falls within 1e-16 of a float32 rounding boundary)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start, stop in row_chunks(x.shape[0], x.shape[1], BLOCK_ELEMENTS):
        total += x[start:stop].sum(0, dtype=torch.float64)
    return (rows.sum_(total) / rows.n_rows).to(x.dtype)


def _graphs(images: torch.Tensor, texts: torch.Tensor, k: int, rows: RowBlocks):
    """(consistent neighbours, mask, image-space lists, text-space lists) of this rank's rows. ``texts`` may come in
    fewer columns than ``images`` (their coordinates in the kept nouns' span, :func:`noun_span_basis`)."""
    if not rows.distributed:
        # Both graphs and their intersection in one pass (one fused kernel on GPU); the full lists are kept too.
        dtype = operand_dtype(images.device)
        if dtype == torch.float32:
            return consistent_neighbours(images, texts, k, return_graphs=True)
        # Half precision: both graphs' candidates in the one pass, then the float32 choice (laic.operands.knn).
        wide = n_candidates(k, rows.n_rows, exclude_self=True)
        _, _, image_candidates, text_candidates = consistent_neighbours(images.to(dtype), texts.to(dtype), wide,
                                                                        return_graphs=True)
        _, image_nbrs = rescored(images, images, image_candidates, k)
        _, text_nbrs = rescored(texts, texts, text_candidates, k)
        return (*filter_neighbours(image_nbrs, text_nbrs), image_nbrs, text_nbrs)
    _, image_nbrs = distributed_knn_graph(images, k, rows.group)
    _, text_nbrs = distributed_knn_graph(texts, k, rows.group)
    return (*filter_neighbours(image_nbrs, text_nbrs), image_nbrs, text_nbrs)


def random_vocabulary(n_nouns: int, dim: int, seed: int) -> torch.Tensor:
    """``n_nouns`` random directions (float32, on the CPU, the same on every rank and device): a vocabulary without
    meaning, the null of the agreement (:func:`null_agreement`)."""
    return torch.randn(n_nouns, dim, generator=torch.Generator().manual_seed(int(seed) + 1), dtype=torch.float32)


def null_text_features(images: torch.Tensor, centres: torch.Tensor, vocabulary_size: int, nouns_per_centre: int,
                       tau: float, seed: int, rows: Optional[RowBlocks] = None) -> torch.Tensor:
    """Centred unit text counterparts of the unit ``images`` made from a vocabulary without meaning:
    ``vocabulary_size`` random directions (:func:`random_vocabulary`) in place of the nouns, filtered by the same
    semantic ``centres`` as the real nouns (as :func:`build_semantic_space` makes them from real nouns). The null of
    both agreements (:func:`null_agreement`, :func:`partition_agreement`)."""
    rows = rows if rows is not None else RowBlocks(images.shape[0])
    vocabulary = random_vocabulary(vocabulary_size, images.shape[1], seed).to(images.device)
    kept = unit_rows(vocabulary[filter_nouns(vocabulary, centres, nouns_per_centre)])
    texts = text_counterparts(images, kept, tau)
    return in_basis(unit_rows(texts - row_mean(texts, rows)), shared_span_basis(kept, rows))


def null_agreement(null_texts: torch.Tensor, image_neighbours: torch.Tensor, seed: int,
                   rows: Optional[RowBlocks] = None, max_rows: int = NULL_AGREEMENT_ROWS) -> float:
    """The agreement that a vocabulary without meaning reaches: that of the text counterparts of random nouns
    (``null_texts``, :func:`null_text_features`). Any text counterpart is a function of the image, so even
    meaningless nouns partly agree with the image space (nearby images pick the same random noun); only agreement
    beyond this level is evidence from language. The filtering is part of the null on purpose: keeping the few random
    directions nearest each image group makes them agree more (0.116 against 0.066 unfiltered on cifar10-500, 5 of
    1403 kept per centre), and without it the selection itself passed for evidence (a random vocabulary calibrated to
    0.05 there, and cost 1.6 ACC points against image-only k-means).
    It is a mean over rows: in one process beyond ``max_rows`` rows, the mean over a random sample of them (their
    neighbours among all rows), which costs ``max_rows x N`` products instead of a whole ``N x N`` graph."""
    rows = rows if rows is not None else RowBlocks(null_texts.shape[0])
    n, k = image_neighbours.shape
    if rows.distributed:
        _, text_nbrs = distributed_knn_graph(null_texts, k, rows.group)
        return text_agreement(image_neighbours, text_nbrs, rows)
    if n <= max_rows:
        _, text_nbrs = knn(null_texts, k)
        return text_agreement(image_neighbours, text_nbrs)
    sample = row_sample(n, max_rows, torch.Generator().manual_seed(int(seed) + 1), null_texts.device)
    _, found = top_similar(null_texts[sample], null_texts, k + 1)
    # Each row's k best other rows: itself dropped wherever it is among the k + 1 (a stable sort keeps the order).
    others = torch.sort((found == sample[:, None]).to(torch.int8), dim=1, stable=True).indices[:, :k]
    return text_agreement(image_neighbours[sample], found.gather(1, others), n_rows=n)


def partition_nmi(first: torch.Tensor, second: torch.Tensor, n_clusters: int, rows: Optional[RowBlocks] = None
                  ) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) of two labelings of the same rows into
    ``n_clusters`` clusters; with ``rows`` (a process group's row blocks) the labels are this rank's and the NMI is
    over all rows. The joint counts are kept only for the label pairs that occur (at most N of them, never K x K)."""
    rows = rows if rows is not None else RowBlocks(first.shape[0])
    first, second = first.long(), second.long().to(first.device)
    pairs, counts = rows.value_counts(first * n_clusters + second)
    total = float(rows.n_rows)
    first_sizes = rows.sum_(torch.bincount(first, minlength=n_clusters)).double() / total
    second_sizes = rows.sum_(torch.bincount(second, minlength=n_clusters)).double() / total

    def entropy(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_first, h_second = entropy(first_sizes), entropy(second_sizes)
    if h_first + h_second == 0:
        return 1.0   # one cluster each: the same partition
    joint = counts.double() / total
    outer = first_sizes[pairs // n_clusters] * second_sizes[pairs % n_clusters]
    mutual = float((joint * (joint / outer).log()).sum())
    return max(0.0, mutual / ((h_first + h_second) / 2))


def partition_agreement(images: torch.Tensor, texts: torch.Tensor, null_texts: torch.Tensor, n_clusters: int,
                        seed: int, rows: Optional[RowBlocks] = None, text_basis: Optional[torch.Tensor] = None
                        ) -> float:
    """How far the text space's K-means partition agrees with the image space's beyond what a meaningless
    vocabulary's does: :func:`partition_nmis` calibrated (0: no better than random nouns, 1: the same partition)."""
    return calibrated_agreement(*partition_nmis(images, texts, null_texts, n_clusters, seed, rows, text_basis))


def partition_nmis(images: torch.Tensor, texts: torch.Tensor, null_texts: torch.Tensor, n_clusters: int,
                   seed: int, rows: Optional[RowBlocks] = None, text_basis: Optional[torch.Tensor] = None
                   ) -> Tuple[float, float]:
    """The NMI of the image space's K-means partition with the text space's and with the random nouns'
    ``null_texts``' (spherical k-means, ``PARTITION_INIT`` restart): :func:`partition_agreement` calibrates the
    first by the second.

    Why beside the neighbour agreement: real nouns that miss the domain's own (pet breeds, textures) still agree
    locally, since near images pick the same nearby nouns, but they merge the domain's classes. Measured with
    ``benchmarks/quality.py --missing-nouns`` (the 20 nouns nearest each class left out): on dtd-val the neighbour
    agreement hardly moves (0.17 to 0.14) while the calibrated partition agreement falls from 0.26 to 0.18, and on
    cifar10-500 from 0.48 to 0.27.

    In one process beyond ``max(PARTITION_ROWS, 20 K)`` rows, the partitions are those of a uniform sample of that
    many rows (at N = 100k, K = 100 the three k-means on all rows took 14 s of a 5.6 min fit). On a process group
    every row counts, as for :func:`null_agreement`. With ``text_basis`` (:func:`noun_span_basis`) the text
    partition is computed on the texts' coordinates in the kept nouns' span (the same dot products)."""
    group = rows.group if rows is not None else None
    n_rows = images.shape[0] if rows is None else rows.n_rows
    sample_size = max(PARTITION_ROWS, 20 * n_clusters)
    if not (rows is not None and rows.distributed) and n_rows > sample_size:
        sample = row_sample(n_rows, sample_size, torch.Generator().manual_seed(int(seed) + 2), images.device)
        images, texts, null_texts = (x.index_select(0, sample) for x in (images, texts, null_texts))
        rows = None
    labels = [spherical_kmeans(space, n_clusters, n_init=PARTITION_INIT, seed=seed, group=group).labels
              for space in (images, in_basis(texts, text_basis), null_texts)]
    return (partition_nmi(labels[0], labels[1], n_clusters, rows),
            partition_nmi(labels[0], labels[2], n_clusters, rows))


def text_weight_factor(partition_agreement: float, ramp=PARTITION_AGREEMENT_RAMP) -> float:
    """The share of the neighbour agreement that the text side keeps, given the calibrated partition agreement: 0 at
    or below ``ramp[0]``, 1 from ``ramp[1]``, linear between (a ramp, not a threshold: a set near the line is not
    flipped between two methods by a restart's noise)."""
    low, high = ramp
    return min(1.0, max(0.0, (partition_agreement - low) / (high - low)))


def calibrated_agreement(raw: float, null: float) -> float:
    """Agreement beyond the meaningless-vocabulary level, rescaled to [0, 1]."""
    return max(0.0, min(1.0, (raw - null) / (1.0 - null))) if null < 1.0 else 0.0


def n_smoothing_neighbours(n_images: int, n_clusters: int, n_neighbours: int) -> int:
    """Neighbours averaged into each row of the fused space: at most as many as a cluster of average size has
    besides the row itself (N/K - 1), so that small clusters (e.g. 4 images per class) are not blurred together;
    none below two rows a cluster on average (two mutual nearest neighbours would become one point)."""
    return max(0, min(n_neighbours, n_images // n_clusters - 1))


def noun_span_basis(nouns: torch.Tensor) -> Optional[torch.Tensor]:
    """An orthonormal basis ``[D, M']`` (float32) of the span of the ``M'`` kept nouns ``[M', D]``, where it saves
    columns: None when ``M' >= D``, and None when the kernels take half-precision operands
    (``laic.operands.operand_dtype``: the text counterparts are then mixtures of the rounded nouns, off the span by
    the rounding).

    Why: every text counterpart is a mixture of the kept nouns centred by the mean of such mixtures, and every
    relation feature is ``G^(1/2) x`` with the range of ``G`` in the nouns' span (``laic.relations``), so their rows
    lie in it, and their coordinates in the basis (:func:`in_basis`) have the same dot products in M' columns
    instead of D. Spherical k-means reads nothing but dot products: on the coordinates it finds the same partitions
    (up to float rounding) for fewer multiply-adds (food101-train, M' = 74: the fused space's 1024 columns become
    148)."""
    n_nouns, dim = nouns.shape
    if n_nouns >= dim or operand_dtype(nouns.device) != torch.float32:
        return None
    # Householder QR: orthonormal columns whose span holds the nouns', even where nouns repeat or depend.
    basis, _ = torch.linalg.qr(nouns.double().t())
    return basis.float()


def shared_span_basis(nouns: torch.Tensor, rows: RowBlocks) -> Optional[torch.Tensor]:
    """:func:`noun_span_basis` of ``nouns``, rank 0's on every rank of a process group: each rank's coordinates
    must be in the same basis (a QR of the same nouns on another machine's LAPACK may differ in the last bits)."""
    basis = noun_span_basis(nouns)
    return basis if basis is None else rows.broadcast_from_main(basis)


def in_basis(rows: torch.Tensor, basis: Optional[torch.Tensor]) -> torch.Tensor:
    """The coordinates of ``rows`` in the orthonormal ``basis`` (their own when None)."""
    return rows if basis is None else rows @ basis


def fused_features(space: SemanticSpace, n_clusters: int) -> torch.Tensor:
    """The training-free fused representation ``[smooth(images), text_weight * smooth(texts)]``, float32, ``[N, 2D]``
    or fewer columns: a part whose rows lie in the kept nouns' span (the texts; the images where they are the
    relation features) comes in that span's coordinates, ``space.noun_basis`` (:func:`noun_span_basis`), where
    there is one: the same dot products, so the same k-means, in fewer columns.

    ``smooth`` adds to each row the mean of its nearest image-space neighbours (one step of feature propagation on
    the kNN graph: it pulls each point towards its local mode, which k-means then separates more easily). One
    process streams the rows in blocks: the neighbour rows gathered at once are a block's, never all ``[N, k, D]``
    of them; on a process group ``laic.distributed.neighbour_mean`` passes the other ranks' rows round the ring."""
    n_local, dim = space.images.shape
    group = space.rows.group
    nbrs = space.image_neighbours[:, :n_smoothing_neighbours(space.rows.n_rows, n_clusters,
                                                             space.image_neighbours.shape[1])]
    image_basis = space.noun_basis if space.images_in_noun_span else None
    text_basis = space.noun_basis
    image_width = dim if image_basis is None else image_basis.shape[1]
    text_width = dim if text_basis is None else text_basis.shape[1]
    fused = torch.empty(n_local, image_width + text_width, dtype=torch.float32, device=space.images.device)
    blocks = [(0, n_local)] if space.rows.distributed else row_chunks(n_local, nbrs.shape[1] * dim, BLOCK_ELEMENTS)
    for start, stop in blocks:
        block = nbrs[start:stop]
        images, texts = space.images[start:stop], space.texts[start:stop]
        if block.shape[1]:
            images = images + neighbour_mean(space.images, block, group)
            texts = texts + neighbour_mean(space.texts, block, group)
        fused[start:stop, :image_width] = in_basis(unit_rows(images), image_basis)
        fused[start:stop, image_width:] = space.text_weight * in_basis(unit_rows(texts), text_basis)
    return fused
