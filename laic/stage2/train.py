"""Stage 2's training: per-cluster confident pseudo-labels, cross-entropy with label smoothing on a weak and a strong
view of each image, a contrastive term that keeps each image close to its frozen text counterpart, and
:func:`fine_tune`, the whole loop with its per-epoch checkpoint (see the package doc)."""
from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from laic_kernels import checks

from .. import profiling
from ..assignment import labels_of, without_empty_clusters
from ..clip import module_classes, weights_digest
from ..distributed.failure import CollectiveError, from_main, same_on_all_ranks, stop_all_on_failure
from ..distributed.rows import RowBlocks
from ..distributed.world import World
from ..distributed.world import current as current_world
from ..images import PathLike, files_digest, worker_deaths_named
from ..interrupts import stop_if_interrupted
from ..runtime import own_grad_and_precision, resolve_device
from ..stage1 import selection_centres
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, paths_digest, save_checkpoint, set_rng_state
from .config import RESUMABLE_CHANGES, Stage2Config, as_numpy, check_paths, checked_config, log
from .data import TwoViews, batch_loader, build_transforms, epoch_seed, next_batch, preprocess_cfg
from .encoder import (CosineHead, FineTunedEncoder, Stage2Model, autocast, embed_images, load_trainable_state,
                      needs_scaler, prepare_encoder, trainable_state)
from .parallel import EpochBatches, gather_with_local_grad, no_sync, sum_over_ranks, wrap

# What fine_tune notes when it has no text counterparts (a caller that knows why says that instead).
NO_TEXT_NOTE = "no text counterparts given: trained without the language-consistency term"


def kept_count(keep_fraction: float, n: int) -> int:
    """``ceil(keep_fraction * n)`` of the fraction as written: 0.07 of 100 is 7 (the float product, 7.000000000000001,
    rounded up to 8; so did 141 of the fractions 0.01 to 0.99 for some cluster size up to 1000)."""
    return math.ceil(round(keep_fraction * n, 9))


