"""laic.metrics against scikit-learn (and a brute-force permutation search for ACC)."""
import itertools
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from laic.metrics import adjusted_rand_index, cluster_accuracy, evaluate, normalized_mutual_info


def _brute_force_accuracy(t, p):
    """Best one-to-one mapping clusters -> classes by trying every assignment (small label sets only)."""
    classes, clusters = np.unique(t), np.unique(p)
    best = 0
    slots = list(classes) + [None] * max(0, len(clusters) - len(classes))
    for perm in itertools.permutations(slots, len(clusters)):
        mapping = dict(zip(clusters, perm))
        best = max(best, sum(mapping[c] == y for c, y in zip(p, t)))
    return best / len(t)


@pytest.mark.parametrize("n_classes,n_clusters", [(3, 3), (4, 2), (2, 5), (5, 5)])
def test_accuracy_matches_brute_force(n_classes, n_clusters):
    rng = np.random.default_rng(n_classes * 10 + n_clusters)
    t = rng.integers(0, n_classes, 40)
    p = rng.integers(0, n_clusters, 40)
    assert cluster_accuracy(t, p) == pytest.approx(_brute_force_accuracy(t, p))


def test_nmi_of_identical_partitions_is_at_most_one():
    # Rounding gave 1.0000000000000002 for a third of random identical partitions (`laic evaluate --json` printed
    # it, out of NMI's range); scikit-learn gives 1.0 for each.
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 7):
        for _ in range(30):
            t = rng.integers(0, n_classes, int(rng.integers(5, 60)))
            assert 1 - 1e-12 < normalized_mutual_info(t, t) <= 1.0 == skm.normalized_mutual_info_score(t, t)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_classes,n_clusters", [(10, 10), (7, 12), (12, 7), (1, 3)])
def test_nmi_and_ari_match_sklearn(seed, n_classes, n_clusters):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_classes, 300)
    # Partly informative predictions, with arbitrary (non-contiguous) cluster ids.
    p = np.where(rng.random(300) < 0.6, t % n_clusters, rng.integers(0, n_clusters, 300)) * 7 + 3
    assert normalized_mutual_info(t, p) == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-10)
    assert adjusted_rand_index(t, p) == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-10)


def test_trivial_partitions_score_as_scikit_learn_scores_them():
    # One class and one cluster on both sides (only one side was ever trivial above), and no image clustered.
    for t, p in (([3, 3, 3, 3], [7, 7, 7, 7]), ([0], [5])):
        assert normalized_mutual_info(t, p) == skm.normalized_mutual_info_score(t, p) == 1.0
        assert adjusted_rand_index(t, p) == skm.adjusted_rand_score(t, p) == 1.0
    assert cluster_accuracy([0, 1, 1], [-1, -1, -1]) == 0.0
    assert evaluate([0, 1, 1], [-1, -1, -1])["acc"] == 0.0


