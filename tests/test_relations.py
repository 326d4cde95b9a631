"""The relational representation (laic.relations), the neighbour filters, the LAIC switches that use them, and the
10-NN label-consistency diagnostic: each against an independent dense float64 / brute-force computation."""
import re
import warnings

import numpy as np
import pytest
import torch

import laic.model
import laic.operands
import laic.stage0
from laic import LAIC
from laic.metrics import neighbour_label_consistency
import laic.relations
from laic.relations import gram_root, noun_usage, relation_features, relation_map, relation_rows
from laic.stage0 import TEXT_TAU, build_semantic_space

from test_model import semantic_blobs


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def dense_usage(images: np.ndarray, nouns: np.ndarray, tau: float) -> np.ndarray:
    """Each noun's mean softmax weight over the (centred) images at temperature tau, float64."""
    logits = _unit(images) @ _unit(nouns).T / tau
    weights = np.exp(logits - logits.max(1, keepdims=True))
    return (weights / weights.sum(1, keepdims=True)).mean(0)


def dense_weights(images: np.ndarray, nouns: np.ndarray, tau: float, share: float) -> np.ndarray:
    """The nouns' weights at a usage share: ``share`` of the usage, the rest uniform."""
    return share * dense_usage(images, nouns, tau) + (1 - share) / len(nouns)


def dense_relation_rows(images: np.ndarray, nouns: np.ndarray, tau=None, share: float = 1.0) -> np.ndarray:
    """The definition in float64: cosines of the images to the nouns, centred over the nouns, unit rows; with ``tau``
    each noun weighted by ``dense_weights(..., tau, share)``: centred by the weighted mean, columns scaled by
    sqrt(weight)."""
    c = _unit(images) @ _unit(nouns).T
    if tau is None:
        c = c - c.mean(1, keepdims=True)
    else:
        w = dense_weights(images, nouns, tau, share)
        c = (c - (c @ w)[:, None]) * np.sqrt(w)
    return _unit(c)


def model_relation_rows(model, centred: np.ndarray) -> np.ndarray:
    """The dense relation rows of a fitted model's centred images, weighted as its fit weighted them."""
    return dense_relation_rows(centred, model.nouns_.double().numpy(), tau=model.text_tau, share=model.usage_share_)


