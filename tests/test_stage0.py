"""Stage 0: spherical k-means against scikit-learn, noun filtering on a hand-made case, text counterparts, graphs."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from laic_kernels import knn_graph
from laic import LAIC, relations
from laic.operands import half_operands
from laic.stage0 import (PARTITION_AGREEMENT_RAMP, build_semantic_space, calibrated_agreement, filter_nouns,
                         first_copies, fused_features, in_basis, n_semantic_centres, n_smoothing_neighbours,
                         noun_centres, noun_span_basis, null_agreement, null_text_features, partition_agreement,
                         partition_nmi, random_vocabulary, spherical_kmeans, text_agreement, text_counterparts,
                         text_weight_factor)


def sphere_blobs(n_per, k, dim, spread, seed):
    """``k`` well-separated directions on the unit sphere, ``n_per`` noisy unit points around each."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(n_per)
    points = F.normalize(centres[labels] + spread * torch.randn(len(labels), dim, generator=g), dim=1)
    return points, labels.numpy()


def cosine_objective(x: np.ndarray, labels: np.ndarray) -> float:
    """Sum of cosine similarities of unit rows to their cluster's unit mean (what spherical k-means maximises)."""
    total = 0.0
    for c in np.unique(labels):
        members = x[labels == c]
        centre = members.sum(0)
        total += float((members @ (centre / np.linalg.norm(centre))).sum())
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_recovers_blobs_like_sklearn(seed):
    x, truth = sphere_blobs(n_per=40, k=6, dim=16, spread=0.12, seed=seed)
    ours = spherical_kmeans(x, 6, n_init=5, seed=seed)
    theirs = KMeans(6, n_init=5, random_state=seed).fit_predict(x.numpy())
    assert ours.labels.dtype == torch.int64 and ours.labels.shape == (240,)
    assert adjusted_rand_score(truth, ours.labels.numpy()) >= adjusted_rand_score(truth, theirs) - 0.02
    assert adjusted_rand_score(truth, ours.labels.numpy()) > 0.95
    # The reported objective is the true one, and it is at least as good as scikit-learn's partition (1e-3 relative).
    assert ours.objective == pytest.approx(cosine_objective(x.numpy(), ours.labels.numpy()), rel=1e-4)
    assert ours.objective >= cosine_objective(x.numpy(), theirs) * (1 - 1e-3)
    assert torch.allclose(ours.centres.norm(dim=1), torch.ones(6), atol=1e-5)


def test_kmeans_hard_case_objective_close_to_sklearn():
    # Overlapping blobs: no exact recovery, but the local optimum found should be as good as scikit-learn's.
    x, _ = sphere_blobs(n_per=30, k=8, dim=8, spread=0.4, seed=3)
    ours = spherical_kmeans(x, 8, n_init=10, seed=0)
    theirs = KMeans(8, n_init=10, random_state=0).fit_predict(x.numpy())
    assert ours.objective >= cosine_objective(x.numpy(), theirs) * (1 - 5e-3)


def test_kmeans_is_deterministic_and_scale_free():
    x, _ = sphere_blobs(n_per=20, k=4, dim=8, spread=0.6, seed=5)
    a = spherical_kmeans(x, 4, n_init=3, seed=7)
    b = spherical_kmeans(3.0 * x.double(), 4, n_init=3, seed=7)   # rows are normalised inside; any float dtype
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_numbers_its_clusters_by_their_first_row(seed):
    # Numbered by the seeding (cluster 0 was the first seed's), two restarts reaching one partition numbered it
    # otherwise, and rounding chose between them: 3 processes renumbered every label of a real set.
    x, _ = sphere_blobs(n_per=25, k=7, dim=12, spread=0.3, seed=seed)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    result = spherical_kmeans(x, 7, n_init=4, seed=seed)
    labels = result.labels.tolist()
    firsts = [labels.index(c) for c in range(7)]
    assert firsts == sorted(firsts) and firsts[0] == 0
    # Centres renumbered with their labels: each row's nearest centre is its own (blobs well apart).
    assert torch.equal((F.normalize(x, dim=1) @ result.centres.t()).argmax(1), result.labels)


def test_numbering_by_first_row_puts_empty_clusters_last_in_their_order():
    from laic.kmeans import KMeansResult, numbered_by_first_row
    from laic.distributed.rows import RowBlocks

    centres = torch.arange(5.0)[:, None].repeat(1, 2)
    result = numbered_by_first_row(KMeansResult(torch.tensor([2, 2, 0, 3, 0]), centres, 1.5, 4), RowBlocks(5))
    assert result.labels.tolist() == [0, 0, 1, 2, 1]
    assert result.centres[:, 0].tolist() == [2.0, 0.0, 3.0, 1.0, 4.0]
    assert (result.objective, result.n_iter) == (1.5, 4)


def test_kmeans_with_k_equal_n_and_duplicates():
    # K = N distinct points: every point is its own cluster.
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    result = spherical_kmeans(x, 3, n_init=2, seed=0)
    assert sorted(np.bincount(result.labels.numpy(), minlength=3).tolist()) == [1, 1, 1]
    # Exact duplicates (fewer distinct points than K): still a valid labelling of the distinct points.
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = spherical_kmeans(dup, 3, n_init=2, seed=0).labels
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]



@pytest.mark.parametrize("check_every", [1, 4])   # the CPU's convergence check, and a GPU's (every 4 iterations)
def test_kmeans_with_fewer_distinct_rows_than_k_converges(check_every, monkeypatch):
    # Two directions, ten copies each, K = 3: the empty cluster took a copy of another centre's row, which the next
    # assignment emptied alike; the labels changed every iteration and every restart ran all max_iter passes
    # (scikit-learn stops after one).
    import laic.kmeans

    monkeypatch.setattr(laic.kmeans, "lloyd_check_every", lambda device: check_every)
    rows = torch.eye(4)[:2].repeat(10, 1)
    result = spherical_kmeans(rows, 3, n_init=3, max_iter=100, seed=0)
    assert result.n_iter <= 3
    centres_of_rows = result.centres[result.labels]
    assert torch.allclose((centres_of_rows * rows).sum(1), torch.ones(20))     # every row on its centre
    assert result.objective == pytest.approx(20.0)
    # Copies stay together, as scikit-learn keeps them: two clusters used, the third left empty.
    assert len(set(result.labels[0::2].tolist())) == 1 and len(set(result.labels[1::2].tolist())) == 1
    assert result.labels[0] != result.labels[1]


