"""Stage 1: the heads separate synthetic clusters, the text side is weighted by agreement, confident centres."""
import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.metrics import adjusted_rand_score

from scipy.stats import chisquare

from host_reads import counting_host_reads
from laic import stage1
from laic.stage0 import build_semantic_space, fused_features, spherical_kmeans
from laic.stage1 import (MAX_DISTORTION_RISE, ClusterHead, Stage1Config, combine, combined_probabilities,
                         confident_centres, head_probabilities, n_epochs, running_balance, sample_neighbours,
                         stage1_decision, train_heads)
from laic_kernels import checks


def synthetic(n_per=40, k=4, dim=64, spread=0.5, seed=0):
    """Image blobs around ``k`` directions, and a vocabulary with three nouns near each direction plus distractors."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(n_per)
    images = F.normalize(centres[labels] + spread * torch.randn(len(labels), dim, generator=g) / dim ** 0.5, dim=1)
    nouns = F.normalize(centres.repeat_interleave(3, 0) + 0.2 * torch.randn(3 * k, dim, generator=g) / dim ** 0.5,
                        dim=1)
    distractors = F.normalize(torch.randn(10, dim, generator=g), dim=1)
    return images, torch.cat([nouns, distractors]), labels.numpy()


def test_heads_separate_synthetic_clusters():
    images, nouns, truth = synthetic()
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=3, seed=0)
    result = train_heads(space, anchor.labels, 4, seed=0, config=Stage1Config(target_steps=30, batch_size=64))
    assert result.labels.shape == (160,) and result.labels.dtype == torch.int64
    assert adjusted_rand_score(truth, result.labels.numpy()) > 0.95
    torch.testing.assert_close(result.probabilities.sum(1), torch.ones(160))
    # The final assignment is the agreement-weighted mean of the two heads, evaluated in eval mode.
    expected = combine(head_probabilities(result.image_head, space.images),
                       head_probabilities(result.text_head, space.texts), space.agreement)
    torch.testing.assert_close(result.probabilities, expected)
    assert len(result.history["loss"]) == n_epochs(160, Stage1Config(target_steps=30, batch_size=64)) * 3
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))


def test_a_last_batch_of_one_row_does_not_halve_the_steps():
    # N = 129 at batch 64: two batches run an epoch (the one-row batch is left out), so 30 steps are 15 epochs; the
    # schedule counted three and ran 10 epochs, 20 steps.
    images, nouns, _ = synthetic()
    space = build_semantic_space(images[:129], nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=1, seed=0)
    config = Stage1Config(target_steps=30, batch_size=64, min_epochs=1)
    result = train_heads(space, anchor.labels, 4, seed=0, config=config)
    assert len(result.history["loss"]) == 30


def test_heads_improve_a_damaged_anchor():
    # Start from the true partition with 20% of the labels scrambled: training must repair most of them, since the
    # swapped targets and the neighbour consistency follow the data, not only the anchor.
    images, nouns, truth = synthetic(seed=1)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    g = torch.Generator().manual_seed(0)
    damaged = torch.as_tensor(truth).clone()
    flip = torch.randperm(160, generator=g)[:32]
    damaged[flip] = (damaged[flip] + 1) % 4
    result = train_heads(space, damaged, 4, seed=0, config=Stage1Config(target_steps=40, batch_size=64))
    before = adjusted_rand_score(truth, damaged.numpy())
    after = adjusted_rand_score(truth, result.labels.numpy())
    assert after > before + 0.2


def test_seed_controls_everything():
    images, nouns, _ = synthetic(seed=2)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    cfg = Stage1Config(target_steps=6, batch_size=64)
    a = train_heads(space, anchor, 4, seed=3, config=cfg)
    b = train_heads(space, anchor, 4, seed=3, config=cfg)
    torch.testing.assert_close(a.probabilities, b.probabilities, rtol=0, atol=0)
    # ... and another seed gives other heads (a seed that was ignored passed the equality above).
    c = train_heads(space, anchor, 4, seed=4, config=cfg)
    assert not torch.equal(a.probabilities, c.probabilities)


def test_training_leaves_the_global_random_stream_alone_and_does_not_read_it():
    # The heads start from the seed's own generator: whatever the caller's global stream is (another thread may be
    # drawing from it), the heads are the same, and the stream is where the caller left it.
    images, nouns, _ = synthetic(seed=2)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    cfg = Stage1Config(target_steps=6, batch_size=64)
    results = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        state = torch.random.get_rng_state()
        results.append(train_heads(space, anchor, 4, seed=3, config=cfg))
        assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(results[0].probabilities, results[1].probabilities, rtol=0, atol=0)


def test_at_agreement_zero_the_text_head_keeps_its_start_and_the_result_ignores_the_texts():
    # Every text term weighs 0 there. Trained, weight decay alone moved the text head (into float32's subnormals at
    # N = 100k: 8x slower steps on an Intel CPU); now it keeps its start, and the probabilities are those of any
    # other text features. With agreement, it trains.
    images, nouns, _ = synthetic(seed=4)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    assert space.agreement > 0
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    cfg = Stage1Config(target_steps=30, batch_size=64)
    starts = torch.Generator().manual_seed(0)      # as train_heads draws them: the image head, then the text head
    ClusterHead(64, 4, generator=starts)
    text_start = dict(ClusterHead(64, 4, generator=starts).named_parameters())

    def moved(result):
        return [name for name, p in result.text_head.named_parameters() if not torch.equal(p, text_start[name])]

    silent = dataclasses.replace(space, agreement=0.0)
    other_texts = dataclasses.replace(silent, texts=F.normalize(torch.randn_like(space.texts), dim=1))
    results = [train_heads(s, anchor, 4, seed=0, config=cfg) for s in (silent, other_texts)]
    assert moved(results[0]) == [] and moved(results[1]) == []
    torch.testing.assert_close(results[0].probabilities, results[1].probabilities, rtol=0, atol=0)
    assert len(moved(train_heads(space, anchor, 4, seed=0, config=cfg))) == len(text_start)


def test_at_agreement_zero_the_consistency_loss_is_not_computed(monkeypatch):
    # It weighs sqrt(a) = 0 in the loss, and was computed all the same: at K = 1000, 136 of a step's 157 ms on one
    # CPU thread. Skipped, the loss and the result are the same (a term of 0 added), and the history says 0.
    images, nouns, _ = synthetic(seed=4)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    cfg = Stage1Config(target_steps=20, batch_size=64)
    calls, real = [], stage1.consistency_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1, "consistency_loss", counted)
    silent = train_heads(dataclasses.replace(space, agreement=0.0), anchor, 4, seed=0, config=cfg)
    assert calls == [] and set(silent.history["consistency"]) == {0.0}
    assert len(silent.history["loss"]) > 0
    train_heads(space, anchor, 4, seed=0, config=cfg)
    assert len(calls) == len(silent.history["loss"])   # with agreement: once a step


def test_heads_start_as_torchs_own_linear_layers():
    # linear_start draws nn.Linear's own initialisation: the same values as nn.Linear under torch.manual_seed.
    torch.manual_seed(7)
    expected = [nn.Linear(48, 96), nn.Linear(96, 5)]
    head = ClusterHead(48, 5, hidden=96, generator=torch.Generator().manual_seed(7))
    for layer, want in zip((head.net[0], head.net[3]), expected):
        assert torch.equal(layer.weight, want.weight) and torch.equal(layer.bias, want.bias)


def test_heads_start_the_same_under_a_float64_default_dtype():
    # A caller's torch.set_default_dtype(torch.float64) made the layers float64, and Kaiming draws in float64 are
    # other numbers (up to 0.09 apart after the cast): a real fit's probabilities moved.
    want = ClusterHead(48, 5, hidden=96, generator=torch.Generator().manual_seed(7))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ClusterHead(48, 5, hidden=96, generator=torch.Generator().manual_seed(7))
    finally:
        torch.set_default_dtype(previous)
    for name, tensor in want.state_dict().items():
        assert got.state_dict()[name].dtype == tensor.dtype and torch.equal(got.state_dict()[name], tensor), name


def test_combine_weights_text_by_agreement():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    q = torch.tensor([[0.1, 0.9], [0.6, 0.4]])
    torch.testing.assert_close(combine(p, q, 0.0), p)
    torch.testing.assert_close(combine(p, q, 1.0), (p + q) / 2)
    torch.testing.assert_close(combine(p, q, 0.25), (p + 0.25 * q) / 1.25)


def test_confident_centres_use_the_most_confident_members():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]), dim=1)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    centres = confident_centres(feats, probs, fraction=0.5)
    # Cluster 0 = rows {0, 1}: the most confident one (row 0) alone; cluster 1 = rows {2, 3}: row 2.
    torch.testing.assert_close(centres, torch.stack([feats[0], feats[2]]))


def test_combined_probabilities_in_blocks_hold_one_n_by_k_matrix():
    """Block by block equals the composition of the two heads' probabilities (an odd N, blocks that do not divide
    it), leaves the heads' modes as they were, and its peak extra CPU memory is about one [N, K] float32 matrix
    (the composition held four or five)."""
    from laic.profiling import FitProfiler, step

    n, dim, k = 6001, 24, 64
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    image_head, text_head = ClusterHead(dim, k), ClusterHead(dim, k).eval()
    expected = combine(head_probabilities(image_head, images), head_probabilities(text_head, texts), 0.3)
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording():
        with step("combined", "other"):
            probs = combined_probabilities(image_head, text_head, images, texts, 0.3, batch_size=250)
    torch.testing.assert_close(probs, expected)
    assert image_head.training and not text_head.training
    one_matrix, one_block = n * k * 4, 250 * k * 4
    (record,) = profiler.steps
    assert one_matrix <= record["peak_extra_bytes"] <= one_matrix + 10 * one_block, record


@pytest.mark.parametrize("n, target_steps, expected", [
    (100, 50, 50),            # one step an epoch: max_epochs
    (257, 50, 50),            # one step an epoch too: a last batch of one row is left out (it had 25 epochs)
    (513, 50, 25),            # two steps an epoch (17 before: 34 steps)
    (2000, 50, 7),            # 8 steps an epoch: about 50 steps
    (100_000, 50, 5),         # 391 steps an epoch: min_epochs (1955 steps)
    (256_000, 50, 5),         # 1000 steps an epoch: min_epochs, exactly min_epochs_max_steps
    (500_000, 50, 2),         # 1954 steps an epoch: two fit in 5000 steps
    (1_281_167, 50, 1),       # 5005 steps an epoch: one, however many steps it holds
    (100_000, 10_000, 26),    # a target of many steps is not capped: 26 epochs of 391
])
def test_schedule_is_bounded(n, target_steps, expected):
    cfg = Stage1Config(target_steps=target_steps, batch_size=256, min_epochs=5, max_epochs=50,
                       min_epochs_max_steps=5000)
    assert n_epochs(n, cfg) == expected
    steps_per_epoch = n // 256 + (n % 256 >= 2)    # the batches that run (BatchNorm needs two rows)
    if expected < 5:     # min_epochs yielded: no more than the steps limit, unless one epoch is already past it
        assert expected * steps_per_epoch <= 5000 or expected == 1
        assert (expected + 1) * steps_per_epoch > 5000


def confident_centres_by_loop(features, probs, fraction):
    """The definition, one cluster at a time in float64."""
    feats = F.normalize(features.double(), dim=1)
    p = probs.double()
    labels, confidence = p.argmax(1), p.max(1).values
    centres = []
    for c in range(p.shape[1]):
        members = [i for i in range(len(labels)) if labels[i] == c]
        if not members:
            centre = p[:, c] @ feats
        else:
            members.sort(key=lambda i: (-float(confidence[i]), i))
            keep = max(1, round(fraction * len(members)))
            centre = feats[members[:keep]].sum(0)
        centres.append(F.normalize(centre, dim=0))
    return torch.stack(centres).float()


@pytest.mark.parametrize("n, k, fraction", [(1, 3, 0.5), (37, 5, 0.5), (200, 13, 0.3), (64, 64, 1.0)])
def test_confident_centres_match_the_loop_definition(n, k, fraction):
    g = torch.Generator().manual_seed(n * k)
    features = torch.randn(n, 8, generator=g)
    # Rounded probabilities: ties in confidence, and some clusters nobody picks.
    probs = torch.softmax(3 * torch.randn(n, k, generator=g), dim=1).mul(20).round().add(0.01)
    probs = probs / probs.sum(1, keepdim=True)
    expected = confident_centres_by_loop(features, probs, fraction)
    torch.testing.assert_close(confident_centres(features, probs, fraction), expected, rtol=1e-5, atol=1e-5)


def test_running_balance_is_flat_at_balanced_shares_and_pushes_a_drifting_cluster():
    k = 5
    uniform = torch.full((k,), 1.0 / k)
    # Three fairly confident rows of five clusters (B < K): the entropy of the batch mean can only rise by flattening
    # the rows and pushes hard; over balanced running shares the push is two orders of magnitude weaker.
    logits = (3 * torch.eye(k)[:3]).requires_grad_()
    value, shares = running_balance(torch.softmax(logits, 1), uniform, momentum=0.9)
    value.backward()
    running_grad = logits.grad.norm()
    torch.testing.assert_close(shares, 0.9 * uniform + 0.1 * torch.softmax(logits.detach(), 1).mean(0))
    logits = (3 * torch.eye(k)[:3]).requires_grad_()
    batch_mean = torch.softmax(logits, 1).mean(0)
    (batch_mean * batch_mean.log()).sum().backward()
    assert running_grad < 0.02 * logits.grad.norm()
    # A cluster whose running share grew: its logits are pushed down.
    grown = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    logits = torch.zeros(4, k, requires_grad=True)
    running_balance(torch.softmax(logits, 1), grown, momentum=0.9)[0].backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()


def test_running_balance_of_both_heads_at_once_is_each_heads_own():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 9, 5, generator=g), -1)
    shares = torch.softmax(torch.randn(2, 5, generator=g), -1)
    values, new_shares = running_balance(probs, shares, momentum=0.9)
    for head in range(2):
        value, head_shares = running_balance(probs[head], shares[head], momentum=0.9)
        torch.testing.assert_close(values[head], value)
        torch.testing.assert_close(new_shares[head], head_shares)


def test_anchor_rows_are_one_hot():
    labels = torch.randint(0, 7, (13,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(stage1._one_hot(labels, 7), F.one_hot(labels, 7).float())


def test_heads_keep_every_cluster_with_fewer_rows_per_batch_than_clusters():
    images, nouns, truth = synthetic(n_per=8, k=40, dim=64, spread=0.4, seed=3)
    space = build_semantic_space(images, nouns, 40, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 40), 40, n_init=2, seed=0)
    result = train_heads(space, anchor.labels, 40, seed=0, config=Stage1Config(target_steps=40, batch_size=16))
    assert len(torch.unique(result.labels)) >= 0.97 * len(torch.unique(anchor.labels))
    assert stage1_decision(fused_features(space, 40), anchor.labels, result.labels, 40)["kept"]


def test_decision_rejects_a_collapsed_partition_and_keeps_a_close_one():
    images, nouns, truth = synthetic(n_per=20, k=8, seed=4)
    space = build_semantic_space(images, nouns, 8, seed=0, n_neighbours=5)
    fused = fused_features(space, 8)
    anchor = spherical_kmeans(fused, 8, n_init=3, seed=0).labels
    same = stage1_decision(fused, anchor, anchor.clone(), 8)
    assert same["kept"] and same["distortion_rise"] == pytest.approx(0.0, abs=1e-6) and same["moved"] == 0.0
    merged = anchor.clone()
    merged[merged == 1] = 0                 # two clusters merged: one of 8 emptied
    report = stage1_decision(fused, anchor, merged, 8)
    assert not report["kept"] and report["stage1_clusters"] == 7 and report["distortion_rise"] > 0
    scrambled = anchor[torch.randperm(len(anchor), generator=torch.Generator().manual_seed(0))]
    report = stage1_decision(fused, anchor, scrambled, 8)
    assert not report["kept"] and report["distortion_rise"] > MAX_DISTORTION_RISE


def test_decision_rejects_an_emptied_cluster_whatever_the_distortion(monkeypatch):
    # The merge above also raises the distortion past its bound: with that bound lifted, the emptied cluster alone
    # must reject the partition (7 of 8 clusters, under MIN_CLUSTERS_KEPT), and moving rows without emptying any
    # must not.
    images, nouns, _ = synthetic(n_per=20, k=8, seed=4)
    space = build_semantic_space(images, nouns, 8, seed=0, n_neighbours=5)
    fused = fused_features(space, 8)
    anchor = spherical_kmeans(fused, 8, n_init=3, seed=0).labels
    monkeypatch.setattr(stage1, "MAX_DISTORTION_RISE", float("inf"))
    merged = anchor.clone()
    merged[merged == 1] = 0
    report = stage1_decision(fused, anchor, merged, 8)
    assert not report["kept"] and (report["stage0_clusters"], report["stage1_clusters"]) == (8, 7)
    moved = anchor.clone()
    moved[(anchor == 1).nonzero()[0]] = 0       # one row of cluster 1 moves; cluster 1 keeps the others
    assert stage1_decision(fused, anchor, moved, 8)["kept"]


def test_the_decision_measures_the_distortion_rise_relative_to_stage_0s_distortion():
    """The distortion is 1 - the mean cosine to the own cluster's unit mean; its rise is relative to stage 0's
    distortion (not to its objective). Tight blobs (a distortion near 0) make one misplaced row a large relative
    rise: computed here in float64, the partition must be rejected, and its report must carry that rise."""
    g = torch.Generator().manual_seed(7)
    centres = F.normalize(torch.randn(4, 16, generator=g, dtype=torch.float64), dim=1)
    truth = torch.arange(4).repeat_interleave(20)
    fused = F.normalize(centres[truth] + 0.05 * torch.randn(80, 16, generator=g, dtype=torch.float64), dim=1)
    moved = truth.clone()
    moved[0] = 1                                   # one row of 80 in the wrong cluster

    def distortion(labels):
        means = F.normalize(torch.stack([fused[labels == c].sum(0) for c in range(4)]), dim=1)
        return 1.0 - float((fused * means[labels]).sum(1).mean())

    rise = (distortion(moved) - distortion(truth)) / distortion(truth)
    assert rise > MAX_DISTORTION_RISE
    report = stage1_decision(fused.float(), truth, moved, 4)
    assert report["distortion_rise"] == pytest.approx(rise, rel=1e-3)
    assert not report["kept"]


def test_a_step_balances_mixes_and_weights_the_heads_as_the_module_says(monkeypatch):
    """One training step, each part computed here from the heads' log-probabilities: the Sinkhorn column marginals
    are the running cluster shares (at the first step the anchor's, here unequal), a balanced target is B x the plan
    (rows summing to 1; the textbook iteration in float64), the text head learns the image head's balanced assignment
    and the image head the text head's to the degree a, both mixed with the anchor by anchor_weight; the text head's
    own terms count a times the image head's and the consistency loss sqrt(a) times."""
    images, nouns, _ = synthetic(n_per=10, k=4, seed=1)
    a = 0.36
    space = dataclasses.replace(build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5), agreement=a)
    anchor = torch.tensor([0] * 16 + [1] * 12 + [2] * 8 + [3] * 4)
    config = Stage1Config(target_steps=1, min_epochs=1, max_epochs=1, batch_size=40)    # one step on all 40 rows
    seen = {}

    def recorded(name, function):
        def call(*args, **kwargs):
            out = function(*args, **kwargs)
            seen.setdefault(name, (args, kwargs, out))
            return out
        return call

    for name in ("sinkhorn", "_soft_cross_entropy", "running_balance", "consistency_loss", "_one_hot"):
        monkeypatch.setattr(stage1, name, recorded(name, getattr(stage1, name)))
    result = train_heads(space, anchor, 4, seed=0, config=config)
    assert len(result.history["loss"]) == 1

    (log_probs, eps, n_iters), kwargs, _ = seen["sinkhorn"]
    shares = torch.bincount(anchor, minlength=4).double() / 40
    torch.testing.assert_close(kwargs["col_marginals"].double(), shares, rtol=1e-6, atol=0)
    s = log_probs.double() / eps
    row, col = torch.zeros(2, 40, 1, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64)
    for _ in range(n_iters):      # columns to the shares, then rows to 1/B
        col = shares.log() - torch.logsumexp(s + row, dim=1, keepdim=True)
        row = math.log(1 / 40) - torch.logsumexp(s + col, dim=2, keepdim=True)
    balanced_img, balanced_txt = 40 * (s + row + col).exp()
    (batch_anchor, _), _, _ = seen["_one_hot"]          # the anchor labels of the batch, in its shuffled order
    assert torch.equal(batch_anchor.sort().values, anchor)
    one_hot = F.one_hot(batch_anchor, 4).double()
    w = config.anchor_weight
    targets = torch.stack([w * one_hot + (1 - w) * (a * balanced_txt + (1 - a) * balanced_img),
                           w * one_hot + (1 - w) * balanced_img])
    (_, got_targets), _, _ = seen["_soft_cross_entropy"]
    torch.testing.assert_close(got_targets.double(), targets, rtol=0, atol=1e-5)

    cross_entropy = -(targets * log_probs.double()).sum(-1).mean(-1)
    running = config.share_momentum * shares + (1 - config.share_momentum) * log_probs.double().exp().mean(1)
    balance = (running * running.log()).sum(-1)
    consistency = float(seen["consistency_loss"][2][0].detach())
    expected = (cross_entropy[0] + a * cross_entropy[1] + math.sqrt(a) * consistency
                + config.balance_weight * (balance[0] + a * balance[1]))
    assert result.history["balance"][0] == pytest.approx(float(balance[0] + a * balance[1]), rel=1e-5, abs=1e-6)
    assert result.history["loss"][0] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_the_decision_is_recorded_and_survives_save_and_load(tmp_path):
    from laic import LAIC
    images, nouns, _ = synthetic(seed=5)
    model = LAIC(n_clusters=4, random_state=0, stage1_steps=10, batch_size=64).fit(images.numpy(), nouns.numpy())
    report = model.stage1_report_
    assert report["ran"] and set(report) >= {"kept", "distortion_rise", "stage0_clusters", "stage1_clusters"}
    assert (model.image_head_ is not None) == report["kept"]
    model.save(tmp_path / "m")
    assert LAIC.load(tmp_path / "m").stage1_report_ == report
    # A file written before the report existed still loads (with an empty report).
    state = torch.load(tmp_path / "m", weights_only=True)
    del state["stage1_report"]
    torch.save(state, tmp_path / "old")
    old = LAIC.load(tmp_path / "old")
    assert old.stage1_report_ == {}
    assert (old.predict(images.numpy()) == model.labels_).all()
    skipped = LAIC(n_clusters=4, random_state=0, stage1_steps=0).fit(images.numpy(), nouns.numpy())
    assert skipped.stage1_report_ == {"ran": False, "kept": False} and skipped.image_head_ is None


