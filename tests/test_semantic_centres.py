"""Adaptive semantic centres (laic.semantic_centres, laic.prompt_centres) and SIC's pseudo-labels
(laic.pseudo_labels), against independent computations; the prompt path on the tiny open_clip model."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from laic import LAIC
from laic.pseudo_labels import confident_pseudo_labels, relation_probabilities, semantic_centres
from laic.semantic_centres import (CentresConfig, centres_loss, cluster_mean_directions, confident_rows,
                                   continuous_centres, project_to_cap)
from host_reads import counting_host_reads
from test_model import semantic_blobs
from tiny_clip import register_tiny_clip


def unit64(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_argmax(features, centres):
    """Independent assignment: argmax of the float64 cosine of each row to each centre."""
    return (unit64(features) @ unit64(centres).T).argmax(1)


# ------------------------------------------------------------------------------------------------ continuous centres

def test_project_to_cap_is_the_nearest_point_of_the_cap():
    g = torch.Generator().manual_seed(0)
    origins = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    points = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    projected = project_to_cap(points, origins, 0.9)
    cos = (projected * origins).sum(1)
    inside = (points * origins).sum(1) >= 0.9
    assert torch.equal(projected[inside], points[inside])
    torch.testing.assert_close(cos[~inside], torch.full_like(cos[~inside], 0.9), atol=1e-5, rtol=0)
    # Nearest point of the cap: no random point of the cap's edge is closer to the original point.
    for i in (~inside).nonzero().flatten()[:5].tolist():
        o, p = origins[i].double(), points[i].double()
        tangents = torch.randn(200, 8, generator=g).double()
        tangents = F.normalize(tangents - (tangents @ o)[:, None] * o, dim=1)
        edge = 0.9 * o + (1 - 0.81) ** 0.5 * tangents
        assert float(projected[i].double() @ p) >= float((edge @ p).max()) - 1e-6


@pytest.fixture(scope="module")
def stage0_fit():
    images, nouns, names, truth = semantic_blobs(n_per=40, k=3, dim=32, seed=1)
    model = LAIC(n_clusters=3, random_state=0, stage1_steps=0)
    space, probs = model._fit(images, nouns, names)
    return model, space, probs, images, nouns, names


def test_continuous_centres_learn_within_the_trust_region():
    # Pseudo-labels from a random linear split that the initial noun mixtures do not fit: there is loss to lose.
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(150, 16, generator=g), dim=1)
    nouns = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    labels = (images @ torch.randn(16, 3, generator=g)).argmax(1)
    probs = F.one_hot(labels, 3).float()
    neighbours = (images @ images.t()).topk(6, dim=1).indices[:, 1:]
    mask = torch.ones_like(neighbours, dtype=torch.bool)
    config = CentresConfig(steps=40, batch_size=64, min_cosine=0.95, lr=0.05)
    result, origins = continuous_centres(images, nouns, labels, probs, neighbours, mask, 3, tau=0.05, config=config)
    loss = np.array(result.history["loss"])
    assert loss[-10:].mean() < loss[:10].mean() - 0.1
    # Origins: each cluster's noun mixture, computed here from the softmax weights over the nouns.
    x, v = unit64(images), unit64(nouns)
    weights = np.exp((x @ v.T - (x @ v.T).max(1, keepdims=True)) / 0.05)
    mixtures = unit64((weights / weights.sum(1, keepdims=True)) @ v)
    expected = unit64(np.stack([mixtures[labels.numpy() == c].sum(0) for c in range(3)]))
    np.testing.assert_allclose(origins.numpy(), expected, atol=1e-4)
    cos = (unit64(result.centres.numpy()) * expected).sum(1)
    assert (cos >= 0.95 - 1e-4).all() and (cos < 1 - 1e-3).all()   # they moved, within the cap
    np.testing.assert_array_equal(result.labels.numpy(), cosine_argmax(images, result.centres.numpy()))


def test_centre_training_steps_read_nothing_back_from_the_device():
    # As stage 1's loop (tests/test_stage1.py): the reads of a whole training do not grow with its steps.
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(90, 8, generator=g), dim=1)
    nouns = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    labels = torch.arange(90) % 3
    neighbours = (images @ images.t()).topk(5, dim=1).indices[:, 1:]
    mask = torch.rand(90, 4, generator=g) < 0.5
    mask[:, 0] = True
    reads = {}
    for steps in (2, 9):
        config = CentresConfig(steps=steps, batch_size=32)
        with counting_host_reads() as counts:
            result, _ = continuous_centres(images, nouns, labels, F.one_hot(labels, 3).float(), neighbours, mask, 3,
                                           tau=0.05, config=config)
        assert len(result.history["loss"]) == steps
        reads[steps] = counts
    assert reads[2] == reads[9]


def test_no_subnormal_gradient_reaches_a_product():
    """At CLIP's logit scale of 100 over many clusters the softmax's far entries, and their gradients, are float32
    subnormals, which Intel CPUs multiply on a slow path: the products carrying them to the centres took 21 of a
    25 s fit. Every matrix product of a training (forward and backward) now sees none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    tiny = torch.finfo(torch.float32).tiny

    class SubnormalProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.found += sum(int(((a != 0) & (a.abs() < tiny)).sum()) for a in args
                                  if isinstance(a, torch.Tensor) and a.dtype == torch.float32)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    nouns = F.normalize(torch.randn(400, 16, generator=g), dim=1)
    labels = torch.arange(300) % 200                      # 200 clusters: most logits are far below each row's best
    neighbours = (images @ images.t()).topk(5, dim=1).indices[:, 1:]
    config = CentresConfig(steps=5, batch_size=128)
    with SubnormalProducts() as products:
        continuous_centres(images, nouns, labels, F.one_hot(labels, 200).float(), neighbours, None, 200, tau=0.05,
                           config=config)
    assert products.found == 0


