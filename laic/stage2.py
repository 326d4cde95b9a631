"""Stage 2, self-enhancement: fine-tune the open_clip vision tower on the stage-1 model's confident pseudo-labels.

What it needs, and nothing more (so it stays independent of how stage 1 is built):
  - ``stage1``: any object with ``predict_proba(features) -> [N, K]`` (a fitted ``LAIC``), used once, for the first
    pseudo-labels and to initialise the image head;
  - an open_clip model (only its vision tower is used; it is copied, the caller's model is left untouched);
  - the image paths (readable images; stream from disk, decoded by DataLoader workers);
  - optionally the frozen text counterparts ``[N, D]`` of the images (stage 1's semantic mixture of nouns): a
    contrastive term keeps each fine-tuned image embedding closest to its own text counterpart, which ties the
    encoder to language. Without them that term is off (``FineTuneResult.notes`` says so).

Training: the last ``n_blocks`` residual blocks of the vision tower, what follows them (``ln_post``, ``proj``) and a
cosine image head whose class vectors start at the centres of the confident stage-1 clusters; optionally LoRA
adapters of rank ``lora_rank`` on the attention projections of every block. The loss is cross-entropy with label
smoothing on a weak view (random resized crop, flip) and a strong view (plus colour jitter, grayscale, blur) of each
image, plus ``text_weight`` times the text term. Every epoch the current model relabels all images and, per cluster,
the most confident ``keep_fraction`` (at least ``min_per_cluster``) become that epoch's pseudo-labels, so small
clusters keep their share. AMP (bf16, or fp16 with a gradient scaler) and gradient accumulation on CUDA.

Reproducibility and resuming: the shuffling of each epoch comes from a generator seeded by (seed, epoch), and each
image's augmentation from a seed of (seed, epoch, image index), so results do not depend on the number of workers or
on where a run was interrupted. After every epoch a checkpoint (trainable parameters, optimiser, scheduler, gradient
scaler, RNG states, pseudo-labels, history, epoch) replaces the previous one atomically; ``resume=True`` continues
from it and ends in the same state as an uninterrupted run (bitwise on the CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import pathlib
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from laic_kernels import checks

from . import io
from .images import DECODE_ERRORS, open_rgb

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CHECKPOINT_NAME = "stage2_checkpoint.pt"
CHECKPOINT_FORMAT = "laic-stage2-checkpoint"
MODEL_FORMAT = "laic-stage2-model"
FORMAT_VERSION = 1

# Settings that may change between an interrupted run and its resumption: they do not affect the result.
RESUMABLE_CHANGES = ("num_workers", "eval_batch_size")


@dataclass
class Stage2Config:
    """Settings of a stage-2 run (defaults for a pretrained ViT-B/32 on a GPU)."""

    epochs: int = 10
    batch_size: int = 64
    grad_accum_steps: int = 1          # optimiser step every this many batches (effective batch = product)
    n_blocks: int = 2                  # last residual blocks of the vision tower trained in full (0: none)
    lora_rank: Optional[int] = None    # LoRA adapters of this rank on every block's attention projections
    lora_alpha: float = 16.0
    encoder_lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    keep_fraction: float = 0.5         # per cluster, the most confident fraction becomes pseudo-labels
    min_per_cluster: int = 5           # ... and at least this many (topped up from the most probable free images)
    head_temperature: float = 0.05     # cosine head: logits = cos(feature, class vector) / temperature
    text_weight: float = 0.5           # weight of the image-to-text-counterpart contrastive term
    text_temperature: float = 0.05
    amp: bool = True                   # autocast on CUDA (bf16 where supported, else fp16 with a scaler)
    num_workers: int = min(4, os.cpu_count() or 1)
    eval_batch_size: int = 256
    seed: int = 0

    def validate(self) -> "Stage2Config":
        for name in ("epochs", "batch_size", "grad_accum_steps", "min_per_cluster", "eval_batch_size"):
            checks.int_in_range(name, getattr(self, name), 1, 1 << 30)
        checks.int_in_range("n_blocks", self.n_blocks, 0, 1 << 30)
        checks.int_in_range("num_workers", self.num_workers, 0, 1024)
        checks.int_in_range("seed", self.seed, 0, 2**63 - 1)
        if self.lora_rank is not None:
            checks.int_in_range("lora_rank", self.lora_rank, 1, 4096, " (or None for no LoRA)")
            checks.positive("lora_alpha", self.lora_alpha)
        if self.n_blocks == 0 and self.lora_rank is None:
            log.info("stage 2 with n_blocks=0 and no LoRA trains only the projection and the head")
        for name in ("encoder_lr", "head_lr", "head_temperature", "text_temperature"):
            checks.positive(name, getattr(self, name))
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("weight_decay", "text_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Pseudo-labels and the head's starting point


def select_confident(probs, keep_fraction: float = 0.5, min_per_cluster: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels: per cluster, the indices of its most confident members, and their cluster.

    A cluster of n members (images whose argmax it is) keeps ``ceil(keep_fraction * n)`` of them, those with the
    highest probability for it (ties: lower index). A cluster left with fewer than ``min_per_cluster`` then borrows,
    from the images not kept so far, those with the highest probability for it, so that small or emptied clusters keep
    being trained instead of dying out. Returns ``(indices, labels)``, sorted by index, each image at most once.
    """
    p = _as_numpy("probs", probs, ndim=2)
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    checks.int_in_range("min_per_cluster", min_per_cluster, 1, 1 << 30)
    n, k = p.shape
    assigned = p.argmax(1)
    confidence = p[np.arange(n), assigned]
    label = np.full(n, -1, dtype=np.int64)
    for c in range(k):
        members = np.flatnonzero(assigned == c)
        order = np.lexsort((members, -confidence[members]))  # most confident first, then by index
        label[members[order[:math.ceil(keep_fraction * len(members))]]] = c
    for c in range(k):
        short = min_per_cluster - int((label == c).sum())
        if short > 0:
            free = np.flatnonzero(label < 0)
            label[free[np.lexsort((free, -p[free, c]))[:short]]] = c
    indices = np.flatnonzero(label >= 0)
    return indices, label[indices]