def test_head_width_follows_the_clusters_and_saved_heads_keep_theirs():
    from laic.stage1 import ClusterHead, hidden_width
    assert [hidden_width(512, k) for k in (2, 10, 47, 100, 128, 1000)] == [64, 64, 188, 400, 512, 512]
    assert hidden_width(24, 4) == 24      # never wider than the features
    assert ClusterHead(512, 47).hidden == 188
    # A head of an older file (D -> D -> K) loads with its own width and computes what it computed.
    torch.manual_seed(0)
    old = ClusterHead(32, 3, hidden=32).eval()
    loaded = ClusterHead.from_state(old.state_dict(), 32, 3).eval()
    assert loaded.hidden == 32
    x = torch.randn(9, 32)
    torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)


@pytest.mark.parametrize("n, k, masked", [(1, 1, True), (7, 5, True), (33, 10, True), (9, 4, False)])
def test_sample_neighbours_takes_the_draws_share_of_the_valid_columns(n, k, masked):
    g = torch.Generator().manual_seed(n * k)
    neighbours = torch.randint(1000, (n, k), generator=g)
    mask = torch.rand(n, k, generator=g) < 0.4
    mask[torch.arange(n), torch.randint(k, (n,), generator=g)] = True      # every row has a valid neighbour
    rows = torch.randint(n, (2 * n + 3,), generator=g)
    uniforms = torch.rand(len(rows), generator=g)
    uniforms[0] = 1 - 2 ** -24      # the largest float32 below 1: rounds up to the count, must stay in range
    got = sample_neighbours(neighbours, mask if masked else None, rows, uniforms)
    for row, u, pick in zip(rows.tolist(), uniforms, got.tolist()):
        valid = [int(neighbours[row, j]) for j in range(k) if mask[row, j] or not masked]
        nth = int(u * len(valid))       # the product in float32, as the sampler computes it
        assert pick == valid[min(nth, len(valid) - 1)]