def select_confident(probs, keep_fraction: float = 0.5, min_per_cluster: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels: per cluster, the indices of its most confident members, and their cluster.

    A cluster of n members (images whose argmax it is) keeps ``ceil(keep_fraction * n)`` of them, those with the
    highest probability for it (ties: lower index). A cluster left with fewer than ``min_per_cluster`` then borrows,
    from the images not kept so far, those with the highest probability for it, so that small or emptied clusters keep
    being trained instead of dying out. Returns ``(indices, labels)``, sorted by index, each image at most once.
    """
    p = as_numpy("probs", probs, ndim=2)
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    checks.int_in_range("min_per_cluster", min_per_cluster, 1, 1 << 30)
    n, k = p.shape
    assigned = p.argmax(1)
    confidence = p[np.arange(n), assigned]
    label = np.full(n, -1, dtype=np.int64)
    # Every cluster's members in one sort, most confident first, then by index, not a pass over all N images per
    # cluster (an ad hoc timing, one thread, N = 200k, K = 1000: 0.28 s a selection before, 0.17 s; the same result).
    by_cluster = np.lexsort((np.arange(n), -confidence, assigned))
    sizes = np.bincount(assigned, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for c in range(k):
        label[by_cluster[starts[c]:starts[c] + kept_count(keep_fraction, int(sizes[c]))]] = c
    # Topping a cluster up takes images kept nowhere: the counts of the clusters after it do not change.
    kept = np.bincount(label[label >= 0], minlength=k)
    for c in range(k):
        short = min_per_cluster - int(kept[c])
        if short > 0:
            # Only images the cluster has some probability for: a cluster at 0 everywhere (one stage 1 left empty,
            # laic.assignment.without_empty_clusters) is not a cluster to keep alive.
            free = np.flatnonzero((label < 0) & (p[:, c] > 0))
            label[free[np.lexsort((free, -p[free, c]))[:short]]] = c
    indices = np.flatnonzero(label >= 0)
    return indices, label[indices]


def text_alignment_loss(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between each image's embedding and its own frozen text counterpart within the batch."""
    logits = F.normalize(features.float(), dim=1) @ F.normalize(text.float(), dim=1).t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _optimizer(model: Stage2Model, cfg: Stage2Config) -> torch.optim.Optimizer:
    encoder = [p for p in model.visual.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    return torch.optim.AdamW([{"params": encoder, "lr": cfg.encoder_lr, "weight_decay": cfg.weight_decay},
                              {"params": head, "lr": cfg.head_lr, "weight_decay": 0.0}])


def _scheduler(optimizer, epochs: int):
    # Cosine decay over epochs, stepped once per epoch: pseudo-label counts change between epochs, so a per-step
    # schedule would not know its length in advance.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))


def _train_steps(model, batches: EpochBatches, dataset: TwoViews, optimizer, scaler, text, cfg: Stage2Config,
                 device, world: World, blank_image: torch.Tensor) -> Dict[str, float]:
    """An epoch's optimiser steps over ``batches`` (this rank's share of each combined batch, see
    laic.stage2.parallel); :func:`_train_one_epoch` is the whole epoch around them."""
    model.train()
    # This rank's share of the running sums (loss, cross-entropy, text term, images), summed over the ranks once, at
    # the end. They stay on the device: reading them every step would wait for the GPU each time.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    n_steps = len(batches)
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, dataset.epoch))
    images = iter(batch_loader(dataset, batches, cfg.num_workers, device, generator))
    start = time.perf_counter()
    shares = accumulation_shares(batches, cfg.grad_accum_steps)
    optimizer.zero_grad(set_to_none=True)
    for step in range(n_steps):
        counts = batches.counts(step)
        stepping = (step + 1) % cfg.grad_accum_steps == 0 or step + 1 == n_steps
        with no_sync(model, accumulating=not stepping):
            # Reading the images and the forward pass are where a rank fails on its own (an unreadable image, out of
            # memory): the ranks agree on success before the next collective, so that a failure stops all of them.
            ce_share, features, n_local = stop_all_on_failure(
                world.group, lambda: _read_and_forward(model, images, sum(counts), cfg, device, blank_image),
                f"stage 2 (epoch {dataset.epoch}, step {step})")
            # The combined batch's mean cross-entropy is the sum of the ranks' shares; DDP averages the gradients
            # over the ranks, hence the factor world.size.
            loss = world.size * ce_share
            if text is not None and cfg.text_weight > 0 and sum(counts) > 1:
                rows = torch.from_numpy(dataset.indices)[batches.combined(step)].to(text.device)
                align = text_alignment_loss(gather_with_local_grad(features, counts, world), text[rows],
                                            cfg.text_temperature)
                loss = loss + world.size * cfg.text_weight * align
                if world.is_main():  # every rank computes the same combined-batch value: count it once
                    sums[0] += cfg.text_weight * align.detach()
                    sums[2] += align.detach()
            scaler.scale(loss * shares[step]).backward()
        if stepping:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        sums[0] += ce_share.detach()
        sums[1] += ce_share.detach()
        sums[3] += n_local
    images = None           # the loader's iterator goes, and shuts its worker processes down
    stop_if_interrupted()   # a Ctrl-C while it did was swallowed (laic.interrupts)
    total = sum_over_ranks(sums, world).tolist()  # waits for the device: time after it
    seconds = time.perf_counter() - start
    stats = {name: total[i] / max(1, n_steps) for i, name in enumerate(("loss", "ce", "text"))}
    seen = int(total[3])
    stats.update(images=seen, seconds=seconds, images_per_s=seen / seconds if seconds > 0 else float("nan"))
    return stats


def accumulation_shares(batches: EpochBatches, accumulate: int) -> List[float]:
    """Each step's share of the images of its accumulation group (the ``accumulate`` batches whose gradients one
    optimiser step sums; the epoch's last group may hold fewer). Weighing each batch's mean loss by it makes the
    group's gradient that of its images' mean, whatever the batches' sizes: dividing by ``accumulate`` counted the
    images of a short last batch up to twice, and scaled a last group of fewer batches down."""
    sizes = [len(batches.combined(step)) for step in range(len(batches))]
    shares = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start:start + accumulate]
        shares += [size / sum(group) for size in group]
    return shares