def cluster_centres(features: torch.Tensor, probs: np.ndarray, indices: np.ndarray, labels: np.ndarray
                    ) -> torch.Tensor:
    """Unit-norm centre of each cluster's confident members ``[K, D]``; a cluster with none (no image has it as its
    argmax) gets the probability-weighted mean of all images, so every class vector starts somewhere sensible."""
    k = probs.shape[1]
    feats = F.normalize(features.float(), dim=1)
    weights = torch.zeros(len(feats), k, dtype=torch.float32)
    weights[torch.from_numpy(indices), torch.from_numpy(labels)] = 1.0
    empty = weights.sum(0) == 0
    if bool(empty.any()):
        weights[:, empty] = torch.from_numpy(probs[:, empty.numpy()]).float()
    return F.normalize(weights.t() @ feats, dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# The model: vision tower with a chosen trainable part, and a cosine head


class LowRankDelta(nn.Module):
    """LoRA as a parametrisation: ``weight + (up @ down) * alpha / rank``; ``up`` starts at zero so training starts
    from the pretrained weights exactly."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype) * self.scale


def _resblocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(visual, "ln_post"):
        raise ValueError(f"stage 2 needs an open_clip VisionTransformer tower (transformer.resblocks, ln_post, proj), "
                         f"got {type(visual).__name__}; use a ViT model such as ViT-B-32")
    return blocks


def prepare_encoder(visual: nn.Module, n_blocks: int, lora_rank: Optional[int] = None, lora_alpha: float = 16.0
                    ) -> nn.Module:
    """Freeze ``visual`` except its last ``n_blocks`` blocks and what follows them (final norm, pooling,
    projection); with ``lora_rank``, add trainable LoRA adapters to every block's attention projections. In place."""
    blocks = _resblocks(visual)
    checks.int_in_range("n_blocks", n_blocks, 0, len(blocks), f" (the tower has {len(blocks)} blocks)")
    visual.requires_grad_(False)
    for block in blocks[len(blocks) - n_blocks:]:
        block.requires_grad_(True)
    for name in ("ln_post", "attn_pool", "attn_pool_contrastive"):
        part = getattr(visual, name, None)
        if isinstance(part, nn.Module):
            part.requires_grad_(True)
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        visual.proj.requires_grad_(True)
    if lora_rank is not None:
        for block in blocks:
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise ValueError(f"lora_rank needs nn.MultiheadAttention blocks, got {type(attn).__name__}; "
                                 "use n_blocks instead")
            for owner, name in ((attn, "in_proj_weight"), (attn.out_proj, "weight")):
                out_f, in_f = getattr(owner, name).shape
                parametrize.register_parametrization(owner, name, LowRankDelta(out_f, in_f, lora_rank, lora_alpha))
    return visual


class CosineHead(nn.Module):
    """``logits = cos(feature, class vector) / temperature``: class vectors live in the embedding space, so they can
    start at the stage-1 cluster centres and the first relabelling reproduces stage 1's nearest-centre view."""

    def __init__(self, centres: torch.Tensor, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(centres.clone().float())
        self.temperature = temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t() / self.temperature


class Stage2Model(nn.Module):
    """The vision tower followed by the cosine head; ``forward`` returns ``(logits, unit-norm features)``."""

    def __init__(self, visual: nn.Module, head: CosineHead):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(self.visual(images).float(), dim=1)
        return self.head(features), features


def _fingerprint(module: nn.Module) -> str:
    """Checksum of a module's parameters, to refuse resuming (or loading) onto a different base encoder."""
    digest = hashlib.sha1()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"the saved stage-2 state does not fit this model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); rebuild it with the same n_blocks / lora_rank")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


# ---------------------------------------------------------------------------------------------------------------------
# Images: transforms and streaming datasets


def _preprocess_cfg(clip_model: nn.Module) -> dict:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip_model)
    if not cfg:
        size = getattr(clip_model.visual, "image_size", 224)
        cfg = {"size": size, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    size = cfg["size"]
    return {"size": tuple(size) if isinstance(size, (tuple, list)) else (size, size),
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def build_transforms(preprocess_cfg: dict):
    """(eval, weak, strong) torchvision transforms at the tower's input size and normalisation."""
    from torchvision import transforms as T

    size, mean, std = preprocess_cfg["size"], preprocess_cfg["mean"], preprocess_cfg["std"]
    bicubic = T.InterpolationMode.BICUBIC
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(min(size), interpolation=bicubic), T.CenterCrop(size), *finish])
    crop_flip = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    weak = T.Compose([*crop_flip, *finish])
    strong = T.Compose([*crop_flip,
                        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                        T.RandomGrayscale(p=0.2),
                        T.RandomApply([_RandomBlur(0.1, 2.0)], p=0.5),
                        *finish])
    return eval_tf, weak, strong