def test_sample_neighbours_draws_uniformly_among_the_valid_ones():
    neighbours = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[True, False, True, True, False, False], [False] * 5 + [True]])
    draws = 30000
    rows = torch.arange(draws) % 2
    picks = sample_neighbours(neighbours, mask, rows, torch.rand(draws, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(picks, minlength=12)
    assert counts[[1, 4, 5, 6, 7, 8, 9, 10]].sum() == 0 and counts[11] == draws // 2
    assert chisquare(counts[[0, 2, 3]].numpy()).pvalue > 1e-3


def test_training_steps_read_nothing_back_from_the_device():
    # A read (item, tolist, cpu, bool, ...) is a device sync on CUDA: the training loop must make none, so the reads
    # of a whole train_heads call (before and after its loop) do not grow with the number of steps. Inside
    # values_checked, as in LAIC.fit (the ops' value checks read by design otherwise).
    images, nouns, _ = synthetic(seed=4)
    space = build_semantic_space(images, nouns, 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    reads = {}
    for steps in (3, 12):     # 160 rows in batches of 64: 3 steps an epoch, so 1 and 4 epochs
        config = Stage1Config(target_steps=steps, min_epochs=1, batch_size=64)
        with checks.values_checked(), counting_host_reads() as counts:
            result = train_heads(space, anchor, 4, seed=0, config=config)
        assert len(result.history["loss"]) == steps
        reads[steps] = counts
    assert reads[3] == reads[12]


def _graph_test_space(device):
    images, nouns, _ = synthetic(n_per=150, seed=5)     # 600 rows: 9 batches of 64 and one of 24 an epoch
    space = build_semantic_space(images.to(device), nouns.to(device), 4, seed=0, n_neighbours=5)
    anchor = spherical_kmeans(fused_features(space, 4), 4, n_init=2, seed=0).labels
    return space, anchor


def test_cuda_graph_is_ignored_off_cuda():
    """cuda_graph=True trains exactly as the eager loop where there is no CUDA device (the CPU here)."""
    space, anchor = _graph_test_space("cpu")
    results = [train_heads(space, anchor, 4, seed=0, config=Stage1Config(batch_size=64, cuda_graph=graph))
               for graph in (False, True)]
    assert results[0].history == results[1].history
    assert torch.equal(results[0].labels, results[1].labels)


LAST_GPU = f"cuda:{torch.cuda.device_count() - 1}"


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")),
    pytest.param(LAST_GPU, marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                    reason="a GPU other than the current one needs two")),
])
def test_cuda_graph_steps_train_as_the_eager_steps(monkeypatch, device):
    """On CUDA the full-size steps replayed from one captured graph (the last batch of each epoch eager between
    them) give the eager loop's history and labels up to float rounding (the same kernels run), also on a GPU that
    is not the current one."""
    space, anchor = _graph_test_space(device)
    replays = []

    class CountingGraph(torch.cuda.CUDAGraph):
        def replay(self):
            replays.append(1)
            super().replay()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", CountingGraph)
    results = {}
    for graph in (False, True):
        with checks.values_checked():
            results[graph] = train_heads(space, anchor, 4, seed=0,
                                         config=Stage1Config(batch_size=64, cuda_graph=graph))
    eager, graphed = results[False], results[True]
    steps = len(eager.history["loss"])
    epochs = steps // 10
    assert len(replays) == 9 * epochs - stage1._GraphedSteps.WARMUP      # every full-size step after the warm-up
    for name in eager.history:
        torch.testing.assert_close(torch.tensor(graphed.history[name]), torch.tensor(eager.history[name]),
                                   rtol=1e-4, atol=1e-5)
    assert (graphed.labels == eager.labels).float().mean() > 0.99