@pytest.mark.parametrize("check_every", [1, 4])
def test_kmeans_converges_on_centred_copies_whose_centre_is_their_direction_up_to_rounding(check_every,
                                                                                          monkeypatch):
    # 100 directions, 5 copies each, centred and normalised as stage 0 does: a copy's cosine to its copies'
    # normalised sum is 1 up to a rounding. An empty cluster re-seeded with one copy drew the whole group after it by
    # that rounding, which emptied their cluster, re-seeded in turn: all 100 iterations at K = 150 (2 at K <= 100).
    import laic.kmeans

    monkeypatch.setattr(laic.kmeans, "lloyd_check_every", lambda device: check_every)
    generator = torch.Generator().manual_seed(0)
    copies = F.normalize(torch.randn(100, 512, generator=generator), dim=1).repeat_interleave(5, 0)
    x = F.normalize(copies - copies.mean(0), dim=1)
    result = spherical_kmeans(x, 150, n_init=2, max_iter=100, seed=0)
    assert result.n_iter <= 2 * check_every
    groups = result.labels.reshape(100, 5)
    assert bool((groups == groups[:, :1]).all()) and len(set(groups[:, 0].tolist())) == 100   # one cluster a group
    assert result.objective == pytest.approx(500.0, abs=1e-3)


def test_lloyd_gives_an_empty_cluster_the_farthest_row():
    """One iteration from five rows' own centres and a copy of the first (ties go to the original: the copy starts
    empty): the empty cluster's centre becomes the row farthest from its nearest centre (found here directly), the
    others the unit means of the rows nearest to them (the moved row still counts in its first cluster's sum, as
    _reseed_empty leaves it)."""
    from laic.distributed.rows import RowBlocks
    from laic.kmeans import _lloyd
    x, _ = sphere_blobs(n_per=12, k=5, dim=16, spread=0.5, seed=4)
    x = F.normalize(x, dim=1)
    start = x[[0, 12, 24, 36, 48, 0]]
    sims = x @ start.t()
    nearest, best = sims.argmax(1), sims.max(1).values
    assert not bool((nearest == 5).any())                       # cluster 5 starts empty
    farthest = int(best.argmin())
    _, centres, _, _ = _lloyd(x, start, 1, RowBlocks(len(x)))
    torch.testing.assert_close(centres[5], x[farthest])
    for c in range(5):
        torch.testing.assert_close(centres[c], F.normalize(x[nearest == c].sum(0), dim=0), rtol=1e-5, atol=1e-6)


def test_lloyd_gives_an_empty_cluster_the_farthest_row_of_tight_groups():
    """Twenty tight groups (the farthest row's cosine to its centre about 1e-3 below 1) and one empty centre: the
    empty cluster still takes the farthest row (a re-seeding threshold of 1e-2 left it empty)."""
    from laic.distributed.rows import RowBlocks
    from laic.kmeans import _lloyd
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(20, 64, generator=g), dim=1).repeat_interleave(10, 0)
    x = F.normalize(base + 0.005 * torch.randn(200, 64, generator=g), dim=1)
    means = F.normalize(x.reshape(20, 10, 64).sum(1), dim=1)
    start = torch.cat([means, -means[:1]])
    sims = x @ start.t()
    nearest, best = sims.argmax(1), sims.max(1).values
    assert not bool((nearest == 20).any())                      # cluster 20 starts empty
    assert 1e-4 < float(1 - best.min()) < 1e-2                  # a row to gain, though little
    _, centres, _, _ = _lloyd(x, start, 1, RowBlocks(len(x)))
    torch.testing.assert_close(centres[20], x[int(best.argmin())])


def test_lloyd_reseeds_only_the_empty_clusters_with_a_row_to_gain():
    """Ten groups of five copies plus one outlier, from the groups' own directions and two extra (empty) centres:
    the first empty cluster takes the outlier, the second stays empty, since the next farthest row is a copy on its
    centre. Each empty cluster was checked against the first one's gain: the second took a copy, drawing its group
    after it and emptying that group's cluster."""
    from laic.distributed.rows import RowBlocks
    from laic.kmeans import RESEED_MIN_GAIN, _assign, _lloyd, _reseed_empty
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(10, 64, generator=g), dim=1)
    outlier = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    x = torch.cat([directions.repeat_interleave(5, 0), outlier])
    start = torch.cat([directions, -directions[:1], F.normalize(torch.randn(1, 64, generator=g), dim=1)])
    sims = x @ start.t()
    nearest, gains = sims.argmax(1), 1 - sims.max(1).values
    assert torch.equal(nearest[:50], torch.arange(10).repeat_interleave(5))     # clusters 10 and 11 start empty
    assert int(nearest[50]) < 10
    assert float(gains[50]) > 0.1 and float(gains[:50].max()) <= RESEED_MIN_GAIN   # one row to gain, copies none
    expected = torch.cat([torch.arange(10).repeat_interleave(5), torch.tensor([10])])
    # The re-seeding itself: only the outlier moves, and the second empty cluster's sum stays zero.
    best, assigned, sums = _assign(x, start)
    counts = torch.bincount(assigned, minlength=12)
    new_sums, new_labels = _reseed_empty(x, best, assigned, sums, counts, RowBlocks(len(x)))
    assert torch.equal(new_labels, expected)
    assert torch.equal(new_sums[11], torch.zeros(64)) and torch.equal(new_sums[10], outlier[0])
    labels, centres, _, _ = _lloyd(x, start, 1, RowBlocks(len(x)))
    assert torch.equal(labels, expected)
    torch.testing.assert_close(centres[10], outlier[0])
    for c in range(10):     # the outlier still counts in its first cluster's sum, as _reseed_empty leaves it
        torch.testing.assert_close(centres[c], F.normalize(x[nearest == c].sum(0), dim=0))


def test_reseeding_with_no_empty_cluster_changes_nothing():
    """What the CPU's Lloyd loop skips when no cluster is empty is a no-op there."""
    from laic.distributed.rows import RowBlocks
    from laic.kmeans import _assign, _reseed_empty
    x = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    sims, labels, sums = _assign(x, x[:4])
    counts = torch.bincount(labels, minlength=4)
    assert bool((counts > 0).all())
    new_sums, new_labels = _reseed_empty(x, sims, labels, sums, counts, RowBlocks(40))
    assert torch.equal(new_sums, sums) and torch.equal(new_labels, labels)