class _RandomBlur:
    """Gaussian blur of a PIL image with sigma drawn uniformly in [low, high] pixels from torch's RNG (so the
    per-image seeding covers it). PIL's blur is used because torchvision's is ~100x slower on PIL images."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, img):
        from PIL import ImageFilter

        sigma = float(torch.empty(1).uniform_(self.low, self.high))
        return img.filter(ImageFilter.GaussianBlur(sigma))


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[PathLike], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_rgb(self.paths[i])
        except DECODE_ERRORS as exc:
            # A clear error instead of PIL's: these images are to be assigned one by one, so none can be skipped.
            raise ValueError(f"cannot read image {self.paths[i]} ({exc}); remove it or replace it with a readable "
                             "image") from None
        return self.transform(image)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one image's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling (and of the DataLoader workers' base seed)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _TwoViews(torch.utils.data.Dataset):
    """(image index, pseudo-label, weak view, strong view); each item's augmentation is seeded by (seed, epoch,
    index), so it is the same whichever worker decodes it and whether or not the run was resumed."""

    def __init__(self, paths, indices: np.ndarray, labels: np.ndarray, weak, strong, seed: int, epoch: int):
        self.paths, self.indices, self.labels = paths, indices, labels
        self.weak, self.strong, self.seed, self.epoch = weak, strong, seed, epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        index = int(self.indices[j])
        img = open_rgb(self.paths[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.epoch, index))
            weak, strong = self.weak(img), self.strong(img)
        return index, int(self.labels[j]), weak, strong


def _loader(dataset, batch_size: int, num_workers: int, device: torch.device, generator=None, shuffle=False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _needs_scaler(device: torch.device, amp: bool) -> bool:
    return device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()


@torch.no_grad()
def embed_images(model: Stage2Model, paths: Sequence[PathLike], transform, *, batch_size: int, num_workers: int,
                 device: torch.device, amp: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features ``[N, D]`` and head probabilities ``[N, K]`` (float32, CPU) of ``paths`` in order."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    try:
        for images in _loader(_EvalImages(paths, transform), batch_size, num_workers, device):
            with _autocast(device, amp):
                logits, f = model(images.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            probs.append(logits.float().softmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(probs)


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


def _train_epoch(model, loader, optimizer, scaler, text, cfg: Stage2Config, device) -> Dict[str, float]:
    model.train()
    # Running sums stay on the device: reading them every step would wait for the GPU each time.
    sums = {name: torch.zeros((), device=device) for name in ("loss", "ce", "text")}
    n_batches = len(loader)
    seen, start = 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, (index, label, weak, strong) in enumerate(loader):
        label = label.to(device, non_blocking=True)
        views = torch.cat([weak, strong]).to(device, non_blocking=True)
        with _autocast(device, cfg.amp):
            logits, features = model(views)
        logits_weak, logits_strong = logits.float().chunk(2)
        ce = 0.5 * (F.cross_entropy(logits_weak, label, label_smoothing=cfg.label_smoothing)
                    + F.cross_entropy(logits_strong, label, label_smoothing=cfg.label_smoothing))
        loss = ce
        if text is not None and cfg.text_weight > 0 and len(index) > 1:
            align = text_alignment_loss(features.chunk(2)[0], text[index.to(text.device)], cfg.text_temperature)
            loss = loss + cfg.text_weight * align
            sums["text"] += align.detach()
        scaler.scale(loss / cfg.grad_accum_steps).backward()
        if (step + 1) % cfg.grad_accum_steps == 0 or step + 1 == n_batches:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        sums["loss"] += loss.detach()
        sums["ce"] += ce.detach()
        seen += len(index)
    stats = {k: float(v) / max(1, n_batches) for k, v in sums.items()}  # waits for the device: time after it
    seconds = time.perf_counter() - start
    stats.update(images=seen, seconds=seconds, images_per_s=seen / seconds if seconds > 0 else float("nan"))
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _paths_digest(paths: Sequence[PathLike]) -> str:
    return hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()


def _load_checkpoint(path: pathlib.Path, cfg: Stage2Config, base_fingerprint: str, paths_digest: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a laic stage-2 checkpoint of version {FORMAT_VERSION}; delete it or pass "
                         "resume=False")
    saved = ckpt["config"]
    changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise ValueError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); resume with the "
                         "same settings or pass resume=False to start over")
    if ckpt["base_fingerprint"] != base_fingerprint:
        raise ValueError(f"checkpoint {path} was written for another base encoder (its weights differ); pass the same "
                         "open_clip model and weights, or resume=False")
    if ckpt["paths_digest"] != paths_digest:
        raise ValueError(f"checkpoint {path} was written for another list of images; pass the same image paths in "
                         "the same order, or resume=False")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------------
# Public API


class FineTunedEncoder:
    """The fine-tuned vision tower with its cluster head: ``predict_proba(paths)``, ``predict(paths)``,
    ``embed(paths)`` on new images; ``save(path)`` / ``FineTunedEncoder.load(path, clip_model)`` (the file holds
    only the trained part, so loading needs the same base open_clip model)."""

    def __init__(self, model: Stage2Model, config: Stage2Config, preprocess_cfg: dict, base_fingerprint: str,
                 device: torch.device):
        self.model, self.config, self.preprocess_cfg = model, config, preprocess_cfg
        self.base_fingerprint, self.device = base_fingerprint, device
        self.eval_transform = build_transforms(preprocess_cfg)[0]

    @property
    def n_clusters(self) -> int:
        return self.model.head.weight.shape[0]

    def embed_and_predict(self, paths: Sequence[PathLike], *, batch_size: Optional[int] = None,
                          num_workers: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Unit-norm fine-tuned features ``[N, D]`` and cluster probabilities ``[N, K]`` of the images at ``paths``."""
        paths = _check_paths(paths)
        feats, probs = embed_images(self.model, paths, self.eval_transform,
                                    batch_size=batch_size or self.config.eval_batch_size,
                                    num_workers=self.config.num_workers if num_workers is None else num_workers,
                                    device=self.device, amp=self.config.amp)
        return feats.numpy(), probs.numpy()

    def embed(self, paths, **kwargs) -> np.ndarray:
        return self.embed_and_predict(paths, **kwargs)[0]

    def predict_proba(self, paths, **kwargs) -> np.ndarray:
        return self.embed_and_predict(paths, **kwargs)[1]

    def predict(self, paths, **kwargs) -> np.ndarray:
        return self.predict_proba(paths, **kwargs).argmax(1).astype(np.int64)

    def state(self) -> dict:
        return {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                "preprocess_cfg": self.preprocess_cfg, "base_fingerprint": self.base_fingerprint,
                "n_clusters": self.n_clusters, "trainable": trainable_state(self.model)}

    def save(self, path: PathLike) -> None:
        io.torch_save(path, self.state())

    @classmethod
    def from_state(cls, state: dict, clip_model: nn.Module, device=None) -> "FineTunedEncoder":
        if state.get("format") != MODEL_FORMAT or state.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a laic stage-2 model of version {FORMAT_VERSION}")
        config = Stage2Config(**state["config"])
        visual = copy.deepcopy(clip_model.visual)
        if _fingerprint(visual) != state["base_fingerprint"]:
            raise ValueError("clip_model is not the base encoder this stage-2 model was trained from; load the same "
                             "open_clip model and weights")
        device = torch.device(device) if device is not None else _default_device()
        prepare_encoder(visual, config.n_blocks, config.lora_rank, config.lora_alpha)
        head = CosineHead(torch.zeros(state["n_clusters"], state["trainable"]["head.weight"].shape[1]),
                          config.head_temperature)
        model = Stage2Model(visual, head)
        load_trainable_state(model, state["trainable"])
        return cls(model.to(device), config, state["preprocess_cfg"], state["base_fingerprint"], device)

    @classmethod
    def load(cls, path: PathLike, clip_model: nn.Module, device=None) -> "FineTunedEncoder":
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True), clip_model, device)


