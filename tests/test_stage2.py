"""Stage 2 on the CPU: a tiny open_clip ViT with random weights, fine-tuned on real CIFAR-10 images written as PNGs.

The stage-1 model is replaced by an independent stand-in (scikit-learn k-means on features computed with open_clip's
own preprocessing), since stage 2 only needs ``predict_proba``.
"""
import copy
import fractions
import math
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from laic import stage2
from test_model import flip_a_weight_bit
from tiny_clip import register_tiny_clip, write_cifar_pngs

N_TRAIN, N_NEW, K = 160, 40, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NearestCentre:
    """Stand-in for a fitted stage-1 model: softmax over cosine similarity to k centres drawn from the images."""

    def __init__(self, features: np.ndarray, k: int):
        centres = features[np.random.default_rng(0).choice(len(features), k, replace=False)]
        self.centres = F.normalize(torch.from_numpy(centres).float(), dim=1)

    def predict_proba(self, features):
        f = F.normalize(torch.as_tensor(np.asarray(features)).float(), dim=1)
        return (f @ self.centres.t() / 0.05).softmax(1).numpy()


def make_clip(seed=0):
    import open_clip

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(register_tiny_clip())
    return model.eval(), preprocess


def open_clip_features(model, preprocess, paths):
    """Image features the way open_clip's own preprocessing gives them (not stage 2's code)."""
    from PIL import Image

    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        return F.normalize(model.encode_image(images), dim=1).numpy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = [str(p) for p in write_cifar_pngs(tmp_path_factory.mktemp("cifar"), N_TRAIN + N_NEW)]
    model, preprocess = make_clip()
    feats = open_clip_features(model, preprocess, paths[:N_TRAIN])
    stage1 = NearestCentre(feats, K)
    # Text counterparts: the text embedding of the noun nearest to each image (a semantic mixture at tau -> 0).
    import open_clip

    nouns = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with torch.no_grad():
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(register_tiny_clip())(nouns)), dim=1).numpy()
    counterparts = text[(feats @ text.T).argmax(1)]
    return {"train": paths[:N_TRAIN], "new": paths[N_TRAIN:], "features": feats, "stage1": stage1,
            "text": counterparts}


def short_config(**overrides):
    settings = dict(epochs=3, batch_size=32, n_blocks=1, encoder_lr=2e-3, head_lr=2e-2, num_workers=0,
                    min_per_cluster=3, eval_batch_size=64)
    settings.update(overrides)
    return stage2.Stage2Config(**settings)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    model, _ = make_clip()
    before = copy.deepcopy(model.state_dict())
    result = stage2.fine_tune(data["stage1"], model, data["train"], image_features=data["features"],
                              text_counterparts=data["text"], config=short_config(),
                              checkpoint_dir=tmp_path_factory.mktemp("ckpt"), device="cpu")
    return {"clip": model, "before": before, "result": result}


def _params(module, prefix):
    return {n: p.detach() for n, p in module.named_parameters() if n.startswith(prefix)}


# ------------------------------------------------------------------------------------------------------------------
# Pseudo-label selection


def test_select_confident_keeps_the_most_confident_share_of_every_cluster():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 6)) * 3
    logits[:4, 4] += 50  # cluster 4 is tiny: 4 members, topped up to min_per_cluster
    logits[4:, 4] -= 50
    logits[:, 5] -= 50   # cluster 5 is nobody's argmax: it borrows min_per_cluster images
    probs = torch.from_numpy(logits).softmax(1).numpy()
    indices, labels = stage2.select_confident(probs, keep_fraction=0.3, min_per_cluster=5)
    assigned, conf = probs.argmax(1), probs.max(1)
    assert np.all(np.diff(indices) > 0)  # sorted, each image once
    for k in range(4):  # ordinary clusters: the most confident 30% of their members
        members = np.flatnonzero(assigned == k)
        kept = indices[labels == k]
        assert set(kept) <= set(members) and len(kept) == math.ceil(fractions.Fraction(3, 10) * len(members))
        assert conf[kept].min() >= conf[np.setdiff1d(members, kept)].max()
    assert set(indices[labels == 4]) > {0, 1, 2, 3} and (labels == 4).sum() == 5
    borrowed = indices[labels == 5]
    assert len(borrowed) == 5
    others = np.setdiff1d(np.arange(300), indices)  # images kept nowhere
    assert probs[borrowed, 5].min() >= probs[others, 5].max()


def _select_confident_cluster_by_cluster(p, keep_fraction, min_per_cluster):
    """select_confident as its docstring defines it, one cluster at a time over all the images."""
    n, k = p.shape
    assigned = p.argmax(1)
    confidence = p[np.arange(n), assigned]
    label = np.full(n, -1)
    for c in range(k):
        members = np.flatnonzero(assigned == c)
        ranked = sorted(members, key=lambda i: (-confidence[i], i))
        label[ranked[:math.ceil(fractions.Fraction(str(keep_fraction)) * len(members))]] = c
    for c in range(k):
        short = min_per_cluster - int((label == c).sum())
        free = [i for i in sorted(range(n), key=lambda i: (-p[i, c], i)) if label[i] < 0 and p[i, c] > 0]
        label[free[:max(short, 0)]] = c
    return np.flatnonzero(label >= 0), label[label >= 0]