def brute_force_knn(rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most cosine-similar other rows (float64, a loop over rows)."""
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    out = []
    for i in range(len(unit)):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        out.append(np.argsort(-sims, kind="stable")[:k])
    return np.array(out)


@pytest.mark.parametrize("n_nouns", [7, 80])   # fewer nouns than dimensions (rank-deficient map) and more
def test_relation_features_have_the_cosines_of_the_relation_rows(n_nouns):
    g = np.random.default_rng(0)
    images, nouns = g.standard_normal((50, 24)), g.standard_normal((n_nouns, 24))
    dense = dense_relation_rows(images, nouns)
    feats = relation_features(torch.from_numpy(images).float(), relation_map(torch.from_numpy(nouns).float()))
    np.testing.assert_allclose(feats.double().numpy() @ feats.double().numpy().T, dense @ dense.T, atol=2e-5)
    rows = relation_rows(torch.from_numpy(images).float(), torch.from_numpy(nouns).float())
    np.testing.assert_allclose(rows.double().numpy(), dense, atol=2e-6)


@pytest.mark.parametrize("n_images, n_nouns, block", [(50, 7, 1 << 24), (37, 80, 100)])  # one block and many
def test_noun_usage_and_the_weighted_relation_rows(monkeypatch, n_images, n_nouns, block):
    monkeypatch.setattr(laic.relations, "BLOCK_ELEMENTS", block)
    g = np.random.default_rng(n_nouns)
    images, nouns = g.standard_normal((n_images, 24)), g.standard_normal((n_nouns, 24))
    x, v = torch.from_numpy(images).float(), torch.from_numpy(nouns).float()
    usage = noun_usage(x, v, 0.05)
    np.testing.assert_allclose(usage.numpy(), dense_usage(images, nouns, 0.05), rtol=1e-4, atol=1e-9)
    dense = dense_relation_rows(images, nouns, tau=0.05)
    feats = relation_features(x, relation_map(v, usage)).double().numpy()
    np.testing.assert_allclose(feats @ feats.T, dense @ dense.T, atol=2e-5)
    np.testing.assert_allclose(relation_rows(x, v, usage).double().numpy(), dense, atol=2e-5)


def test_noun_usage_keeps_float32_where_the_pipeline_casts_to_half_precision():
    # Under bfloat16 operands (a GPU's, forced here) the usage came from a bfloat16 product: its output rounded to
    # 8 bits moved logits at the stage's temperature by 0.2. It is a float32 product on every device.
    g = np.random.default_rng(5)
    images, nouns = g.standard_normal((300, 512)), g.standard_normal((90, 512))
    # (random rows: cosines within +-0.1 of 0, each row's best about 0.1; rounding to bfloat16 moved the usage by 3%)
    expected = dense_usage(images, nouns, TEXT_TAU)
    with laic.operands.half_operands(torch.bfloat16):
        usage = noun_usage(torch.from_numpy(images).float(), torch.from_numpy(nouns).float(), TEXT_TAU)
    np.testing.assert_allclose(usage.numpy(), expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("m, d", [(7, 24), (23, 24), (24, 24), (80, 24), (141, 512)])
def test_gram_root_is_the_square_root_of_the_gram_matrix(m, d):
    """Against numpy's eigen-decomposition of the D x D Gram matrix itself, rows centred as the map's are (so
    M <= D leaves it singular): the M x M path below D must give the same symmetric root."""
    a = np.random.default_rng(m).standard_normal((m, d))
    a -= a.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(a.T @ a)
    expected = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    root = gram_root(torch.from_numpy(a)).numpy()
    # The D x D path's zero eigenvalues come out at +-1e-15 of the largest, and their square roots (1e-8) blur its
    # root: compare at 1e-6 of the largest entry, and check the square itself tightly.
    np.testing.assert_allclose(root, expected, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(root @ root, a.T @ a, atol=1e-10 * np.abs(a.T @ a).max())
    np.testing.assert_allclose(root, root.T, atol=1e-12 * np.abs(root).max())
    assert np.linalg.eigvalsh(root).min() > -1e-9 * np.abs(root).max()     # the positive semi-definite root


def test_relation_map_needs_three_nouns_and_one_weight_each():
    for n_nouns in (1, 2):     # centred, they span 0 and 1 directions
        # (kept nouns: a vocabulary of 5 with nouns_per_centre=1 keeps 2 at K = 2, and was told to grow)
        with pytest.raises(ValueError, match="at least 3 distinct kept nouns .*a larger nouns_per_centre"):
            relation_map(torch.randn(n_nouns, 8))
    for weights in (torch.ones(4), torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0]),
                    torch.zeros(3)):
        with pytest.raises(ValueError, match="weights must be 3 finite, non-negative numbers"):
            relation_map(torch.randn(3, 8), weights)


def test_label_consistency_against_a_loop():
    g = np.random.default_rng(1)
    labels, neighbours = g.integers(0, 3, 40), g.integers(0, 40, (40, 5))
    mask = g.random((40, 5)) < 0.6
    mask[:, 0] = True
    expected = np.mean([np.mean([labels[j] == labels[i] for j in neighbours[i]]) for i in range(40)])
    masked = np.mean([np.mean([labels[j] == labels[i] for j, m in zip(neighbours[i], mask[i]) if m])
                      for i in range(40)])
    assert neighbour_label_consistency(labels, neighbours) == pytest.approx(expected)
    assert neighbour_label_consistency(labels, torch.from_numpy(neighbours), torch.from_numpy(mask)) == \
        pytest.approx(masked)
    with pytest.raises(ValueError, match="neighbours must be"):
        neighbour_label_consistency(labels[:10], neighbours)
    with pytest.raises(ValueError, match="at least one True"):
        neighbour_label_consistency(labels, neighbours, np.zeros_like(mask))
    # faiss's -1 for "no neighbour" read the last row's label; out-of-range and float indices were raw IndexErrors.
    padded = neighbours.copy()
    padded[3, 4] = -1
    with pytest.raises(ValueError, match=r"neighbours\[3, 4\] = -1 is not a row index in \[0, 40\); mark"):
        neighbour_label_consistency(labels, padded)
    unmasked = np.ones_like(mask)
    unmasked[3, 4] = False   # marked missing: scored as the loop over the others
    assert neighbour_label_consistency(labels, padded, unmasked) == pytest.approx(np.mean(
        [np.mean([labels[j] == labels[i] for j, m in zip(padded[i], unmasked[i]) if m]) for i in range(40)]))
    with pytest.raises(ValueError, match="= 40 is not a row index"):
        neighbour_label_consistency(labels, np.where(padded < 0, 40, padded))
    with pytest.raises(ValueError, match="must hold row indices .integers., got dtype float64"):
        neighbour_label_consistency(labels, neighbours.astype(float))


@pytest.fixture(scope="module")
def blobs():
    return semantic_blobs(n_per=20, k=3, dim=32)


@pytest.mark.parametrize("usage_weighting", [False, True])   # "auto" below, in the fits
def test_neighbour_filters_against_brute_force(blobs, usage_weighting):
    images, nouns, _, _ = blobs
    x, v = torch.from_numpy(images), torch.from_numpy(nouns)
    space = build_semantic_space(x, v, 3, neighbour_filter="relation", usage_weighting=usage_weighting)
    image_lists = space.image_neighbours.numpy()
    np.testing.assert_array_equal(image_lists, brute_force_knn(space.images.double().numpy(), 10))
    tau = TEXT_TAU if usage_weighting else None
    relation_lists = brute_force_knn(dense_relation_rows(space.images.double().numpy(),
                                                         nouns[space.noun_index.numpy()], tau=tau), 10)
    for i in range(len(images)):
        kept = [j for j in image_lists[i] if j in relation_lists[i]] or [image_lists[i][0]]
        assert space.neighbours[i][space.neighbour_mask[i]].tolist() == kept
    unfiltered = build_semantic_space(x, v, 3, neighbour_filter="none")
    np.testing.assert_array_equal(unfiltered.neighbours.numpy(), image_lists)
    assert bool(unfiltered.neighbour_mask.all())
    with pytest.raises(ValueError, match="neighbour_filter must be one of"):
        build_semantic_space(x, v, 3, neighbour_filter="images")


def test_relation_fused_clusters_the_relation_features_and_predicts_the_same_way(blobs, tmp_path):
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0, relation_fused=True).fit(images, nouns, names)
    # Independent: the fused centres are the unit means of the members' [relation row, sqrt(a) * text] rows, the
    # relation part compared through the dense relation rows' cosines.
    x = torch.from_numpy(images).float()
    centred = torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=1) - model.image_mean_, dim=1)
    feats = relation_features(centred, model.relation_map_).double().numpy()
    dense = model_relation_rows(model, centred.double().numpy())
    np.testing.assert_allclose(feats @ feats.T, dense @ dense.T, atol=2e-5)
    assert model.fused_centres_.shape == (3, 2 * images.shape[1])
    np.testing.assert_array_equal(model.predict(images), model.labels_)
    path = tmp_path / "model"
    model.save(path)
    np.testing.assert_allclose(LAIC.load(path).predict_proba(images), model.predict_proba(images), atol=1e-6)


def test_auto_relation_fused_moves_the_images_by_the_partition_factor(blobs, tmp_path, monkeypatch):
    # A partition factor strictly between 0 and 1 (the ramp's middle), so that the blend is neither end.
    monkeypatch.setattr(laic.stage0, "text_weight_factor", lambda partition_agreement: 0.4)
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0).fit(images, nouns, names)
    assert model.relation_fused == "auto" and model.relation_share_ == 0.4
    # Independent (float64): the relation features as the symmetric square root of the kept nouns' Gram matrix
    # (weighted as the fit weighted them, centred by the weighted mean) applied to the centred images, blended
    # 0.6 / 0.4, and the fused centres as the unit means of the members' unit [blend, sqrt(a) * text counterpart] rows.
    x = _unit(images.astype(np.float64))
    centred = _unit(x - model.image_mean_.double().numpy())
    v = _unit(model.nouns_.double().numpy())
    weights = dense_weights(centred, v, model.text_tau, model.usage_share_)
    vc = v - weights @ v
    w, q = np.linalg.eigh((vc * weights[:, None]).T @ vc)
    relations = _unit(centred @ ((q * np.sqrt(np.clip(w, 0, None))) @ q.T))
    blend = _unit(0.6 * centred + 0.4 * relations)
    logits = x @ v.T / model.text_tau
    mix = np.exp(logits - logits.max(1, keepdims=True))
    texts = _unit(_unit((mix / mix.sum(1, keepdims=True)) @ v) - model.text_mean_.double().numpy())
    fused = _unit(np.concatenate([blend, np.sqrt(model.agreement_) * texts], axis=1))
    expected = _unit(np.stack([fused[model.labels_ == c].sum(0) for c in range(3)]))
    np.testing.assert_allclose(model.fused_centres_.double().numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(model.predict(images), model.labels_)
    path = tmp_path / "model"
    model.save(path)
    loaded = LAIC.load(path)
    assert loaded.relation_share_ == 0.4
    np.testing.assert_allclose(loaded.predict_proba(images), model.predict_proba(images), atol=1e-6)


def test_relation_fused_share_and_blend():
    from laic.relations import blended_images, relation_share

    assert relation_share("auto", 0.3, 5) == 0.3 and relation_share(True, 0.3, 5) == 1.0
    assert relation_share(False, 1.0, 5) == 0.0 and relation_share("auto", 1.0, 1) == 0.0
    assert relation_share("auto", 1.0, 2) == 0.0 and relation_share("auto", 1.0, 3) == 1.0   # 2 nouns: 1 direction
    with pytest.raises(ValueError, match="relation_fused must be 'auto', True or False"):
        relation_share("on", 1.0, 5)
    a, b = (torch.nn.functional.normalize(torch.randn(9, 5), dim=1) for _ in range(2))
    assert blended_images(a, b, 0.0) is a and blended_images(a, None, 0.0) is a and blended_images(a, b, 1.0) is b
    np.testing.assert_allclose(blended_images(a, b, 0.25).numpy(), _unit(0.75 * a.numpy() + 0.25 * b.numpy()),
                               atol=1e-6)
    with pytest.raises(ValueError, match="with_relations"):
        blended_images(a, None, 0.5)


def test_an_auto_share_of_few_nouns_relation_features_is_said(blobs):
    # relation_fused="auto" moved cifar10-500's fused space onto 20 random nouns' relation features (ACC 77 -> 65,
    # seed 102's nouns) without a word (a QA helper, 12-08): a share of fewer than FEW_RELATION_NOUNS kept nouns is
    # said, with the switch that turns it off; a switch set by hand is not second-guessed.
    from laic.relations import FEW_RELATION_NOUNS, few_nouns_warning

    images, nouns, names, _ = blobs
    assert len(nouns) < FEW_RELATION_NOUNS
    with pytest.warns(UserWarning, match=r"the fused space takes a share of [\d.]+ of its image part from the "
                                         r"relation features of only 12 kept nouns \(of 12 given; .* pass "
                                         r"relation_fused=False \(laic fit: --relation-fused off\)") as said:
        model = LAIC(n_clusters=3, random_state=0, stage1_steps=0).fit(images, nouns, names)
    assert model.relation_share_ > 0 and said[0].filename == __file__
    for switch in (True, False):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            LAIC(n_clusters=3, random_state=0, stage1_steps=0, relation_fused=switch).fit(images, nouns, names)
        assert not [w for w in said if "relation features of only" in str(w.message)], switch
    assert "a share of 0.004 " in few_nouns_warning("auto", 0.004, FEW_RELATION_NOUNS - 1, 200)
    assert few_nouns_warning("auto", 0.2, FEW_RELATION_NOUNS, 200) is None
    assert few_nouns_warning("auto", 0.0, 3, 3) is None
    assert few_nouns_warning(True, 1.0, 3, 3) is None and few_nouns_warning(np.True_, 1.0, 3, 3) is None


def test_one_kept_noun_fits_without_relation_features_unless_asked(blobs):
    # One noun's centred relation row is zero: "auto" takes no share of it, True says what to change.
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0).fit(images, nouns[:1], names[:1])
    assert model.relation_share_ == 0.0 and model.relation_map_ is None
    with pytest.raises(ValueError, match="relation_fused=False"):   # too few kept nouns: found building the map
        relation_map(torch.from_numpy(nouns[:2]))


@pytest.mark.parametrize("switch, said", [(dict(relation_fused=True), "relation_fused=True (--relation-fused on)"),
                                          (dict(relation_view=True), "relation_view=True (--relation-view)"),
                                          (dict(neighbour_filter="relation"),
                                           "neighbour_filter='relation' (--neighbour-filter relation)")])
def test_relation_switches_with_too_few_nouns_are_refused_before_stage_0(blobs, monkeypatch, switch, said):
    # Refused after the whole of stage 0 before, naming a shape ("got (1, 512)") and LAIC's keywords alone.
    images, nouns, names, _ = blobs
    monkeypatch.setattr(laic.model, "build_semantic_space", lambda *a, **k: pytest.fail("stage 0 ran"))
    with pytest.raises(ValueError, match=re.escape(f"{said} needs the relational representation, which needs at "
                                                   "least 3 distinct nouns, got 2; use a larger vocabulary")):
        LAIC(n_clusters=3, stage1_steps=0, **switch).fit(images, nouns[:2], names[:2])


def test_unweighted_fit_takes_no_relation_share(blobs):
    # Without the partition weighting (its ablation) there is no partition agreement to trust the nouns by.
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0, partition_weighting=False).fit(images, nouns, names)
    assert model.agreement_report_["text_weight_factor"] == 1.0
    assert model.relation_share_ == 0.0 and model.relation_map_ is None


def test_image_only_fit_computes_no_relation_features(blobs):
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0, use_text=False).fit(images, nouns, names)
    assert model.relation_share_ == 0.0 and model.relation_map_ is None


def test_usage_weighting_weights_the_relation_nouns_by_their_usage(blobs, tmp_path):
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0, relation_fused=True, usage_weighting=True).fit(images, nouns, names)
    assert model.usage_share_ == 1.0
    x = torch.from_numpy(images).float()
    centred = torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=1) - model.image_mean_, dim=1)
    feats = relation_features(centred, model.relation_map_).double().numpy()
    weighted = dense_relation_rows(centred.double().numpy(), model.nouns_.double().numpy(), tau=model.text_tau)
    np.testing.assert_allclose(feats @ feats.T, weighted @ weighted.T, atol=2e-5)
    usage = dense_usage(centred.double().numpy(), model.nouns_.double().numpy(), model.text_tau)
    assert model.attended_nouns_ == pytest.approx(np.exp(-(usage * np.log(usage)).sum()), rel=1e-4)
    uniform = dense_relation_rows(centred.double().numpy(), model.nouns_.double().numpy())
    assert np.abs(weighted @ weighted.T - uniform @ uniform.T).max() > 1e-2   # the two weightings differ here
    np.testing.assert_array_equal(model.predict(images), model.labels_)
    model.save(tmp_path / "m")
    loaded = LAIC.load(tmp_path / "m")
    assert loaded.usage_weighting is True and loaded.usage_share_ == 1.0
    assert loaded.attended_nouns_ == model.attended_nouns_
    np.testing.assert_allclose(loaded.predict_proba(images), model.predict_proba(images), atol=1e-6)
    state = torch.load(tmp_path / "m", weights_only=True)
    del state["params"]["usage_weighting"], state["usage_share"], state["attended_nouns"]
    torch.save(state, tmp_path / "old")   # files of laic versions before the switch weighted the nouns alike
    old = LAIC.load(tmp_path / "old")
    assert old.usage_weighting is False and old.usage_share_ == 0.0 and np.isnan(old.attended_nouns_)
    off = LAIC(n_clusters=3, stage1_steps=0, relation_fused=True, usage_weighting=False).fit(images, nouns, names)
    assert off.usage_share_ == 0.0 and np.isnan(off.attended_nouns_)


def test_auto_usage_share_ramps_over_the_attended_nouns_a_cluster(blobs, monkeypatch):
    from laic.relations import USAGE_RAMP, usage_share

    low, high = USAGE_RAMP
    assert usage_share("auto", low * 40, 40) == 0.0 and usage_share("auto", high * 40, 40) == 1.0
    assert usage_share("auto", (low + high) / 2 * 40, 40) == pytest.approx(0.5)
    assert usage_share(True, 1.0, 40) == 1.0 and usage_share(False, 400.0, 40) == 0.0
    with pytest.raises(ValueError, match="usage_weighting must be 'auto', True or False"):
        usage_share("usage", 1.0, 40)
    # A fit whose attended nouns a cluster fall inside the ramp: its nouns take that share of their usage.
    images, nouns, names, _ = blobs
    probe = LAIC(n_clusters=3, stage1_steps=0, relation_fused=True, usage_weighting=True).fit(images, nouns, names)
    ratio = probe.attended_nouns_ / 3
    monkeypatch.setattr(laic.relations, "USAGE_RAMP", (ratio - 0.75, ratio + 0.25))
    model = LAIC(n_clusters=3, stage1_steps=0, relation_fused=True).fit(images, nouns, names)
    assert model.usage_weighting == "auto" and model.usage_share_ == pytest.approx(0.75)
    x = torch.from_numpy(images).float()
    centred = torch.nn.functional.normalize(torch.nn.functional.normalize(x, dim=1) - model.image_mean_, dim=1)
    feats = relation_features(centred, model.relation_map_).double().numpy()
    dense = model_relation_rows(model, centred.double().numpy())
    np.testing.assert_allclose(feats @ feats.T, dense @ dense.T, atol=2e-5)


@pytest.mark.parametrize("relation_fused, share", [(True, 1.0), (False, 0.0)])
def test_files_from_before_the_relation_share_load_with_their_switch_s_share(blobs, tmp_path, relation_fused, share):
    images, nouns, names, _ = blobs
    model = LAIC(n_clusters=3, stage1_steps=0, relation_fused=relation_fused).fit(images, nouns, names)
    assert model.relation_share_ == share
    model.save(tmp_path / "m")
    state = torch.load(tmp_path / "m", weights_only=True)
    del state["relation_share"]   # files of laic versions before it, whose relation_fused was a bool
    torch.save(state, tmp_path / "old")
    loaded = LAIC.load(tmp_path / "old")
    assert loaded.relation_share_ == share and loaded.relation_fused is relation_fused
    np.testing.assert_allclose(loaded.predict_proba(images), model.predict_proba(images), atol=1e-6)
    del state["params"]["relation_fused"]   # and files from before the switch itself, which fitted without it
    torch.save(state, tmp_path / "older")
    if not relation_fused:
        older = LAIC.load(tmp_path / "older")
        assert older.relation_fused is False and older.relation_share_ == 0.0


@pytest.mark.filterwarnings("ignore:.*clusters hold no image")
def test_relation_view_feeds_stage_1_the_relation_features(blobs, monkeypatch):
    images, nouns, names, _ = blobs
    seen = {}
    real_train_heads = laic.model.train_heads

    def spy(space, *args, **kwargs):
        seen["texts"], seen["images"], seen["nouns"] = space.texts, space.images, space.nouns
        return real_train_heads(space, *args, **kwargs)

    monkeypatch.setattr(laic.model, "train_heads", spy)
    # Keep the heads whatever the decision says, so that predict goes through the relation view too.
    # (It claims all 3 clusters in use: the fit warns when the heads leave one empty, not this test's point.)
    monkeypatch.setattr(laic.model, "stage1_decision", lambda *a, **k: {"ran": True, "kept": True,
                                                                        "stage1_clusters": 3})
    model = LAIC(n_clusters=3, stage1_steps=10, batch_size=32, relation_view=True).fit(images, nouns, names)
    dense = model_relation_rows(model, seen["images"].double().numpy())
    texts = seen["texts"].double().numpy()
    np.testing.assert_allclose(texts @ texts.T, dense @ dense.T, atol=2e-5)
    np.testing.assert_array_equal(model.predict(images), model.labels_)


@pytest.mark.parametrize("option, value, match", [
    ("neighbour_filter", "relations", "neighbour_filter must be one of"),
    ("relation_view", "yes", "relation_view must be True or False"),
    ("relation_fused", 1, "relation_fused must be 'auto', True or False"),
    ("relation_fused", "on", "relation_fused must be 'auto', True or False"),
    ("use_text", None, "use_text must be True or False"),
    ("usage_weighting", "usage", "usage_weighting must be 'auto', True or False"),
    ("usage_weighting", 1, "usage_weighting must be 'auto', True or False")])
def test_bad_switches_name_the_option(blobs, option, value, match):
    images, nouns, _, _ = blobs
    with pytest.raises(ValueError, match=match):
        LAIC(n_clusters=3, **{option: value}).fit(images, nouns)


def test_ablation_reads_the_sklearn_figures_of_the_data_readme(shared_data):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quality_ablation.py"
    spec = importlib.util.spec_from_file_location("laic_quality_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.sklearn_figures(shared_data)
    # Every set folder with features has its figure, read from the same README line a reader sees.
    sets = sorted(d.name for d in shared_data.iterdir() if (d / "features.npy").is_file())
    assert sorted(figures) == sets
    readme = (shared_data / "README.md").read_text()
    for name, acc in figures.items():
        assert f"{acc:.1f} / " in next(line for line in readme.splitlines() if line.startswith(f"| {name} "))