# ------------------------------------------------------------------------------------------------------------- SIC

def test_semantic_centres_and_pseudo_labels_match_a_brute_force_computation(stage0_fit):
    model, space, probs, images, _, _ = stage0_fit
    labels = probs.argmax(1)
    tau, k = model.text_tau, 3
    centres = semantic_centres(torch.from_numpy(images), space.nouns, labels, k, tau)
    x, v = unit64(images), unit64(space.nouns.numpy())
    expected = []
    for c in range(k):
        mean_relation = np.zeros(len(v))
        for i in np.flatnonzero(labels.numpy() == c):
            s = x[i] @ v.T / tau
            mean_relation += np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        expected.append(mean_relation @ v)
    np.testing.assert_allclose(centres.numpy(), unit64(expected), atol=1e-5)
    relation = relation_probabilities(torch.from_numpy(images), centres).double().numpy()
    logits = 100 * x @ unit64(expected).T
    ref = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(relation, ref / ref.sum(1, keepdims=True), atol=1e-4)


def brute_force_pseudo_labels(probs, fraction):
    n, k = probs.shape
    m = min(n, max(1, round(fraction * n / k)))
    chosen = {}
    for c in range(k):
        column = sorted(range(n), key=lambda i: (-probs[i, c], i))[:m]
        for i in column:
            if i not in chosen or probs[i, c] > probs[i, chosen[i]] or (probs[i, c] == probs[i, chosen[i]]
                                                                           and c < chosen[i]):
                chosen[i] = c
    rows = sorted(chosen)
    return np.array(rows), np.array([chosen[i] for i in rows])


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_confident_pseudo_labels_match_a_loop(fraction):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(60, 4, generator=g, dtype=torch.float64), dim=1)
    probs[5] = probs[6]            # equal rows: ties broken by the lower row
    rows, labels = confident_pseudo_labels(probs, fraction)
    ref_rows, ref_labels = brute_force_pseudo_labels(probs.numpy(), fraction)
    np.testing.assert_array_equal(rows.numpy(), ref_rows)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)