@pytest.mark.parametrize("seed", range(4))
def test_select_confident_matches_the_cluster_by_cluster_definition(seed):
    # One sort for all clusters replaced a pass over all the images per cluster; ties (rounded probabilities) keep
    # the lower index, and small or empty clusters are topped up as before.
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(50, 400)), int(rng.integers(2, 40))
    probs = torch.from_numpy(rng.normal(size=(n, k)) * 2).softmax(1).numpy().round(2)   # many ties
    probs[:, rng.integers(k)] = 0   # a cluster nobody may join
    for keep_fraction in (0.07, 0.5, 1.0):
        got = stage2.select_confident(probs, keep_fraction=keep_fraction, min_per_cluster=5)
        want = _select_confident_cluster_by_cluster(probs, keep_fraction, 5)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_select_confident_never_revives_a_cluster_at_zero_probability():
    """A column at 0 everywhere (a cluster stage 1 left empty: laic.assignment.without_empty_clusters) borrows nothing."""
    probs = torch.from_numpy(np.random.default_rng(2).normal(size=(40, 3)) * 3).softmax(1).numpy()
    probs[:, 2] = 0
    probs /= probs.sum(1, keepdims=True)
    _, labels = stage2.select_confident(probs, keep_fraction=0.5, min_per_cluster=5)
    assert set(labels) == {0, 1}


class WithEmptyCluster(NearestCentre):
    """A stage-1 model whose last cluster holds no fitted image (LAIC's cluster_sizes_), while its centre would
    still win images."""

    def __init__(self, features: np.ndarray, k: int):
        super().__init__(features, k)
        self.cluster_sizes_ = [1] * (k - 1) + [0]


def test_fine_tuning_keeps_the_clusters_stage1_left_empty_empty(data):
    """Stage 2 filled a cluster stage 1 left empty (no names; predict gives it nothing), through the top-up of
    small clusters and the later epochs' relabelling."""
    stage1 = WithEmptyCluster(data["features"], K)
    assert (stage1.predict_proba(data["features"]).argmax(1) == K - 1).any()   # its centre wins images
    model, _ = make_clip()
    result = stage2.fine_tune(stage1, model, data["train"], image_features=data["features"],
                              config=short_config(epochs=2), device="cpu")
    assert (result.labels != K - 1).all() and np.all(result.probs[:, K - 1] == 0)


def test_a_run_logs_its_notes_once_and_each_epoch_after_its_checkpoint(data, tmp_path, monkeypatch):
    """What `laic fit` shows of stage 2 (the laic.stage2 log): the n_blocks=0 note once a run (the config is validated
    three times a run: it was shown three times), and each epoch's line once the epoch's checkpoint is written."""
    from laic.stage2 import train

    saved = []
    save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, **state: (saved.append(state["epoch"]),
                                                                         save(path, **state)))
    logged = []
    monkeypatch.setattr(train.log, "info", lambda message, *args: logged.append((message % args, list(saved))))
    stage2.fine_tune(data["stage1"], make_clip()[0], data["train"], image_features=data["features"],
                     config=short_config(epochs=2, n_blocks=0), checkpoint_dir=tmp_path, device="cpu")
    notes = [text for text, _ in logged if "n_blocks=0" in text]
    epochs = [(text.split(":")[0], checkpoints) for text, checkpoints in logged if text.startswith("stage 2 epoch")]
    assert len(notes) == 1 and epochs == [("stage 2 epoch 1/2", [0]), ("stage 2 epoch 2/2", [0, 1])]


def test_stage1_predicts_on_the_features_as_the_caller_gave_them(data, tmp_path):
    # fine_tune handed stage 1 its own numpy copy of image_features: a model fitted on a frame (feature_names_in_)
    # warned that they had no column names, whatever the caller passed, and could not check the frame's columns.
    from frames import Frame

    class Seen(Exception):
        pass

    class Recording:
        def predict_proba(self, features):
            self.features = features
            raise Seen

    stage1, frame = Recording(), Frame(data["features"], [f"c{j}" for j in range(data["features"].shape[1])])
    with pytest.raises(Seen):
        stage2.fine_tune(stage1, make_clip()[0], data["train"], image_features=frame, config=short_config(),
                         checkpoint_dir=tmp_path, device="cpu")
    assert stage1.features is frame


def test_a_diverging_fine_tune_stops_with_advice_and_keeps_no_nan_checkpoint(data, tmp_path):
    """encoder_lr = 1e6: the loss is NaN after the first epoch. It ended in 'labels must hold cluster ids >= 0' (or
    NaN probabilities) and wrote the NaN weights into the checkpoint, which every --resume then reloaded."""
    model, _ = make_clip()
    with pytest.raises(ValueError, match=r"stage 2 diverged in epoch 1/2 \(loss nan\): lower encoder_lr and head_lr"):
        stage2.fine_tune(data["stage1"], model, data["train"], image_features=data["features"],
                         config=short_config(epochs=2, encoder_lr=1e6), checkpoint_dir=tmp_path, device="cpu")
    assert not (tmp_path / stage2.CHECKPOINT_NAME).exists()


def test_a_model_left_unusable_by_an_epochs_last_step_stops_the_fine_tune(data, tmp_path):
    """One step an epoch (20 images, batches of 32) at learning rates of 1e30: the step's loss is finite, the model
    it leaves predicts NaN. The fine-tune went on to fail on NaN probabilities (or -1 labels) in the next epoch, and
    kept the weights in the checkpoint, which --resume then reloaded."""
    model, _ = make_clip()
    with pytest.raises(ValueError, match=r"stage 2 diverged in epoch 1/2 \(its predictions are no longer finite "
                                         r"numbers\): lower encoder_lr and head_lr \(now 1e\+30 and 1e\+30\)"):
        stage2.fine_tune(data["stage1"], model, data["train"][:20], image_features=data["features"][:20],
                         config=short_config(epochs=2, encoder_lr=1e30, head_lr=1e30, min_per_cluster=1),
                         checkpoint_dir=tmp_path, device="cpu")
    assert not (tmp_path / stage2.CHECKPOINT_NAME).exists()