@pytest.mark.parametrize("k", [1, 3, 16, 17, 47])
def test_kmeans_assignment_among_padded_centres_is_the_nearest_centre(k, monkeypatch):
    """On the CPU the assignment searches the centres padded with copies to a multiple of 16 rows: the labels are
    the plain arg-max over the K centres and the sums per cluster those of the labels, also where the search
    answers with a copy (forced here: rounding may let a copy win) and where every similarity is negative (a zero
    row would win there)."""
    import laic.kmeans as kmeans

    gen = torch.Generator().manual_seed(k)
    centres = torch.randn(k, 9, generator=gen)
    centres[:, 0] = centres[:, 0].abs() + 0.5
    centres = F.normalize(centres, dim=1)
    rows = F.normalize(torch.randn(203, 9, generator=gen), dim=1)
    rows[:50] = -F.one_hot(torch.tensor(0), 9).float()     # a negative similarity to every centre
    searched, origin = kmeans.padded_centres(centres)
    assert searched.shape[0] % kmeans.CPU_CENTRE_MULTIPLE == 0 and (origin is None) == (k % 16 == 0)
    plain = rows @ centres.t()
    want_labels = plain.argmax(1)
    want_sums = torch.zeros(k, 9).index_add_(0, want_labels, rows)
    if origin is not None:
        assert torch.equal(searched, centres[origin]) and bool((origin < k).all())
    search = kmeans.top_similar

    def answering_with_a_copy(block, keys, n, **options):
        values, indices = search(block, keys, n, **options)
        copies = [torch.nonzero(origin == i).flatten()[-1] for i in indices[:, 0].tolist()]
        return values, torch.stack(copies)[:, None]

    for answer in ([search] if origin is None else [search, answering_with_a_copy]):
        monkeypatch.setattr(kmeans, "top_similar", answer)
        sims, labels, sums = kmeans._assign(rows, centres)
        torch.testing.assert_close(sims, plain.max(1).values)
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(sums, want_sums)


def test_kmeans_centres_are_not_padded_in_half_precision_operands():
    """Half-precision operands re-score a few candidates in float32: copies of a centre would take their places."""
    import laic.kmeans as kmeans

    with half_operands():
        assert kmeans.padded_centres(torch.randn(3, 8))[1] is None
    assert kmeans.padded_centres(torch.randn(3, 8))[1] is not None


@pytest.mark.parametrize("bad, match", [(dict(n_clusters=0), "n_clusters"), (dict(n_clusters=50), "n_clusters"),
                                        (dict(n_init=0), "n_init"), (dict(max_iter=0), "max_iter"),
                                        (dict(max_iter=-1), "max_iter"), (dict(seed=1.7), "seed must be an int"),
                                        (dict(seed=2 ** 64), "seed must be between 0 and"),
                                        (dict(greedy="no"), "greedy must be True or False")])
def test_kmeans_bad_input(bad, match):
    args = dict(n_clusters=2, n_init=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(torch.randn(10, 3), args.pop("n_clusters"), **args)
    with pytest.raises(ValueError, match="features"):
        spherical_kmeans(torch.full((4, 3), float("nan")), 2)


def test_filter_nouns_hand_made():
    # Two image groups along e0 and e1; nouns: 7 near e0 (decreasingly), 2 near e1, one far from both (e3).
    # With K = 1: max(3K, N/300) = 3 centres for 60 images, so the semantic centres are e0, e1 and a third one
    # that splits a group; we ask for 2 centres directly by making N tiny relative to that rule not matter:
    dim = 6
    g = torch.Generator().manual_seed(0)
    e = torch.eye(dim)
    images = torch.cat([F.normalize(e[0] + 0.01 * torch.randn(30, dim, generator=g), dim=1),
                        F.normalize(e[1] + 0.01 * torch.randn(30, dim, generator=g), dim=1)])
    near0 = [F.normalize(e[0] + s * e[2], dim=0) for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]
    near1 = [F.normalize(e[1] + s * e[2], dim=0) for s in (0.1, 0.3)]
    far = [F.normalize(e[3] + 0.05 * e[4], dim=0)]
    nouns = torch.stack(near0 + near1 + far)
    assert n_semantic_centres(60, 1) == 3
    centres = noun_centres(images, n_clusters=1, seed=0)
    assert centres.shape == (3, dim)
    kept = filter_nouns(nouns, centres, nouns_per_centre=2)
    assert kept.dtype == torch.int64 and len(set(kept.tolist())) == len(kept)
    kept = set(kept.tolist())
    # Each group's two best nouns survive; the 5 weaker e0 nouns cannot all fit in the remaining centre.
    assert {0, 1, 7, 8} <= kept
    assert not {4, 5, 6} <= kept
    assert len(kept) <= 3 * 2
    # With one noun per centre and the groups far apart, the best noun of each group is kept.
    kept1 = set(filter_nouns(nouns, centres, nouns_per_centre=1).tolist())
    assert {0, 7} <= kept1 and len(kept1) <= 3


def test_kept_nouns_come_in_the_lexicographic_order_of_their_unit_rows_whatever_the_vocabulary_s_order():
    # Against Python's sort of the unit rows as tuples; the same kept nouns, in the same order, for a permuted
    # vocabulary (mapped back to the original rows).
    g = torch.Generator().manual_seed(4)
    nouns = torch.randn(300, 6, generator=g) * torch.rand(300, 1, generator=g)   # rows of any scale
    nouns[7, :2] = nouns[8, :2] = torch.tensor([0.5, -0.25])   # equal leading coordinates: the later ones decide
    centres = F.normalize(torch.randn(20, 6, generator=g), dim=1)
    kept = filter_nouns(nouns, centres, nouns_per_centre=3)
    rows = [tuple(r) for r in F.normalize(nouns[kept], dim=1).tolist()]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    perm = torch.randperm(300, generator=g)
    assert torch.equal(perm[filter_nouns(nouns[perm], centres, nouns_per_centre=3)], kept)


def test_text_counterparts_match_the_definition():
    g = torch.Generator().manual_seed(1)
    images, nouns = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    ours = text_counterparts(images, nouns, tau=0.05)
    u, v = F.normalize(images.double(), dim=1), F.normalize(nouns.double(), dim=1)
    expected = F.normalize(torch.softmax(u @ v.t() / 0.05, dim=1) @ v, dim=1)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_text_agreement_bounds():
    n, k = 50, 5
    g = torch.Generator().manual_seed(0)
    same = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n)])
    assert text_agreement(same, same) == pytest.approx(1.0)
    other = (same + 17) % n
    overlap = np.mean([len(set(a) & set(b)) for a, b in zip(same.tolist(), other.tolist())]) / k
    chance = k / (n - 1)
    assert text_agreement(same, other) == pytest.approx(max(0.0, (overlap - chance) / (1 - chance)))


def test_text_agreement_of_independent_random_lists_is_chance():
    # Monte Carlo against the chance correction: lists drawn at random among the N - 1 other rows overlap by
    # k / (N - 1) on average, which must score 0; at N = 8, k = 3 a chance of k / N would score 0.09.
    n, k, draws = 8, 3, 200_000
    g = torch.Generator().manual_seed(0)
    row = torch.arange(draws) % n

    def random_lists():
        keys = torch.rand(draws, n, generator=g)
        keys[torch.arange(draws), row] = 2.0        # never the row itself
        return keys.argsort(1)[:, :k]

    assert text_agreement(random_lists(), random_lists(), n_rows=n) < 0.01
    # Lists that share two of three entries: the exact value, from the overlap counted by sets.
    a = random_lists()
    b = a.clone()
    b[:, 2] = torch.where(a[:, 2] == (row + 1) % n, (row + 2) % n, (row + 1) % n)
    b[:, 2] = torch.where((b[:, 2:3] == a[:, :2]).any(1), (row + 3) % n, b[:, 2])
    shared = np.mean([len(set(x) & set(y)) for x, y in zip(a[:2000].tolist(), b[:2000].tolist())]) / k
    chance = k / (n - 1)
    assert text_agreement(a[:2000], b[:2000], n_rows=n) == pytest.approx((shared - chance) / (1 - chance), rel=1e-6)


