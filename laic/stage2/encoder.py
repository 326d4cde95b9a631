"""Stage 2's model: the vision tower with a chosen trainable part (its last blocks, optionally LoRA adapters) and a
cosine head, inference over image files, and :class:`FineTunedEncoder`, the trained result that predicts on new images
and saves only its trained part (loading it needs the same base open_clip model, checked by its weights digest)."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from laic_kernels import checks

from .. import io
from ..assignment import labels_of
from ..clip import module_change, module_classes, weights_digest
from ..embed import report_skipped
from ..profiling import progress_bar
from ..images import ImageDataset, PathLike, make_loader, worker_deaths_named
from ..interrupts import stop_if_interrupted
from ..runtime import own_grad_and_precision, resolve_device
from .config import Stage2Config, check_paths
from .data import build_transforms

MODEL_FORMAT = "laic-stage2-model"
# 2: the base encoder is identified by laic.clip.weights_digest of the whole open_clip model.
FORMAT_VERSION = 2

class LowRankDelta(nn.Module):
    """LoRA as a parametrisation: ``weight + (up @ down) * alpha / rank``; ``up`` starts at zero so training starts
    from the pretrained weights exactly."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None):
        """``down`` is drawn from ``generator`` (a CPU one; a fresh one when None), never from torch's global
        generator: the fine-tune then follows its seed whatever the caller's random stream is, and on any device the
        same start. Both factors then live on ``device``, the weight's (parametrisation runs ``forward`` at once)."""
        super().__init__()
        down = torch.empty(rank, in_features)
        generator = generator if generator is not None else torch.Generator()
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype) * self.scale


def _resblocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(visual, "ln_post"):
        raise ValueError(f"stage 2 needs an open_clip VisionTransformer tower (transformer.resblocks, ln_post, proj), "
                         f"got {type(visual).__name__}; use a ViT model such as ViT-B-32")
    return blocks


def check_tower(visual: nn.Module, n_blocks: int, lora_rank: Optional[int] = None) -> None:
    """That :func:`prepare_encoder` can take ``visual`` with these settings, without touching it: checked before
    stages 0 and 1 (found after them before, a whole embedding pass and fit later)."""
    blocks = _resblocks(visual)
    checks.int_in_range("n_blocks", n_blocks, 0, len(blocks), f" (the tower has {len(blocks)} blocks)")
    if lora_rank is not None:
        for block in blocks:
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise ValueError(f"lora_rank needs nn.MultiheadAttention blocks, got {type(attn).__name__}; "
                                 "use n_blocks instead")


def prepare_encoder(visual: nn.Module, n_blocks: int, lora_rank: Optional[int] = None, lora_alpha: float = 16.0,
                    generator: Optional[torch.Generator] = None) -> nn.Module:
    """Freeze ``visual`` except its last ``n_blocks`` blocks and what follows them (final norm, pooling,
    projection); with ``lora_rank``, add trainable LoRA adapters to every block's attention projections, their
    starts drawn from ``generator``. In place."""
    check_tower(visual, n_blocks, lora_rank)
    blocks = _resblocks(visual)
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
        # One generator for all adapters (a fresh one each would give every adapter the same start).
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        for block in blocks:
            attn = block.attn
            for owner, name in ((attn, "in_proj_weight"), (attn.out_proj, "weight")):
                weight = getattr(owner, name)
                out_f, in_f = weight.shape
                parametrize.register_parametrization(
                    owner, name, LowRankDelta(out_f, in_f, lora_rank, lora_alpha, generator, weight.device))
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
        # The tower is float32 (fine_tune's copy); the transforms make images in torch's default dtype, float64 under
        # a caller's torch.set_default_dtype(torch.float64), which the tower refused.
        features = F.normalize(self.visual(images.float()).float(), dim=1)
        return self.head(features), features


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


def autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_scaler(device: torch.device, amp: bool) -> bool:
    return device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()