@dataclass
class FineTuneResult:
    encoder: FineTunedEncoder
    labels: np.ndarray                 # int64 [N]: final assignment of the training images by the fine-tuned model
    probs: np.ndarray                  # float32 [N, K]
    features: np.ndarray               # float32 [N, D]: fine-tuned unit-norm embeddings of the training images
    history: List[dict]                # per epoch: loss, ce, text, n_pseudo, images, seconds, images_per_s
    notes: List[str]
    paths: List[str] = dataclasses.field(default_factory=list)  # [N] the training images, in row order


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_paths(paths) -> List[str]:
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("image_paths is empty; pass the images that stage 1 was fitted on")
    return paths


def _as_numpy(name: str, x, ndim: int) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a.astype(np.float32, copy=False)


def fine_tune(stage1, clip_model: nn.Module, image_paths: Sequence[PathLike], *,
              image_features=None, text_counterparts=None, config: Optional[Stage2Config] = None,
              checkpoint_dir: Optional[PathLike] = None, resume: bool = False, device=None,
              on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> FineTuneResult:
    """Run stage 2 and return the fine-tuned encoder, the final labels of ``image_paths`` and the history.

    Args:
        stage1: fitted model with ``predict_proba(features) -> [N, K]`` on the frozen encoder's features.
        clip_model: the open_clip model the features came from (its ``visual`` tower is copied and fine-tuned).
        image_paths: the N training images, in the order of ``image_features`` / ``text_counterparts``.
        image_features: ``[N, D]`` frozen features of the images (computed with the tower when None).
        text_counterparts: ``[N, D]`` frozen text counterparts, or None to train without the language term.
        config: :class:`Stage2Config` (defaults when None).
        checkpoint_dir: where the per-epoch checkpoint goes (none written when None).
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.
        on_epoch_end: called as ``on_epoch_end(epoch, stats)`` after each epoch's checkpoint is written.
    """
    cfg = (config or Stage2Config()).validate()
    paths = _check_paths(image_paths)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder of the interrupted run)")
    device = torch.device(device) if device is not None else _default_device()
    notes: List[str] = []

    visual = copy.deepcopy(clip_model.visual).float()
    base_fingerprint = _fingerprint(visual)
    preprocess_cfg = _preprocess_cfg(clip_model)
    eval_tf, weak_tf, strong_tf = build_transforms(preprocess_cfg)
    prepare_encoder(visual, cfg.n_blocks, cfg.lora_rank, cfg.lora_alpha)
    dim = visual.output_dim

    text = None
    if text_counterparts is not None:
        t = _as_numpy("text_counterparts", text_counterparts, ndim=2)
        if t.shape != (len(paths), dim):
            raise ValueError(f"text_counterparts must have shape [N, D] = ({len(paths)}, {dim}) (one row per image, "
                             f"the encoder's embedding size), got {t.shape}")
        text = torch.from_numpy(t).to(device)
    else:
        notes.append("no text counterparts given: trained without the language-consistency term")

    ckpt_path = pathlib.Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path, cfg, base_fingerprint, _paths_digest(paths))
        n_clusters = ckpt["n_clusters"]
        if getattr(stage1, "n_clusters", n_clusters) != n_clusters:
            raise ValueError(f"checkpoint {ckpt_path} has {n_clusters} clusters but stage1 has {stage1.n_clusters}; "
                             "resume with the same number of clusters, or pass resume=False to start over")
        head = CosineHead(torch.zeros(n_clusters, dim), cfg.head_temperature)
    else:
        if resume:
            notes.append(f"resume=True but no checkpoint at {ckpt_path}: started from the beginning")
        probs0, head = _initial_pseudo_labels_and_head(stage1, visual, paths, image_features, eval_tf, cfg, device)

    model = Stage2Model(visual, head).to(device)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=_needs_scaler(device, cfg.amp))
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        load_trainable_state(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        start_epoch = ckpt["epoch"] + 1
        notes.append(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}")

    for epoch in range(start_epoch, cfg.epochs):
        if epoch == 0:
            probs = probs0
        else:  # refresh: the current model relabels every image
            probs = embed_images(model, paths, eval_tf, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                                 device=device, amp=cfg.amp)[1].numpy()
        indices, labels = select_confident(probs, cfg.keep_fraction, cfg.min_per_cluster)
        dataset = _TwoViews(paths, indices, labels, weak_tf, strong_tf, cfg.seed, epoch)
        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        loader = _loader(dataset, cfg.batch_size, cfg.num_workers, device, generator=generator, shuffle=True)
        stats = _train_epoch(model, loader, optimizer, scaler, text, cfg, device)
        scheduler.step()
        stats.update(epoch=epoch, n_pseudo=int(len(indices)),
                     n_pseudo_clusters=int(len(np.unique(labels))))
        history.append(stats)
        log.info("stage 2 epoch %d/%d: loss %.4f (ce %.4f, text %.4f), %d pseudo-labels, %.1f images/s",
                 epoch + 1, cfg.epochs, stats["loss"], stats["ce"], stats["text"], stats["n_pseudo"],
                 stats["images_per_s"])
        if ckpt_path is not None:
            io.torch_save(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "epoch": epoch,
                "config": dataclasses.asdict(cfg), "base_fingerprint": base_fingerprint,
                "paths_digest": _paths_digest(paths), "n_clusters": model.head.weight.shape[0],
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "pseudo_labels": {"indices": torch.from_numpy(indices), "labels": torch.from_numpy(labels)},
                "history": history})
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)

    encoder = FineTunedEncoder(model, cfg, preprocess_cfg, base_fingerprint, device)
    features, probs = embed_images(model, paths, eval_tf, batch_size=cfg.eval_batch_size,
                                   num_workers=cfg.num_workers, device=device, amp=cfg.amp)
    return FineTuneResult(encoder=encoder, labels=probs.argmax(1).numpy().astype(np.int64), probs=probs.numpy(),
                          features=features.numpy(), history=history, notes=notes, paths=paths)


