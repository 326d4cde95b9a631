"""Spherical k-means (cosine similarity, unit centres), in one process or over a torch.distributed process group:
greedy k-means++ seeding that reads nothing back to the host, restarts, Lloyd iterations in row blocks with a
convergence check that reads the device only every few iterations on a GPU."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from laic_kernels import checks
from laic_kernels.chunks import row_chunks

from .distributed.failure import stop_all_on_failure
from .distributed.rows import RowBlocks, group_size, row_sample
from .operands import BLOCK_ELEMENTS, operand_dtype, top_similar, unit_rows
from .runtime import MAX_SEED

SEED_SAMPLE_ROWS = 16384   # k-means++ seeds from a sample of this many rows (or 20 per cluster) beyond that N
# Candidate centres re-scored in float32 beyond the nearest in half precision (laic.operands.top_similar): a few
# suffice for one nearest centre, and every Lloyd iteration gathers them for all N rows.
ASSIGNMENT_MARGIN = 3


@dataclass
class KMeansResult:
    labels: torch.Tensor      # [N] int64
    centres: torch.Tensor     # [K, D] float32, unit rows
    objective: float          # sum over points of the cosine similarity to their centre (higher is better)
    n_iter: int               # Lloyd iterations of the best restart


# ------------------------------------------------------------------------------------------------------------------
# Spherical k-means

# Lloyd iterations between two convergence checks on a GPU: a check reads one flag from the device (a host sync
# that drains the launch queue); the iterations after convergence until the next check leave labels and centres
# unchanged (they are frozen on device), at the cost of their assignment pass.
LLOYD_CHECK_EVERY = 4
# An empty cluster is re-seeded with a row only where that row's cosine to its centre is below 1 by more than this:
# about 8 float32 roundings at 1, the most a copy's cosine to its copies' normalised sum is off (see _reseed_empty).
RESEED_MIN_GAIN = 1e-6


def lloyd_check_every(device: torch.device) -> int:
    """Iterations between convergence checks: LLOYD_CHECK_EVERY on CUDA; every iteration on the CPU, where reading a
    value costs nothing (no queue to drain) and an extra iteration costs a whole pass over the rows."""
    return LLOYD_CHECK_EVERY if torch.device(device).type == "cuda" else 1


def weighted_draws(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row indices drawn with probability proportional to ``weights`` (``[N]``, non-negative; uniform over all
    rows where they sum to zero), one per entry of ``uniforms`` (``[T]``, uniform in [0, 1), on the same device):
    inverse transform sampling on the float64 cumulative sums, so that nothing is read back to the host (a
    ``torch.multinomial`` over a CPU generator needs the weights on the host). A row of zero weight is never drawn.
    Batched alike: ``weights`` ``[S, N]`` and ``uniforms`` ``[S, T]`` give ``[S, T]`` draws, row s from weights s."""
    weights = weights.double()
    cumulative = (weights + (weights.sum(-1, keepdim=True) == 0)).cumsum(-1)     # all zero: a weight of 1 each
    total = cumulative[..., -1:]
    # Below the total, also where u * total rounds up to it: the last row drawn is the last of positive weight.
    targets = torch.minimum(uniforms.double() * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cumulative, targets, right=True)


