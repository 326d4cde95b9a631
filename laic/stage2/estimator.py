"""Stage 2 on the LAIC estimator: stages 0 and 1 on the frozen features of image files, then :func:`fine_tune`
(``LAIC.fit_images`` and ``laic fit --images``), and the :class:`Stage2Part` a fitted LAIC keeps (through
``LAIC.attach_stage2``) to predict on new images and to save it inside the model file."""
from __future__ import annotations

import hashlib
import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import io, profiling
from ..assignment import labels_of, without_empty_clusters
from ..clip import (clip_model, clip_record, load_clip, load_recorded_clip, module_classes, tokenizer_of,
                    weights_digest)
from ..distributed.rows import RowBlocks
from ..distributed.failure import from_main, stop_all_on_failure
from ..distributed.world import current as current_world
from ..images import PathLike, list_images
from ..inputs import as_tensor, n_distinct_nouns
from ..relations import check_enough_nouns
from ..runtime import cpu_threads
from .checkpoint import CHECKPOINT_NAME, check_resumable
from .config import Stage2Config, as_numpy, check_paths, checked_config
from .encoder import FineTunedEncoder, check_tower
from .train import NO_TEXT_NOTE, FineTuneResult, fine_tune


@dataclass
class Stage2Part:
    """What stage 2 adds to a fitted LAIC: the fine-tuned encoder (or, after loading, its saved state until it is
    rebuilt on first use onto the base encoder), the record that rebuilds that base encoder (laic.clip.clip_record),
    the training images in row order, and the per-epoch history."""

    clip: Dict
    image_paths: List[str]
    history: List[dict] = field(default_factory=list)
    encoder: Optional[FineTunedEncoder] = None
    saved_encoder: Optional[Dict] = None

    def state(self) -> Dict:
        encoder = self.encoder.state() if self.encoder is not None else self.saved_encoder
        # Recorded as their bytes (io.path_text): the model file may be loaded under another locale.
        return {"encoder": encoder, "clip": dict(self.clip), "history": list(self.history),
                "image_paths": [io.path_text(p) for p in self.image_paths]}

    @classmethod
    def from_state(cls, state: Dict) -> "Stage2Part":
        return cls(clip=dict(state["clip"]), image_paths=[io.text_path(p) for p in state["image_paths"]],
                   history=list(state.get("history", [])), saved_encoder=state["encoder"])

    def fine_tuned_encoder(self, clip=None, device=None) -> FineTunedEncoder:
        """The encoder; after loading, rebuilt onto ``clip`` (default: the recorded base encoder, loaded again). A
        ``clip`` given once the encoder is built must be its base encoder too, checked at each call (it was ignored,
        whatever it held; the digest takes about 0.7 s at ViT-B/32, laic.clip.weights_digest)."""
        if self.encoder is None:
            if clip is None:
                clip = load_recorded_clip(self.clip, device)
            self.encoder = FineTunedEncoder.from_state(self.saved_encoder, clip_model(clip), device=device)
            self.saved_encoder = None
        elif clip is not None:
            self.encoder.check_base(clip_model(clip))
        return self.encoder


def image_list(images) -> List[str]:
    """A folder (its images, as laic.images.list_images orders them) or a sequence of paths, as strings."""
    if isinstance(images, (str, os.PathLike)):
        if pathlib.Path(images).expanduser().is_file():   # "is not a folder" alone did not say a list is taken
            raise ValueError(f"images {str(images)!r} is a file, not a folder; pass the folder that holds your "
                             "images, or a list of image paths ([path] for one image)")
        return [str(p) for p in list_images(images)]
    return check_paths(images)