def _initial_pseudo_labels_and_head(stage1, visual, paths, image_features, eval_tf, cfg, device):
    """Stage 1's probabilities on the frozen features, and a head whose class vectors are the confident centres."""
    if image_features is None:  # the frozen tower's features (the head is a placeholder, its output unused)
        probe = Stage2Model(visual, CosineHead(torch.ones(1, visual.output_dim), 1.0)).to(device)
        image_features = embed_images(probe, paths, eval_tf, batch_size=cfg.eval_batch_size,
                                      num_workers=cfg.num_workers, device=device, amp=cfg.amp)[0]
    feats = torch.from_numpy(_as_numpy("image_features", image_features, ndim=2))
    if feats.shape[0] != len(paths):
        raise ValueError(f"image_features has {feats.shape[0]} rows but there are {len(paths)} image paths; pass one "
                         "feature row per image, in the same order")
    probs = _as_numpy("stage1.predict_proba(image_features)", stage1.predict_proba(feats.numpy()), ndim=2)
    if probs.shape[0] != len(paths) or probs.shape[1] < 2:
        raise ValueError(f"stage1.predict_proba returned shape {probs.shape}; expected [N={len(paths)}, K>=2]")
    if feats.shape[1] != visual.output_dim:
        raise ValueError(f"image_features has dimension {feats.shape[1]} but the encoder outputs "
                         f"{visual.output_dim}; pass the features of this open_clip model")
    indices, labels = select_confident(probs, cfg.keep_fraction, cfg.min_per_cluster)
    head = CosineHead(cluster_centres(feats, probs, indices, labels), cfg.head_temperature)
    return probs, head