def test_one_image_with_a_non_finite_prediction_is_a_divergence(data, tmp_path, monkeypatch):
    # Not only a model that predicts NaN everywhere: one image is enough (its labels would be -1, its row NaN).
    from laic.stage2 import train

    real = train._embed_training_images

    def one_nan_row(*args, **kwargs):
        features, scores = real(*args, **kwargs)
        scores[3] = float("nan")
        return features, scores

    monkeypatch.setattr(train, "_embed_training_images", one_nan_row)
    with pytest.raises(ValueError, match=r"stage 2 diverged in epoch 1/2 \(its predictions are no longer finite"):
        stage2.fine_tune(data["stage1"], make_clip()[0], data["train"][:40], image_features=data["features"][:40],
                         config=short_config(epochs=2), checkpoint_dir=tmp_path, device="cpu")
    assert not (tmp_path / stage2.CHECKPOINT_NAME).exists()


def test_resuming_from_a_diverged_checkpoint_says_so(data, tmp_path):
    # A checkpoint that a run wrote before each epoch's model was checked (12-05) may hold NaN weights.
    paths, run = data["train"][:40], dict(image_features=data["features"][:40], device="cpu", checkpoint_dir=tmp_path)
    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                         on_epoch_end=_interrupt_after_first_epoch, **run)
    checkpoint = tmp_path / stage2.CHECKPOINT_NAME
    state = torch.load(checkpoint, weights_only=True)
    state["trainable"]["head.weight"][0] = float("nan")
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=f"the stage-2 checkpoint {re.escape(str(checkpoint))} holds a model whose "
                                         r"predictions are not finite numbers \(a run that diverged\): delete it"):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2), resume=True, **run)


@pytest.mark.parametrize("kwargs, message", [({"keep_fraction": 0.0}, "keep_fraction"),
                                             ({"min_per_cluster": 0}, "min_per_cluster")])
def test_select_confident_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stage2.select_confident(np.full((4, 2), 0.5), **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Training


def test_short_run_trains_the_unfrozen_part_only(trained):
    result, history = trained["result"], trained["result"].history
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["ce"] < history[0]["ce"] - 0.1, [h["ce"] for h in history]
    assert all(h["text"] > 0 for h in history)  # the language term was on
    assert all(h["n_pseudo"] >= math.ceil(0.5 * N_TRAIN) for h in history)

    tuned = result.encoder.model.visual
    base = {k[len("visual."):]: v for k, v in trained["before"].items() if k.startswith("visual.")}
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p.detach(), base[n])}
    trainable = {n for n in base if n.startswith(("transformer.resblocks.1.", "ln_post.")) or n == "proj"}
    assert changed == trainable
    # The caller's model is left as it was.
    for name, value in trained["clip"].state_dict().items():
        assert torch.equal(value, trained["before"][name]), name


def test_predictions_on_new_images_match_an_independent_forward_pass(trained, data, tmp_path):
    encoder = trained["result"].encoder
    probs = encoder.predict_proba(data["new"])
    assert probs.shape == (N_NEW, K) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(encoder.predict(data["new"]), probs.argmax(1))

    # By hand: open_clip's preprocessing, the tuned tower, the cosine head.
    import open_clip
    from PIL import Image

    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in data["new"]])
        feats = F.normalize(encoder.model.visual(images), dim=1)
        weight = F.normalize(encoder.model.head.weight, dim=1)
        expected = (feats @ weight.t() / encoder.config.head_temperature).softmax(1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    # Save and load onto the same base model: same predictions; onto another base: a clear error.
    encoder.save(tmp_path / "stage2.pt")
    loaded = stage2.FineTunedEncoder.load(tmp_path / "stage2.pt", make_clip(seed=0)[0], device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(data["new"]), probs)
    with pytest.raises(ValueError, match="base encoder"):
        stage2.FineTunedEncoder.load(tmp_path / "stage2.pt", make_clip(seed=1)[0], device="cpu")


def test_save_replaces_an_encoder_but_no_other_file_unless_told(trained, tmp_path):
    encoder = trained["result"].encoder
    encoder.save(tmp_path / "stage2.pt")
    encoder.save(tmp_path / "stage2.pt")       # saved again: replaced
    features = tmp_path / "features.npy"
    np.save(features, np.ones((3, 4), np.float32))
    before = features.read_bytes()
    with pytest.raises(ValueError, match="features.npy: exists and is not a laic fine-tuned encoder file; pass "
                                         "overwrite=True"):
        encoder.save(features)
    assert features.read_bytes() == before     # replaced without a word before
    encoder.save(features, overwrite=True)
    loaded = stage2.FineTunedEncoder.load(features, make_clip(seed=0)[0], device="cpu")
    torch.testing.assert_close(loaded.model.head.weight, encoder.model.head.weight.cpu())
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        encoder.save(tmp_path / "new.pt", overwrite=1)


def test_a_base_of_the_same_weights_built_otherwise_is_refused(trained, data, tmp_path):
    # The weights digest alone took a QuickGELU build of the base weights (as an OpenAI tag builds them; a file
    # builds GELU) and predicted with another function than the one trained (12-06).
    import open_clip

    trained["result"].encoder.save(tmp_path / "stage2.pt")
    quick = open_clip.create_model_and_transforms(register_tiny_clip(), force_quick_gelu=True)[0].eval()
    quick.load_state_dict(make_clip(seed=0)[0].state_dict())
    with pytest.raises(ValueError, match=r"built of other layers \(GELU there, QuickGELU here\)"):
        stage2.FineTunedEncoder.load(tmp_path / "stage2.pt", quick, device="cpu")
    # A file saved before the base's layers were recorded loads as before.
    state = torch.load(tmp_path / "stage2.pt", weights_only=True)
    assert "GELU" in state.pop("base_modules")
    stage2.FineTunedEncoder.from_state(state, quick, device="cpu")


def test_final_labels_are_the_tuned_model_on_the_training_images(trained, data):
    result = trained["result"]
    np.testing.assert_allclose(result.encoder.predict_proba(data["train"][:50]), result.probs[:50], atol=1e-6)
    assert np.array_equal(result.labels, result.probs.argmax(1))
    np.testing.assert_allclose(np.linalg.norm(result.features, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Resuming


class Interrupted(Exception):
    pass


def _interrupt_after_first_epoch(epoch, stats):
    if epoch == 0:
        raise Interrupted


@pytest.mark.parametrize("resize", [{}, {"image_resize_mode": "squash"}, {"image_resize_mode": "longest"},
                                    {"image_interpolation": "bilinear"}])
def test_stage_2_sees_an_image_as_stage_0_embedded_it(resize):
    # Stage 2 resized the shorter side and cropped, whatever the tower's preprocessing: a tower that squashes
    # images (open_clip's dfn5b tags) was fine-tuned and relabelled on other pixels than stage 0 embedded.
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(register_tiny_clip(), **resize)
    eval_tf = stage2.data.build_transforms(stage2.data.preprocess_cfg(model))[0]
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 96, 3), dtype=np.uint8))
    torch.testing.assert_close(eval_tf(wide), preprocess(wide), rtol=0, atol=0)