def test_perfect_and_relabelled_partitions():
    t = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([5, 5, 9, 9, 1, 1])
    assert evaluate(t, p) == {"acc": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        cluster_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="one-dimensional"):
        normalized_mutual_info(np.zeros((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        adjusted_rand_index([0.5, 1.0], [0, 1])
    # The row at fault named (it was "got dtype float64", while whole float64 values are taken).
    for bad, shown in ((np.nan, "nan"), (np.inf, "inf"), (2.5, "2.5")):
        with pytest.raises(ValueError, match=f"labels_pred must hold integer labels .whole, finite numbers., but row 2 "
                                             f"is {shown}"):
            evaluate([0, 1, 1], [0.0, 1.0, bad])
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [])
    # Ids at the ends of int64 beside an unclustered image: its singleton id once overflowed (a RuntimeWarning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate([0, 1, 2], [2 ** 63 - 1, 0, -2 ** 63]) == pytest.approx({"acc": 2 / 3, "nmi": 1.0, "ari": 1.0})
    # Ids beyond int64 wrapped: 2**64 - 1 became -1, scored as an unclustered image.
    for huge in (np.array([0, 0, 1, 2 ** 64 - 1], np.uint64), np.array([0.0, 0.0, 1.0, 1e19])):
        with pytest.raises(ValueError, match="beyond int64's range"):
            evaluate([0, 0, 1, 1], huge)
    # -1 for an unlabelled image would be scored as one more class (ACC 75 here, not 100 over the labelled ones).
    for score in (evaluate, cluster_accuracy, normalized_mutual_info, adjusted_rand_index):
        with pytest.raises(ValueError, match="labels_true holds 1 negative label"):
            score([0, 0, 1, -1], [0, 0, 1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_unclustered_images_are_wrong_for_acc_one_cluster_for_nmi_and_singletons_for_ari(seed):
    # laic predict's -1 (an unreadable image) is no cluster, given the least credit each score allows. As singletons
    # NMI credited each with its class: every prediction -1 scored 0.51 (a helper's audit).
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, 30)
    p = rng.integers(-1, 3, 30)
    p[0] = 0
    scores = evaluate(t, p)
    clustered = p >= 0
    assert scores["acc"] == pytest.approx(_brute_force_accuracy(t[clustered], p[clustered]) * clustered.mean())
    singletons = np.where(clustered, p, 100 + np.arange(30))
    assert scores["nmi"] == pytest.approx(min(skm.normalized_mutual_info_score(t, singletons),
                                              skm.normalized_mutual_info_score(t, np.where(clustered, p, 100))))
    assert scores["ari"] == pytest.approx(skm.adjusted_rand_score(t, singletons))
    # Neither reading alone: every image -1 scored 0.51 as singletons; a class all -1 scored 1.0 as one cluster.
    assert evaluate(t, np.full(30, -1))["nmi"] == 0.0 == skm.normalized_mutual_info_score(t, np.zeros(30))
    pure = evaluate([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, -1, -1])["nmi"]
    assert pure == pytest.approx(skm.normalized_mutual_info_score([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 8, 9])) and pure < 0.95
    # The reviewer's case: two unreadable images of one class once scored a perfect 100 %.
    assert evaluate([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, -1, -1])["acc"] == pytest.approx(4 / 6)
    # Each function alone scores them alike (cluster_accuracy matched the -1s to a class: 100 % here, not 50 %).
    assert cluster_accuracy(t, p) == scores["acc"]
    assert normalized_mutual_info(t, p) == scores["nmi"] and adjusted_rand_index(t, p) == scores["ari"]
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [-1, -1, -1, 0, 0, 0]) == pytest.approx(3 / 6)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [-1, -1, -1, 0, 0, 0]) == pytest.approx(
        skm.adjusted_rand_score([0, 0, 0, 1, 1, 1], [10, 11, 12, 0, 0, 0]))


def test_many_clusters_need_memory_of_the_non_zero_cells_only():
    # A dense classes x clusters table: 1,000 classes against 200,000 distinct predictions held 1.6 GB (8 GB at a
    # million). The scores are known here: each class matches one of its own singletons, and the ARI of
    # singletons is 0.
    import tracemalloc

    truth = np.random.default_rng(0).integers(0, 1000, 200_000)
    tracemalloc.start()
    try:
        scores = evaluate(truth, np.arange(200_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scores["acc"] == pytest.approx(1000 / 200_000) and scores["ari"] == pytest.approx(0.0, abs=1e-12)
    assert scores["nmi"] == pytest.approx(skm.normalized_mutual_info_score(truth, np.arange(200_000)), abs=1e-9)
    assert peak < 100 * 2 ** 20, peak


@pytest.mark.parametrize("as_given", [lambda t: np.array(["cat", "dog", "emu"], dtype=object)[t],   # pandas' strings
                                      lambda t: np.array([b"cat", b"dog", b"emu"])[t],             # HDF5's
                                      lambda t: torch.from_numpy(t == 1),                          # booleans
                                      lambda t: np.array([False, True, False], dtype=object)[t],
                                      lambda t: np.array([b"cat", b"dog", b"emu"], dtype=object)[t],   # h5py's
                                      lambda t: np.array(list(np.array(["cat", "dog", "emu"])), dtype=object)[t]])
def test_class_names_or_booleans_in_any_container_score_as_scikit_learn_scores_them(as_given):
    # An object array of names and a tensor of booleans were refused ("must hold integer labels"), though names
    # and booleans are taken; scikit-learn takes them all.
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 3, 60), rng.integers(0, 4, 60)
    given = as_given(t)
    plain = [v.decode() if isinstance(v, bytes) else v       # (scikit-learn refuses bytes)
             for v in np.asarray(given.numpy() if isinstance(given, torch.Tensor) else given).tolist()]
    got = evaluate(given, p)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(plain, p), abs=1e-12)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(plain, p), abs=1e-12)
    assert got["acc"] == pytest.approx(cluster_accuracy(np.unique(plain, return_inverse=True)[1], p), abs=0)


def test_byte_string_class_names_are_named_by_their_text():
    from laic.io import truth_and_names

    ids, names = truth_and_names("labels", np.array([b"dog", b"cat", "\u00e9mu".encode(), b"\xff"]))
    assert names == ["cat", "dog", "\u00e9mu", "\\xff"] and ids.tolist() == [1, 0, 2, 3]   # was "b'cat'"
    with pytest.raises(ValueError, match="must hold integer labels"):
        truth_and_names("labels", np.array(["cat", 3], dtype=object))     # mixed objects: refused as before


@pytest.mark.parametrize("unclustered, said", [(1, "1 image without a cluster"), (2, "2 images without a cluster")])
def test_laic_evaluate_counts_the_images_without_a_cluster(tmp_path, capsys, unclustered, said):
    # "1 images have no cluster"
    from laic.cli import main

    pred = np.array([0, 0, 1, 1, 2, 2])
    pred[:unclustered] = -1
    np.save(tmp_path / "t.npy", np.array([0, 0, 1, 1, 2, 2]))
    np.save(tmp_path / "p.npy", pred)
    assert main(["evaluate", "--labels", str(tmp_path / "t.npy"), "--pred", str(tmp_path / "p.npy")]) == 0
    assert f"  {said} (-1: unreadable in `laic predict`): wrong for ACC, each a cluster of its own for ARI, for NMI " \
        "the lesser of that and one cluster" in capsys.readouterr().out