def test_semantic_space_shapes_and_fused_space():
    x, _ = sphere_blobs(n_per=25, k=4, dim=12, spread=0.4, seed=2)
    nouns = F.normalize(torch.randn(40, 12, generator=torch.Generator().manual_seed(9)), dim=1)
    space = build_semantic_space(x, nouns, 4, seed=0, n_neighbours=6)
    n = x.shape[0]
    assert space.images.shape == (n, 12) and space.texts.shape == (n, 12)
    torch.testing.assert_close(space.images.norm(dim=1), torch.ones(n))
    assert space.image_neighbours.shape == (n, 6) and space.neighbours.shape == (n, 6)
    assert bool(space.neighbour_mask.any(1).all())
    assert 0.0 <= space.agreement <= 1.0
    assert space.nouns.shape[0] == len(space.noun_index) <= 40
    # Image neighbours are the true cosine neighbours of the centred features.
    sims = space.images @ space.images.t()
    sims.fill_diagonal_(-2)
    assert torch.equal(space.image_neighbours[:, 0], sims.argmax(1))
    fused = fused_features(space, 4)
    assert fused.shape == (n, 24)
    assert n_smoothing_neighbours(4000, 1000, 10) == 3 and n_smoothing_neighbours(500, 10, 10) == 10


@pytest.mark.parametrize("n_per, k", [(25, 4), (3, 4), (1, 4)])
def test_fused_features_are_the_smoothed_parts_weighted_by_the_agreement(n_per, k):
    """Each fused row is [unit(x_i + mean of its first s image-space neighbours' x), sqrt(a) * the same of the
    texts], s = min(k, N / K - 1) (no smoothing at under two rows a cluster): its dot products, computed here in
    float64 (the columns may be another basis of the same span), are the fused space's."""
    x, _ = sphere_blobs(n_per=n_per, k=k, dim=12, spread=0.4, seed=2)
    nouns = F.normalize(torch.randn(40, 12, generator=torch.Generator().manual_seed(9)), dim=1)
    space = dataclasses.replace(build_semantic_space(x, nouns, k, seed=0, n_neighbours=6), agreement=0.36)
    n = x.shape[0]
    s = max(0, min(6, n // k - 1))
    nbrs = space.image_neighbours[:, :s]

    def smoothed(rows):
        rows = rows.double()
        out = rows + (rows[nbrs].mean(1) if s else 0)
        return out / out.norm(dim=1, keepdim=True)

    images, texts = smoothed(space.images), smoothed(space.texts)
    want = images @ images.t() + space.agreement * (texts @ texts.t())
    fused = fused_features(space, k).double()
    torch.testing.assert_close(fused @ fused.t(), want, rtol=0, atol=1e-5)


def test_agreement_is_calibrated_against_random_nouns():
    assert calibrated_agreement(0.4, 0.1) == pytest.approx(1 / 3)
    assert calibrated_agreement(0.05, 0.1) == 0.0
    # Nouns that describe the images (here: words placed at some of the images, as a fitting vocabulary has a word
    # for most regions) agree with the image space well beyond random nouns; random nouns do not.
    x, _ = sphere_blobs(n_per=40, k=5, dim=32, spread=0.3, seed=4)
    g = torch.Generator().manual_seed(4)
    meaningful = F.normalize(x[torch.randperm(200, generator=g)[:80]] + 0.05 * torch.randn(80, 32, generator=g), dim=1)
    random_nouns = F.normalize(torch.randn(80, 32, generator=g), dim=1)
    good = build_semantic_space(x, meaningful, 5, seed=0, n_neighbours=8)
    bad = build_semantic_space(x, random_nouns, 5, seed=0, n_neighbours=8)
    assert good.agreement > 0.15 and good.agreement > bad.agreement + 0.15
    assert bad.agreement < 0.1
    assert good.neighbour_agreement == pytest.approx(calibrated_agreement(good.raw_agreement, good.null_agreement))
    assert good.agreement == pytest.approx(good.neighbour_agreement * text_weight_factor(good.partition_agreement))


def test_null_agreement_is_that_of_a_random_vocabulary_filtered_like_the_nouns():
    # The null is the raw agreement that build_semantic_space finds for a random vocabulary of the nouns' size
    # (same seed, so the same semantic centres filter it): such a vocabulary calibrates to exactly 0.
    x, _ = sphere_blobs(n_per=40, k=5, dim=32, spread=0.3, seed=4)
    g = torch.Generator().manual_seed(5)
    nouns = F.normalize(x[torch.randperm(200, generator=g)[:120]] + 0.05 * torch.randn(120, 32, generator=g), dim=1)
    for seed in (0, 3):
        space = build_semantic_space(x, nouns, 5, seed=seed, n_neighbours=8)
        random_space = build_semantic_space(x, random_vocabulary(120, 32, seed), 5, seed=seed, n_neighbours=8)
        assert space.null_agreement == random_space.raw_agreement == random_space.null_agreement
        assert random_space.agreement == 0.0
        assert space.agreement > 0.1   # nouns placed at the images agree well beyond the null
    # Filtering keeps the random directions nearest the image groups, which agree more than unfiltered ones would:
    # an unfiltered vocabulary of the kept size (every direction kept) reaches less.
    centres = noun_centres(x, 5, seed=0)
    _, image_nbrs = knn_graph(F.normalize(x - F.normalize(x, dim=1).mean(0), dim=1), 8)
    many = null_agreement(null_text_features(x, centres, 4000, 2, 0.005, seed=0), image_nbrs, seed=0)
    kept = len(filter_nouns(random_vocabulary(4000, 32, 0), centres, 2))
    few = null_agreement(null_text_features(x, centres, kept, kept, 0.005, seed=0), image_nbrs, seed=0)
    assert len(filter_nouns(random_vocabulary(kept, 32, 0), centres, kept)) == kept
    assert many > few + 0.03


def test_first_copies_are_the_rows_no_earlier_row_repeats():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 7)).astype(np.float32)
    x = np.concatenate([x, x[[3, 3, 10, 49]], x[:2]])[rng.permutation(56)]
    _, first = np.unique(x, axis=0, return_index=True)
    expected = np.zeros(len(x), dtype=bool)
    expected[first] = True
    np.testing.assert_array_equal(first_copies(torch.from_numpy(x)).numpy(), expected)