def test_numpy_settings_give_a_checkpoint_and_an_encoder_file_that_load(data, tmp_path):
    # A rate from np.logspace (np.float64) passed validate, and torch.load(weights_only=True) then refused the
    # checkpoint ("damaged ... start over"): every finished epoch was lost; FineTunedEncoder.load refused its file.
    paths, features = data["train"][:64], data["features"][:64]
    run = dict(image_features=features, text_counterparts=data["text"][:64], device="cpu")
    config = short_config(epochs=np.int64(2), encoder_lr=np.logspace(-3, -1, 3)[0], amp=np.True_)
    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=config, checkpoint_dir=tmp_path / "c",
                         on_epoch_end=_interrupt_after_first_epoch, **run)
    resumed = stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=config, checkpoint_dir=tmp_path / "c",
                               resume=True, **run)
    assert len(resumed.history) == 2
    resumed.encoder.save(tmp_path / "encoder.pt")
    loaded = stage2.FineTunedEncoder.load(tmp_path / "encoder.pt", make_clip()[0])
    np.testing.assert_array_equal(loaded.predict_proba(data["new"]), resumed.encoder.predict_proba(data["new"]))


def test_a_checkpoint_under_home_and_a_callback_adding_numpy_stats_resume(data, tmp_path, monkeypatch):
    # checkpoint_dir="~/..." was written (io expands ~) but looked for literally on resume: found none, started over.
    # A numpy value the callback added to stats went into every later checkpoint's history, which then read as
    # "damaged". FineTunedEncoder.load("~/...") did not expand ~ either.
    monkeypatch.setenv("HOME", str(tmp_path))
    paths, features = data["train"][:64], data["features"][:64]
    run = dict(image_features=features, text_counterparts=data["text"][:64], device="cpu", config=short_config(epochs=2),
               checkpoint_dir="~/stage2")
    epochs = []

    def note_then_interrupt(epoch, stats):
        stats["val_acc"] = np.float64(0.5)
        epochs.append(epoch)
        _interrupt_after_first_epoch(epoch, stats)

    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, on_epoch_end=note_then_interrupt, **run)
    assert (tmp_path / "stage2" / stage2.CHECKPOINT_NAME).is_file()
    resumed = stage2.fine_tune(data["stage1"], make_clip()[0], paths, resume=True, on_epoch_end=note_then_interrupt,
                               **run)
    assert epochs == [0, 1] and len(resumed.history) == 2     # epoch 0 not run again
    assert not any("no checkpoint" in note for note in resumed.notes), resumed.notes
    assert all("val_acc" not in stats for stats in resumed.history)
    resumed.encoder.save("~/encoder.pt")
    loaded = stage2.FineTunedEncoder.load("~/encoder.pt", make_clip()[0])
    np.testing.assert_array_equal(loaded.predict_proba(data["new"]), resumed.encoder.predict_proba(data["new"]))
    with open(tmp_path / "encoder.pt", "rb") as file:   # a file object, as torch.load takes it, too
        from_file = stage2.FineTunedEncoder.load(file, make_clip()[0])
    np.testing.assert_array_equal(from_file.predict_proba(data["new"]), resumed.encoder.predict_proba(data["new"]))


def test_an_encoder_trained_on_a_half_precision_base_loads_onto_it(data, tmp_path):
    # fine_tune trains a float32 copy of the tower; loading copied the trained weights into bfloat16 parameters,
    # and predict failed (float32 images against bfloat16 weights).
    base = make_clip()[0].to(torch.bfloat16)
    paths = data["train"][:64]
    result = stage2.fine_tune(data["stage1"], base, paths, image_features=data["features"][:64],
                              text_counterparts=data["text"][:64], config=short_config(epochs=1), device="cpu")
    result.encoder.save(tmp_path / "encoder.pt")
    loaded = stage2.FineTunedEncoder.load(tmp_path / "encoder.pt", base)
    np.testing.assert_array_equal(loaded.predict_proba(data["new"]), result.encoder.predict_proba(data["new"]))