def _read_and_forward(model, images, combined: int, cfg: Stage2Config, device, blank_image: torch.Tensor):
    """:func:`_local_cross_entropy` of the next batch of ``images``; a loader worker's death there a WorkerDied
    naming its image, which stop_all_on_failure then says on every rank (its RuntimeError was a traceback there)."""
    with worker_deaths_named():
        return _local_cross_entropy(model, next_batch(images), combined, cfg, device, blank_image)


def _local_cross_entropy(model, batch, combined: int, cfg: Stage2Config, device, blank_image: torch.Tensor):
    """This rank's share of the combined batch's mean cross-entropy (its images' sum over ``combined``), the
    unit-norm features of its weak views, and its number of images. A rank without images (in a last batch smaller
    than the world) runs one blank image with weight zero, so that it still takes part in DDP's all-reduce."""
    if batch is None:
        with autocast(device, cfg.amp):
            logits, features = model(blank_image.to(device))
        return 0.0 * logits.float().sum(), features[:0], 0
    index, label, weak, strong = batch
    label = label.to(device, non_blocking=True)
    views = torch.cat([weak, strong]).to(device, non_blocking=True)
    with autocast(device, cfg.amp):
        logits, features = model(views)
    logits_weak, logits_strong = logits.float().chunk(2)
    ce_sum = 0.5 * (F.cross_entropy(logits_weak, label, label_smoothing=cfg.label_smoothing, reduction="sum")
                    + F.cross_entropy(logits_strong, label, label_smoothing=cfg.label_smoothing, reduction="sum"))
    return ce_sum / combined, features.chunk(2)[0], len(index)


@dataclass
class FineTuneResult:
    encoder: FineTunedEncoder
    labels: np.ndarray                 # int64 [N]: final assignment of the training images by the fine-tuned model
    probs: np.ndarray                  # float32 [N, K]
    features: np.ndarray               # float32 [N, D]: fine-tuned unit-norm embeddings of the training images
    # per epoch: epoch, loss, ce, text, n_pseudo, n_pseudo_clusters, images, seconds, images_per_s
    history: List[dict]
    notes: List[str]
    paths: List[str] = dataclasses.field(default_factory=list)  # [N] the training images, in row order


@own_grad_and_precision()   # it trains (also inside the caller's no_grad) and takes autocast from cfg.amp alone
def fine_tune(stage1, clip_model: nn.Module, image_paths: Sequence[PathLike], *,
              image_features=None, text_counterparts=None, config: Optional[Stage2Config] = None,
              checkpoint_dir: Optional[PathLike] = None, resume: bool = False, device=None,
              on_epoch_end: Optional[Callable[[int, dict], None]] = None, stage1_probs=None,
              inputs_digest: str = "", inputs_options: Optional[Dict[str, str]] = None) -> FineTuneResult:
    """Run stage 2 and return the fine-tuned encoder, the final labels of ``image_paths`` and the history.

    In a process group (``laic.distributed``) every rank calls it with the same arguments (all N rows of each array)
    and gets the same result: they train one model together (see ``laic.stage2.parallel``), rank 0 writes the
    checkpoint, and an error on one rank is raised on every rank.

    Args:
        stage1: fitted model with ``predict_proba(features) -> [N, K]`` on the frozen encoder's features.
        clip_model: the open_clip model the features came from (its ``visual`` tower is copied and fine-tuned).
        image_paths: the N training images, in the order of ``image_features`` / ``text_counterparts``.
        image_features: ``[N, D]`` frozen features of the images (computed with the tower when None).
        text_counterparts: ``[N, D]`` frozen text counterparts, or None to train without the language term.
        config: :class:`Stage2Config` (defaults when None).
        checkpoint_dir: where the per-epoch checkpoint goes (none written when None).
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.
        device: where to train (None: CUDA when available, else the CPU).
        on_epoch_end: called as ``on_epoch_end(epoch, stats)`` after each epoch's checkpoint is written (on every
            rank: ``laic.distributed.is_main()`` says which one may print).
        stage1_probs: ``[N, K]`` what ``stage1.predict_proba(image_features)`` returns, when the caller has it
            already (then stage 1 is not asked again).
        inputs_digest: an identity of what stage 1 was fitted from (``LAIC.fit_images``: the vocabulary and the
            LAIC options), kept in the checkpoint: a resume with other inputs is refused.
        inputs_options: the LAIC options behind ``inputs_digest`` (name: repr), kept beside it so that a refused
            resume names the options that differ.

    The run draws from a torch stream of its own, seeded by ``config.seed`` (kept in the checkpoint, and restored
    into that stream by a resume): the caller's global streams are left as they were.
    """
    cfg = checked_config(config, Stage2Config())
    device = resolve_device(device)
    gpu = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu):
        torch.default_generator.manual_seed(cfg.seed)
        if gpu:
            torch.cuda.default_generators[gpu[0]].manual_seed(cfg.seed)
        return _fine_tune(stage1, clip_model, image_paths, image_features, text_counterparts, cfg, checkpoint_dir,
                          resume, device, on_epoch_end, stage1_probs, inputs_digest, inputs_options)