def test_graphed_steps_warm_up_then_capture_once_then_replay(monkeypatch):
    """_GraphedSteps' control flow on the CPU, CUDA's streams and graphs faked: the first WARMUP full-size steps run
    eagerly, the next is captured once and every later full-size step replays it on that batch's indices (copied
    into the fixed inputs), each returning its own record; a batch of another size runs eagerly; the gradients are
    cleared before every eager step and before the capture, never for a replay."""
    capturing, replays, zero_grads, eager_runs = [], [], [], []

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class FakeGraph:
        body = None

        def replay(self):
            replays.append(1)
            self.body()

    @contextlib.contextmanager
    def fake_graph(graph, stream=None):
        capturing.append(graph)
        yield
        capturing.pop()

    def record_of(rows, nbrs):
        return torch.stack([rows.sum(), nbrs.sum()]).float()

    def run(rows, nbrs):
        out = record_of(rows, nbrs)
        if capturing:    # what the capture records: the step on the fixed inputs, run again at each replay
            capturing[-1].body = lambda: out.copy_(record_of(rows, nbrs))
        else:
            eager_runs.append(1)
        return out

    class FakeOptimiser:
        def zero_grad(self):
            zero_grads.append(1)

    for name, value in (("Stream", FakeStream), ("current_stream", lambda device=None: FakeStream()),
                        ("stream", lambda s: contextlib.nullcontext()),
                        ("device", lambda d: contextlib.nullcontext()), ("graph", fake_graph),
                        ("CUDAGraph", FakeGraph)):
        monkeypatch.setattr(torch.cuda, name, value)
    steps = stage1._GraphedSteps(run, FakeOptimiser(), 4, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, (4 if i != 5 else 3, 2), generator=g) for i in range(9)]
    records = [steps(b[:, 0], b[:, 1]) for b in batches]
    for b, got in zip(batches, records):
        assert torch.equal(got, record_of(b[:, 0], b[:, 1]))
    warmup = stage1._GraphedSteps.WARMUP
    full = sum(len(b) == 4 for b in batches)
    assert len(replays) == full - warmup                 # the captured step and every one after it
    assert len(eager_runs) == warmup + 1                 # the warm-up and the short batch
    assert len(zero_grads) == warmup + 1 + 1             # the same, and once before the capture


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_is_torchs_fused_adam_to_the_bit(device, dtype):
    # stage 1's optimiser calls torch's fused kernel itself (torch.optim's first use imports torch._dynamo): the
    # same parameters, moments and step counts as torch.optim.Adam(fused=True) after every step, odd shapes, a
    # parameter left without a gradient at some steps.
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 1, 2), ()]
    start = [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]
    ours = [p.clone().to(device).requires_grad_() for p in start]
    theirs = [p.clone().to(device).requires_grad_() for p in start]
    mine = stage1.FusedAdam(ours, lr=3e-3, weight_decay=1e-2)
    torchs = torch.optim.Adam(theirs, lr=3e-3, weight_decay=1e-2, fused=True)
    for step in range(6):
        mine.zero_grad()
        torchs.zero_grad(set_to_none=True)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if i == 2 and step % 3 == 1:
                continue    # no gradient this step: left alone
            grad = torch.randn(a.shape, generator=g, dtype=dtype).to(device)
            a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        torchs.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            state = torchs.state[b]
            assert torch.equal(a, b), (step, i)
            assert torch.equal(mine.exp_avgs[i], state["exp_avg"]) and torch.equal(mine.exp_avg_sqs[i],
                                                                                     state["exp_avg_sq"])
            assert torch.equal(mine.steps[i], state["step"].to(device)), (step, i, mine.steps[i], state["step"])
    assert mine.steps[2].item() == 4 and mine.steps[0].item() == 6
    mine.zero_grad()
    assert all(p.grad is None for p in ours)