def test_an_image_damaged_since_it_was_embedded_is_one_line_with_loader_workers(data, tmp_path):
    # With DataLoader workers the error was torch's "Caught ValueError in DataLoader worker process 0." and the
    # worker's whole traceback, the image named on its last line only.
    paths = [str(tmp_path / f"{i}.png") for i in range(48)]
    for source, path in zip(data["train"], paths):
        shutil.copy(source, path)
    pathlib.Path(paths[5]).write_bytes(b"damaged since")
    with pytest.raises(ValueError) as said:
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, image_features=data["features"][:48],
                         config=short_config(epochs=1, num_workers=2, keep_fraction=1.0), device="cpu")
    message = str(said.value)
    assert "\n" not in message and message.startswith(f"cannot read image {paths[5]} ("), message


@pytest.mark.parametrize("reading", ["training views", "relabelling"])
def test_a_loader_worker_killed_reading_an_image_names_it(data, tmp_path, monkeypatch, reading):
    # torch said "DataLoader worker (pid N) is killed by signal: Killed." under a traceback, naming no image: stage 2
    # reads them in its training steps (two augmented views) and when it relabels every image after an epoch.
    import signal

    import laic.images
    import laic.stage2.data
    from laic.images import WorkerDied

    paths = [str(tmp_path / f"{i}.png") for i in range(48)]
    for source, path in zip(data["train"], paths):
        shutil.copy(source, path)
    module, name = (laic.stage2.data, "readable") if reading == "training views" else (laic.images, "open_rgb")
    read = getattr(module, name)

    def dies_on_image_5(path):
        if str(path) == paths[5] and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return read(path)

    monkeypatch.setattr(module, name, dies_on_image_5)
    with pytest.raises(WorkerDied, match=rf"^a worker process reading images died \(DataLoader worker \(pid.* while "
                                         rf"it was reading {re.escape(paths[5])}: "):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, image_features=data["features"][:48],
                         config=short_config(epochs=1, num_workers=2, keep_fraction=1.0), device="cpu")


def test_the_callers_random_streams_are_left_as_they_were_a_resume_included(data, tmp_path):
    # A resume set torch's, numpy's and Python's global streams to those of the interrupted process.
    import random

    paths = data["train"][:64]
    run = dict(image_features=data["features"][:64], text_counterparts=data["text"][:64], device="cpu",
               config=short_config(epochs=2), checkpoint_dir=tmp_path)
    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, on_epoch_end=_interrupt_after_first_epoch, **run)
    clip_model = make_clip()[0]   # (it seeds torch's stream)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    stage2.fine_tune(data["stage1"], clip_model, paths, resume=True, **run)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_no_gpu_stream_is_reseeded_by_the_augmentations_or_a_seeded_clip(data, monkeypatch):
    """torch.manual_seed (each image's augmentation, a CLIP of random weights drawn from a seed) also reseeds every
    GPU's stream, which fork_rng(devices=[]) does not restore: a CPU fine-tune on a machine with GPUs replaced the
    caller's CUDA streams (or, before CUDA started, the seed queued for it). Only the CPU generator is seeded now."""
    from laic.clip import load_clip

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    torch.manual_seed(0)
    assert reseeded == [0]   # the spy sees what torch.manual_seed does
    reseeded.clear()
    load_clip(register_tiny_clip(), None, "cpu", seed=3)
    stage2.fine_tune(data["stage1"], make_clip()[0], data["train"][:32], image_features=data["features"][:32],
                     device="cpu", config=short_config(epochs=1, keep_fraction=1.0))
    assert reseeded == [0]   # make_clip's own torch.manual_seed(0) alone


def test_a_checkpoint_refuses_the_same_base_weights_built_otherwise(data, tmp_path):
    # Its base was told by the weights digest alone: an epoch trained on a GELU build was resumed on a QuickGELU one,
    # and the encoder file then claimed QuickGELU for all of it (12-06).
    import open_clip

    paths, run = data["train"][:64], dict(image_features=data["features"][:64], device="cpu")
    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                         checkpoint_dir=tmp_path, on_epoch_end=_interrupt_after_first_epoch, **run)
    quick = open_clip.create_model_and_transforms(register_tiny_clip(), force_quick_gelu=True)[0].eval()
    quick.load_state_dict(make_clip()[0].state_dict())
    with pytest.raises(ValueError, match=r"same base weights built of other layers \(GELU there, QuickGELU here"):
        stage2.fine_tune(data["stage1"], quick, paths, config=short_config(epochs=2), checkpoint_dir=tmp_path,
                         resume=True, **run)
    # A checkpoint written before the layers were recorded resumes on its weights alone.
    ckpt = torch.load(tmp_path / stage2.CHECKPOINT_NAME, weights_only=True)
    assert "GELU" in ckpt.pop("base_modules")
    torch.save(ckpt, tmp_path / stage2.CHECKPOINT_NAME)
    resumed = stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                               checkpoint_dir=tmp_path, resume=True, **run)
    assert any(note.startswith("resumed from") for note in resumed.notes)