def _fine_tune(stage1, clip_model, image_paths, image_features, text_counterparts, cfg, checkpoint_dir, resume,
               device, on_epoch_end, stage1_probs, inputs_digest, inputs_options) -> FineTuneResult:
    """fine_tune, inside its own random stream: the run's set-up, its epochs, and the final model's result."""
    paths = check_paths(image_paths)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder of the interrupted run)")
    world = current_world()
    if cfg.n_blocks == 0 and cfg.lora_rank is None and world.is_main():   # said once a run (validate runs often)
        log.info("stage 2 with n_blocks=0 and no LoRA trains only the tower's last norm (ln_post), its projection "
                 "and the head")
    notes: List[str] = []

    base_fingerprint, base_modules = weights_digest(clip_model), module_classes(clip_model)
    same_on_all_ranks(world.group, {"the base encoder's weights": base_fingerprint, "image_paths": paths_digest(paths),
                                    "the stage-2 settings": _result_settings(cfg)})
    visual = copy.deepcopy(clip_model.visual).float()
    preprocessing = preprocess_cfg(clip_model)
    eval_tf, weak_tf, strong_tf = build_transforms(preprocessing)
    # LoRA's starts follow the seed (they came from torch's global stream, which stage 1 no longer seeds).
    prepare_encoder(visual, cfg.n_blocks, cfg.lora_rank, cfg.lora_alpha, torch.Generator().manual_seed(cfg.seed))
    text = _checked_text_counterparts(text_counterparts, len(paths), visual.output_dim, device, notes)

    # (~ expanded: io.torch_save writes there, and a resume looked for ~/... literally, found none, started over)
    ckpt_path = pathlib.Path(checkpoint_dir).expanduser() / CHECKPOINT_NAME if checkpoint_dir is not None else None
    # The images as rank 0 (which reads and writes the checkpoint) sees them: one stat per file, once per run.
    files = files_digest(paths) if ckpt_path is not None and world.is_main() else ""
    checkpoint = _CheckpointFile(ckpt_path, cfg, base_fingerprint, base_modules, paths, files, inputs_digest,
                                 inputs_options)
    ckpt, head, probs0 = _resume_or_start(checkpoint, resume, stage1, visual, image_features, stage1_probs, eval_tf,
                                          device, world, notes)
    stage1_sizes = _stage1_sizes(stage1, head.weight.shape[0])

    model = Stage2Model(visual, head).to(device)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler(device, cfg.amp))
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        history, start_epoch = _restore_state(ckpt, ckpt_path, model, optimizer, scheduler, scaler, cfg, device, notes)
    trained = wrap(model, world, device)  # DDP in a process group (after loading: it starts every rank from rank 0's)
    blank_image = torch.zeros((1, 3) + tuple(preprocessing["size"]))
    run = _Run(cfg=cfg, device=device, world=world, paths=paths, eval_tf=eval_tf, weak_tf=weak_tf, strong_tf=strong_tf,
               text=text, stage1_sizes=stage1_sizes, model=model, trained=trained, optimizer=optimizer,
               scheduler=scheduler, scaler=scaler, blank_image=blank_image)

    probs = probs0    # None when resumed: a resumed run relabels with the checkpoint's model first
    features = None
    for epoch in range(start_epoch, cfg.epochs):
        # One profiling step per epoch (laic.profiling; a no-op unless fit_images records): the training, the
        # relabelling and the checkpoint, not the caller's on_epoch_end. Its progress is the fuller line logged below.
        with profiling.step(f"stage 2 epoch {epoch + 1}/{cfg.epochs}", "stage-2", announce=False):
            if probs is None:
                _, probs = run.relabelled(_unusable_checkpoint(ckpt_path))
            stats, features, probs, pseudo_labels = _train_one_epoch(run, epoch, probs)
            history.append(stats)
            _save_epoch(run, checkpoint, epoch, stats, history, pseudo_labels)
        if on_epoch_end is not None:
            # A copy: stats is kept in the history of every later checkpoint, which a value the callback added
            # (a numpy scalar) made unreadable ("damaged").
            stop_all_on_failure(world.group, lambda: on_epoch_end(epoch, dict(stats)), "on_epoch_end")

    encoder = FineTunedEncoder(model, cfg, preprocessing, base_fingerprint, device, base_modules)
    if features is None:   # resumed after the last epoch (or no epoch to run): the features of the final model
        with profiling.step("embed images (fine-tuned encoder)", "other"):
            features, probs = run.relabelled(_unusable_checkpoint(ckpt_path) if ckpt is not None else None)
    return FineTuneResult(encoder=encoder, labels=labels_of(probs), probs=probs,
                          features=features.numpy(), history=history, notes=notes, paths=paths)