def n_trials(k: int, greedy: bool = True) -> int:
    """Candidates a k-means++ step draws: ``2 + log k`` greedy (as scikit-learn), else one."""
    return 2 + int(math.log(k)) if greedy else 1


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator, greedy: bool = True,
               gram: Optional[torch.Tensor] = None, n_starts: int = 1) -> torch.Tensor:
    """``[n_starts, k, D]``: ``n_starts`` k-means++ seedings with cosine distance ``1 - x·c``; ``greedy`` (as
    scikit-learn) draws ``2 + log k`` candidates per step and keeps the one that most lowers the potential, else one
    candidate per step. ``gram`` (``x @ x.T``, optional) replaces the per-step products by row lookups. Distances
    are float32 whatever the dtype of ``x``. The random numbers are drawn up front from ``generator`` (a CPU one),
    seeding after seeding, and copied once: the k steps then read nothing back to the host (on a GPU each read would
    drain the launch queue, k times a seeding).

    The seedings step in lockstep, in groups whose candidates' distances fit a block of BLOCK_ELEMENTS: one product
    of all their candidates with ``x`` a step reads ``x`` once for the group instead of once a seeding (3x faster at
    N = 10k, K = 100, D = 512, 10 seedings, one CPU thread). Each seeding is the one it would be alone on the same
    generator state: on the CPU bit for bit where the distances are read from ``gram``; from products, up to their
    rounding (a BLAS may round a row's product otherwise in a larger batch), which decides a draw only between rows
    at equal distance up to it, such as copies of one row: there a seeding may pick another copy (the same
    potential). On a GPU the potentials' sums and cumulative sums may also round otherwise for another count of
    seedings (its reductions split the work by the number of outputs), which decides between candidates whose
    potentials are that close."""
    n, trials = x.shape[0], n_trials(k, greedy)
    draws = [(torch.randint(n, (1,), generator=generator, device="cpu"),
              torch.rand(max(k - 1, 0), trials, dtype=torch.float64, generator=generator, device="cpu"))
             for _ in range(n_starts)]
    group = max(1, BLOCK_ELEMENTS // (trials * n))
    return torch.cat([_lockstep_seedings(x, k, trials, draws[at:at + group], gram)
                      for at in range(0, n_starts, group)])


def _lockstep_seedings(x: torch.Tensor, k: int, trials: int, draws, gram: Optional[torch.Tensor]) -> torch.Tensor:
    """The k-means++ seedings of :func:`_kmeans_pp` for ``draws`` (one first row and ``[k - 1, trials]``
    uniforms a seeding), stepped together: ``[S, k, D]``."""
    n, s = x.shape[0], len(draws)

    def distances(rows):
        if gram is not None:
            sims = gram.index_select(0, rows)
        else:
            # The rows times the candidates (padded on the CPU to a multiple of 16, padded_centres), then
            # transposed: the CPU's BLAS ran [N, D] x [D, 16] faster than [T, D] x [D, N] (seeding 1.1x to 1.5x
            # faster, the same seeds: benchmarks/RESULTS.md, kmeans_pp, 12-07). Contiguous: the sums over the
            # rows below, read along a transposed view, rounded otherwise.
            candidates, _ = padded_centres(x.index_select(0, rows))
            sims = (x @ candidates.t())[:, :len(rows)].t().contiguous()
        return (1.0 - sims.float()).clamp_min_(0.0)

    first = torch.cat([row for row, _ in draws]).to(x.device)                      # [S]
    uniforms = torch.stack([u for _, u in draws]).to(x.device)                      # [S, k - 1, trials]
    seeding = torch.arange(s, device=x.device)
    chosen = [first]
    closest = distances(first)                                                      # [S, N]
    for step in range(k - 1):
        candidates = weighted_draws(closest, uniforms[:, step])                     # [S, trials]
        trial = torch.minimum(distances(candidates.reshape(-1)).view(s, trials, n), closest.unsqueeze(1))
        best = trial.sum(2).argmin(1)                                               # [S]
        chosen.append(candidates[seeding, best])
        closest = trial[seeding, best]
    return x[torch.stack(chosen, 1)]


# The CPU's BLAS multiplies [N, D] by [D, K] much faster when K is a multiple of this (an ad hoc timing, one
# thread, N = 2000, D = 512: 19 GFLOP/s at K = 10 against 71 at K = 16, 42 at K = 47 against 77 at K = 48; 12-03,
# AMD EPYC, torch 2.14). The whole assignment gains less (its float32 re-scoring and sums do not shrink): 1.15x at
# K = 47, within noise at K = 10, in `OMP_NUM_THREADS=1 python benchmarks/throughput.py --ops kmeans_assign`.
CPU_CENTRE_MULTIPLE = 16


def padded_centres(centres: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """On the CPU in float32 operands, ``centres`` with copies of its first rows appended up to a multiple of
    CPU_CENTRE_MULTIPLE rows, and the original row of each (None where nothing was added): a copy is as near to
    every row as its original (up to the product's rounding), so the nearest of the padded centres, mapped back, is
    the nearest centre (ties: the original comes first). Elsewhere the centres as they are: in half-precision
    operands copies would crowd out the candidates that ``top_similar`` re-scores in float32."""
    k = centres.shape[0]
    extra = -k % CPU_CENTRE_MULTIPLE
    if centres.device.type != "cpu" or operand_dtype(centres.device) != torch.float32 or extra == 0:
        return centres, None
    origin = torch.cat([torch.arange(k), torch.arange(extra) % k])
    return centres[origin], origin


def _assign(x: torch.Tensor, centres: torch.Tensor, with_sums: bool = True):
    """Nearest centre of every row (``top_similar`` with k = 1: half-precision operands where the device calls for
    them, the choice made in float32; on the CPU among :func:`padded_centres`), its similarity (float32) and, with
    ``with_sums``, the float32 per-cluster sums of the rows, in row blocks: nothing of size N x K."""
    n, k = x.shape[0], centres.shape[0]
    sims = torch.empty(n, dtype=torch.float32, device=x.device)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device) if with_sums else None
    searched, origin = padded_centres(centres)
    for start, stop in row_chunks(n, max(x.shape[1], searched.shape[0]), BLOCK_ELEMENTS):
        block = x[start:stop]
        s, i = top_similar(block, searched, 1, margin=ASSIGNMENT_MARGIN)
        sims[start:stop], labels[start:stop] = s[:, 0], i[:, 0] if origin is None else origin[i[:, 0]]
        if with_sums:
            sums.index_add_(0, labels[start:stop], block)
    return sims, labels, sums


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """``[K, D]`` float32 sums of the rows of each cluster (an index_add: nothing of size N x K)."""
    return torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device).index_add_(
        0, labels.to(x.device), x.float())