def fit_images(model, images, noun_features, noun_names=None, *, clip, model_name: str, image_features=None,
               config: Optional[Stage2Config] = None, checkpoint_dir: Optional[PathLike] = None,
               resume: bool = False, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
               embed_cache: Optional[PathLike] = None) -> FineTuneResult:
    """Stages 0 to 2 on images: embed ``images`` (a folder or a list of paths) with ``clip``, fit ``model`` (a LAIC)
    on the features, then fine-tune the encoder (:func:`fine_tune`) on its pseudo-labels, with the language term when
    the model's agreement weight says the vocabulary helps (the text counterparts and stage-1 probabilities are the
    ones the fit computed). ``model.labels_`` becomes the fine-tuned labels of the readable images (unreadable ones
    are skipped with an UnreadableImagesWarning); the result's ``paths`` are those images, in row order.
    ``image_features`` ``[N, D]`` (row i for image i) skips the embedding; ``embed_cache`` is a `laic embed` cache
    folder to reuse (or fill) for it. ``config`` defaults to :class:`Stage2Config` with the model's ``random_state``
    as seed.

    In a process group every rank calls it with the same arguments (``embed_cache`` is then required: the ranks embed
    their shares into it); stages 0 and 1 share the rows, stage 2 the batches, and every rank ends with the same
    model and all labels.

    With ``model.profile`` set, one recording spans the whole call (``laic.profiling.fit_recording``): ``LAIC.fit``
    records its steps into it rather than opening its own, and ``model.profile_`` holds stages 0 to 2, with one
    "stage-2" step per epoch run here (after ``resume``, those left). Its Chrome trace is recorded on the CPU only,
    where the memory figures need it: on CUDA it would hold every kernel of every training step, and the figures come
    from CUDA's counters. On the CPU that trace holds every op and allocation of every epoch (about 30 MB per epoch
    of 96 small images with the tests' tiny ViT), so profile stage 2 there on small runs; its memory figures are this
    process's (DataLoader workers are other processes).

    ``model.n_threads`` applies to the whole call, the embedding and stage 2 included (only LAIC.fit's stages 0 and 1
    ran at it)."""
    with cpu_threads(model.n_threads), profiling.fit_recording(model, trace=False):
        return _fit_images(model, images, noun_features, noun_names, clip=clip, model_name=model_name,
                           image_features=image_features, config=config, checkpoint_dir=checkpoint_dir, resume=resume,
                           on_epoch_end=on_epoch_end, embed_cache=embed_cache)


def _check_enough_read(model, n_read: int, n_skipped: int) -> None:
    """LAIC's options against the images that could be read, and if they fail, the unreadable ones named as the
    cause (their count met n_clusters / k_range; LAIC.fit's own error said only N, which the user had not chosen)."""
    from ..model import MIN_IMAGES

    try:
        if n_read < MIN_IMAGES:
            raise ValueError(f"laic needs at least {MIN_IMAGES} images")
        model._check_options(n_read)
    except ValueError as exc:
        raise ValueError(f"{n_skipped} of the {n_read + n_skipped} images could not be read (named in the warning "
                         f"above), leaving {n_read}: {exc}") from None