def test_row_hashes_wrap_around_alike_on_every_path():
    """The CPU's numpy product and the products-and-sums path that CUDA takes give the same hashes mod 2^64."""
    from laic.stage0 import _row_hashes, _row_hashes_by_products

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (37, 19), generator=g, dtype=torch.int64).to(torch.int32)
    coefficients = torch.randint(-2**63, 2**63 - 1, (19, 2), generator=g, dtype=torch.int64) | 1
    # Python's integers, reduced mod 2^64 into int64's range.
    expected = [[(sum(b * c for b, c in zip(row, column)) + 2**63) % 2**64 - 2**63
                 for column in coefficients.t().tolist()] for row in bits.tolist()]
    for path in (_row_hashes, _row_hashes_by_products):
        assert path(bits, coefficients).tolist() == expected


@pytest.mark.parametrize("n, k, seed", [(30, 10, 0), (90, 40, 1), (200, 100, 2)])
def test_semantic_centres_for_every_image_are_the_images(n, k, seed):
    """Below 3 images a cluster every image is a semantic centre: a k-means with one centre a row (its seeding's N
    draws took 20 s of a fit at N = 10,000, K = 5,000) ends at the rows themselves, so the rows are the centres, and
    they keep the nouns that k-means' centres keep, a copied row included."""
    g = torch.Generator().manual_seed(seed)
    x, nouns = torch.randn(n, 16, generator=g) * 3, torch.randn(500, 16, generator=g)
    x[5] = x[3]
    assert n_semantic_centres(n, k) == n
    centres = noun_centres(x, k, seed=seed)
    torch.testing.assert_close(centres, F.normalize(x, dim=1), rtol=0, atol=1e-7)   # the unit rows, in row order
    by_kmeans = spherical_kmeans(F.normalize(x, dim=1), n, n_init=1, max_iter=10, seed=seed, greedy=False).centres
    assert torch.equal(filter_nouns(nouns, centres), filter_nouns(nouns, by_kmeans))


def _neighbour_lists(rows: torch.Tensor, k: int) -> np.ndarray:
    sims = (rows @ rows.t()).double()
    sims.fill_diagonal_(-np.inf)
    return torch.topk(sims, k, dim=1).indices.numpy()