def test_sic_starts_its_running_shares_from_the_partition_and_its_pseudo_labels(stage0_fit, monkeypatch):
    # The rows without a pseudo-label were handed to train_centres as cluster 0 (a placeholder of zeros, masked out
    # of the loss): its running shares, which the balance term follows, began with about half of all rows there.
    import laic.pseudo_labels as pseudo_labels

    model, space, probs, images, _, _ = stage0_fit
    partition = probs.argmax(1)
    seen = {}

    def recorded(features, weights_fn, params, labels, confident, *args, **kwargs):
        seen.update(labels=labels.clone(), confident=confident.clone())
        raise StopIteration

    monkeypatch.setattr(pseudo_labels, "train_centres", recorded)
    with pytest.raises(StopIteration):
        pseudo_labels.sic_fit(space, torch.from_numpy(images), partition, 3, tau=model.text_tau)
    labels, confident = seen["labels"], seen["confident"]
    assert 0 < int(confident.sum()) < len(partition)
    assert torch.equal(labels[~confident], partition[~confident])
    rows, pseudo = confident_pseudo_labels(
        relation_probabilities(F.normalize(torch.from_numpy(images), dim=1),
                               semantic_centres(F.normalize(torch.from_numpy(images), dim=1), space.nouns, partition,
                                                3, model.text_tau)), 0.5)
    assert torch.equal(confident.nonzero().flatten(), rows) and torch.equal(labels[rows], pseudo)


def test_sic_option_reports_and_assigns_by_its_centres():
    images, nouns, names, truth = semantic_blobs(n_per=30, k=3, dim=32, seed=2)
    model = LAIC(n_clusters=3, random_state=0, stage1_steps=0, pseudo_labels="semantic").fit(images, nouns, names)
    report = model.refine_report_["semantic_pseudo_labels"]
    assert report["pseudo_labelled"] >= 3 and isinstance(report["kept"], bool)
    if report["kept"]:
        assert model.assignment_.space == "image"
        centred = unit64(unit64(images) - model.image_mean_.double().numpy())
        np.testing.assert_array_equal(model.labels_, cosine_argmax(centred, model.assignment_.centres.numpy()))
    np.testing.assert_array_equal(model.predict(images), model.labels_)


@pytest.mark.parametrize("option, value", [("semantic_centres", "yes"), ("pseudo_labels", "sic")])
def test_bad_option_values_name_the_option(option, value):
    images, nouns, names, _ = semantic_blobs(n_per=10, k=2, dim=16)
    with pytest.raises(ValueError, match=option):
        LAIC(n_clusters=2, **{option: value}).fit(images, nouns, names)


# ------------------------------------------------------------------------------------------------------ prompt path

@pytest.fixture(scope="module")
def tiny_tower():
    from laic.clip import load_clip

    model, _, tokenizer = load_clip(register_tiny_clip(), None, "cpu", seed=0)
    return model, tokenizer


def tower_blobs(model, tokenizer, n_per=20, seed=0):
    """Images around the tiny tower's own embeddings of three words (so that text and images share a space)."""
    words = ["cat", "truck", "apple", "house", "river", "shoe"]
    with torch.no_grad():
        nouns = F.normalize(model.encode_text(tokenizer([f"a {w}" for w in words])).float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(3).repeat_interleave(n_per)
    images = F.normalize(nouns[truth] + 0.2 * torch.randn(len(truth), nouns.shape[1], generator=g), dim=1)
    return images.numpy(), nouns.numpy(), words


def test_prompt_module_starts_at_the_towers_own_prompt_embedding(tiny_tower):
    from laic.prompt_centres import PromptCentres, frozen

    model, tokenizer = tiny_tower
    names = ["cat", "fire truck", "apple"]
    prompts = PromptCentres(model, tokenizer, names)
    with torch.no_grad():
        expected = model.encode_text(tokenizer([f"a photo of a {n}." for n in names])).float()
    torch.testing.assert_close(prompts(), expected, atol=1e-5, rtol=1e-5)
    assert [name for name, _ in prompts.named_parameters()] == ["ctx"]
    with frozen(model):
        prompts().sum().backward()
    assert prompts.ctx.grad is not None and prompts.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())   # restored after training


