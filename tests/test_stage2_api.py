"""Stage 2 through the API (laic.stage2.fit_images, LAIC.fit_images) and the CLI (`laic fit --images`, `laic predict
--images`, `laic report`), on the CPU with a tiny open_clip ViT (random weights drawn from a seed) and real CIFAR-10
images written as PNGs.

The orchestration is checked against the same steps done by hand: features with open_clip's own preprocessing,
LAIC.fit_trace (text counterparts checked against numpy), then laic.stage2.fine_tune.
"""
import contextlib
import io
import json
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import laic.embed
from laic import run_dir, stage2
from laic.cli import main
from laic.clip import clip_record, load_clip
from laic.embed import PHOTO_TEMPLATE, UnreadableImagesWarning, embed_texts
from laic.model import LAIC
from tiny_clip import cifar_images, register_tiny_clip

N_TRAIN, N_NEW, K = 96, 24, 4
NOUNS = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "tree", "house"]
# Short runs: 2 epochs, one trainable block, large learning rates so that something visibly moves.
STAGE2 = dict(epochs=2, batch_size=32, n_blocks=1, encoder_lr=2e-3, head_lr=2e-2, num_workers=0, min_per_cluster=3,
              eval_batch_size=64)
CLI_STAGE2 = [arg for name, value in STAGE2.items() for arg in ("--stage2", f"{name}={value}")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_clip(seed=0):
    return load_clip(register_tiny_clip(), "random", "cpu", seed=seed)


def write_pngs(folder: pathlib.Path, pixels: np.ndarray, first: int):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"img_{first + i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def open_clip_features(clip, paths):
    """Frozen features the way open_clip's own preprocessing gives them (not laic.embed's code)."""
    from PIL import Image

    model, preprocess = clip[0], clip[1]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return F.normalize(model.encode_image(images), dim=1).numpy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2api")
    pixels = cifar_images(N_TRAIN + N_NEW)
    train = write_pngs(root / "train", pixels[:N_TRAIN], 0)
    new = write_pngs(root / "new", pixels[N_TRAIN:], N_TRAIN)
    # The same training images plus one file that is not an image: it must be skipped, not crash the run.
    with_broken = root / "with_broken"
    write_pngs(with_broken, pixels[:N_TRAIN], 0)
    (with_broken / "img_9999.png").write_bytes(b"this is not a png")
    clip = base_clip()
    features = open_clip_features(clip, train)
    # "Nouns" that agree with the images (noisy copies of some image embeddings), so that stage 0 finds the
    # vocabulary helpful and stage 2 gets the language term; a random text tower's nouns would not agree.
    rng = np.random.default_rng(0)
    nouns = features[rng.choice(N_TRAIN, 24, replace=False)] + 0.05 * rng.normal(size=(24, features.shape[1]))
    nouns = (nouns / np.linalg.norm(nouns, axis=1, keepdims=True)).astype(np.float32)
    return {"root": root, "train": [str(p) for p in train], "new": [str(p) for p in new],
            "with_broken": with_broken, "clip": clip, "features": features, "nouns": nouns,
            "noun_names": [f"n{i}" for i in range(len(nouns))]}


def config(**overrides):
    return stage2.Stage2Config(**dict(STAGE2, **overrides))


def states_close(a, b, atol):
    a, b = stage2.trainable_state(a), stage2.trainable_state(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# laic.stage2.fit_images


@pytest.fixture(scope="module")
def fitted(data):
    model = LAIC(n_clusters=K, random_state=0)
    with pytest.warns(UnreadableImagesWarning, match="img_9999"):
        result = stage2.fit_images(model, data["with_broken"], data["nouns"], data["noun_names"], clip=data["clip"],
                                   model_name=register_tiny_clip(), config=config())
    return model, result


def test_fit_images_inside_the_callers_no_grad_trains_as_outside(fitted, data):
    # Stage 2's backward failed inside torch.no_grad() ("element 0 of tensors does not require grad").
    model = LAIC(n_clusters=K, random_state=0)
    with torch.no_grad(), pytest.warns(UnreadableImagesWarning) as said:
        result = stage2.fit_images(model, data["with_broken"], data["nouns"], data["noun_names"], clip=data["clip"],
                                   model_name=register_tiny_clip(), config=config())
    assert {w.filename for w in said if w.category is UnreadableImagesWarning} == {__file__}   # the caller's line
    np.testing.assert_array_equal(result.labels, fitted[1].labels)
    states_close(result.encoder.model, fitted[1].encoder.model, atol=0)


def test_fit_images_under_the_callers_cpu_autocast_trains_as_outside(fitted, data):
    # The frozen embedding ran under the caller's CPU autocast, and moved (12-06).
    model = LAIC(n_clusters=K, random_state=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UnreadableImagesWarning):
        result = stage2.fit_images(model, data["with_broken"], data["nouns"], data["noun_names"], clip=data["clip"],
                                   model_name=register_tiny_clip(), config=config())
        probs = result.encoder.predict_proba(data["new"])
    np.testing.assert_array_equal(result.labels, fitted[1].labels)
    states_close(result.encoder.model, fitted[1].encoder.model, atol=0)
    np.testing.assert_array_equal(probs, fitted[1].encoder.predict_proba(data["new"]))


def test_fit_images_runs_under_the_callers_float64_default_dtype(data):
    # The float32 tower refused the transforms' float64 images ("expected scalar type Double but found Float"),
    # after the embedding and stages 0 and 1 had run; its probabilities met a float64 buffer (12-06). The images
    # are preprocessed in the default dtype (torchvision's ToTensor), so the result equals the float32 default's
    # up to rounding, not to the bit.
    model, before = LAIC(n_clusters=K, random_state=0), torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.warns(UnreadableImagesWarning):
            result = stage2.fit_images(model, data["with_broken"], data["nouns"], data["noun_names"],
                                       clip=data["clip"], model_name=register_tiny_clip(), config=config())
        probs = result.encoder.predict_proba(result.paths)
    finally:
        torch.set_default_dtype(before)
    assert probs.dtype == np.float32 and result.labels.shape == (N_TRAIN,)
    np.testing.assert_allclose(probs, result.probs, atol=1e-5)
    np.testing.assert_array_equal(result.labels, probs.argmax(1))


def test_fit_images_labels_every_readable_image(fitted, data):
    model, result = fitted
    # The broken file is left out; the order is the folder's sorted order.
    assert result.paths == [str(data["with_broken"] / pathlib.Path(p).name) for p in data["train"]]
    assert result.labels.shape == (N_TRAIN,) and result.labels.dtype == np.int64
    assert result.labels.min() >= 0 and result.labels.max() < K
    assert np.array_equal(model.labels_, result.labels)
    assert result.features.shape == (N_TRAIN, 32)
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert model.agreement_ > 0 and all(h["text"] > 0 for h in result.history)  # the language term was on


def test_text_counterparts_are_the_softmax_mixture_of_the_models_nouns(data):
    model = LAIC(n_clusters=K, random_state=0)
    trace = model.fit_trace(data["features"], data["nouns"], data["noun_names"])
    nouns = model.nouns_.double().numpy()
    logits = data["features"].astype(np.float64) @ nouns.T / model.text_tau
    weights = np.exp(logits - logits.max(1, keepdims=True))
    mixed = (weights / weights.sum(1, keepdims=True)) @ nouns
    expected = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    np.testing.assert_allclose(trace.text_counterparts, expected, rtol=0, atol=1e-5)
    # ... and the probabilities are the fitted model's own.
    np.testing.assert_allclose(trace.probabilities, model.predict_proba(data["features"]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(trace.probabilities.argmax(1), model.labels_)


def test_fit_computes_the_text_counterparts_once(data, monkeypatch):
    # Stage 0 mixes the kept nouns once for the training images; fit must not mix them again (e.g. to label the
    # training images), and fit_images reuses them for stage 2. (The random-noun null model mixes other nouns.)
    from laic import stage0

    mixed_with = []
    real = stage0.text_counterparts

    def counted(images, nouns, tau=stage0.TEXT_TAU):
        mixed_with.append(nouns)
        return real(images, nouns, tau)

    monkeypatch.setattr(stage0, "text_counterparts", counted)
    for options in ({}, {"min_cluster_size": 10 ** 6}):  # with and without stage 1
        mixed_with.clear()
        model = LAIC(n_clusters=K, random_state=0, **options)
        stage2.fit_images(model, data["train"][:48], data["nouns"], clip=data["clip"], model_name=register_tiny_clip(),
                          image_features=data["features"][:48], config=config(epochs=1))
        assert sum(nouns is model.nouns_ for nouns in mixed_with) == 1
        assert len(mixed_with) == 2  # the kept nouns, and the null model's random ones


def test_n_threads_applies_to_the_embedding_and_stage_2(data, monkeypatch):
    # Only LAIC.fit's stages 0 and 1 ran at n_threads: the embedding and the fine-tune, most of the run, at torch's.
    import laic.embed
    from laic.stage2 import estimator

    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(laic.embed, "embed_images", spy("embed", laic.embed.embed_images))
    monkeypatch.setattr(estimator, "fine_tune", spy("stage 2", estimator.fine_tune))
    assert torch.get_num_threads() == 1   # (the module's one_torch_thread)
    model = LAIC(n_clusters=K, random_state=0, stage1_steps=2, n_threads=2)
    stage2.fit_images(model, data["train"][:48], data["nouns"], clip=data["clip"], model_name=register_tiny_clip(),
                      config=config(epochs=1))
    assert seen == {"embed": 2, "stage 2": 2} and torch.get_num_threads() == 1


def test_fit_images_is_stage1_then_fine_tune_by_hand(fitted, data):
    # The same pipeline written out: stage 0/1 on features computed with open_clip's own preprocessing, then
    # fine_tune with the text counterparts (checked against numpy above). Everything is deterministic on the CPU, so
    # the results must be identical. (Not compared with numpy's counterparts directly: their 1e-6 float64 rounding
    # flips the sign of Adam's near-zero steps, a difference of a whole learning rate.)
    model, result = fitted
    by_hand = LAIC(n_clusters=K, random_state=0)
    text = by_hand.fit_trace(data["features"], data["nouns"], data["noun_names"]).text_counterparts
    expected = stage2.fine_tune(by_hand, data["clip"][0], data["train"], image_features=data["features"],
                                text_counterparts=text, config=config(), device="cpu")
    assert np.array_equal(result.labels, expected.labels)
    states_close(result.encoder.model, expected.encoder.model, atol=0)


def test_without_an_agreeing_vocabulary_there_is_no_language_term(data):
    model = LAIC(n_clusters=K, random_state=0, use_text=False)  # agreement forced to 0
    result = stage2.fit_images(model, data["train"][:48], data["nouns"], clip=data["clip"],
                               model_name=register_tiny_clip(), image_features=data["features"][:48],
                               config=config(epochs=1))
    assert model.agreement_ == 0.0
    assert all(h["text"] == 0 for h in result.history)
    assert any("does not agree" in note for note in result.notes)
    assert not any("no text counterparts given" in note for note in result.notes)   # one note for one cause


def test_fit_images_reads_image_features_as_fit_does(data):
    """image_features of any float dtype and row scale, as LAIC.fit takes them: long double rows of 2^5000 (beyond
    float64) and float64 rows of 2^990 (beyond float32) give the stage-1 model of the plain rows (fit_images cast
    them to float32 and refused them as infinite before)."""
    plain = data["features"][:48].astype(np.float32)
    expected = LAIC(n_clusters=K, random_state=0).fit(plain, data["nouns"]).centres_
    for scaled in (np.ldexp(plain.astype(np.longdouble), 5000), np.ldexp(plain.astype(np.float64), 990)):
        if not np.isfinite(scaled).all():
            continue                      # no 80-bit long double here: 2^5000 overflows
        model = LAIC(n_clusters=K, random_state=0)
        stage2.fit_images(model, data["train"][:48], data["nouns"], clip=data["clip"], model_name=register_tiny_clip(),
                          image_features=scaled, config=config(epochs=1))
        assert torch.equal(model.centres_, expected)       # the stage-1 model: fitted on the same directions


def test_fit_images_bad_input(data):
    model = LAIC(n_clusters=K)
    with pytest.raises(ValueError, match="image_features has 10 rows"):
        stage2.fit_images(model, data["train"], data["nouns"], clip=data["clip"], model_name=register_tiny_clip(),
                          image_features=data["features"][:10], config=config())
    with pytest.raises(ValueError, match="clip must be"):
        stage2.fit_images(model, data["train"], data["nouns"], clip="ViT-B-32", model_name=register_tiny_clip())
    # An unreadable image given with a feature row of its own: named when training reaches it (PIL's traceback from
    # inside the training loader before).
    broken = data["train"][:-1] + [str(data["with_broken"] / "img_9999.png")]
    with pytest.raises(ValueError, match=r"cannot read image .*img_9999.png .*; .*fit again without it, or, if "
                                         "it changed since the fit began, put the file back as it was "
                                         "\\(its modification time too: cp -p\\) and resume"):
        stage2.fit_images(LAIC(n_clusters=K, random_state=0), broken, data["nouns"], clip=data["clip"],
                          model_name=register_tiny_clip(), image_features=data["features"],
                          config=config(epochs=1, keep_fraction=1.0))


def test_images_given_as_one_image_s_path_are_told_a_list_is_taken(data):
    # What predict_images and fit_images read their images with: "is not a folder; pass the folder that holds your
    # images" said nothing of the list that predicts one image.
    from laic.stage2.estimator import image_list

    one = data["new"][0]
    with pytest.raises(ValueError, match=r"images '.*' is a file, not a folder; pass the folder that holds your "
                                         r"images, or a list of image paths \(\[path\] for one image\)"):
        image_list(one)
    assert image_list([one]) == [str(one)]
    with pytest.raises(ValueError, match="image folder '.*nowhere' does not exist"):   # as before
        image_list(data["root"] / "nowhere")


def test_predict_images_reads_bytes_paths_as_the_file_system_names_them(fitted, data):
    """A bytes path was made "b'/tmp/...'" by str() and reported as unreadable."""
    import os

    encoder = fitted[1].encoder
    as_bytes = [os.fsencode(p) for p in data["new"][:3]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImagesWarning)
        np.testing.assert_array_equal(encoder.predict(as_bytes), encoder.predict(data["new"][:3]))
    broken = [data["with_broken"] / "img_9999.png"]
    # At the caller's line, not laic's; with the reason, as the frozen encoder's embedding says it (the name alone).
    with pytest.warns(UnreadableImagesWarning, match=r"img_9999.png \(cannot identify image file") as said:
        encoder.predict(data["new"][:2] + broken)
    assert [w.filename for w in said if w.category is UnreadableImagesWarning] == [__file__]


def test_stage2_state_round_trip_predicts_the_same(fitted, data, tmp_path):
    # The pieces LAIC.save / LAIC.load use: the stage-2 part of the model file, restored onto a reloaded model and
    # rebuilt onto the base encoder (given, or loaded again from the recorded name, weights and seed).
    model, result = fitted
    model.save(tmp_path / "plain")  # before attaching: a model without stage 2
    part = stage2.Stage2Part(clip_record(data["clip"], register_tiny_clip(), "random", 0), result.paths,
                             result.history, encoder=result.encoder)
    model.attach_stage2(part, result.labels)
    expected = stage2.predict_images_proba(model, data["new"])
    np.testing.assert_array_equal(expected, result.encoder.predict_proba(data["new"]))
    model.save(tmp_path / "model")
    torch.save(part.state(), tmp_path / "stage2_part")
    for clip in (base_clip(seed=0), None):
        loaded = LAIC.load(tmp_path / "plain")
        loaded.attach_stage2(stage2.Stage2Part.from_state(torch.load(tmp_path / "stage2_part", weights_only=True)),
                             result.labels)
        assert loaded.stage2_.image_paths == result.paths
        np.testing.assert_array_equal(stage2.predict_images_proba(loaded, data["new"], clip), expected)
        np.testing.assert_array_equal(stage2.predict_images(loaded, data["root"] / "new", clip), expected.argmax(1))
        np.testing.assert_array_equal(stage2.predict_images(LAIC.load(tmp_path / "model"), data["new"], clip),
                                      expected.argmax(1))
    loaded = LAIC.load(tmp_path / "model")
    with pytest.raises(ValueError, match="base encoder"):
        stage2.predict_images(loaded, data["new"], base_clip(seed=1))
    # Once the encoder is built (by a first predict, or by the fit itself), another base encoder given is refused
    # too: it was ignored, whatever it held.
    for built in (LAIC.load(tmp_path / "model"), model):
        np.testing.assert_array_equal(stage2.predict_images(built, data["new"]), expected.argmax(1))
        with pytest.raises(ValueError, match="clip_model is not the base encoder"):
            stage2.predict_images(built, data["new"], base_clip(seed=1))
        np.testing.assert_array_equal(stage2.predict_images(built, data["new"], base_clip(seed=0)),
                                      expected.argmax(1))
    with pytest.raises(ValueError, match="no stage 2"):
        stage2.predict_images(LAIC.load(tmp_path / "plain"), data["new"])


def test_a_stage2_part_with_numpy_settings_saves_a_file_that_loads(fitted, data, tmp_path):
    # Stage2Config(head_lr=np.float64(...)) passes validate: LAIC.save wrote it and LAIC.load refused the file.
    model, result = fitted
    encoder = result.encoder.state()
    encoder["config"] = {k: np.float64(v) if isinstance(v, float) else v for k, v in encoder["config"].items()}
    part = stage2.Stage2Part(clip_record(data["clip"], register_tiny_clip(), "random", 0), result.paths,
                             result.history, saved_encoder=encoder)
    model.save(tmp_path / "plain")
    loaded = LAIC.load(tmp_path / "plain")
    loaded.attach_stage2(part, result.labels)
    loaded.save(tmp_path / "model")
    again = LAIC.load(tmp_path / "model")
    np.testing.assert_array_equal(stage2.predict_images_proba(again, data["new"], base_clip(seed=0)),
                                  result.encoder.predict_proba(data["new"]))


# ------------------------------------------------------------------------------------------------------------------
# LAIC methods


def test_without_clip_the_base_encoder_is_loaded_and_recorded(data, tmp_path):
    # No clip: the base is built from the model name and weights (random ones from random_state); the saved model
    # then rebuilds it by itself to predict.
    from laic.clip import weights_digest

    model = LAIC(n_clusters=K, random_state=0)
    stage2.fit_laic_images(model, data["train"][:48], data["nouns"], model_name=register_tiny_clip(),
                           image_features=data["features"][:48], stage2_config=config(epochs=1))
    assert model.stage2_.clip["pretrained"] == "random" and model.stage2_.clip["seed"] == 0
    assert model.stage2_.clip["weights_digest"] == weights_digest(data["clip"][0])
    assert len(model.stage2_.history) == 1
    expected = stage2.predict_images(model, data["new"])
    model.save(tmp_path / "model")
    np.testing.assert_array_equal(stage2.predict_images(LAIC.load(tmp_path / "model"), data["new"]), expected)


@pytest.mark.parametrize("renormalised", [False, True])
def test_copies_of_too_few_nouns_are_refused_before_the_images_are_embedded(data, monkeypatch, renormalised):
    # The early check counted rows: three copies of one noun passed it, the images were embedded, then LAIC.fit
    # refused them (one distinct noun). Copies a rounding apart under one name are one noun to both.
    import laic.embed

    monkeypatch.setattr(laic.embed, "embed_images", lambda *a, **k: pytest.fail("the images were embedded"))
    copies = np.repeat(data["nouns"][:1], 3, axis=0).astype(np.float32)
    names = None
    if renormalised:
        copies[1] = copies[1] / np.linalg.norm(copies[1]) * np.float32(0.7)
        copies[2] = copies[2] / np.float32(3.0)
        names = ["thing"] * 3
    with pytest.raises(ValueError, match="needs at least 3 distinct nouns, got 1"):
        stage2.fit_images(LAIC(n_clusters=K, random_state=0, relation_fused=True), data["train"][:48], copies,
                          noun_names=names, clip=data["clip"], model_name=register_tiny_clip(),
                          config=config(epochs=1))


def test_a_k_that_only_the_unreadable_images_allowed_is_refused_naming_them(data, monkeypatch):
    # N_TRAIN + 1 files, one of them not an image: K = N_TRAIN + 1 fits the files listed, not the images read, and
    # LAIC.fit's refusal named only N, which the user never chose.
    from laic.model import LAIC as Fitted

    monkeypatch.setattr(Fitted, "fit_trace", lambda *a, **k: pytest.fail("stages 0 and 1 ran"))
    for model, said in ((LAIC(n_clusters=N_TRAIN + 1), f"n_clusters must be between 2 and {N_TRAIN}"),
                        (LAIC(n_clusters="auto", k_range=(2, N_TRAIN)), f"within \\[2, N - 1 = {N_TRAIN - 1}\\]")):
        with pytest.warns(UnreadableImagesWarning, match="img_9999"), \
                pytest.raises(ValueError, match=f"^1 of the {N_TRAIN + 1} images could not be read .*, leaving "
                                                f"{N_TRAIN}: .*{said}"):
            stage2.fit_images(model, data["with_broken"], data["nouns"], data["noun_names"], clip=data["clip"],
                              model_name=register_tiny_clip(), config=config(epochs=1))
    # Options the images read allow go on as before.
    monkeypatch.setattr(Fitted, "fit_trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fit reached")))
    with pytest.warns(UnreadableImagesWarning), pytest.raises(RuntimeError, match="fit reached"):
        stage2.fit_images(LAIC(n_clusters=N_TRAIN), data["with_broken"], data["nouns"], data["noun_names"],
                          clip=data["clip"], model_name=register_tiny_clip(), config=config(epochs=1))


def test_settings_the_tower_cannot_take_are_refused_before_stage_0(data, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("stages 0 and 1 ran before the refusal")

    monkeypatch.setattr(LAIC, "fit_trace", no_fit)
    with pytest.raises(ValueError, match=r"n_blocks must be between 0 and 2, got 3 \(the tower has 2 blocks\)"):
        stage2.fit_images(LAIC(n_clusters=K, random_state=0), data["train"][:48], data["nouns"], clip=data["clip"],
                          model_name=register_tiny_clip(), image_features=data["features"][:48],
                          config=config(n_blocks=3))


@pytest.mark.parametrize("model, extra, match", [
    (LAIC(n_clusters=K, random_state=None), {}, "random_state must be an int"),       # a TypeError in int() before
    (LAIC(n_clusters=K, random_state=-1), {}, "random_state must be between"),        # said as stage 2's "seed"
    (LAIC(n_clusters=K, text_tau=0.0), {}, "text_tau must be"),
    (LAIC(n_clusters=K), {"resume": True}, "resume=True needs checkpoint_dir")])     # after stages 0 and 1 before
def test_laics_options_and_resume_are_refused_before_the_images_are_embedded(data, monkeypatch, model, extra, match):
    def no_work(*args, **kwargs):
        raise AssertionError("the images were embedded, or stages 0 and 1 ran, before the refusal")

    monkeypatch.setattr(LAIC, "fit_trace", no_work)
    monkeypatch.setattr("laic.embed.embed_images", no_work)
    with pytest.raises(ValueError, match=match):
        model.fit_images(data["train"][:48], data["nouns"], clip=data["clip"], model_name=register_tiny_clip(),
                         stage2_config=config(), **extra)


def test_a_clip_given_without_its_weights_is_asked_for_again(data, tmp_path):
    # clip= without pretrained= was recorded as random weights from random_state: the loaded model rebuilt another
    # encoder and refused it ("clip_model is not the base encoder"), though no clip_model was passed.
    model = LAIC(n_clusters=K, random_state=0)
    clip = base_clip(seed=5)
    stage2.fit_laic_images(model, data["train"][:48], data["nouns"], model_name=register_tiny_clip(), clip=clip,
                           image_features=data["features"][:48], stage2_config=config(epochs=1))
    assert model.stage2_.clip["pretrained"] is None
    expected = stage2.predict_images(model, data["new"])
    model.save(tmp_path / "model")
    with pytest.raises(ValueError, match="was passed as clip= without pretrained=, so its weights cannot be loaded "
                                         "again: pass the same encoder as clip= here"):
        stage2.predict_images(LAIC.load(tmp_path / "model"), data["new"])
    np.testing.assert_array_equal(stage2.predict_images(LAIC.load(tmp_path / "model"), data["new"], clip), expected)


def test_laic_fit_images_save_load_predict_images(data, tmp_path):
    model = LAIC(n_clusters=K, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        returned = model.fit_images(data["with_broken"], data["nouns"], data["noun_names"], clip=data["clip"],
                                    model_name=register_tiny_clip(), stage2_config=config(epochs=1))
    assert returned is model
    assert len(model.stage2_.image_paths) == N_TRAIN and model.labels_.shape == (N_TRAIN,)
    expected = model.predict_images_proba(data["new"], data["clip"])
    np.testing.assert_array_equal(model.predict_images(data["new"]), expected.argmax(1))
    model.save(tmp_path / "model")
    loaded = LAIC.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.labels_, model.labels_)
    np.testing.assert_array_equal(loaded.predict_images_proba(data["new"], base_clip(seed=0)), expected)
    # Fitting again on features alone drops the stage-2 part: predict_images would use a stale encoder.
    loaded.fit(data["features"], data["nouns"])
    with pytest.raises(ValueError, match="no stage 2"):
        loaded.predict_images(data["new"])


class Interrupted(Exception):
    pass


def test_fit_images_interrupted_in_stage2_leaves_the_model_as_it_was(data):
    """Stages 0 and 1 done, stage 2 interrupted: the model is the one before the call (it was left with the new
    stage-1 fit and no stage-2 part at all: neither the old model nor the new one)."""
    model = LAIC(n_clusters=K, random_state=0)
    options = dict(clip=data["clip"], model_name=register_tiny_clip())
    model.fit_images(data["train"][:48], data["nouns"], data["noun_names"], stage2_config=config(epochs=1), **options)
    before = {name: value for name, value in vars(model).items()}

    def interrupt(epoch, stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.fit_images(data["train"], data["nouns"], data["noun_names"], stage2_config=config(epochs=2),
                         on_epoch_end=interrupt, **options)
    assert vars(model).keys() == before.keys()
    assert all(vars(model)[name] is value for name, value in before.items())
    assert len(model.stage2_.image_paths) == 48


def stage2_steps(profile):
    return [s for s in profile["steps"] if s["kind"] == "stage-2"]


def test_laic_profile_fit_images_records_stages_0_to_2_in_one_profile(data, tmp_path):
    """LAIC(profile=True).fit_images: one recording spans the whole run (LAIC.fit records into it instead of opening
    its own), with one stage-2 step per epoch run; a resumed run profiles the epochs it runs."""
    def fit(profile=True, **options):
        model = LAIC(n_clusters=K, random_state=0, profile=profile)
        return model.fit_images(data["train"], data["nouns"], data["noun_names"], clip=data["clip"],
                                model_name=register_tiny_clip(), image_features=data["features"], **options)

    model = fit(stage2_config=config(epochs=2))
    profile = model.profile_
    names = [s["name"] for s in profile["steps"]]
    assert names.count("fused k-means") == 1                         # one recording, not one per stage
    assert {"graphs", "stage-1", "stage-2"} <= {s["kind"] for s in profile["steps"]}
    epochs = stage2_steps(profile)
    assert [s["name"] for s in epochs] == ["stage 2 epoch 1/2", "stage 2 epoch 2/2"]
    # Training allocates (activations, gradients, the optimiser's state): the CPU's memory figures see each epoch.
    assert all(s["seconds"] > 0 and s["peak_extra_bytes"] > 0 for s in epochs)
    assert names.index("stage 1 (heads)") < names.index("stage 2 epoch 1/2")   # stages in order, in one profile
    assert sum(s["seconds"] for s in profile["steps"]) <= profile["seconds"]
    assert profile["by_kind"]["stage-2"]["seconds"] == pytest.approx(sum(s["seconds"] for s in epochs))
    assert model.profiler_.has_trace             # on the CPU the memory figures come from the trace
    # Profiling changes nothing in the result.
    plain = fit(profile=False, stage2_config=config(epochs=2))
    assert not hasattr(plain, "profile_")
    np.testing.assert_array_equal(plain.labels_, model.labels_)

    def stop_after_first_epoch(epoch, stats):
        if epoch == 0:
            raise Interrupted

    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(Interrupted):
        fit(stage2_config=config(epochs=2), checkpoint_dir=checkpoint, on_epoch_end=stop_after_first_epoch)
    resumed = fit(stage2_config=config(epochs=2), checkpoint_dir=checkpoint, resume=True)
    assert [s["name"] for s in stage2_steps(resumed.profile_)] == ["stage 2 epoch 2/2"]
    np.testing.assert_array_equal(resumed.labels_, model.labels_)


def test_a_resume_with_other_laic_options_is_refused_naming_them(data, tmp_path):
    """The stage-2 checkpoint keeps the LAIC options stage 1 was fitted with: a resume under others (a changed
    option, or a laic version whose default changed) says which, then and now."""
    def fit(run: dict, **options):
        model = LAIC(n_clusters=K, random_state=0, **options)
        return model.fit_images(data["train"], data["nouns"], data["noun_names"], clip=data["clip"],
                                model_name=register_tiny_clip(), image_features=data["features"],
                                stage2_config=config(epochs=2), checkpoint_dir=tmp_path, **run)

    def stop_after_first_epoch(epoch, stats):
        raise Interrupted

    with pytest.raises(Interrupted):
        fit({"on_epoch_end": stop_after_first_epoch})
    saved = torch.load(tmp_path / stage2.CHECKPOINT_NAME, weights_only=True)["inputs_options"]
    default = LAIC(n_clusters=K).min_cluster_size
    assert saved["min_cluster_size"] == repr(default) and "n_clusters" not in saved and "device" not in saved
    with pytest.raises(ValueError, match=f"min_cluster_size={default} then, {default + 1} now"):
        fit({"resume": True}, min_cluster_size=default + 1)


# ------------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def vocab(data):
    """A `laic vocab`-style folder of real nouns encoded by the same (seeded random) text tower."""
    folder = data["root"] / "vocab"
    embed_texts(NOUNS, register_tiny_clip(), None, templates=PHOTO_TEMPLATE, cache_dir=folder, progress=False,
                clip=data["clip"])
    (folder / "nouns.txt").write_text("".join(n + "\n" for n in NOUNS))
    return folder


def fit_args(data, vocab, out, *extra):
    return ["fit", "--images", str(data["root"] / "train"), "--model", register_tiny_clip(), "--pretrained",
            "random", "--vocab", str(vocab), "--k", str(K), "--out", str(out), "--device", "cpu", "--threads", "1",
            *CLI_STAGE2, *extra]


def test_cli_resume_without_a_checkpoint_says_so_before_the_run(data, vocab, tmp_path, capsys, monkeypatch):
    # Said as a note after the whole run before (a mistyped --out with --resume: the user learnt it at the end).
    from laic.commands import fit_images

    seen = []
    monkeypatch.setattr(fit_images, "_fit_and_publish", lambda *args, resume: seen.append(resume) or 0)
    assert main(fit_args(data, vocab, tmp_path / "run", "--resume")) == 0
    checkpoint = run_dir.checkpoint_dir(tmp_path / "run")
    assert capsys.readouterr().out == (f"laic fit: --resume, but no stage-2 checkpoint in {checkpoint}: starting "
                                       "from the beginning\n")
    assert seen == [False]      # nothing to resume: the run starts as a fresh one (no note of it after the run)
    assert main(fit_args(data, vocab, tmp_path / "run")) == 0
    assert capsys.readouterr().out == "" and seen == [False, False]


def test_cli_run_kept_aside_takes_its_checkpoint_with_it(data, vocab, tmp_path, capsys, monkeypatch):
    # A RUN_DIR filled while the run was made keeps the finished run beside it; its stage-2 checkpoint stayed, and
    # the next fit (even with --overwrite) called it an interrupted stage-2 run (a QA helper, 12-08).
    from laic.commands import common

    out, write = tmp_path / "run", common.write_fit

    def write_then_another_arrives(folder, *args, **kwargs):
        write(folder, *args, **kwargs)
        assert (run_dir.checkpoint_dir(out) / stage2.CHECKPOINT_NAME).is_file()   # the run's own, until now
        out.mkdir()
        (out / "theirs.txt").write_text("another process's file\n")

    monkeypatch.setattr(common, "write_fit", write_then_another_arrives)
    assert main(fit_args(data, vocab, out, "--stage2", "epochs=1", "--quiet")) == 2
    err = capsys.readouterr().err
    assert "changed while the run was made" in err and "the finished run is in" in err, err
    [kept] = [p for p in tmp_path.iterdir() if ".unpublished-" in p.name]
    assert LAIC.load(kept / "run" / "model").n_clusters_ == K
    assert not run_dir.checkpoint_dir(out).exists()
    monkeypatch.setattr(common, "write_fit", write)
    (out / "theirs.txt").unlink()
    assert main(fit_args(data, vocab, out, "--stage2", "epochs=1", "--quiet")) == 0   # no "interrupted" run left


def test_cli_images_with_k_auto_records_the_search(data, vocab, tmp_path, capsys):
    # run.json of `laic fit --images --k auto` said nothing of the search (`--features` recorded it).
    out = tmp_path / "run"
    args = fit_args(data, vocab, out, "--k-range", "2:4", "--stage2", "epochs=1", "--quiet")
    args[args.index("--k") + 1] = "auto"
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    model = LAIC.load(out / "model")
    assert run["k"] == model.n_clusters_ and run["k_search"]["range"] == [2, 4]
    assert run["k_search"]["scores"] == [[k, s] for k, s in model.k_scores_]


def test_cli_images_of_one_picture_are_refused_naming_images(data, vocab, tmp_path, capsys):
    # The fit's refusal named LAIC's image_features, which a user of `laic fit --images` never wrote.
    same = tmp_path / "same"
    same.mkdir()
    picture = sorted((data["root"] / "train").iterdir())[0].read_bytes()
    for i in range(3 * K):
        (same / f"copy_{i}.png").write_bytes(picture)
    args = fit_args(data, vocab, tmp_path / "run", "--quiet")
    args[args.index("--images") + 1] = str(same)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"laic fit: error: --images {same}: all {3 * K} rows point the same way"), err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def cli_run(data, vocab):
    out = data["root"] / "runs" / "full"
    printed, shown = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(shown):
        assert main(fit_args(data, vocab, out)) == 0
    return out, printed.getvalue(), shown.getvalue()


def test_cli_fit_images_records_every_skipped_file(data, vocab, tmp_path):
    # run.json kept a count only, and the warning names five: the rest were found by comparing images.txt by hand.
    args = fit_args(data, vocab, tmp_path / "run")
    args[args.index("--images") + 1] = str(data["with_broken"])
    assert main(args) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["n_skipped"] == 1 and run["skipped"] == [str(data["with_broken"] / "img_9999.png")]
    assert run["n_images"] == N_TRAIN


def test_cli_fit_writes_a_stage2_run(cli_run, data):
    out, printed, shown = cli_run
    assert sorted(p.name for p in out.iterdir()) == sorted(set(run_dir.RUN_FILES) - set(run_dir.PROFILE_FILES))
    assert [p.name for p in out.parent.iterdir()] == ["full"]  # no staging or checkpoint folder left behind
    # Each epoch once, on stderr (the progress), not among the results on stdout.
    assert [line.split(":")[1] for line in shown.splitlines() if "stage 2 epoch" in line] == [
        " stage 2 epoch 1/2", " stage 2 epoch 2/2"] and "stage 2 epoch" not in printed
    assert "embedding images: 100%" in shown   # the frozen encoder's bar (laic.embed)
    # The fine-tuned encoder's bars: the relabelling that ends each epoch (a bar ends its line when it closes; until
    # then it redraws itself with carriage returns).
    bars = [line for line in shown.split("\n") if "embedding images (fine-tuned encoder)" in line]
    assert len(bars) == 2 and all("100%" in bar for bar in bars), bars
    labels = np.load(out / "labels.npy")
    assert labels.shape == (N_TRAIN,) and labels.max() < K
    assert (out / "images.txt").read_text().splitlines() == data["train"]
    info = json.loads((out / "run.json").read_text())
    assert info["encoder"]["pretrained"] == "random" and info["stage2"]["epochs"] == 2
    # The run's labels are the fine-tuned encoder's view of the training images.
    encoder = LAIC.load(out / "model").stage2_.fine_tuned_encoder(base_clip(seed=0), device="cpu")
    features, probs = encoder.embed_and_predict(data["train"])
    np.testing.assert_array_equal(probs.argmax(1), labels)
    np.testing.assert_allclose(np.load(out / "features.npy"), features, atol=1e-6)
    np.testing.assert_array_equal(LAIC.load(out / "model").labels_, labels)


def test_cli_predict_images_uses_the_fine_tuned_encoder(cli_run, data, tmp_path, capsys):
    out = cli_run[0]
    pred, proba = tmp_path / "pred.npy", tmp_path / "proba.npy"
    assert main(["predict", "--model", str(out), "--images", str(data["root"] / "new"), "--out", str(pred),
                 "--proba", str(proba), "--device", "cpu"]) == 0
    assert "embedding images (fine-tuned encoder): 100%" in capsys.readouterr().err   # its progress bar
    encoder = LAIC.load(out / "model").stage2_.fine_tuned_encoder(base_clip(seed=0), device="cpu")
    # The encoder's probabilities, without the clusters that hold none of the run's images (renormalised).
    empty = np.bincount(np.load(out / "labels.npy"), minlength=K) == 0
    expected = np.where(empty, 0, encoder.predict_proba(data["new"]))
    np.testing.assert_allclose(np.load(proba), expected / expected.sum(1, keepdims=True), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.load(pred), np.load(proba).argmax(1))
    assert main(["predict", "--model", str(out), "--images", str(data["root"] / "train"), "--out", str(pred),
                 "--device", "cpu", "--quiet", "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(pred), np.load(out / "labels.npy"))
    assert "embedding images" not in capsys.readouterr().err


def test_cli_predict_images_refuses_base_weights_built_otherwise(cli_run, data, tmp_path, capsys):
    # The base weights from a file (GELU) for a run whose base was an OpenAI tag's build (QuickGELU): one weights
    # digest, another function; the images were scored by it (12-06).
    weights, pred = tmp_path / "base.pt", tmp_path / "pred.npy"
    torch.save(base_clip(seed=0)[0].state_dict(), weights)
    model = LAIC.load(cli_run[0] / "model")
    assert "GELU" in model.stage2_.clip["modules"]
    model.stage2_.clip["modules"] = ["QuickGELU" if m == "GELU" else m for m in model.stage2_.clip["modules"]]
    model.save(tmp_path / "tag_run")
    assert main(["predict", "--images", str(data["root"] / "new"), "--device", "cpu", "--quiet", "--model",
                 str(tmp_path / "tag_run"), "--out", str(pred), "--pretrained", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"--pretrained {weights}: holds the base encoder's weights, but loads built of other layers than at the " \
           "fit (QuickGELU there, GELU here" in err, err
    assert f"pass --pretrained {model.stage2_.clip['pretrained']} as the fit did" in err
    # A fit given its encoder from Python records no weights to name ("pass --pretrained None" it said).
    model.stage2_.clip["pretrained"] = None
    model.save(tmp_path / "api_run")
    assert main(["predict", "--images", str(data["root"] / "new"), "--device", "cpu", "--quiet", "--model",
                 str(tmp_path / "api_run"), "--out", str(pred), "--pretrained", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "predict from Python with it as clip=" in err and "--pretrained None" not in err, err


def test_cli_predict_images_finds_moved_base_weights_with_pretrained(cli_run, data, tmp_path, capsys):
    # A run fitted with --pretrained FILE records the file's absolute path: once the file moved (the run copied to
    # another machine), predict --images failed, and its error asked for an existing file through no flag it has.
    out = cli_run[0]
    weights, other = tmp_path / "moved.pt", tmp_path / "other.pt"
    torch.save(base_clip(seed=0)[0].state_dict(), weights)
    torch.save(base_clip(seed=1)[0].state_dict(), other)
    model = LAIC.load(out / "model")
    model.stage2_.clip["pretrained"] = str(tmp_path / "gone" / "base.pt")   # as recorded by a fit with that file
    model.save(tmp_path / "moved_run")
    pred, expected = tmp_path / "pred.npy", tmp_path / "expected.npy"
    args = ["predict", "--images", str(data["root"] / "new"), "--device", "cpu", "--quiet", "--overwrite"]
    assert main(args + ["--model", str(out), "--out", str(expected)]) == 0
    assert main(args + ["--model", str(tmp_path / "moved_run"), "--out", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "base encoder weights file" in err and "gone/base.pt" in err and "is gone" in err and "--pretrained" in err
    assert main(args + ["--model", str(tmp_path / "moved_run"), "--out", str(pred), "--pretrained", str(weights)]) == 0
    np.testing.assert_array_equal(np.load(pred), np.load(expected))
    assert main(args + ["--model", str(tmp_path / "moved_run"), "--out", str(pred), "--pretrained", str(other)]) == 2
    assert f"--pretrained {other}: holds other weights than the base encoder this run was fitted from" in \
        capsys.readouterr().err
    assert main(["predict", "--model", str(out), "--features", str(out / "features.npy"), "--out", str(pred),
                 "--pretrained", str(weights)]) == 2
    assert "--pretrained goes with --images" in capsys.readouterr().err
    # The recorded file rewritten with other weights: said in the command's terms (was "clip_model is not the base
    # encoder", an argument of no command).
    model.stage2_.clip["pretrained"] = str(other)
    model.save(tmp_path / "replaced_run")
    assert main(args + ["--model", str(tmp_path / "replaced_run"), "--out", str(pred)]) == 2
    err = capsys.readouterr().err
    assert f"base encoder weights file '{other}'" in err and "holds other weights than at the fit" in err and \
        "--pretrained PATH" in err and "clip_model" not in err, err
    # Random weights (or a tag) that this open_clip builds otherwise than the fit's: no file to put back.
    model.stage2_.clip.update(pretrained="random", seed=1)
    model.save(tmp_path / "rebuilt_otherwise")
    assert main(args + ["--model", str(tmp_path / "rebuilt_otherwise"), "--out", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "base encoder weights 'random'" in err and "come out otherwise here than at the fit" in err and \
        "Put the fit's weights back" not in err, err


def test_cli_predict_refuses_the_runs_fine_tuned_features_for_the_stage1_model(cli_run, tmp_path, capsys):
    # RUN_DIR/features.npy of a stage-2 run are the fine-tuned encoder's embeddings: the stage-1 model, fitted on the
    # base encoder's, scored them without a word.
    out = cli_run[0]
    for model, given in ((out, out / "features.npy"), (out, out), (out / "model", out / "features.npy")):
        assert main(["predict", "--model", str(model), "--features", str(given), "--out", str(tmp_path / "p.npy"),
                     "--device", "cpu"]) == 2
        assert "holds its fine-tuned encoder's embeddings" in capsys.readouterr().err


def test_cli_predict_images_skips_and_reports_an_unreadable_image(cli_run, data, tmp_path, capsys):
    out = cli_run[0]
    pred, proba = tmp_path / "pred.npy", tmp_path / "proba.npy"
    assert main(["predict", "--model", str(out), "--images", str(data["with_broken"]), "--out", str(pred),
                 "--proba", str(proba), "--device", "cpu"]) == 0
    printed = capsys.readouterr().err.strip().split("\n")
    [bar] = [line for line in printed if "embedding images (fine-tuned encoder)" in line]   # the progress bar's line
    assert "100%" in bar and f"{N_TRAIN + 1}/{N_TRAIN + 1}" in bar, bar    # the unreadable image counted too
    err = "\n".join(line for line in printed if line != bar)
    assert len(err.splitlines()) == 1 and "img_9999.png" in err and "unreadable" in err, err
    # Row i is still image i: the broken one (last in sorted order) gets cluster -1 and NaN probabilities.
    labels, probs = np.load(pred), np.load(proba)
    assert labels.shape == (N_TRAIN + 1,) and labels[-1] == -1 and np.isnan(probs[-1]).all()
    np.testing.assert_array_equal(labels[:-1], np.load(out / "labels.npy"))
    # As a .csv: each image's path, cluster and names, in the same order (the path was to be rebuilt by hand).
    assert main(["predict", "--model", str(out), "--images", str(data["with_broken"]), "--out",
                 str(tmp_path / "pred.csv"), "--device", "cpu", "--quiet"]) == 0
    import csv

    from laic.images import list_images

    clusters = json.loads((out / "clusters.json").read_text())["clusters"]
    names = {row["cluster"]: "; ".join(row["names"]) for row in clusters}
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["path", "cluster", "names"]] + [
        [str(path), str(c), names.get(c, "")] for path, c in zip(list_images(data["with_broken"]), labels.tolist())]
    # A run fitted on features has no fine-tuned encoder to assign images with.
    plain = tmp_path / "plain"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--features", str(out / "features.npy"), "--vocab", str(data["root"] / "vocab"), "--k",
                     str(K), "--out", str(plain), "--device", "cpu"]) == 0
    assert main(["predict", "--model", str(plain), "--images", str(data["root"] / "new"), "--out", str(pred),
                 "--overwrite"]) == 2
    assert "no fine-tuned encoder" in capsys.readouterr().err


def test_cli_fit_images_reuses_an_embed_cache(data, vocab, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        assert main(["embed", str(data["root"] / "train"), "--model", register_tiny_clip(), "--pretrained", "random",
                     "--seed", "0", "--out", str(cache), "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    import laic.embed

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the images were embedded again instead of read from the cache")

    monkeypatch.setattr(laic.embed, "encode_batch", must_not_encode)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(fit_args(data, vocab, tmp_path / "run", "--embed-cache", str(cache))) == 0
    assert (tmp_path / "run" / "images.txt").read_text().splitlines() == data["train"]


def test_cli_fit_images_semantic_centres_learn_prompts_through_the_models_text_tower(data, vocab, tmp_path,
                                                                                     monkeypatch, capsys):
    """`laic fit --images --semantic-centres` takes the prompt path (laic.prompt_centres) with the text tower of
    --model/--pretrained, not the continuous centres that `laic fit --features --semantic-centres` learns."""
    import laic.prompt_centres

    text_towers = []
    real_prompt_centres = laic.prompt_centres.prompt_centres

    def spy(text_tower, *args, **kwargs):
        tower, _ = text_tower
        text_towers.append({name: t.clone() for name, t in tower.state_dict().items() if not name.startswith("visual")})
        return real_prompt_centres(text_tower, *args, **kwargs)

    monkeypatch.setattr(laic.prompt_centres, "prompt_centres", spy)
    out = tmp_path / "run"
    assert main(fit_args(data, vocab, out, "--stage2", "epochs=1", "--semantic-centres")) == 0
    assert "options: semantic_centres=True" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["options"] == {"semantic_centres": True}
    model = LAIC.load(out / "model")
    assert model.semantic_centres and model.assignment_.space == "clip"
    # Prompts were learned once, through the text tower of the encoder the run names (seed 0's random weights).
    assert len(text_towers) == 1
    expected = {name: t for name, t in base_clip(seed=0)[0].state_dict().items() if not name.startswith("visual")}
    assert text_towers[0].keys() == expected.keys()
    assert all(torch.equal(text_towers[0][name], expected[name]) for name in expected)


def test_cli_report_draws_a_stage2_run(cli_run, tmp_path):
    out = cli_run[0]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out), "--out", str(tmp_path / "report"), "--per-cluster", "2"]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    shown = sorted({int(c) for c in np.load(out / "labels.npy")})
    for c in shown:
        assert f"cluster_{c:03d}.png" in page and (tmp_path / "report" / f"cluster_{c:03d}.png").is_file()


def test_cli_fit_images_profile_writes_the_profile_of_stages_0_to_2(cli_run, data, vocab, tmp_path):
    out = tmp_path / "run"
    printed, shown = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(shown):
        assert main(fit_args(data, vocab, out, "--profile")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(run_dir.RUN_FILES)
    profile = json.loads((out / "profile.json").read_text())
    # Progress on stderr as the run goes: each step's end, a stage-2 epoch as its own fuller line.
    lines = [m.group(1) for m in re.finditer(r"^laic fit: (.+?): (?:\d+\.\d s|loss .*)$", shown.getvalue(), re.M)]
    assert lines == [s["name"] for s in profile["steps"]], shown.getvalue()
    kinds = {s["kind"] for s in profile["steps"]}
    assert {"k-means", "counterparts", "graphs", "stage-1", "stage-2", "other"} == kinds
    epochs = [s for s in profile["steps"] if s["kind"] == "stage-2"]
    assert len(epochs) == STAGE2["epochs"] == json.loads((out / "run.json").read_text())["stage2"]["epochs"]
    assert sum(s["seconds"] for s in epochs) <= sum(s["seconds"] for s in profile["steps"]) <= profile["seconds"]
    assert "embed images (frozen encoder)" in [s["name"] for s in profile["steps"]]
    trace = json.loads((out / "trace.json").read_text())      # a Chrome trace, with the steps marked
    marked = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("laic:")}
    assert {"laic:stage 2 epoch 1/2", "laic:fused k-means"} <= marked
    table = printed.getvalue().split("profile (", 1)[1]
    assert str(out / "trace.json") in table
    assert all(s["name"] in table for s in profile["steps"]) and "whole fit (cpu)" in table
    # Profiling changes nothing in the run.
    np.testing.assert_array_equal(np.load(out / "labels.npy"), np.load(cli_run[0] / "labels.npy"))


def test_cli_interrupted_stage2_resumes_to_the_uninterrupted_result(cli_run, data, vocab, monkeypatch, capsys):
    full = cli_run[0]
    out = data["root"] / "runs" / "resumed"
    checkpoint = run_dir.checkpoint_dir(out)
    save = stage2.train.save_checkpoint

    def stop_after_first_epoch(path, *, epoch, **state):   # once its checkpoint is written
        save(path, epoch=epoch, **state)
        if epoch == 0:
            raise Interrupted

    monkeypatch.setattr(stage2.train, "save_checkpoint", stop_after_first_epoch)
    with pytest.raises(Interrupted):
        main(fit_args(data, vocab, out))
    monkeypatch.undo()
    assert not out.exists() and (checkpoint / stage2.CHECKPOINT_NAME).is_file()

    # Starting over by accident is refused, and so is resuming with another K, LAIC option or stage-2 setting,
    # before any image is embedded (after the embedding and stages 0 and 1 before); --resume continues.
    assert main(fit_args(data, vocab, out)) == 2
    assert "--resume" in capsys.readouterr().err
    other_k = fit_args(data, vocab, out, "--resume")
    other_k[other_k.index("--k") + 1] = str(K + 1)
    with monkeypatch.context() as patch:
        patch.setattr(laic.embed, "embed_images", lambda *args, **kwargs: pytest.fail("the images were embedded"))
        assert main(other_k) == 2
        assert f"has {K} clusters but the fit asks for {K + 1}" in capsys.readouterr().err
        other_vocab = fit_args(data, vocab, out, "--resume", "--relation-fused", "off")     # another LAIC option
        assert main(other_vocab) == 2
        assert "other LAIC options" in (err := capsys.readouterr().err) and str(checkpoint) in err
        assert main(fit_args(data, vocab, out, "--resume", "--stage2", "head_lr=0.01")) == 2
        assert "other settings (head_lr=" in capsys.readouterr().err
    assert main(fit_args(data, vocab, out, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not checkpoint.exists()

    a = torch.load(full / "model", weights_only=True)["stage2"]["encoder"]["trainable"]
    b = torch.load(out / "model", weights_only=True)["stage2"]["encoder"]["trainable"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in ("labels.npy", "features.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(full / name))


def test_cli_fit_images_into_a_run_dir_another_fit_is_writing_is_refused(data, vocab, tmp_path, capsys):
    # A second `laic fit --images --out D` while the first ran was told the first's live checkpoint was an
    # interrupted run, and with --resume both wrote it. The first holds the checkpoint folder (here: this process,
    # through another open of it) for its whole run; a run stopped before its first checkpoint leaves no folder.
    from laic import io as laic_io

    out = tmp_path / "run"
    checkpoint = run_dir.checkpoint_dir(out)
    first = laic_io.FolderLock(checkpoint, "busy")
    first.take()
    try:
        for extra in ((), ("--resume",)):
            assert main(fit_args(data, vocab, out, "--quiet", *extra)) == 2
            err = capsys.readouterr().err
            assert f"another process is fitting into --out {out} now (it holds {checkpoint})" in err, err
    finally:
        first.release()
    assert not checkpoint.exists() and not out.exists()   # the first's folder, empty: removed as it ends
    with pytest.raises(Interrupted), pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage2.train, "_fine_tune", lambda *args, **kwargs: (_ for _ in ()).throw(Interrupted()))
        main(fit_args(data, vocab, out, "--quiet"))
    assert not checkpoint.exists()   # stopped before its first checkpoint: nothing to resume, nothing left
    # A killed first checkpoint write leaves only its temporary: no interrupted run to resume, and the fit runs.
    checkpoint.mkdir()
    (checkpoint / f".{stage2.CHECKPOINT_NAME}.k1ll3d.tmp").write_bytes(b"\0" * 16)
    assert main(fit_args(data, vocab, out, "--quiet", "--stage2", "epochs=1")) == 0
    assert (out / "labels.npy").is_file() and not checkpoint.exists()


def test_cli_fit_images_interrupted_after_its_run_is_written_says_the_run_is_complete(cli_run, data, vocab,
                                                                                      monkeypatch, capsys):
    import laic.commands.common as fit_images_command   # (where `laic fit` writes and publishes its run)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_images_command, "print_fit", ctrl_c)
    out = data["root"] / "runs" / "interrupted_at_the_end"
    assert main(fit_args(data, vocab, out)) == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"laic fit: interrupted after {out} was written: the run there is complete"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cli_run[0].iterdir())
    assert not run_dir.checkpoint_dir(out).exists()


@pytest.mark.parametrize("case", ["features and images", "no model", "unknown stage2 option", "reserved seed",
                                  "other encoder", "missing images", "run inside images", "nan setting",
                                  "settings together", "blocks beyond the tower"])
def test_cli_stage2_bad_input_is_one_clear_error(case, data, vocab, tmp_path, capsys):
    out = tmp_path / "run"
    args = fit_args(data, vocab, out)
    if case == "features and images":
        args += ["--features", str(tmp_path / "f.npy")]
        named = "--features"
    elif case == "no model":
        i = args.index("--model")
        del args[i:i + 2]
        named = "--model"
    elif case == "unknown stage2 option":
        args += ["--stage2", "no_such=1"]
        named = "--stage2"
    elif case == "reserved seed":
        args += ["--stage2", "seed=3"]
        named = "--seed"
    elif case == "other encoder":
        args += ["--seed", "5"]  # random weights from another seed: not the encoder of the vocabulary
        named = "--vocab"
    elif case == "run inside images":   # its report's PNGs would be read as images by the next fit on the folder
        out = pathlib.Path(args[args.index("--images") + 1]) / "run"
        args[args.index("--out") + 1] = str(out)
        named = "lies inside --images"
    elif case == "nan setting":   # was "must be a number, got 'nan' (str)"
        args += ["--stage2", "encoder_lr=nan"]
        named = "--stage2 encoder_lr=nan: encoder_lr must be a positive finite number, got nan"
    elif case == "settings together":   # each valid alone (lora_alpha is unused without LoRA)
        args += ["--stage2", "lora_rank=4", "--stage2", "lora_alpha=-1"]
        named = "--stage2 (the settings together): lora_alpha must be a positive finite number, got -1"
    elif case == "blocks beyond the tower":   # refused after stages 0 and 1 before, without naming --stage2
        args += ["--stage2", "n_blocks=3"]
        named = "--stage2 with --model laic-tiny-test: n_blocks must be between 0 and 2"
    else:
        args[args.index("--images") + 1] = str(tmp_path / "nowhere")
        named = "nowhere"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


# `laic fit --images ...` in its own process; with a number, it kills itself with SIGKILL right after stage 2 saved the
# checkpoint of that epoch (nothing can be tidied up).
FIT_PROCESS = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from tiny_clip import register_tiny_clip
register_tiny_clip()
from laic.cli import main
from laic.stage2 import train
kill_after = int(sys.argv[1])
save = train.save_checkpoint
def save_then_die(path, *, epoch, **state):
    save(path, epoch=epoch, **state)
    if epoch == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_cli_stage2_killed_after_an_epoch_resumes_to_the_same_run(cli_run, data, vocab, tmp_path):
    import subprocess
    import sys

    code = FIT_PROCESS.format(tests=str(pathlib.Path(__file__).parent))
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", code, "0", *fit_args(data, vocab, out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and run_dir.checkpoint_dir(out).is_dir()
    resumed = subprocess.run([sys.executable, "-c", code, "-1", *fit_args(data, vocab, out, "--resume")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    whole = cli_run[0]
    for name in ("labels.npy", "features.npy", "clusters.json", "images.txt"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not run_dir.checkpoint_dir(out).exists()


def test_the_stage1_digest_takes_float64_nouns_beyond_float32():
    # Cast to float32, rows of 1e300 became infinite (and of 1e-50 zero): `laic fit --images` with such a
    # vocabulary folder, which `laic fit --vocab` reads as float64 and LAIC.fit takes, was refused naming
    # noun_features.
    from laic import LAIC
    from laic.stage2.estimator import stage1_inputs_digest

    model = LAIC(n_clusters=2)
    nouns = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]]) * np.array([[1e300], [1e-50], [1.0]])
    digest = stage1_inputs_digest(model, nouns, ["a", "b", "c"])
    assert digest == stage1_inputs_digest(model, nouns.copy(), ["a", "b", "c"])
    assert digest != stage1_inputs_digest(model, nouns * np.array([[1.0], [1.0], [2.0]]), ["a", "b", "c"])
    # Only rows float32 rounds to zero (no overflow to tell them by): two vocabularies of other directions at 1e-50
    # shared the digest of all-zero float32 rows.
    tiny = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]]) * 1e-50
    turned = np.array([[4.0, 3.0], [1.0, 2.0], [2.0, 0.0]]) * 1e-50
    assert stage1_inputs_digest(model, tiny, ["a", "b", "c"]) != stage1_inputs_digest(model, turned, ["a", "b", "c"])
    # Nouns float32 holds: the float32 digest, whatever their dtype (earlier checkpoints resume), bfloat16 too.
    ordinary = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]])
    as_float32 = stage1_inputs_digest(model, ordinary.astype(np.float32), ["a", "b", "c"])
    assert stage1_inputs_digest(model, ordinary, ["a", "b", "c"]) == as_float32
    assert stage1_inputs_digest(model, torch.tensor(ordinary, dtype=torch.bfloat16), ["a", "b", "c"]) == as_float32