@own_grad_and_precision()   # (outside no_grad, which it would undo): the caller's CPU autocast moved the features
@torch.no_grad()
def embed_images(model: Stage2Model, paths: Sequence[PathLike], transform, *, batch_size: int, num_workers: int,
                 device: torch.device, amp: bool, progress: bool = False,
                 desc: str = "embedding images (fine-tuned encoder)") -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Unit-norm features ``[N, D]`` and head probabilities ``[N, K]`` (float32, CPU) of ``paths`` in order, and the
    indices of the images that could not be read (their rows are NaN); ``progress``: a bar on stderr, named ``desc``."""
    was_training = model.training
    model.eval()
    try:
        with worker_deaths_named(), progress_bar(len(paths), progress, "img", desc) as bar:
            # (make_loader's generator is its own: a resumed run, which relabels once more, ended one draw ahead of
            # torch's global stream when it was not.)
            loader = make_loader(ImageDataset(paths, transform), batch_size=batch_size, num_workers=num_workers,
                                 pin_memory=device.type == "cuda")
            feats, probs, skipped = _embed_batches(model, loader, len(paths), bar, device, amp)
    finally:
        model.train(was_training)
    if feats is None:
        from ..embed import none_could_be_read
        raise none_could_be_read(paths)
    return feats, probs, skipped


def _embed_batches(model, loader, n: int, bar, device, amp):
    """The loop of :func:`embed_images`: (features, probabilities: None without a readable image, unreadable
    indices)."""
    feats = probs = None
    skipped: List[int] = []
    for images, indices, bad in loader:
        bar.update(len(indices) + len(bad))
        skipped += bad
        if images is None:
            continue
        with autocast(device, amp):
            logits, f = model(images.to(device, non_blocking=True))
        if feats is None:
            feats = torch.full((n, f.shape[1]), float("nan"), dtype=torch.float32)   # (whatever torch's default)
            probs = torch.full((n, logits.shape[1]), float("nan"), dtype=torch.float32)
        feats[indices] = f.float().cpu()
        probs[indices] = logits.float().softmax(1).cpu()
        stop_if_interrupted()   # a Ctrl-C that something swallowed (laic.interrupts) stops the pass here
    return feats, probs, skipped


def check_base_encoder(clip_model: nn.Module, base_fingerprint: str, base_modules: Optional[List[str]]) -> None:
    """``clip_model`` holds the weights (laic.clip.weights_digest) and, where recorded, the layers of the base
    encoder a stage-2 model was trained from; a ValueError saying how to load it otherwise."""
    if weights_digest(clip_model) != base_fingerprint:
        raise ValueError("clip_model is not the base encoder this stage-2 model was trained from; load the same "
                         "open_clip model and weights")
    if base_modules is not None and module_classes(clip_model) != base_modules:
        raise ValueError(f"clip_model holds the base encoder's weights but was built of other layers "
                         f"({module_change(base_modules, module_classes(clip_model))}): an open_clip tag such as "
                         "OpenAI's builds QuickGELU where the same weights from a file build GELU; load it as "
                         "the training did (the same tag, or a model name ending in -quickgelu for the file)")


class FineTunedEncoder:
    """The fine-tuned vision tower with its cluster head: ``predict_proba(paths)``, ``predict(paths)``,
    ``embed(paths)`` on new images; ``save(path)`` / ``FineTunedEncoder.load(path, clip_model)`` (the file holds
    only the trained part, so loading needs the same base open_clip model)."""

    def __init__(self, model: Stage2Model, config: Stage2Config, preprocess_cfg: dict, base_fingerprint: str,
                 device: torch.device, base_modules: Optional[List[str]] = None):
        self.model, self.config, self.preprocess_cfg = model, config, preprocess_cfg
        self.base_fingerprint, self.device = base_fingerprint, device
        self.base_modules = base_modules   # laic.clip.module_classes of the base (None: saved before it was recorded)
        self.eval_transform = build_transforms(preprocess_cfg)[0]

    @property
    def n_clusters(self) -> int:
        return self.model.head.weight.shape[0]

    def embed_and_predict(self, paths: Sequence[PathLike], *, batch_size: Optional[int] = None,
                          num_workers: Optional[int] = None, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Unit-norm fine-tuned features ``[N, D]`` and cluster probabilities ``[N, K]`` of the images at ``paths``,
        row i for path i. An image that cannot be read is skipped with an UnreadableImagesWarning naming it, and its
        rows are NaN (``predict`` gives it cluster -1). ``progress``: a bar on stderr."""
        paths = check_paths(paths)
        feats, probs, skipped = embed_images(self.model, paths, self.eval_transform,
                                             batch_size=batch_size or self.config.eval_batch_size,
                                             num_workers=self.config.num_workers if num_workers is None
                                             else num_workers, device=self.device, amp=self.config.amp,
                                             progress=progress)
        # (with the reasons, as the embedding of the frozen encoder gives them: it named the files alone)
        report_skipped([pathlib.Path(paths[i]) for i in skipped], len(paths), "fine-tuned encoder")
        return feats.numpy(), probs.numpy()

    def embed(self, paths, **kwargs) -> np.ndarray:
        return self.embed_and_predict(paths, **kwargs)[0]

    def predict_proba(self, paths, **kwargs) -> np.ndarray:
        return self.embed_and_predict(paths, **kwargs)[1]

    def predict(self, paths, **kwargs) -> np.ndarray:
        return labels_of(self.predict_proba(paths, **kwargs))

    def state(self) -> dict:
        return {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                "preprocess_cfg": self.preprocess_cfg, "base_fingerprint": self.base_fingerprint,
                "n_clusters": self.n_clusters, "trainable": trainable_state(self.model),
                **({} if self.base_modules is None else {"base_modules": list(self.base_modules)})}

    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """To ``path``, atomically; a file already there is replaced when it is a fine-tuned encoder (saved again) or
        with ``overwrite``, any other file refused."""
        checks.true_or_false("overwrite", overwrite)
        io.torch_save(path, self.state(), replaces=None if overwrite else MODEL_FORMAT,
                      what="a laic fine-tuned encoder file")

    def check_base(self, clip_model: nn.Module) -> None:
        """``clip_model`` is the base encoder this one was trained from (:func:`check_base_encoder`)."""
        check_base_encoder(clip_model, self.base_fingerprint, self.base_modules)

    @classmethod
    def from_state(cls, state: dict, clip_model: nn.Module, device=None) -> "FineTunedEncoder":
        if state.get("format") != MODEL_FORMAT or state.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a laic stage-2 model of version {FORMAT_VERSION}")
        config = Stage2Config(**state["config"])
        base_modules = state.get("base_modules")
        check_base_encoder(clip_model, state["base_fingerprint"], base_modules)
        # In float32, as fine_tune trained it (a half-precision base took the trained weights rounded, and refused
        # float32 images).
        visual = copy.deepcopy(clip_model.visual).float()
        device = resolve_device(device)
        prepare_encoder(visual, config.n_blocks, config.lora_rank, config.lora_alpha)
        head = CosineHead(torch.zeros(state["n_clusters"], state["trainable"]["head.weight"].shape[1]),
                          config.head_temperature)
        model = Stage2Model(visual, head)
        load_trainable_state(model, state["trainable"])
        return cls(model.to(device), config, state["preprocess_cfg"], state["base_fingerprint"], device,
                   base_modules)

    @classmethod
    def load(cls, path: PathLike, clip_model: nn.Module, device=None) -> "FineTunedEncoder":
        if isinstance(path, (str, os.PathLike)):   # (a file object too, as torch.load takes it)
            path = pathlib.Path(path).expanduser()     # (save writes through io.torch_save, which expands ~)
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True), clip_model, device)
