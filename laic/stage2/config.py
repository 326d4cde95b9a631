"""Stage 2's settings, and the checks of its array and path inputs."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from laic_kernels import checks

from ..runtime import MAX_SEED

log = logging.getLogger("laic.stage2")

# Settings that may change between an interrupted run and its resumption (memory and speed): num_workers does not
# affect the result; eval_batch_size rounds the relabelling's products otherwise (another batching), so a resume with
# another one ends equal up to that rounding (1e-6 of a probability), not bitwise.
RESUMABLE_CHANGES = ("num_workers", "eval_batch_size")


@dataclass
class Stage2Config:
    """Settings of a stage-2 run (defaults for a pretrained ViT-B/32 on a GPU).

    Attributes:
        epochs: passes over the confident images (each epoch's trained model relabels every image, and the next
            epoch picks its confident images from those labels).
        batch_size: images per step; in a process group, all ranks' together (each takes a share).
        grad_accum_steps: an optimiser step every this many batches (effective batch: the product; each step's
            gradient is that of its images' mean loss, an epoch's short last batch and last group included).
        n_blocks: the vision tower's last residual blocks trained in full (0: none).
        lora_rank: LoRA adapters of this rank on every block's attention projections (None: no LoRA).
        lora_alpha: LoRA's scale: the adapters add ``(up @ down) * lora_alpha / lora_rank`` to each weight.
        encoder_lr, head_lr: AdamW's learning rates of the encoder's trained weights and of the cosine head.
        weight_decay: AdamW's weight decay of the encoder's trained weights (the head has none).
        label_smoothing: of the cross-entropy on the pseudo-labels, in [0, 1).
        keep_fraction: per cluster, the most confident fraction of its images becomes pseudo-labels, in (0, 1].
        min_per_cluster: ... and at least this many (topped up from the most probable free images).
        head_temperature: the cosine head's logits are cos(feature, class vector) / head_temperature.
        text_weight: weight of the image-to-text-counterpart contrastive term (0: none; fit_images leaves it out
            where the vocabulary does not agree with the images).
        text_temperature: that term's temperature.
        amp: autocast on CUDA (bf16 where supported, else fp16 with a gradient scaler).
        num_workers: DataLoader worker processes (default: min(4, the CPUs)); may change on resuming.
        eval_batch_size: images per forward pass when relabelling, per process; may change on resuming (the
            result is then equal up to float rounding, not bitwise).
        seed: stage 2's own random stream (augmentations, batches, LoRA's initial weights).
    """

    epochs: int = 10
    batch_size: int = 64
    grad_accum_steps: int = 1
    n_blocks: int = 2
    lora_rank: Optional[int] = None
    lora_alpha: float = 16.0
    encoder_lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    keep_fraction: float = 0.5
    min_per_cluster: int = 5
    head_temperature: float = 0.05
    text_weight: float = 0.5
    text_temperature: float = 0.05
    amp: bool = True
    num_workers: int = min(4, os.cpu_count() or 1)
    eval_batch_size: int = 256
    seed: int = 0

    def validate(self) -> "Stage2Config":
        """The settings checked, as plain Python values (numpy's, e.g. a rate from np.logspace, made a checkpoint
        that torch.load(weights_only=True) refused: every finished epoch was lost on resuming)."""
        self = dataclasses.replace(self, **{f.name: getattr(self, f.name).item() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), np.generic)})
        for name, (low, high) in INT_BOUNDS.items():
            checks.int_in_range(name, getattr(self, name), low, high)
        checks.true_or_false("amp", self.amp)
        reals = ("lora_alpha", "encoder_lr", "head_lr", "weight_decay", "label_smoothing", "keep_fraction",
                 "head_temperature", "text_weight", "text_temperature")
        for name in reals:
            _real_number(name, getattr(self, name))
        # Plain ints and floats: another Integral or Real (a Fraction) passed the checks, then made a checkpoint that
        # torch.load(weights_only=True) refused, as numpy's did.
        ints = tuple(INT_BOUNDS) + (("lora_rank",) if self.lora_rank is not None else ())
        if self.lora_rank is not None:
            checks.int_in_range("lora_rank", self.lora_rank, 1, 4096, " (or None for no LoRA)")
        self = dataclasses.replace(self, **{name: int(getattr(self, name)) for name in ints},
                                   **{name: float(getattr(self, name)) for name in reals}, amp=bool(self.amp))
        # Finite even without LoRA (unused then): NaN never equals itself, so a checkpoint written with it refused
        # every resume ("lora_alpha=nan then, nan now").
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if self.lora_rank is not None:
            checks.positive("lora_alpha", self.lora_alpha)
        for name in ("encoder_lr", "head_lr", "head_temperature", "text_temperature"):
            checks.positive(name, getattr(self, name))
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("weight_decay", "text_weight"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return self


# The whole-number settings and their bounds (lora_rank, which may be None, is checked on its own).
INT_BOUNDS = {"epochs": (1, 1 << 30), "batch_size": (1, 1 << 30), "grad_accum_steps": (1, 1 << 30),
              "min_per_cluster": (1, 1 << 30), "eval_batch_size": (1, 1 << 30), "n_blocks": (0, 1 << 30),
              "num_workers": (0, 1024), "seed": (0, MAX_SEED)}   # (2**32 drew what 0 draws: torch takes 32 bits)


def checked_config(config, default: "Stage2Config") -> "Stage2Config":
    """``config`` validated (``default`` where it is None); anything but a Stage2Config refused (a dict failed with
    an AttributeError, the class itself with a TypeError, and an empty dict was taken as no config at all)."""
    if config is None:
        return default.validate()
    if not isinstance(config, Stage2Config):
        raise ValueError(f"the stage-2 config must be a laic.stage2.Stage2Config, got {type(config).__name__} "
                         f"{config!r}; pass Stage2Config(**settings)")
    return config.validate()


def _real_number(name: str, value) -> None:
    if not checks.is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def check_paths(paths) -> List[str]:
    """Image paths as strings (bytes paths decoded as the file system does: str() made them "b'...'"); at least one."""
    if isinstance(paths, (str, bytes)):
        raise ValueError(f"images must be a folder path or a list of image paths, got the single string {paths!r}; "
                         "pass [path] for one image")
    paths = [os.fsdecode(p) for p in paths]
    if not paths:
        raise ValueError("the list of images is empty; pass at least one image path (or a folder)")
    return paths


def as_numpy(name: str, x, ndim: int) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a.astype(np.float32, copy=False)