# ---------------------------------------------------------------------------------------------------------------------
# The LAIC estimator on images: stage 0 and 1 on the frozen features, then stage 2 (LAIC.fit_images and `laic fit`)

RANDOM_WEIGHTS = "random"


def load_base_clip(model_name: str, pretrained: Optional[str], *, seed: int = 0, device=None):
    """The open_clip model stage 2 starts from, as ``(model, preprocess, tokenizer)`` (see laic.embed.load_clip).

    ``pretrained`` None or "random" gives random weights drawn from ``seed`` (testing only): drawn from a seed, the
    same base encoder can be rebuilt later to load the fine-tuned part onto it (the fingerprint check needs it)."""
    from .embed import load_clip

    if pretrained is None or pretrained == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
            torch.manual_seed(seed)
            return load_clip(model_name, None, device)
    return load_clip(model_name, pretrained, device)


def _clip_model(clip) -> nn.Module:
    """The open_clip model of ``clip``: a ``(model, preprocess, tokenizer)`` tuple as from load_clip, or the model."""
    model = clip[0] if isinstance(clip, (tuple, list)) else clip
    if not isinstance(model, nn.Module) or not hasattr(model, "visual"):
        raise ValueError("clip must be the open_clip model the features come from, as (model, preprocess, tokenizer) "
                         f"from laic.embed.load_clip (or laic.stage2.load_base_clip), got {type(clip).__name__}")
    return model