def test_the_agreements_count_each_image_once():
    """Copies of an image fill each other's neighbour lists in every space alike, real nouns' or random ones': half
    the demo's rows copies of 30 of its images gave a raw agreement of 0.24 against the random nouns' 0.40, and
    LAIC.fit dropped the text side with a warning blaming the nouns. Both agreements are now those of the distinct
    images' graphs among themselves (as the K search counts each image once)."""
    from laic.demo_data import make_semantic_dataset

    data = make_semantic_dataset(seed=0)
    rng = np.random.default_rng(0)
    copied = data.features[rng.choice(len(data.features), 30, replace=False)[rng.integers(0, 30, 1000)]]
    x = np.concatenate([data.features, copied])
    nouns = torch.from_numpy(data.noun_features)
    space = build_semantic_space(torch.from_numpy(x), nouns, 10, seed=0)
    # Independently: the first occurrence of each distinct row, brute-force lists among those rows in both spaces.
    first = np.sort(np.unique(x, axis=0, return_index=True)[1])
    assert len(first) == len(data.features)
    image_lists = _neighbour_lists(space.images[first], 10)
    text_lists = _neighbour_lists(space.texts[first], 10)
    overlap = np.mean([len(set(a) & set(b)) for a, b in zip(image_lists, text_lists)]) / 10
    chance = 10 / (len(first) - 1)
    assert space.raw_agreement == pytest.approx((overlap - chance) / (1 - chance), abs=2e-3)
    # The null is the raw agreement of a random vocabulary's space, counted alike.
    random_space = build_semantic_space(torch.from_numpy(x), random_vocabulary(len(nouns), nouns.shape[1], 0), 10,
                                        seed=0)
    assert space.null_agreement == random_space.raw_agreement
    alone = build_semantic_space(torch.from_numpy(data.features), nouns, 10, seed=0)
    # About what the distinct images alone reach (the centring and the noun filtering see the copies).
    assert space.neighbour_agreement == pytest.approx(alone.neighbour_agreement, abs=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning that the nouns say nothing
        model = LAIC(n_clusters=10, random_state=0, n_threads=1).fit(x, data.noun_features, data.noun_names)
    assert model.agreement_ > 0.1
    assert space.agreement_images == len(first) and space.distinct.sum() == len(first)


def test_a_few_copies_leave_the_agreement_to_every_row():
    """Below COPIED_SHARE_COUNTED_ONCE of the rows repeating others (a few copies are common in real sets, and they
    move the agreement about as a reseeding does) the agreements are those of the whole graphs: no second pair of
    graphs among the distinct images."""
    from laic.demo_data import make_semantic_dataset
    from laic.stage0 import COPIED_SHARE_COUNTED_ONCE

    data = make_semantic_dataset(seed=0)
    n = len(data.features)
    x = np.concatenate([data.features, data.features[:int(COPIED_SHARE_COUNTED_ONCE * n) - 1]])
    space = build_semantic_space(torch.from_numpy(x), torch.from_numpy(data.noun_features), 10, seed=0)
    assert space.agreement_images == len(x) and int(space.distinct.sum()) == n
    assert space.raw_agreement == text_agreement(space.image_neighbours, space.text_neighbours)


@pytest.mark.parametrize("n, k, seed", [(1, 3, 0), (37, 5, 1), (200, 7, 2), (64, 16, 3)])
def test_partition_nmi_is_scikit_learns(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, k, (n,), generator=g)
    second = torch.where(torch.rand(n, generator=g) < 0.6, first, torch.randint(0, k - 1, (n,), generator=g))
    for a, b in ((first, second), (first, first), (first, torch.zeros_like(first))):
        assert partition_nmi(a, b, k) == pytest.approx(normalized_mutual_info_score(a.numpy(), b.numpy()),
                                                       abs=1e-9)


def test_text_weight_factor_ramps_from_none_to_all():
    low, high = PARTITION_AGREEMENT_RAMP
    assert 0.0 < low < high < 1.0
    assert text_weight_factor(0.0) == text_weight_factor(low) == 0.0
    assert text_weight_factor(high) == text_weight_factor(1.0) == 1.0
    assert text_weight_factor((low + high) / 2) == pytest.approx(0.5)
    grid = [text_weight_factor(v) for v in np.linspace(0, 1, 41)]
    assert grid == sorted(grid)


def test_nouns_that_merge_the_classes_agree_locally_but_not_as_partitions():
    """Nouns one per class make a text partition that is the image partition; nouns one per three classes (a
    vocabulary that knows "dog" but no breed) merge the classes: the partition agreement falls to about what a
    random vocabulary reaches and the text weight to 0, although the text space still agrees with the image space
    beyond random nouns locally (near images pick the same nearby nouns)."""
    x, labels = sphere_blobs(n_per=40, k=6, dim=32, spread=0.12, seed=3)
    means = F.normalize(torch.stack([x[labels == c].mean(0) for c in range(6)]), dim=1)
    triples = F.normalize(means.reshape(2, 3, 32).sum(1), dim=1)
    g = torch.Generator().manual_seed(0)
    each = F.normalize(means.repeat_interleave(4, 0) + 0.05 * torch.randn(24, 32, generator=g), dim=1)
    merged = F.normalize(triples.repeat_interleave(12, 0) + 0.05 * torch.randn(24, 32, generator=g), dim=1)
    spaces = {name: build_semantic_space(x, nouns, 6, seed=0, n_neighbours=8)
              for name, nouns in (("each", each), ("merged", merged), ("random", random_vocabulary(24, 32, 0)))}
    assert spaces["each"].partition_agreement > 0.9
    assert spaces["merged"].partition_agreement < PARTITION_AGREEMENT_RAMP[0]
    assert spaces["random"].partition_agreement < PARTITION_AGREEMENT_RAMP[0]
    assert spaces["merged"].neighbour_agreement > 0.02
    for space in spaces.values():
        assert space.agreement == space.neighbour_agreement * text_weight_factor(space.partition_agreement)
    assert spaces["merged"].agreement == spaces["random"].agreement == 0.0 < spaces["each"].agreement
    # The calibration's null: the random vocabulary's own partition calibrates to 0.
    nulls = null_text_features(x, noun_centres(x, 6, seed=0), 24, 2, 0.005, seed=0)
    assert partition_agreement(spaces["each"].images, nulls, nulls, 6, seed=0) == 0.0


def test_noun_span_basis_keeps_the_dot_products_of_rows_in_the_span():
    g = torch.Generator().manual_seed(3)
    distinct = F.normalize(torch.randn(7, 20, generator=g), dim=1)
    nouns = torch.cat([distinct, distinct[:2]])       # repeated nouns: the basis still holds their span
    basis = noun_span_basis(nouns)
    assert basis.shape == (20, 9)
    torch.testing.assert_close(basis.t() @ basis, torch.eye(9), atol=1e-6, rtol=0)
    mixtures = torch.softmax(torch.randn(50, 9, generator=g) / 0.1, dim=1) @ nouns   # as the text counterparts
    mixtures = mixtures - mixtures.mean(0)
    coords = in_basis(mixtures, basis)
    torch.testing.assert_close(coords @ coords.t(), mixtures @ mixtures.t(), atol=1e-5, rtol=0)
    off_span = torch.randn(5, 20, generator=g)       # rows off the span lose their off-span part
    assert float((off_span.norm(dim=1) - in_basis(off_span, basis).norm(dim=1)).min()) > 0.1
    assert in_basis(off_span, None) is off_span
    assert noun_span_basis(F.normalize(torch.randn(20, 20, generator=g), dim=1)) is None   # M' = D: nothing saved
    with half_operands(torch.bfloat16):    # counterparts of rounded nouns leave the span: no basis
        assert noun_span_basis(nouns) is None


def few_noun_data(seed=0):
    """Blobs round 3 directions in D = 32 and 19 nouns (M' < D: a noun basis): 3 near each direction, 10 random,
    so that the text side carries weight."""
    g = torch.Generator().manual_seed(seed + 10)
    centres = F.normalize(torch.randn(3, 32, generator=g), dim=1)
    x = F.normalize(centres[torch.arange(90) % 3] + 0.6 * torch.randn(90, 32, generator=g) / 32 ** 0.5, dim=1)
    nouns = torch.cat([centres.repeat_interleave(3, 0) + 0.3 * torch.randn(9, 32, generator=g) / 32 ** 0.5,
                       torch.randn(10, 32, generator=g)])
    return x, F.normalize(nouns, dim=1)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_fused_features_in_the_noun_span_have_the_full_spaces_dot_products(share):
    x, nouns = few_noun_data()
    space = relations.with_relations(build_semantic_space(x, nouns, 3, seed=0, n_neighbours=5), "auto", 0.005, 3)
    assert space.text_weight > 0.1          # the text columns count
    space = relations.fused_view(space, share)
    n_kept = space.nouns.shape[0]
    assert space.noun_basis is not None and space.noun_basis.shape == (32, n_kept)
    assert space.images_in_noun_span == (share >= 1.0)
    reduced = fused_features(space, 3)
    full = fused_features(dataclasses.replace(space, noun_basis=None), 3)
    assert full.shape[1] == 64 and reduced.shape[1] == (2 * n_kept if share >= 1.0 else 32 + n_kept)
    torch.testing.assert_close(reduced @ reduced.t(), full @ full.t(), atol=2e-5, rtol=0)
    # Each part on its own, so that neither can hide behind the other's larger dot products.
    image_width = reduced.shape[1] - n_kept
    for part, (lo, hi), (full_lo, full_hi) in (("image", (0, image_width), (0, 32)),
                                               ("text", (image_width, None), (32, None))):
        small, whole = reduced[:, lo:hi], full[:, full_lo:full_hi]
        torch.testing.assert_close(small @ small.t(), whole @ whole.t(), atol=2e-5, rtol=0, msg=part)
    assert torch.equal(spherical_kmeans(reduced, 3, seed=1).labels, spherical_kmeans(full, 3, seed=1).labels)


def equally_near(features, found, expected, atol=1e-5):
    """Whether two neighbour lists of the same rows are equally good in ``features``' own dot products: per row the
    same sorted similarities (lists may differ only where rows tie, which float rounding decides)."""
    def sims(lists):
        return (features[:, None, :] * features[lists]).sum(-1).sort(dim=1).values
    return bool(torch.allclose(sims(found), sims(expected), atol=atol, rtol=0))


def test_a_fit_in_the_noun_span_is_the_fit_in_all_columns(monkeypatch):
    import laic.stage0 as stage0

    x, nouns = few_noun_data(seed=4)
    spans, text_widths = [], []
    real, real_graphs = stage0.noun_span_basis, stage0._graphs
    monkeypatch.setattr(stage0, "noun_span_basis", lambda v: spans.append(real(v)) or spans[-1])
    monkeypatch.setattr(stage0, "_graphs", lambda images, texts, *a: text_widths.append(texts.shape[1])
                        or real_graphs(images, texts, *a))
    reduced = LAIC(n_clusters=3, random_state=0).fit(x, nouns)
    reduced_space = build_semantic_space(x, nouns, 3, seed=0)
    assert len(spans) == 4 and all(basis is not None for basis in spans)   # the nouns' and the random nouns'
    # The text graph was built on the coordinates (as many columns as kept nouns), not on D = 32.
    assert text_widths == [reduced_space.noun_basis.shape[1]] * 2 and text_widths[0] < 32
    assert reduced.agreement_ > 0.1 and reduced.relation_share_ == 1.0   # both fused parts in the nouns' span
    monkeypatch.setattr(stage0, "noun_span_basis", lambda v: None)
    full = LAIC(n_clusters=3, random_state=0).fit(x, nouns)
    full_space = build_semantic_space(x, nouns, 3, seed=0)
    assert np.array_equal(reduced.labels_, full.labels_)
    # The text graph built on the coordinates is the full columns' one up to ties (these mixtures of 19 nouns tie
    # often: rounding moves the agreements by a few percent, so the reports are not compared).
    assert torch.equal(reduced_space.image_neighbours, full_space.image_neighbours)
    assert equally_near(full_space.texts, reduced_space.text_neighbours, full_space.text_neighbours)
    assert not torch.equal(reduced_space.text_neighbours, reduced_space.image_neighbours)


def test_null_texts_come_in_their_random_nouns_span_with_the_full_columns_dot_products(monkeypatch):
    import laic.stage0 as stage0

    x, _ = few_noun_data(seed=2)
    centres = noun_centres(x, 3, seed=0)
    reduced = null_text_features(x, centres, 60, 2, 0.05, seed=0)
    monkeypatch.setattr(stage0, "noun_span_basis", lambda v: None)
    full = null_text_features(x, centres, 60, 2, 0.05, seed=0)
    assert full.shape == (90, 32) and reduced.shape[0] == 90 and reduced.shape[1] < 32   # kept random nouns < D
    torch.testing.assert_close(reduced @ reduced.t(), full @ full.t(), atol=2e-6, rtol=0)
    # Their graph, as null_agreement builds it, is equally near in the full columns.
    assert equally_near(full, knn_graph(reduced, 5)[1], knn_graph(full, 5)[1])


def test_partition_agreement_beyond_its_row_cap_runs_on_a_sample(monkeypatch):
    import laic.kmeans
    import laic.stage0 as stage0

    x, _ = sphere_blobs(n_per=60, k=5, dim=16, spread=0.3, seed=8)
    g = torch.Generator().manual_seed(1)
    texts = F.normalize(x + 0.05 * torch.randn(x.shape, generator=g), dim=1)
    nulls = F.normalize(torch.randn(x.shape, generator=g), dim=1)
    whole = partition_agreement(x, texts, nulls, 5, seed=0)
    seen = []
    real = laic.kmeans.spherical_kmeans
    monkeypatch.setattr(stage0, "spherical_kmeans", lambda f, *a, **k: seen.append(len(f)) or real(f, *a, **k))
    monkeypatch.setattr(stage0, "PARTITION_ROWS", 150)     # 300 rows: a sample of 150 (K = 5: 20 K = 100)
    sampled = partition_agreement(x, texts, nulls, 5, seed=0)
    assert seen == [150, 150, 150]
    assert whole > 0.5 and abs(sampled - whole) < 0.15
    monkeypatch.setattr(stage0, "PARTITION_ROWS", 300)     # at the cap: every row, the same value as before
    assert partition_agreement(x, texts, nulls, 5, seed=0) == whole


def test_null_agreement_from_a_sample_of_rows_estimates_the_whole():
    x, _ = sphere_blobs(n_per=60, k=5, dim=16, spread=0.5, seed=8)
    _, image_nbrs = knn_graph(x, 8)
    centres = noun_centres(x, 5, seed=0)

    def null(seed, **options):
        return null_agreement(null_text_features(x, centres, 60, 2, 0.005, seed=seed), image_nbrs, seed=seed,
                              **options)

    whole = null(0)
    # Exact at max_rows >= N; from half the rows an estimate of the same mean (300 rows x 8 neighbours).
    assert null(0, max_rows=300) == whole
    half = null(0, max_rows=150)
    assert abs(half - whole) < 0.1 and 0.0 <= half <= 1.0
    # Every row of the sample is its own most similar row: with it dropped, the lists hold k other rows.
    assert null(1, max_rows=299) == pytest.approx(null(1), abs=0.05)


@pytest.mark.parametrize("weights", [[0.0, 3.0, 1.0, 0.0, 6.0, 0.5, 0.0], [0.0] * 5, [2.0]])
def test_kmeans_pp_draws_rows_in_proportion_to_their_weights(weights, device):
    # Against the weights themselves: 40,000 draws, frequencies within 5 standard errors; a zero-weight row is never
    # drawn unless all are zero (then uniform).
    from laic.kmeans import weighted_draws
    w = torch.tensor(weights, device=device)
    uniforms = torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    draws = weighted_draws(w, uniforms).cpu()
    w = w.cpu()
    frequency = torch.bincount(draws, minlength=len(w)).double() / len(draws)
    expected = w.double() / w.sum() if w.sum() > 0 else torch.full((len(w),), 1.0 / len(w), dtype=torch.float64)
    assert torch.all(frequency[expected == 0] == 0)
    assert torch.allclose(frequency, expected, atol=5 * 0.5 / len(draws) ** 0.5)
    # The ends of [0, 1): the first row of positive weight and the last one.
    positive = (expected > 0).nonzero()[:, 0]
    ends = weighted_draws(w.to(device), torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64, device=device))
    assert ends.tolist() == [int(positive[0]), int(positive[-1])]