def _checked_text_counterparts(text_counterparts, n: int, dim: int, device, notes: List[str]) -> Optional[torch.Tensor]:
    """The text counterparts on ``device``, checked to be one ``dim``-wide row per image; None (and a note) without."""
    if text_counterparts is None:
        notes.append(NO_TEXT_NOTE)
        return None
    t = as_numpy("text_counterparts", text_counterparts, ndim=2)
    if t.shape != (n, dim):
        raise ValueError(f"text_counterparts must have shape [N, D] = ({n}, {dim}) (one row per image, "
                         f"the encoder's embedding size), got {t.shape}")
    return torch.from_numpy(t).to(device)


@dataclass(frozen=True)
class _CheckpointFile:
    """Where the run keeps its per-epoch checkpoint (``path`` None: nowhere), and what identifies the run in it: a
    resume refuses a checkpoint written for other settings, base encoder, images or stage-1 inputs."""
    path: Optional[pathlib.Path]
    cfg: Stage2Config
    base_fingerprint: str
    base_modules: List[str]
    paths: List[str]
    files: str                # rank 0's laic.images.files_digest of the images ("" elsewhere, or without a path)
    inputs_digest: str
    inputs_options: Optional[Dict[str, str]]

    def read(self, world: World) -> Optional[dict]:
        """The checkpoint on every rank, None where there is none."""
        # Rank 0 reads the checkpoint and hands it to the others: it holds nothing that depends on the world size,
        # and the other ranks need not see the folder (another machine's disk).
        return from_main(world.group, lambda: load_checkpoint(self.path, self.cfg, self.base_fingerprint, self.paths,
                                                              self.files, self.inputs_digest, self.inputs_options,
                                                              self.base_modules)
                         if self.path.is_file() else None, "reading the stage-2 checkpoint")

    def write(self, run: _Run, epoch: int, history: List[dict], pseudo_labels: Tuple[np.ndarray, np.ndarray]):
        """The run's state after ``epoch``, written by rank 0; collective (every rank calls it)."""
        indices, labels = pseudo_labels
        # Rank 0 writes (atomically: a failed write leaves the previous epoch's checkpoint); the agreement is
        # the barrier after it, and a failed write stops every rank.
        stop_all_on_failure(run.world.group, lambda: save_checkpoint(
            self.path, epoch=epoch, config=self.cfg, base_fingerprint=self.base_fingerprint, paths=self.paths,
            n_clusters=run.model.head.weight.shape[0], trainable=trainable_state(run.model), optimizer=run.optimizer,
            scheduler=run.scheduler, scaler=run.scaler, history=history, files=self.files, device=run.device,
            inputs_digest=self.inputs_digest, inputs_options=self.inputs_options, base_modules=self.base_modules,
            pseudo_labels={"indices": torch.from_numpy(indices), "labels": torch.from_numpy(labels)})
            if run.world.is_main() else None, "writing the stage-2 checkpoint")