def _fit_images(model, images, noun_features, noun_names, *, clip, model_name, image_features, config, checkpoint_dir,
                resume, on_epoch_end, embed_cache) -> FineTuneResult:
    from ..embed import embed_images as embed_frozen

    if resume and checkpoint_dir is None:   # (refused by fine_tune, after the embedding and stages 0 and 1)
        raise ValueError("resume=True needs checkpoint_dir (the folder of the interrupted run)")
    encoder = clip_model(clip)
    if noun_names is not None and not isinstance(noun_names, (str, bytes)):
        noun_names = list(noun_names)    # read twice below (the fit, the inputs' digest): an iterator would not be
    cfg = checked_config(config, Stage2Config(seed=_checked_seed(model)))
    check_tower(encoder.visual, cfg.n_blocks, cfg.lora_rank)   # before stages 0 and 1, not after them
    # As LAIC.fit checks it (on distinct nouns: rows counted, three copies of one noun passed here, then the images
    # were embedded before LAIC.fit refused them), but before the images are embedded.
    stop_all_on_failure(current_world().group, lambda: check_enough_nouns(
        n_distinct_nouns(noun_features, noun_names), model.neighbour_filter,
        model.relation_view, model.relation_fused), "checking LAIC's options")
    inputs_digest, inputs_options = stage1_inputs_digest(model, noun_features, noun_names), stage1_options(model)
    if resume and checkpoint_dir is not None:
        check_checkpoint_early(pathlib.Path(checkpoint_dir).expanduser() / CHECKPOINT_NAME, cfg, encoder,
                               inputs_digest, inputs_options, model.n_clusters)
    if image_features is None:
        if not isinstance(clip, (tuple, list)) or len(clip) < 2:
            raise ValueError("clip must be (model, preprocess, ...) as from laic.clip.load_clip, to embed the images")
        with profiling.step("embed images (frozen encoder)", "other"):
            embedded = embed_frozen(images, model_name, clip=clip, batch_size=cfg.eval_batch_size,
                                    cache_dir=embed_cache, num_workers=cfg.num_workers,
                                    progress=profiling.progress_shown())
        paths, features = [str(p) for p in embedded.paths], embedded.features
        if embedded.skipped:
            stop_all_on_failure(current_world().group, lambda: _check_enough_read(model, len(paths),
                                                                                  len(embedded.skipped)),
                                "checking LAIC's options")
    else:
        paths = image_list(images)
        # As LAIC.fit reads them (any float dtype, rows of any scale kept as directions), then as numpy.
        features = as_tensor("image_features", image_features, ndim=2).cpu().numpy()
        if len(features) != len(paths):
            raise ValueError(f"image_features has {len(features)} rows but there are {len(paths)} images; pass one "
                             "feature row per image, in the same order (laic.embed.embed_images skips unreadable "
                             "images: pass its result's .paths as the images)")
    # In a process group LAIC.fit takes each rank's block of rows (laic.distributed.fit) and its trace holds those
    # rows; stage 2 trains on every image on every rank (each takes its share of each batch), so they are gathered.
    world = current_world()
    block = world.row_shard(len(features))
    trace = model.fit_trace(features[block], noun_features, noun_names, text_tower=text_tower(model, clip, model_name))
    rows = RowBlocks(block.stop - block.start, world.group)
    probabilities = rows.all_gather(torch.from_numpy(trace.probabilities)).numpy()
    # A vocabulary that does not agree with the images would pull the encoder towards noise.
    text = rows.all_gather(torch.from_numpy(trace.text_counterparts)).numpy() if model.agreement_ > 0 else None
    result = fine_tune(model, encoder, paths, image_features=features, text_counterparts=text, config=cfg,
                       checkpoint_dir=checkpoint_dir, resume=resume, device=model.torch_device(),
                       on_epoch_end=on_epoch_end, stage1_probs=probabilities,
                       inputs_digest=inputs_digest, inputs_options=inputs_options)
    if text is None:   # the reason in place of fine_tune's generic note (one note for one cause)
        result.notes = [note for note in result.notes if note != NO_TEXT_NOTE]
        result.notes.append(f"the vocabulary does not agree with the images (agreement {model.agreement_:.3f}): "
                            "trained without the language term")
    model.relabel(result.labels)
    return result


def _checked_seed(model) -> int:
    """The model's ``random_state``, its options first checked as ``LAIC.fit`` checks them (here before anything is
    loaded or embedded: random_state=None failed in int(), -1 was refused as stage 2's "seed")."""
    stop_all_on_failure(current_world().group, model._check_settings, "checking LAIC's options")
    return int(model.random_state)


def check_checkpoint_early(path: pathlib.Path, cfg: Stage2Config, encoder, inputs_digest: str,
                           inputs_options: Dict[str, str], n_clusters) -> None:
    """A resume that its checkpoint refuses, refused before the embedding and stages 0 and 1 (not after them);
    rank 0 reads the checkpoint (laic.stage2.checkpoint.check_resumable). No checkpoint: nothing to check."""
    base, layers = weights_digest(encoder), module_classes(encoder)
    from_main(current_world().group, lambda: check_resumable(path, cfg, base, inputs_digest, inputs_options,
                                                             n_clusters, layers) if path.is_file() else None,
              "reading the stage-2 checkpoint")


# LAIC options left out of the digest: those that do not change a fit's result (a resume may change them), and K,
# which a resume checks on its own (naming both numbers).
RUNTIME_OPTIONS = ("device", "n_threads", "profile", "n_clusters")


def fit_options(model) -> Dict:
    """The LAIC options a fit's result depends on (all but ``RUNTIME_OPTIONS``)."""
    return {k: v for k, v in model.laic_options().items() if k not in RUNTIME_OPTIONS}


def stage1_options(model) -> Dict[str, str]:
    """:func:`fit_options`, each as its ``repr`` (kept in the stage-2 checkpoint, so that a refused resume names the
    options that differ: a laic version with other defaults changes them too)."""
    return {k: repr(v) for k, v in sorted(fit_options(model).items())}