@pytest.mark.parametrize("options", ["", "semantic_centres=True", "pseudo_labels='semantic'"])
def test_a_fit_on_the_cpu_imports_neither_torch_dynamo_nor_sympy_nor_triton(options):
    # torch.optim's Optimizer imported torch._dynamo on its first use (0.7-1.5 s of every `laic fit` on this CPU),
    # nn.utils.skip_init sympy (0.6 s), the kernels' dispatcher triton to say why it cannot run on CPU tensors
    # (0.15 s). Run as a user runs it: without the tests' TRITON_INTERPRET. The refinements' centres train with
    # stage 1's optimiser too.
    import os
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn.functional as F\n"
            "from laic import LAIC\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = F.normalize(torch.randn(60, 16, generator=g), dim=1)\n"
            "nouns = F.normalize(torch.randn(30, 16, generator=g), dim=1)\n"
            f"options = dict({options})\n"
            "model = LAIC(n_clusters=3, stage1_steps=5, **options).fit(x, nouns)\n"
            "assert model.stage1_report_.get('ran', True), model.stage1_report_   # the heads trained\n"
            "assert bool(model.refine_report_) == bool(options), model.refine_report_   # the refinement ran\n"
            "print([name for name in ('torch._dynamo', 'sympy', 'triton') if name in sys.modules])\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