def _resume_or_start(checkpoint: _CheckpointFile, resume: bool, stage1, visual, image_features, stage1_probs, eval_tf,
                     device, world: World, notes: List[str]) -> Tuple[Optional[dict], CosineHead, Optional[np.ndarray]]:
    """The checkpoint resumed from (None: a run from the beginning), the head to train (a placeholder that the
    checkpoint's weights replace, or one at stage 1's confident centres), and the probabilities of the first epoch's
    pseudo-labels (stage 1's; None when resumed: the checkpoint's model relabels the images first)."""
    cfg, paths, ckpt_path = checkpoint.cfg, checkpoint.paths, checkpoint.path
    ckpt = None
    if resume:
        ckpt = checkpoint.read(world)
    if ckpt is not None:
        n_clusters = ckpt["n_clusters"]
        # The K a LAIC model was fitted with (n_clusters_: its n_clusters may be "auto").
        fitted = getattr(stage1, "n_clusters_", getattr(stage1, "n_clusters", n_clusters))
        if fitted != n_clusters:
            raise ValueError(f"checkpoint {ckpt_path} has {n_clusters} clusters but stage1 has {fitted}; "
                             f"resume with the same number of clusters, or start over: delete {ckpt_path.parent} "
                             "(in Python, resume=False starts over and replaces it)")
        return ckpt, CosineHead(torch.zeros(n_clusters, visual.output_dim), cfg.head_temperature), None
    if resume:
        notes.append(f"resume=True but no checkpoint at {ckpt_path}: started from the beginning")
    probs0, head = _initial_pseudo_labels_and_head(stage1, visual, paths, image_features, stage1_probs, eval_tf,
                                                   cfg, device, world)
    return None, head, probs0


def _restore_state(ckpt: dict, ckpt_path, model: Stage2Model, optimizer, scheduler, scaler, cfg: Stage2Config,
                   device, notes: List[str]) -> Tuple[List[dict], int]:
    """Puts the checkpoint's training state back (weights, optimiser, schedule, scaler, random streams); returns its
    history and the first epoch left to run."""
    load_trainable_state(model, ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)   # rank 0's, on every rank
    notes.append(f"resumed from {ckpt_path} after epoch {ckpt['epoch'] + 1}/{cfg.epochs}")  # 1-based, as logged
    return list(ckpt["history"]), ckpt["epoch"] + 1


@dataclass(frozen=True)
class _Run:
    """What every epoch of one fine_tune uses: its settings and images, and the model with its training state."""
    cfg: Stage2Config
    device: torch.device
    world: World
    paths: List[str]
    eval_tf: Callable
    weak_tf: Callable
    strong_tf: Callable
    text: Optional[torch.Tensor]   # the frozen text counterparts (None: no language term)
    stage1_sizes: np.ndarray
    model: Stage2Model
    trained: nn.Module             # model, wrapped in DDP in a process group (laic.stage2.parallel.wrap)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    blank_image: torch.Tensor      # what a rank without images in a batch runs (_local_cross_entropy)

    def relabelled(self, unusable: Optional[Exception]) -> Tuple[torch.Tensor, np.ndarray]:
        """:func:`_relabelled` by the run's model."""
        return _relabelled(self.model, self.paths, self.eval_tf, self.cfg, self.device, self.world, self.stage1_sizes,
                           unusable)