def _beyond_float32(x) -> Optional[np.ndarray]:
    """``x`` as a numpy array where it is float64 (or wider), finite, and has values float32 cannot hold (infinite
    or zero once cast); None otherwise (cast to float32, it is the same data)."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float64:
            return None
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize <= 4 or not np.isfinite(x).all():
        return None
    with np.errstate(over="ignore", under="ignore"):
        cast = x.astype(np.float32)
    return x if not np.isfinite(cast).all() or bool(np.any((cast == 0) & (x != 0))) else None


def stage1_inputs_digest(model, noun_features, noun_names) -> str:
    """What stage 1 was fitted from besides the images and K: the vocabulary (embeddings and names) and the LAIC
    options."""
    wide = _beyond_float32(noun_features)
    if wide is not None:
        # As given (its dtype named): float64 rows beyond float32's range, which the fit rescales exactly, became
        # infinite or zero cast to float32 and were refused here, naming the API argument (`laic fit --images`).
        h = hashlib.sha1(wide.dtype.str.encode() + np.ascontiguousarray(wide).tobytes())
    else:   # float32 bytes, as before: checkpoints written by earlier versions still resume
        h = hashlib.sha1(np.ascontiguousarray(as_numpy("noun_features", noun_features, ndim=2)).tobytes())
    h.update(repr(sorted(fit_options(model).items())).encode())
    h.update("\n".join(map(str, noun_names or [])).encode("utf-8", errors="surrogateescape"))
    return h.hexdigest()


def text_tower(model, clip, model_name: str):
    """``(open_clip model, tokenizer)`` when the model learns prompt centres (semantic_centres=True), else None."""
    if not getattr(model, "semantic_centres", False):
        return None
    if isinstance(clip, (tuple, list)) and len(clip) >= 3:
        return clip_model(clip), clip[2]
    return clip_model(clip), tokenizer_of(model_name)


def fit_laic_images(model, images, noun_features, noun_names=None, *, model_name: str, clip=None,
                    pretrained: Optional[str] = None, image_features=None, stage2_config: Optional[Stage2Config] = None,
                    checkpoint_dir: Optional[PathLike] = None, resume: bool = False,
                    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                    embed_cache: Optional[PathLike] = None) -> FineTuneResult:
    """``LAIC.fit_images``: :func:`fit_images`, then the result attached to ``model`` (``LAIC.attach_stage2``).
    Without ``clip`` the base encoder is loaded from ``model_name`` and ``pretrained`` (None: random weights from the
    model's ``random_state``). ``pretrained`` is recorded so that a saved model can rebuild its base encoder; with
    ``clip`` and no ``pretrained`` nothing says which weights it holds, and predicting on images needs ``clip``
    again."""
    seed = _checked_seed(model)
    loaded = clip is None
    if loaded:
        clip = load_clip(model_name, pretrained, model.torch_device(), seed=seed)
    result = fit_images(model, images, noun_features, noun_names, clip=clip, model_name=model_name,
                        image_features=image_features, config=stage2_config, checkpoint_dir=checkpoint_dir,
                        resume=resume, on_epoch_end=on_epoch_end, embed_cache=embed_cache)
    part = Stage2Part(clip=clip_record(clip, model_name, pretrained, seed, loaded), image_paths=list(result.paths),
                      history=list(result.history), encoder=result.encoder)
    model.attach_stage2(part, result.labels)
    return result


def predict_images_proba(model, images, clip=None) -> np.ndarray:
    """Cluster probabilities ``[N, K]`` of ``images`` (a folder or paths) with the model's fine-tuned encoder; NaN
    rows for images that cannot be read (reported with an UnreadableImagesWarning)."""
    model._check_fitted()   # NotFittedError, as predict's (it said "no stage 2")
    part = getattr(model, "stage2_", None)
    if part is None:
        raise ValueError("this LAIC model has no stage 2; fit it with fit_images(images, noun_features, "
                         "model_name=...) to predict on images")
    encoder = part.fine_tuned_encoder(clip, device=model.torch_device())
    probs = encoder.predict_proba(image_list(images), progress=profiling.progress_shown())
    return without_empty_clusters(probs, model.cluster_sizes_)


def predict_images(model, images, clip=None) -> np.ndarray:
    """Cluster ids (int64 ``[N]``) of ``images`` (a folder or paths); -1 for an image that cannot be read."""
    return labels_of(predict_images_proba(model, images, clip))