def _kmeans_pp_loop(xs, k, trials, g):
    # One k-means++ seeding as the definition reads: float64, candidate after candidate, its random numbers drawn
    # from g as laic draws them (the first row, then the uniforms).
    rows = [int(torch.randint(len(xs), (1,), generator=g))]
    uniforms = torch.rand(k - 1, trials, dtype=torch.float64, generator=g).numpy()
    closest = np.clip(1.0 - xs @ xs[rows[0]], 0.0, None)
    for step in range(k - 1):
        cumulative = np.cumsum(closest)
        candidates = [int(np.searchsorted(cumulative, u * cumulative[-1], side="right")) for u in uniforms[step]]
        potentials = [np.minimum(np.clip(1.0 - xs @ xs[c], 0.0, None), closest) for c in candidates]
        best = int(np.argmin([p.sum() for p in potentials]))
        rows.append(candidates[best])
        closest = potentials[best]
    return rows


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("n_starts, block_elements", [(1, None), (4, None), (5, 2 * 4 * 120)])
def test_kmeans_pp_seeds_match_a_loop_over_the_same_random_numbers(greedy, n_starts, block_elements, monkeypatch,
                                                                   device):
    # Greedy k-means++ keeps, of its 2 + log k candidates, the one that lowers the potential most: against a plain
    # float64 loop over the same draws (Lloyd repairs bad seeds, so the clustering tests could not tell best from
    # worst). Several seedings step in lockstep, in groups of what fits a block (the last case: groups of 2, 2, 1
    # when greedy): each is the loop's seeding on the generator's state after the seedings before it.
    import laic.kmeans as kmeans
    if block_elements is not None:
        monkeypatch.setattr(kmeans, "BLOCK_ELEMENTS", block_elements)
    x = F.normalize(torch.randn(120, 8, generator=torch.Generator().manual_seed(5)), dim=1)
    k = 7
    seeds = kmeans._kmeans_pp(x.to(device), k, torch.Generator().manual_seed(3), greedy=greedy, n_starts=n_starts)
    assert seeds.shape == (n_starts, k, 8) and seeds.device.type == device.type
    seeds = seeds.cpu()
    g = torch.Generator().manual_seed(3)
    trials = 2 + int(np.log(k)) if greedy else 1
    for seeding in seeds:
        torch.testing.assert_close(seeding, x[_kmeans_pp_loop(x.double().numpy(), k, trials, g)], rtol=0, atol=0)


