"""Stage 1: the heads separate synthetic clusters, the text side is weighted by agreement, confident centres."""
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from laic.stage0 import build_semantic_space, fused_features, spherical_kmeans
from laic.stage1 import Stage1Config, combine, confident_centres, head_probabilities, n_epochs, train_heads


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


@pytest.mark.parametrize("n, expected", [(100, 50), (2000, 7), (100000, 5)])
def test_schedule_is_bounded(n, expected):
    cfg = Stage1Config(target_steps=50, batch_size=256, min_epochs=5, max_epochs=50)
    assert n_epochs(n, cfg) == expected


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