def test_prompt_centres_end_to_end_leave_the_tower_unchanged(tiny_tower, tmp_path):
    model, tokenizer = tiny_tower
    images, nouns, words = tower_blobs(model, tokenizer)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    laic = LAIC(n_clusters=3, random_state=0, stage1_steps=0, semantic_centres=True)
    laic.fit_trace(images, nouns, words, text_tower=(model, tokenizer))
    assert laic.refine_report_["semantic_centres"] == "prompts"
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    centres = laic.assignment_.centres.numpy()
    # The prompts moved: the centres are no longer the tower's embedding of any initial "a photo of a <noun>." prompt.
    with torch.no_grad():
        initial = F.normalize(model.encode_text(tokenizer([f"a photo of a {w}." for w in words])).float(), dim=1)
    assert (unit64(centres) @ initial.double().numpy().T).max() < 1 - 1e-4
    assert laic.assignment_.space == "clip"
    np.testing.assert_array_equal(laic.labels_, cosine_argmax(images, centres))
    nearest = (unit64(centres) @ unit64(laic.nouns_.numpy()).T).argmax(1)
    assert [names[0] for names in laic.cluster_names_] == [laic.noun_names_[j] for j in nearest]
    laic.save(tmp_path / "model")
    np.testing.assert_array_equal(LAIC.load(tmp_path / "model").predict(images), laic.labels_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: the tower on CUDA, the fit on CPU")
def test_prompt_centres_with_the_tower_on_cuda_and_the_fit_on_cpu(tiny_tower):
    # The fit's arrays on the CPU, a caller's tower on the GPU: the prompts train on the tower's device and the
    # model comes back on the fit's, with the partition the all-CPU fit finds (up to the devices' rounding).
    model, tokenizer = tiny_tower
    images, nouns, words = tower_blobs(model, tokenizer)
    on_cpu = LAIC(n_clusters=3, random_state=0, stage1_steps=0, semantic_centres=True, device="cpu")
    on_cpu.fit_trace(images, nouns, words, text_tower=(model, tokenizer))
    on_gpu = LAIC(n_clusters=3, random_state=0, stage1_steps=0, semantic_centres=True, device="cpu")
    on_gpu.fit_trace(images, nouns, words, text_tower=(copy.deepcopy(model).cuda(), tokenizer))
    assert on_gpu.assignment_.centres.device.type == "cpu"
    assert (on_gpu.labels_ == on_cpu.labels_).mean() > 0.95
    np.testing.assert_array_equal(on_gpu.predict(images), on_gpu.labels_)


# What a mutation audit (12-05) changed unnoticed in the centre trainer's parts, each against a plain loop.

def test_centre_training_starts_its_running_shares_from_the_labels_cluster_shares():
    """The balance term of the first step is the negative entropy of the running shares: momentum x the labels'
    cluster shares (here 25 / 10 / 5 of 40) + (1 - momentum) x the batch's mean assignment (the batch is every row,
    so its order does not matter), computed here in float64 from the starting centres."""
    from laic.semantic_centres import train_centres

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.tensor([0] * 25 + [1] * 10 + [2] * 5)
    start = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    weights = torch.nn.Parameter(start.clone())
    config = CentresConfig(steps=1, batch_size=40, scale=10.0)
    result = train_centres(x, lambda: weights, [weights], labels, torch.ones(40, dtype=torch.bool), [],
                           config=config)
    probs = torch.softmax(config.scale * x.double() @ start.double().t(), dim=1)
    shares = (config.share_momentum * torch.tensor([25, 10, 5], dtype=torch.float64) / 40
              + (1 - config.share_momentum) * probs.mean(0))
    assert result.history["balance"][0] == pytest.approx(float((shares * shares.log()).sum()), rel=1e-5)


def test_a_sic_partition_the_decision_rejects_leaves_the_partition_alone(monkeypatch):
    """SIC's partition replaces the one it starts from only when stage 1's label-free test accepts it (the module
    docstring of laic.refine): rejected, the fit is the fit without SIC."""
    import laic.refine as refine

    images, nouns, names, _ = semantic_blobs(n_per=30, k=3, dim=32, seed=2)
    plain = LAIC(n_clusters=3, random_state=0, stage1_steps=0).fit(images, nouns, names)
    monkeypatch.setattr(refine, "stage1_decision", lambda *args, **kwargs: {"ran": True, "kept": False})
    model = LAIC(n_clusters=3, random_state=0, stage1_steps=0, pseudo_labels="semantic").fit(images, nouns, names)
    assert model.refine_report_["semantic_pseudo_labels"]["kept"] is False
    assert model.assignment_ is None
    np.testing.assert_array_equal(model.labels_, plain.labels_)
    np.testing.assert_array_equal(model.predict(images), plain.labels_)


def test_confident_rows_keep_a_clusters_most_confident_and_one_of_a_singleton():
    # round(0.5 * 1) is 0 (half to even): a singleton cluster must still keep its one row.
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2])
    probs = torch.softmax(torch.randn(9, 3, generator=gen), dim=1)
    keep = confident_rows(probs, labels, 0.5)
    want = torch.zeros(9, dtype=torch.bool)
    for c in range(3):
        members = (labels == c).nonzero()[:, 0]
        quota = max(1, round(0.5 * len(members)))
        want[members[probs[members, c].argsort(descending=True)[:quota]]] = True
    assert torch.equal(keep, want) and bool(keep[3])