def _reseed_empty(x: torch.Tensor, sims: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor,
                  counts: torch.Tensor, rows: RowBlocks):
    """Empty clusters take the rows farthest from their centres (the i-th empty cluster the i-th farthest row):
    their sums become those rows and those rows their labels. Computed for every cluster with masks, so that the
    number of empty clusters never has to be read on the host; a no-op when none is empty.

    A row within ``RESEED_MIN_GAIN`` of its centre (a group of copies, whose centre is their direction up to
    rounding) stays, and its empty cluster stays empty: moved, it drew its copies after it by a rounding's margin
    (one copy's direction against their normalised sum), emptying their old cluster, which took the next group, and
    so on until max_iter (100 iterations a restart where K exceeded the distinct rows of centred features)."""
    k = counts.shape[0]
    farthest = rows.smallest(sims, k)                                   # [K] global rows, farthest first
    gains = 1.0 - rows.take(sims, farthest)                             # what each would gain, largest first
    order = (counts == 0).cumsum(0) - 1                                 # the i-th empty cluster: i
    empty = (counts == 0) & (gains[order.clamp(0, k - 1)] > RESEED_MIN_GAIN)
    target = farthest[order.clamp_min(0)]                               # the row each empty cluster takes
    sums = torch.where(empty[:, None], rows.take(x, target).float(), sums)
    n_local = labels.shape[0]
    local = target - rows.start
    mine = empty & (local >= 0) & (local < n_local)
    slot = torch.where(mine, local, torch.full_like(local, n_local))      # slot n_local: a bin for the others
    relabelled = torch.cat([labels, labels.new_zeros(1)])
    relabelled[slot] = torch.arange(k, device=labels.device)
    return sums, relabelled[:n_local]


def _lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int, rows: RowBlocks):
    """Lloyd iterations from ``centres`` until the labels stop changing; empty clusters are re-seeded with the
    points farthest from their centres. ``x`` is this rank's block of ``rows`` (all of them in one process), float32
    unit rows; centres are float32.

    The loop reads nothing from the device but one convergence flag every :func:`lloyd_check_every` iterations: once
    the labels stop changing, the following iterations keep labels, centres and the iteration count unchanged on
    the device (the result is the one of stopping at convergence)."""
    k = centres.shape[0]
    centres = centres.float()
    labels = None
    check_every = lloyd_check_every(x.device)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    n_iter = torch.zeros((), dtype=torch.int64, device=x.device)
    converged = False
    assigned = None   # the previous iteration's assignment, before its re-seeding
    for step in range(1, max_iter + 1):
        sims, nearest, sums = _assign(x, centres)
        if labels is not None:
            # Unchanged against the last labels, or against the last assignment: fewer distinct rows than K re-seed
            # an empty cluster with a copy of another centre's rows, which the next assignment empties alike (ties go
            # to the lower index), so the labels changed at every iteration up to max_iter.
            moved = (nearest != labels).sum().reshape(1)
            moved_since = (nearest != assigned).sum().reshape(1)
            changed = rows.sum_(torch.cat([moved, moved_since]))
            stopped = done | (changed == 0).any()
        else:
            stopped = done
        assigned = nearest
        n_iter = torch.where(done, n_iter, step)
        counts = rows.sum_(torch.zeros(k, dtype=torch.int64, device=x.device).index_add_(
            0, nearest, torch.ones_like(nearest)))
        rows.sum_(sums)
        # Masked, so that a GPU never reports the empty clusters to the host; where reading costs nothing (the
        # CPU, which checks convergence every iteration) skipped when none is empty (the usual case: a sort of all
        # N rows and a dozen ops an iteration). The counts are every rank's: all ranks take the same branch.
        reseeded = nearest
        if check_every > 1 or bool((counts == 0).any()):
            sums, reseeded = _reseed_empty(x, sims, nearest, sums, counts, rows)
        # Stopping, the labels are this assignment's (to the centres kept), not the re-seeding's: copies stay
        # together, their extra cluster left empty.
        labels = reseeded if labels is None else torch.where(done, labels, torch.where(stopped, nearest, reseeded))
        centres = torch.where(stopped, centres, F.normalize(sums, dim=1))
        done = stopped
        if step % check_every == 0 and bool(done):
            converged = True
            break
    if not converged:
        # The last iteration moved the centres after assigning the rows (or converged unseen since the last
        # check): assign once more. Once converged, the last assignment was to the final centres, and the labels
        # it gave are the kept ones: a pass more would give the same sims and labels.
        sims, labels, _ = _assign(x, centres, with_sums=False)
    return labels, centres, rows.total(sims), int(n_iter)