def _image_list(images) -> List[str]:
    """A folder (its images, as laic.images.list_images orders them) or a sequence of paths, as strings."""
    from .images import list_images

    if isinstance(images, (str, os.PathLike)):
        return [str(p) for p in list_images(images)]
    return _check_paths(images)


def _language_counterparts(model, features: np.ndarray) -> Optional[np.ndarray]:
    """The images' frozen text counterparts (stage 0's noun mixtures, in CLIP space) when the fitted model found the
    vocabulary helpful (agreement > 0), else None: a vocabulary that does not agree with the images would pull the
    encoder towards noise."""
    from .stage0 import text_counterparts

    if getattr(model, "agreement_", 0.0) <= 0.0:
        return None
    x = torch.from_numpy(np.ascontiguousarray(features)).float().to(model.nouns_.device)
    return text_counterparts(x, model.nouns_, model.text_tau).float().cpu().numpy()


def fit_images(model, images, noun_features, noun_names=None, *, clip, model_name: str, image_features=None,
               config: Optional[Stage2Config] = None, checkpoint_dir: Optional[PathLike] = None,
               resume: bool = False, on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> FineTuneResult:
    """Stages 0 to 2 on images: embed ``images`` (a folder or a list of paths) with ``clip``, fit ``model`` (a LAIC)
    on the features, then fine-tune the encoder (:func:`fine_tune`) on its pseudo-labels, with the language term when
    the model's agreement weight says the vocabulary helps. ``model.labels_`` becomes the fine-tuned labels of the
    readable images (unreadable ones are skipped with an UnreadableImagesWarning); the result's ``paths`` are those
    images, in row order. ``image_features`` ``[N, D]`` (row i for image i) skips the embedding. ``config`` defaults to
    :class:`Stage2Config` with the model's ``random_state`` as seed."""
    from .embed import embed_images as embed_frozen

    clip_model = _clip_model(clip)
    cfg = (config if config is not None else Stage2Config(seed=int(model.random_state))).validate()
    if image_features is None:
        if not isinstance(clip, (tuple, list)) or len(clip) < 2:
            raise ValueError("clip must be (model, preprocess, ...) as from laic.embed.load_clip, to embed the images")
        embedded = embed_frozen(images, model_name, clip=clip, batch_size=cfg.eval_batch_size,
                                num_workers=cfg.num_workers, progress=False)
        paths, features = [str(p) for p in embedded.paths], embedded.features
    else:
        paths = _image_list(images)
        features = _as_numpy("image_features", image_features, ndim=2)
        if len(features) != len(paths):
            raise ValueError(f"image_features has {len(features)} rows but there are {len(paths)} images; pass one "
                             "feature row per image, in the same order")
    model.fit(features, noun_features, noun_names)
    text = _language_counterparts(model, features)
    result = fine_tune(model, clip_model, paths, image_features=features, text_counterparts=text, config=cfg,
                       checkpoint_dir=checkpoint_dir, resume=resume, device=model._torch_device(),
                       on_epoch_end=on_epoch_end)
    if text is None:
        result.notes.append(f"the vocabulary does not agree with the images (agreement {model.agreement_:.3f}): "
                            "trained without the language term")
    model.labels_ = result.labels
    return result


def clip_record(clip, model_name: str, pretrained: Optional[str], seed: int) -> dict:
    """What rebuilds the base encoder later: model name, weights (a file made absolute, a tag, or "random" with its
    seed) and the weights digest."""
    from .embed import weights_digest

    if pretrained is not None and pretrained != RANDOM_WEIGHTS and os.path.isfile(os.path.expanduser(pretrained)):
        pretrained = os.path.abspath(os.path.expanduser(pretrained))
    return {"model": model_name, "pretrained": RANDOM_WEIGHTS if pretrained is None else str(pretrained),
            "seed": int(seed), "weights_digest": weights_digest(_clip_model(clip))}


def attach(model, result: FineTuneResult, clip_info: dict) -> None:
    """Keep a stage-2 result on a LAIC model: ``stage2_`` (the FineTunedEncoder), ``image_paths_``, ``clip_`` (see
    :func:`clip_record`), ``stage2_history_``."""
    model.stage2_ = result.encoder
    model.stage2_state_ = None
    model.image_paths_ = list(result.paths)
    model.clip_ = dict(clip_info)
    model.stage2_history_ = list(result.history)
    model.labels_ = result.labels


def fit_laic_images(model, images, noun_features, noun_names=None, *, model_name: str, clip=None,
                    pretrained: Optional[str] = None, image_features=None, stage2_config: Optional[Stage2Config] = None,
                    checkpoint_dir: Optional[PathLike] = None, resume: bool = False,
                    on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> FineTuneResult:
    """``LAIC.fit_images``: :func:`fit_images`, then :func:`attach` the result to ``model``. Without ``clip`` the
    base encoder is loaded from ``model_name`` and ``pretrained`` (None: random weights from the model's
    ``random_state``). ``pretrained`` is recorded so that a saved model can rebuild its base encoder by itself."""
    if clip is None:
        clip = load_base_clip(model_name, pretrained, seed=int(model.random_state), device=model._torch_device())
    result = fit_images(model, images, noun_features, noun_names, clip=clip, model_name=model_name,
                        image_features=image_features, config=stage2_config, checkpoint_dir=checkpoint_dir,
                        resume=resume, on_epoch_end=on_epoch_end)
    attach(model, result, clip_record(clip, model_name, pretrained, int(model.random_state)))
    return result


def model_state(model) -> dict:
    """The stage-2 part of a LAIC model file (empty when the model has no stage 2)."""
    encoder, saved = getattr(model, "stage2_", None), getattr(model, "stage2_state_", None)
    if encoder is None and saved is None:
        return {}
    return {"stage2": encoder.state() if encoder is not None else saved, "clip": dict(model.clip_),
            "image_paths": list(model.image_paths_)}


def restore_state(model, state: dict) -> None:
    """Inverse of :func:`model_state` on a freshly loaded LAIC; the encoder is rebuilt on first use (it needs the
    base open_clip model)."""
    model.stage2_ = None
    model.stage2_state_ = state.get("stage2")
    model.clip_ = dict(state["clip"]) if state.get("clip") is not None else None
    model.image_paths_ = list(state["image_paths"]) if state.get("image_paths") is not None else None


def encoder_of(model, clip=None) -> FineTunedEncoder:
    """The model's fine-tuned encoder; after loading, rebuilt onto ``clip`` (default: the recorded base encoder,
    loaded again by name and weights)."""
    if getattr(model, "stage2_", None) is not None:
        return model.stage2_
    state = getattr(model, "stage2_state_", None)
    if state is None:
        raise ValueError("this LAIC model has no stage 2; fit it with fit_images(images, noun_features, clip=..., "
                         "model_name=...) to predict on images")
    if clip is None:
        info = model.clip_
        clip = load_base_clip(info["model"], info["pretrained"], seed=info["seed"], device=model._torch_device())
    model.stage2_ = FineTunedEncoder.from_state(state, _clip_model(clip), device=model._torch_device())
    model.stage2_state_ = None
    return model.stage2_


def predict_images_proba(model, images, clip=None) -> np.ndarray:
    """Cluster probabilities ``[N, K]`` of ``images`` (a folder or paths) with the fine-tuned encoder."""
    return encoder_of(model, clip).predict_proba(_image_list(images))


def predict_images(model, images, clip=None) -> np.ndarray:
    """Cluster ids (int64 ``[N]``) of ``images`` (a folder or paths) with the fine-tuned encoder."""
    return predict_images_proba(model, images, clip).argmax(1).astype(np.int64)