def test_resume_ends_in_the_same_state_as_an_uninterrupted_run(data, tmp_path):
    paths, features = data["train"][:96], data["features"][:96]
    run = dict(image_features=features, text_counterparts=data["text"][:96], device="cpu")
    config = short_config(epochs=2)

    full = stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=config, checkpoint_dir=tmp_path / "a", **run)

    # Interrupted with DataLoader workers, resumed without: the result must not depend on either.
    with pytest.raises(Interrupted):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2, num_workers=2),
                         checkpoint_dir=tmp_path / "b", on_epoch_end=_interrupt_after_first_epoch, **run)
    resumed = stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=config, checkpoint_dir=tmp_path / "b",
                               resume=True, **run)
    # Numbered as the log numbers the epochs ("stage 2 epoch 1/2" was the one that finished), not from 0.
    assert any(note.startswith("resumed from") and note.endswith("after epoch 1/2") for note in resumed.notes)

    a, b = stage2.trainable_state(full.encoder.model), stage2.trainable_state(resumed.encoder.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert np.array_equal(full.labels, resumed.labels)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in full.history] == \
           [{k: v for k, v in h.items() if k not in timing} for h in resumed.history]
    ckpt_a = torch.load(tmp_path / "a" / stage2.CHECKPOINT_NAME, weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / stage2.CHECKPOINT_NAME, weights_only=True)
    assert ckpt_a["epoch"] == ckpt_b["epoch"] == 1
    assert torch.equal(ckpt_a["rng"]["torch"], ckpt_b["rng"]["torch"])   # (a resumed run relabels once more)
    for slot, state in ckpt_a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ckpt_b["optimizer"]["state"][slot][key]), (slot, key)
    assert torch.equal(ckpt_a["pseudo_labels"]["indices"], ckpt_b["pseudo_labels"]["indices"])

    # Resuming with other settings is refused, naming them with both values and the way to start over (not "run
    # without --resume": `laic fit` refuses that beside a checkpoint).
    with pytest.raises(ValueError, match=r"other settings \(encoder_lr=.* then, 0.0001 now\); .*start over: delete "
                                         r".*b \(in Python, resume=False starts over"):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2, encoder_lr=1e-4),
                         checkpoint_dir=tmp_path / "b", resume=True, **run)
    # ... and so is resuming with other stage-1 inputs, or after an image was rewritten under its own name.
    with pytest.raises(ValueError, match="another vocabulary or other LAIC options"):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                         checkpoint_dir=tmp_path / "b", resume=True, inputs_digest="other", **run)
    # A checkpoint that kept its options (LAIC.fit_images passes them) names those that differ, or the vocabulary.
    ckpt_path = tmp_path / "b" / stage2.CHECKPOINT_NAME
    torch.save(dict(torch.load(ckpt_path, weights_only=True), inputs_options={"min_cluster_size": "0", "tau": "0.1"}),
               ckpt_path)
    with pytest.raises(ValueError, match=r"other LAIC options \(min_cluster_size=0 then, 8 now; tau=0.1 then, \(none\)"):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                         checkpoint_dir=tmp_path / "b", resume=True, inputs_digest="other",
                         inputs_options={"min_cluster_size": "8"}, **run)
    with pytest.raises(ValueError, match=r"another vocabulary \(the LAIC options are the same\)"):
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                         checkpoint_dir=tmp_path / "b", resume=True, inputs_digest="other",
                         inputs_options={"min_cluster_size": "0", "tau": "0.1"}, **run)
    # A damaged checkpoint (truncated, empty, overwritten) is refused the same way, not with torch's traceback.
    whole = ckpt_path.read_bytes()
    ckpt_path.write_bytes(whole)
    flip_a_weight_bit(ckpt_path)     # torch loads it: the run went on from other weights
    for damaged in (ckpt_path.read_bytes(), whole[: len(whole) // 2], b"", b"garbage"):
        ckpt_path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"checkpoint .* is damaged \(.*\); resume with the same inputs, or start "
                                             r"over: delete"):
            stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                             checkpoint_dir=tmp_path / "b", resume=True, **run)
    ckpt_path.write_bytes(whole)
    # A checkpoint this user cannot read is not called damaged (deleting it would throw its epochs away).
    real_load = torch.load

    def no_permission(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    torch.load = no_permission
    try:
        with pytest.raises(PermissionError):
            stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                             checkpoint_dir=tmp_path / "b", resume=True, **run)
    finally:
        torch.load = real_load
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ValueError, match="before some images changed"):
            stage2.fine_tune(data["stage1"], make_clip()[0], paths, config=short_config(epochs=2),
                             checkpoint_dir=tmp_path / "b", resume=True, **run)
    finally:
        os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ------------------------------------------------------------------------------------------------------------------
# LoRA and bad input