def _train_one_epoch(run: _Run, epoch: int, probs: np.ndarray):
    """Epoch ``epoch``: pseudo-labels from ``probs``, :func:`_train_steps` on them, and the trained model's relabelling
    of every image. Returns the epoch's stats, the model's features (None before the last epoch) and probabilities,
    and the pseudo-labels ``(indices, labels)``."""
    cfg, world = run.cfg, run.world
    indices, labels = select_confident(probs, cfg.keep_fraction, cfg.min_per_cluster)
    dataset = TwoViews(run.paths, indices, labels, run.weak_tf, run.strong_tf, cfg.seed, epoch)
    batches = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, epoch, world.rank, world.size)
    with worker_deaths_named():
        stats = _train_steps(run.trained, batches, dataset, run.optimizer, run.scaler, run.text, cfg, run.device,
                             world, run.blank_image)
    if not math.isfinite(stats["loss"]):   # summed over the ranks: every rank raises alike
        raise _diverged(epoch, cfg, f"loss {stats['loss']}")
    # The trained model relabels every image (for the next epoch, or the result) before the epoch is kept:
    # weights that its last step left unusable (after a finite loss: with one step an epoch, every time)
    # stop the run here, not in the next epoch's labels after a checkpoint of them.
    features, probs = run.relabelled(_diverged(epoch, cfg, "its predictions are no longer finite numbers"))
    if epoch + 1 < cfg.epochs:
        features = None   # only the final model's are the result: not held through the next epoch
    run.scheduler.step()
    stats.update(epoch=epoch, n_pseudo=int(len(indices)),
                 n_pseudo_clusters=int(len(np.unique(labels))))
    return stats, features, probs, (indices, labels)


def _save_epoch(run: _Run, checkpoint: _CheckpointFile, epoch: int, stats: dict, history: List[dict],
                pseudo_labels: Tuple[np.ndarray, np.ndarray]) -> None:
    """Keeps the epoch (already in ``history``): its checkpoint where the run has one, then its log line."""
    if checkpoint.path is not None:
        checkpoint.write(run, epoch, history, pseudo_labels)
    if run.world.is_main():   # once the epoch is kept
        log.info("stage 2 epoch %d/%d: loss %.4f (cross-entropy %.4f, text %.4f), %d pseudo-labels, "
                 "%.1f images/s",
                 epoch + 1, run.cfg.epochs, stats["loss"], stats["ce"], stats["text"], stats["n_pseudo"],
                 stats["images_per_s"])


def _relabelled(model: Stage2Model, paths, eval_tf, cfg: Stage2Config, device, world: World, stage1_sizes,
                unusable: Optional[Exception]) -> Tuple[torch.Tensor, np.ndarray]:
    """The training images' features and cluster probabilities by the current model (never into a cluster stage 1
    left empty); ``unusable``: raised where a probability is not a finite number (None: not checked)."""
    features, scores = _embed_training_images(model, paths, eval_tf, cfg, device, world)
    if unusable is not None and not bool(torch.isfinite(scores).all()):   # gathered: every rank raises alike
        raise unusable
    return features, without_empty_clusters(scores.numpy(), stage1_sizes)


def _diverged(epoch: int, cfg: Stage2Config, sign: str) -> CollectiveError:
    return CollectiveError(
        f"stage 2 diverged in epoch {epoch + 1}/{cfg.epochs} ({sign}): lower encoder_lr and head_lr (now "
        f"{cfg.encoder_lr:g} and {cfg.head_lr:g}); the checkpoint keeps the last epoch that did not diverge")


def _unusable_checkpoint(ckpt_path) -> CollectiveError:
    # A checkpoint of a run that diverged (written before each epoch's model was checked, 12-05).
    return CollectiveError(f"the stage-2 checkpoint {ckpt_path} holds a model whose predictions are not finite "
                           "numbers (a run that diverged): delete it, or start over without resuming, with lower "
                           "encoder_lr and head_lr")