@pytest.mark.parametrize("with_gram", [False, True])
def test_kmeans_pp_seedings_in_lockstep_are_each_the_seeding_alone(with_gram):
    # At a size where the loop above is too slow: ten seedings at once against ten one after another on the same
    # generator. With the Gram matrix bit for bit (row lookups); from products on distinct random rows too here,
    # though a BLAS may round a row's product otherwise in a larger batch: no two distances are that close here.
    import laic.kmeans as kmeans
    x = F.normalize(torch.randn(3000, 48, generator=torch.Generator().manual_seed(2)), dim=1)
    gram = x @ x.t() if with_gram else None
    together = kmeans._kmeans_pp(x, 40, torch.Generator().manual_seed(9), gram=gram, n_starts=10)
    g = torch.Generator().manual_seed(9)
    alone = torch.cat([kmeans._kmeans_pp(x, 40, g, gram=gram) for _ in range(10)])
    assert torch.equal(together, alone)


def test_kmeans_pp_seedings_in_lockstep_over_copies_of_rows_have_the_potential_of_each_alone():
    # Copies of 5 rows, k = 6: once the 5 are chosen, every distance is rounding noise, and the batch's rounding (not
    # the seeding's) may pick another copy. The seeds' rows and their potential (the sum over rows of the distance to
    # the nearest seed) are the same as alone, up to that rounding.
    import laic.kmeans as kmeans
    x = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1).repeat(40, 1)
    together = kmeans._kmeans_pp(x, 6, torch.Generator().manual_seed(7), n_starts=4)
    g = torch.Generator().manual_seed(7)
    alone = torch.cat([kmeans._kmeans_pp(x, 6, g) for _ in range(4)])

    def potential(seeds):
        return (1.0 - (x.double() @ seeds.double().t()).amax(1)).clamp_min(0).sum()

    for a, b in zip(together, alone):
        assert {tuple(r) for r in a.tolist()} == {tuple(r) for r in b.tolist()}
        assert float(potential(a)) == pytest.approx(float(potential(b)), abs=1e-9)


def test_kmeans_seeded_from_a_sample_still_recovers_blobs(monkeypatch):
    import laic.kmeans as kmeans
    x, truth = sphere_blobs(n_per=100, k=6, dim=16, spread=0.12, seed=1)
    monkeypatch.setattr(kmeans, "SEED_SAMPLE_ROWS", 150)    # seeds from 150 of the 600 rows
    result = spherical_kmeans(x, 6, n_init=3, seed=0)
    assert adjusted_rand_score(truth, result.labels.numpy()) > 0.95


def test_kmeans_restarts_on_a_sample_keep_the_best_and_run_it_on_all_rows(monkeypatch):
    """Beyond the sample size the restarts run on the sample and only the best one runs on all rows: the result is
    as good as every restart on all rows (objective within 0.1%, the blobs recovered)."""
    import laic.kmeans as kmeans
    x, truth = sphere_blobs(n_per=100, k=6, dim=16, spread=0.2, seed=3)
    everywhere = spherical_kmeans(x, 6, n_init=4, seed=0)
    monkeypatch.setattr(kmeans, "SEED_SAMPLE_ROWS", 200)
    lloyd_rows = []
    real_lloyd = kmeans._lloyd
    monkeypatch.setattr(kmeans, "_lloyd", lambda x_, *a: lloyd_rows.append(x_.shape[0]) or real_lloyd(x_, *a))
    result = spherical_kmeans(x, 6, n_init=4, seed=0)
    assert lloyd_rows == [200] * 4 + [600]          # four restarts on the sample, then one run on all rows
    assert result.objective == pytest.approx(everywhere.objective, rel=1e-3)
    assert adjusted_rand_score(truth, result.labels.numpy()) > 0.95


@pytest.mark.parametrize("check_every", [1, 4])
def test_kmeans_with_fewer_distinct_rows_than_k_converges_without_the_reseeding_margin(check_every, monkeypatch):
    # RESEED_MIN_GAIN keeps exact copies from being re-seeded; the convergence test against the last assignment and
    # the stopping assignment's labels (not its re-seeding's) guard against the copies' cycle too, each on its own:
    # with the margin off, the copies still converge at once and stay together (as scikit-learn keeps them).
    import laic.kmeans

    monkeypatch.setattr(laic.kmeans, "lloyd_check_every", lambda device: check_every)
    monkeypatch.setattr(laic.kmeans, "RESEED_MIN_GAIN", float("-inf"))
    rows = torch.eye(4)[:2].repeat(10, 1)
    result = spherical_kmeans(rows, 3, n_init=3, max_iter=100, seed=0)
    assert result.n_iter <= 2 * check_every
    assert len(set(result.labels[0::2].tolist())) == 1 and len(set(result.labels[1::2].tolist())) == 1
    assert result.labels[0] != result.labels[1]
    centres_of_rows = result.centres[result.labels]
    assert torch.allclose((centres_of_rows * rows).sum(1), torch.ones(20))     # every row on its centre


def test_batched_weighted_draws_are_each_rows_own_draws():
    # "Batched alike: weights [S, N] and uniforms [S, T] give [S, T] draws, row s from weights s": a row of zero
    # weights draws uniformly over all its rows whatever the other rows weigh.
    from laic.kmeans import weighted_draws

    weights = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [2.0, 0.0, 0.0, 0.0]])
    uniforms = torch.rand(3, 400, generator=torch.Generator().manual_seed(0))
    batched = weighted_draws(weights, uniforms)
    for s in range(3):
        torch.testing.assert_close(batched[s], weighted_draws(weights[s], uniforms[s]))
    assert set(batched[0].tolist()) == {0, 1, 2, 3}
    assert set(batched[1].tolist()) == {1, 3} and set(batched[2].tolist()) == {0}


def test_kmeans_of_features_that_require_grad_builds_no_graph():
    # "nothing here is differentiable: no graph through the centres": without the detach the centres carried a
    # graph through every Lloyd step, and reading the objective warned of a tensor with requires_grad=True.
    import warnings

    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = spherical_kmeans(features, 3, n_init=2, seed=0)
    assert not result.centres.requires_grad and result.centres.grad_fn is None
    expected = spherical_kmeans(features.detach(), 3, n_init=2, seed=0)
    torch.testing.assert_close(result.centres, expected.centres, rtol=0, atol=0)