def _sample_rows(k: int) -> int:
    return max(SEED_SAMPLE_ROWS, 20 * k)


def _n_starts(n_rows: int, k: int, n_init: int) -> int:
    """Lloyd runs on all rows: every restart's up to a sample's size, beyond it the best restart's only."""
    return n_init if n_rows <= _sample_rows(k) else 1


def _seed_rows(x: torch.Tensor, rows: RowBlocks, k: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """The rows k-means++ seeds from, on rank 0 (None on the other ranks): all N rows up to
    ``max(SEED_SAMPLE_ROWS, 20 k)``, else a uniform sample of that many (drawn alike on every rank, so only the
    sample travels to rank 0: no rank ever holds all N rows)."""
    if rows.n_rows <= _sample_rows(k):
        return rows.gather_to_main(x)
    taken = rows.take(x, row_sample(rows.n_rows, _sample_rows(k), generator, x.device))
    return taken if rows.rank == 0 else None


def _starts(x: Optional[torch.Tensor], n_rows: int, k: int, n_init: int, max_iter: int, generator: torch.Generator,
            greedy: bool) -> Optional[torch.Tensor]:
    """``[S, k, D]`` starting centres for the Lloyd runs on all ``n_rows`` rows, from the seeding rows ``x``
    (:func:`_seed_rows`; None where they are not here: other ranks). Up to the sample size, the ``n_init``
    k-means++ seeds (S = n_init). Beyond it, ``x`` is a uniform sample: seeding and the restarts run on it, and only
    the best restart's centres (highest total similarity on the sample) start a run on all rows (S = 1): a few
    dozen rows per cluster rank the restarts as well, and the restarts then cost a sample's passes instead of N
    rows' each."""
    if x is None:
        return None
    n = x.shape[0]
    trials = n_trials(k, greedy)
    # The Gram matrix costs N products per row; seeding needs trials * K * n_init of them. Read from when it fits one
    # block of BLOCK_ELEMENTS (N <= 4096: 64 MB), not beyond: at N = 8192 it was 256 MB, the k-means' largest term
    # (documented as 2 N x D and a block).
    gram = x @ x.t() if n * n <= BLOCK_ELEMENTS and trials * k * n_init > n else None
    seeds = _kmeans_pp(x, k, generator, greedy, gram, n_starts=n_init).float()
    if _n_starts(n_rows, k, n_init) == n_init:
        return seeds
    runs = [_lloyd(x, centres, max_iter, RowBlocks(n)) for centres in seeds]
    return max(runs, key=lambda run: run[2])[1][None]


def _check_kmeans_rows(features, n_init: int, max_iter: int, seed: int, greedy: bool, distributed: bool) -> None:
    checks.tensor("features", features, ndim=2)
    if distributed and features.shape[0] == 0:
        raise ValueError("features has no rows on this rank; give every rank at least one row "
                         "(laic.distributed.row_shard splits N rows evenly)")
    checks.non_empty("features", features)
    checks.finite("features", features)
    checks.int_in_range("n_init", n_init, 1, 1 << 20)
    checks.int_in_range("max_iter", max_iter, 1, 1 << 30, " (Lloyd iterations; 0 would return the seeds)")
    # (seed=1.7 and "5" were taken as 1 and 5, 2**64 failed inside torch; greedy="no" was greedy)
    checks.int_in_range("seed", seed, 0, MAX_SEED)
    checks.true_or_false("greedy", greedy)


def _check_kmeans_size(rows: RowBlocks, n_clusters: int) -> None:
    if len(set(rows.widths)) > 1:
        raise ValueError(f"features must have the same number of columns D on every rank, got {rows.widths} "
                         "(by rank)")
    checks.int_in_range("n_clusters", n_clusters, 1, rows.n_rows, " (at most the number of rows N)")


def spherical_kmeans(features: torch.Tensor, n_clusters: int, *, n_init: int = 10, max_iter: int = 100,
                     seed: int = 0, greedy: bool = True, group=None) -> KMeansResult:
    """Spherical k-means (cosine similarity, unit centres): greedy k-means++ seeding, ``n_init`` restarts, the run
    with the highest total similarity wins. Rows are L2-normalised first. Deterministic for a given ``seed``.
    Beyond ``max(SEED_SAMPLE_ROWS, 20 K)`` rows the restarts run on a uniform sample of that many rows and the best
    one's centres start the one run on all rows (:func:`_starts`).

    With ``group`` (a ``torch.distributed`` process group, e.g. ``laic.distributed.current().group``), ``features``
    is this rank's block of rows (rank 0 the first rows, then rank 1's, ...); every rank gets the same centres and
    objective and the labels of its own rows. The seeds are a single process's: rank 0 gathers the rows seeding
    reads (all of them up to the sample size, then the same uniform sample as one process draws), seeds on them
    (plus their Gram matrix where it fits one block of BLOCK_ELEMENTS) and broadcasts them. Each Lloyd step all-reduces
    the per-cluster sums and counts; the sums are added in another order than in one process, so centres can differ
    from the single-process ones in the last bits. A bad input on any rank raises the same ``ValueError`` on every
    rank."""
    distributed = group_size(group) > 1
    stop_all_on_failure(group, lambda: _check_kmeans_rows(features, n_init, max_iter, seed, greedy, distributed),
                        "k-means' input check")
    rows = RowBlocks(features.shape[0], group, width=features.shape[1])
    stop_all_on_failure(group, lambda: _check_kmeans_size(rows, n_clusters), "k-means' input check")
    x = unit_rows(features.detach())   # nothing here is differentiable: no graph through the centres
    generator = torch.Generator().manual_seed(int(seed))
    # The rows were checked for non-finite values above: the assignments need not scan them again at every call.
    with checks.values_checked():
        starts = _starts(_seed_rows(x, rows, n_clusters, generator), rows.n_rows, n_clusters, n_init, max_iter,
                         generator, greedy)
        if distributed:
            empty = torch.empty(_n_starts(rows.n_rows, n_clusters, n_init), n_clusters, x.shape[1], dtype=x.dtype,
                                device=x.device)
            starts = rows.broadcast_from_main(starts if starts is not None else empty)
        best: Optional[KMeansResult] = None
        for centres in starts:
            labels, centres, objective, n_iter = _lloyd(x, centres, max_iter, rows)
            if best is None or objective > best.objective:
                best = KMeansResult(labels, centres, objective, n_iter)
    return numbered_by_first_row(best, rows)


def numbered_by_first_row(result: KMeansResult, rows: RowBlocks) -> KMeansResult:
    """``result`` with its clusters renumbered in the order of their first rows (row 0's cluster is 0, the cluster
    of the first row outside it 1, ...; empty clusters last, in their order): restarts that reach one partition
    number it alike. The restart kept is the one of highest objective, and between two that reach one partition
    in other numbers rounding decided: 3 processes kept another than one process did, and every label of
    food101-10class-test changed number (a QA check, 12-07)."""
    labels, k = result.labels, result.centres.shape[0]
    rows_index = torch.arange(rows.start, rows.start + labels.shape[0], device=labels.device)
    first = torch.full((k,), rows.n_rows, dtype=torch.int64, device=labels.device)
    first = rows.min_(first.scatter_reduce_(0, labels, rows_index, "amin"))
    order = torch.argsort(first, stable=True)            # [K]: the old number of each new one
    renumber = torch.empty_like(order).scatter_(0, order, torch.arange(k, device=order.device))
    return KMeansResult(renumber[labels], result.centres[order], result.objective, result.n_iter)