def test_lora_trains_adapters_and_leaves_base_weights(data, tmp_path):
    model, _ = make_clip()
    base = {n: p.detach().clone() for n, p in model.visual.named_parameters()}
    # The adapters start at zero: the wrapped tower computes exactly what the base tower computes.
    wrapped = stage2.prepare_encoder(copy.deepcopy(model.visual), n_blocks=0, lora_rank=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model.visual(x), rtol=0, atol=1e-6)
    # Each adapter its own start (a fresh generator each gave them all one).
    downs = [t for n, t in wrapped.named_parameters() if n.endswith(".down")]
    assert len(downs) == 4 and not torch.equal(downs[0], downs[1]) and not torch.equal(downs[0], downs[2])

    # The adapters' starts follow the seed, whatever torch's global stream is (they were drawn from it; stage 1
    # no longer seeds it), and the fine-tune leaves that stream alone.
    results = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        results.append(stage2.fine_tune(data["stage1"], model, data["train"][:64], image_features=data["features"][:64],
                                        config=short_config(epochs=1, n_blocks=0, lora_rank=2), device="cpu"))
    first, second = (dict(r.encoder.model.visual.named_parameters()) for r in results)
    assert all(torch.equal(first[n], second[n]) for n in first)
    result = results[0]
    assert any("no text counterparts" in note for note in result.notes)
    tuned = dict(result.encoder.model.visual.named_parameters())
    adapters = {n for n in tuned if n.endswith((".up", ".down"))}
    assert len(adapters) == 2 * 2 * 2  # 2 blocks x (in_proj, out_proj) x (up, down)
    assert all(tuned[n].requires_grad for n in adapters)
    assert all(tuned[n].abs().max() > 0 for n in adapters if n.endswith(".up"))
    for name, value in base.items():
        tuned_name = name
        for weight in ("attn.in_proj_weight", "attn.out_proj.weight"):
            if name.endswith(weight):
                stem, leaf = name.rsplit(".", 1)
                tuned_name = f"{stem}.parametrizations.{leaf}.original"
        if name == "proj" or name.startswith("ln_post."):
            assert not torch.equal(tuned[tuned_name], value), name
        else:
            assert torch.equal(tuned[tuned_name], value), name
    # The adapters survive saving and loading onto the base model.
    result.encoder.save(tmp_path / "lora.pt")
    loaded = stage2.FineTunedEncoder.load(tmp_path / "lora.pt", make_clip()[0], device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(data["new"][:8]), result.encoder.predict_proba(data["new"][:8]))


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_lora_adapters_live_on_the_towers_device(device):
    # Stage 2 deep-copies a CLIP that may sit on the GPU; registering a parametrisation runs the adapter at once, and
    # adapters made on the CPU met the GPU weight there and failed (the meta device stands in for a GPU here).
    visual = make_clip()[0].visual
    on_cpu = stage2.prepare_encoder(copy.deepcopy(visual), n_blocks=0, lora_rank=2,
                                    generator=torch.Generator().manual_seed(3))
    moved = stage2.prepare_encoder(copy.deepcopy(visual).to(device), n_blocks=0, lora_rank=2,
                                   generator=torch.Generator().manual_seed(3))
    adapters = {n: p for n, p in moved.named_parameters() if n.endswith((".up", ".down"))}
    assert len(adapters) == 8 and all(p.device.type == device for p in adapters.values())
    if device != "meta":   # the same starts on any device (drawn on the CPU, then moved)
        moved_params = dict(moved.named_parameters())
        assert all(torch.equal(p, moved_params[n].cpu()) for n, p in on_cpu.named_parameters())


def test_bad_input_is_refused_with_a_clear_error(data):
    model, _ = make_clip()
    paths, feats = data["train"][:20], data["features"][:20]
    with pytest.raises(ValueError, match="text_counterparts must have shape"):
        stage2.fine_tune(data["stage1"], model, paths, image_features=feats, text_counterparts=np.ones((20, 7)),
                         config=short_config(), device="cpu")
    with pytest.raises(ValueError, match="image_features has 19 rows"):
        stage2.fine_tune(data["stage1"], model, paths, image_features=feats[:19], config=short_config(),
                         device="cpu")
    with pytest.raises(ValueError, match="n_blocks must be between 0 and 2"):
        stage2.fine_tune(data["stage1"], model, paths, config=short_config(n_blocks=3), device="cpu")
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        stage2.fine_tune(data["stage1"], model, paths, config=short_config(), resume=True, device="cpu")
    with pytest.raises(ValueError, match="the list of images is empty"):
        stage2.fine_tune(data["stage1"], model, [], config=short_config(), device="cpu")
    with pytest.raises(ValueError, match="got the single string"):
        stage2.fine_tune(data["stage1"], model, paths[0], config=short_config(), device="cpu")


def test_select_confident_keeps_the_fraction_as_written():
    # 0.07 of 100 kept 8: the float product is 7.000000000000001 (so for 141 fractions 0.01-0.99 and some size).
    for keep_fraction in np.round(np.arange(0.01, 1.0, 0.01), 2):
        for n in (25, 50, 100, 300, 1000):
            expected = math.ceil(fractions.Fraction(str(keep_fraction)) * n)
            probs = np.full((n, 2), 0.25)
            probs[:, 0] = np.linspace(0.5, 0.99, n)
            probs[:, 1] = 1 - probs[:, 0]
            _, labels = stage2.select_confident(probs, keep_fraction=float(keep_fraction), min_per_cluster=1)
            assert (labels == 0).sum() == expected, (keep_fraction, n)


def test_config_values_become_plain_numbers_and_configs_are_stage2configs():
    # A Fraction passed the checks and made a checkpoint torch.load(weights_only=True) refused (every epoch lost on
    # resuming); lora_alpha=nan (LoRA off) one whose every resume was refused (nan != nan); a dict or the class as
    # the config failed with Python's errors, and {} was taken for no config.
    config = stage2.Stage2Config(keep_fraction=fractions.Fraction(1, 2), epochs=np.int16(2)).validate()
    assert type(config.keep_fraction) is float and type(config.epochs) is int and config.keep_fraction == 0.5
    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        stage2.Stage2Config(lora_alpha=float("nan")).validate()
    for bad in ({"epochs": 1}, {}, stage2.Stage2Config):
        with pytest.raises(ValueError, match="the stage-2 config must be a laic.stage2.Stage2Config"):
            stage2.fine_tune(None, None, ["x.png"], config=bad, device="cpu")


@pytest.mark.parametrize("option, value, message", [
    ("amp", "false", "amp must be True or False"),          # a truthy string would have left autocast on
    ("keep_fraction", "0.5x", "keep_fraction must be a number"),
    ("label_smoothing", True, "label_smoothing must be a number"),
    ("lora_alpha", "x", "lora_alpha must be a number"),     # checked with or without LoRA
    ("weight_decay", None, "weight_decay must be a number"),
])
def test_config_refuses_values_of_the_wrong_kind(option, value, message):
    with pytest.raises(ValueError, match=message):
        stage2.Stage2Config(**{option: value}).validate()