def _result_settings(cfg: Stage2Config) -> dict:
    """The settings that the result depends on (those a checkpoint must match too)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def _embed_training_images(model: Stage2Model, paths, eval_tf, cfg: Stage2Config, device, world: World,
                           desc: str = "embedding images (fine-tuned encoder)") -> Tuple[torch.Tensor, torch.Tensor]:
    """Features and probabilities of the training images, which must all stay readable during the run. In a process
    group every rank embeds its contiguous block of the images and the blocks are gathered: every rank gets all rows."""
    block = paths[world.row_shard(len(paths))]

    def embed_block():
        if not block:  # more ranks than images
            n_clusters, dim = model.head.weight.shape
            return torch.empty(0, dim), torch.empty(0, n_clusters)
        features, probs, skipped = embed_images(model, block, eval_tf, batch_size=cfg.eval_batch_size,
                                                num_workers=cfg.num_workers, device=device, amp=cfg.amp,
                                                progress=profiling.progress_shown() and world.is_main(), desc=desc)
        if skipped:
            # (A checkpoint resumes only on the images as the fit began: their sizes and modification times too.)
            raise ValueError(f"training image {block[skipped[0]]} cannot be read any more ({len(skipped)} unreadable);"
                             " put the file back as it was (its modification time too: cp -p) and resume, or fit "
                             "again without it")
        return features, probs

    features, probs = stop_all_on_failure(world.group, embed_block, "embedding the training images")
    rows = RowBlocks(len(features), world.group)
    return rows.all_gather(features), rows.all_gather(probs)


def _stage1_sizes(stage1, k: int) -> np.ndarray:
    """How many images stage 1 gave each cluster (LAIC's cluster_sizes_): a cluster it left empty stays empty in
    stage 2 (it has no names, and predict assigns nothing to it). A stage-1 model without sizes: all clusters."""
    sizes = getattr(stage1, "cluster_sizes_", None)
    return np.asarray(sizes if sizes is not None and len(sizes) == k else np.ones(k, dtype=np.int64))


def _initial_pseudo_labels_and_head(stage1, visual, paths, image_features, stage1_probs, eval_tf, cfg, device,
                                    world: World):
    """Stage 1's probabilities on the frozen features, and a head whose class vectors are the confident centres."""
    if image_features is None:  # the frozen tower's features (the head is a placeholder, its output unused)
        probe = Stage2Model(visual, CosineHead(torch.ones(1, visual.output_dim), 1.0)).to(device)
        image_features = _embed_training_images(probe, paths, eval_tf, cfg, device, world,
                                                "embedding images (frozen encoder)")[0]
    feats = torch.from_numpy(as_numpy("image_features", image_features, ndim=2))
    if feats.shape[0] != len(paths):
        raise ValueError(f"image_features has {feats.shape[0]} rows but there are {len(paths)} image paths; pass one "
                         "feature row per image, in the same order")
    if stage1_probs is None:
        # The caller's own features: a frame keeps its column names, which a model fitted on one checks.
        stage1_probs = stage1.predict_proba(image_features)
    probs = as_numpy("stage1.predict_proba(image_features)", stage1_probs, ndim=2)
    if probs.shape[0] != len(paths) or probs.shape[1] < 2:
        raise ValueError(f"stage1.predict_proba returned shape {probs.shape}; expected [N={len(paths)}, K>=2]")
    probs = without_empty_clusters(probs, _stage1_sizes(stage1, probs.shape[1]))
    if feats.shape[1] != visual.output_dim:
        raise ValueError(f"image_features has dimension {feats.shape[1]} but the encoder outputs "
                         f"{visual.output_dim}; pass the features of this open_clip model")
    indices, labels = select_confident(probs, cfg.keep_fraction, cfg.min_per_cluster)
    centres = selection_centres(feats, torch.from_numpy(probs), torch.from_numpy(indices), torch.from_numpy(labels))
    head = CosineHead(centres, cfg.head_temperature)
    return probs, head