def test_the_consistency_term_is_the_mean_over_the_neighbour_lists():
    gen = torch.Generator().manual_seed(4)
    logits, a, b = (torch.randn(6, 4, generator=gen) for _ in range(3))
    targets, shares, config = torch.full((6,), -1), torch.full((4,), 0.25), CentresConfig()

    def term(*lists):
        return float(centres_loss(logits, list(lists), targets, shares, config)[2]["consistency"])

    def by_hand(other):
        return float(-(torch.softmax(logits, 1) * torch.softmax(other, 1)).sum(1).log().mean())

    assert term(a, b) == pytest.approx((by_hand(a) + by_hand(b)) / 2, rel=1e-6)
    assert term(a, a) == pytest.approx(term(a), rel=1e-6)


def test_an_empty_clusters_direction_is_the_mean_of_all_rows():
    features = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(5)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    directions = cluster_mean_directions(features, labels, 3)
    for c in range(2):
        torch.testing.assert_close(directions[c], F.normalize(features[labels == c].sum(0), dim=0))
    torch.testing.assert_close(directions[2], F.normalize(features.mean(0), dim=0))


@pytest.mark.parametrize("m,top", [(40, 5), (7, 5), (300, 5), (3, 1)])
def test_cluster_names_are_the_distinct_names_of_the_best_nouns(m, top):
    # Nouns of one name (a name's WordNet synsets, kept with dedupe=False) named a cluster "bank, bank, bank".
    from laic.semantic_centres import names_by_score

    generator = torch.Generator().manual_seed(m)
    scores = torch.randn(6, m, generator=generator)
    names = [f"n{j % max(1, m // 4)}" for j in range(m)]     # each name four times (or so)
    expected = []
    for row in scores.tolist():                              # brute force: every noun ranked, repeats dropped
        seen = []
        for j in sorted(range(m), key=lambda j: -row[j]):
            if names[j] not in seen:
                seen.append(names[j])
        expected.append(seen[:top])
    assert names_by_score(scores, names, top) == expected


def test_a_fit_names_each_cluster_with_distinct_nouns():
    images, nouns, _, truth = semantic_blobs()
    names = [f"c{i}" for i in range(3) for _ in range(2)] + [f"other{i % 2}" for i in range(6)]  # each name twice+
    model = LAIC(n_clusters=3, random_state=0, stage1_steps=0).fit(images, nouns, noun_names=names)
    for c, row in enumerate(model.cluster_names_):
        assert len(row) == len(set(row)) == 5          # five names in all (c0..c2, other0..1), none twice
        assert row[0] == f"c{np.bincount(truth[model.labels_ == c]).argmax()}"


def test_kept_semantic_pseudo_labels_name_the_clusters_by_the_centres_that_assign_them():
    # Kept, they move images between clusters, but the names came from the centres before them (k-means' or stage
    # 1's), which no longer assign anything: here 'rose' and 'car' where the kept centres are nearest 'flower' and
    # 'taxi'.
    from laic.demo_data import make_semantic_dataset

    data = make_semantic_dataset(10, 40, 64, seed=0)
    model = LAIC(10, random_state=0, n_threads=1, pseudo_labels="semantic").fit(data.features, data.noun_features,
                                                                                data.noun_names)
    assert model.refine_report_["semantic_pseudo_labels"]["kept"] and model.assignment_.space == "image"
    nouns = F.normalize(torch.as_tensor(model.nouns_) - torch.as_tensor(model.image_mean_), dim=1)
    nearest = (F.normalize(model.assignment_.centres, dim=1) @ nouns.t()).argmax(1).tolist()
    assert [row[0] for row in model.cluster_names_] == [model.noun_names_[j] for j in nearest]