def test_config_seeds_are_those_torch_tells_apart():
    # Bounded at 2**63 - 1: torch's generator takes 32 bits of a seed, so seed=2**32 trained as seed 0 (the LoRA
    # weights and augmentations drawn alike), which LAIC's random_state and --seed refuse.
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(2**32)),
                       torch.randn(4, generator=torch.Generator().manual_seed(0)))
    stage2.Stage2Config(seed=2**32 - 1).validate()
    with pytest.raises(ValueError, match=r"seed must be between 0 and 4294967295, got 4294967296"):
        stage2.Stage2Config(seed=2**32).validate()


@pytest.mark.parametrize("batch_size,accum", [(16, 2), (12, 3), (8, 5)])
def test_gradient_accumulation_matches_one_large_batch(data, tmp_path, batch_size, accum):
    # Without the in-batch text term the loss is a per-image mean, so accumulated smaller batches must give the
    # gradient of the whole batch (sample order and views do not depend on the batch size). One optimiser step of
    # 32 images; Adam's first moment after one step is 0.1 * gradient, so comparing it compares the gradients
    # (the parameters would not show a wrong scale: Adam's step is scale-free). 12 x 3: batches of 12, 12 and 8,
    # whose 8 images counted 1.5 times each; 8 x 5: the epoch ends after 4 of the group's 5 batches, whose gradient
    # came out at 4/5 (each batch's mean was divided by grad_accum_steps).
    paths, feats = data["train"][:32], data["features"][:32]
    moments = []
    for batch_size, accum in ((32, 1), (batch_size, accum)):
        folder = tmp_path / f"b{batch_size}"
        stage2.fine_tune(data["stage1"], make_clip()[0], paths, image_features=feats, device="cpu",
                         checkpoint_dir=folder, config=short_config(epochs=1, keep_fraction=1.0,
                                                                    batch_size=batch_size, grad_accum_steps=accum))
        state = torch.load(folder / stage2.CHECKPOINT_NAME, weights_only=True)["optimizer"]["state"]
        assert all(int(s["step"]) == 1 for s in state.values())
        moments.append([state[i]["exp_avg"] for i in sorted(state)])
    for whole, accumulated in zip(*moments):
        scale = whole.abs().max()
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("sizes,accum", [([16, 16, 8], 1), ([8] * 5, 2), ([12, 12, 12, 12, 4], 2),
                                         ([10] * 7 + [3], 3)])
def test_every_optimiser_step_weighs_its_own_images_alike(sizes, accum):
    # The test above checks the first optimiser step only: shares computed against the first group's images (a
    # later group, or a last one of fewer or smaller batches, then weighed by the first's) went unseen.
    from laic.stage2.train import accumulation_shares

    class Batches:
        def __len__(self):
            return len(sizes)

        def combined(self, step):
            return list(range(sizes[step]))

    shares = accumulation_shares(Batches(), accum)
    assert len(shares) == len(sizes)
    # Independently: the groups end where the training loop steps the optimiser; each image of a group weighs
    # 1 / the group's images.
    stepping = [s for s in range(len(sizes)) if (s + 1) % accum == 0 or s + 1 == len(sizes)]
    first = 0
    for last in stepping:
        images = sum(sizes[first:last + 1])
        for s in range(first, last + 1):
            assert shares[s] == pytest.approx(sizes[s] / images)
        first = last + 1


def test_a_stage2_result_draws_as_a_gallery(trained, data, tmp_path):
    from laic import report, run_dir

    result = trained["result"]
    run_dir.write_run_dir(tmp_path / "run", result.labels, result.features, data["train"], n_clusters=K)
    index = report.write_report(tmp_path / "run", per_cluster=2)
    shown = {int(c) for c in np.unique(result.labels)}
    assert {p.name for p in index.parent.glob("cluster_*.png")} == {f"cluster_{c:03d}.png" for c in shown}


def test_without_image_features_the_frozen_tower_computes_them(data):
    # With learning rates ~0 the head stays at its starting point, the centres of the confident clusters, which
    # must be the same whether the features are passed in (open_clip's own preprocessing) or computed by stage 2.
    paths, feats = data["train"][:48], data["features"][:48]
    config = short_config(epochs=1, encoder_lr=1e-12, head_lr=1e-12)
    heads = [stage2.fine_tune(data["stage1"], make_clip()[0], paths, image_features=f, config=config,
                              device="cpu").encoder.model.head.weight.detach() for f in (feats, None)]
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=1e-5)
    indices, labels = stage2.select_confident(data["stage1"].predict_proba(feats), 0.5, 3)
    expected = np.stack([feats[indices[labels == c]].mean(0) for c in range(K)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(F.normalize(heads[0], dim=1).numpy(), expected, atol=1e-5)


def test_an_image_over_pils_size_limit_is_one_clear_error_in_stage_2(tmp_path, monkeypatch):
    # Every other reader of images catches PIL's DecompressionBombError; stage 2's let it through as a traceback.
    from PIL import Image

    from laic.stage2.data import readable

    path = write_cifar_pngs(tmp_path, 1)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)   # the image is over twice this: PIL refuses it
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))} .*; .*fit again without it, or, if "
                                         "it changed since the fit began, put the file back as it was "
                                         "\\(its modification time too: cp -p\\) and resume"):
        readable(path)
