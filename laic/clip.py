"""The open_clip model: loading it (a weights file, an open_clip tag, or random weights from a seed), its weights
digest (the one fingerprint of an encoder in laic: cache sidecars, run records and stage-2 checkpoints all use it),
and a faster text encoder for short prompts.

Weights: ``pretrained`` is a local file (a state dict or open_clip checkpoint), an open_clip tag such as ``openai``
(downloaded once into the usual open_clip / Hugging Face cache), or None / ``"random"`` for random weights (tests
only; drawn from ``seed`` so that the same encoder can be rebuilt, e.g. to resume or to load a fine-tuned part onto it).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
from typing import Dict, Iterator, List, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from . import io
from .runtime import first_line, resolve_device

RANDOM_WEIGHTS = "random"


class WeightsUnavailableError(FileNotFoundError):
    """The weights of an open_clip tag are not on this machine and cannot be downloaded (e.g. no network)."""


def check_model_name(model_name: str, arg: str = "model_name") -> None:
    """``model_name`` (given as ``arg``: a command's --model) names an open_clip model."""
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"{arg} must be an open_clip model name such as 'ViT-B-32', got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")) or open_clip.get_model_config(model_name) is not None:
        return
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"{arg} {model_name!r} is not an open_clip model; {hint}see open_clip.list_models()")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _cached_tag_file(cfg: Dict) -> Optional[str]:
    """The local file of a tag's weights when a previous download left it in open_clip's caches, else None."""
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open_clip tries a safetensors twin first (pretrained._get_safe_alternatives): look for the same files.
        if filename == HF_WEIGHTS_NAME:
            candidates = [HF_SAFE_WEIGHTS_NAME, filename]
        elif filename.endswith((".bin", ".pth")):
            candidates = [filename[:-4] + ".safetensors", filename]
        else:
            candidates = [filename]
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url"):
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(local):
            return local
    return None


def _reachable(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_tag(model_name: str, tag: str, cfg: Dict) -> str:
    """Local path of the tag's weights, downloading them if needed; without network, one clear line, at once (the
    Hugging Face client would otherwise retry with back-off for most of a minute)."""
    import open_clip.pretrained

    cached = _cached_tag_file(cfg)
    if cached:
        return cached
    if cfg.get("hf_hub"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.get("url", "")).hostname
    advice = ("download them once on a machine with network access, or pass a local weights file (laic: --pretrained "
              "PATH; from Python: pretrained=PATH)")
    if not host or not _reachable(host):
        raise WeightsUnavailableError(
            f"cannot download the open_clip weights {model_name}/{tag}: no network ({host or 'no host'} unreachable); "
            f"{advice}")
    try:
        with root_logger_left_alone():
            return open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:  # network, HTTP and hub errors come in many types; all mean "not available"
        reason = first_line(exc)
        raise WeightsUnavailableError(
            f"cannot download the open_clip weights {model_name}/{tag}: {reason}; {advice}") from exc


def _tag_preprocess(cfg: Dict) -> Dict:
    """The preprocessing a tag was trained with (open_clip stores it in the tag's config), as the keyword arguments
    of ``open_clip.create_model_and_transforms``."""
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    return {names[k]: v for k, v in cfg.items() if k in names}


def load_clip(model_name: str, pretrained: Optional[str] = None, device=None, *, seed: Optional[int] = None):
    """``(model, preprocess, tokenizer)``: the open_clip model in eval mode on ``device`` (default: CUDA when present),
    its inference preprocessing, and its tokenizer.

    ``pretrained``: a local weights file, an open_clip tag (downloaded once, then read from the cache; no network
    raises WeightsUnavailableError with one line saying so), or None / ``"random"`` for random weights: drawn from
    ``seed`` when given (the caller's random stream is left as it was), else from torch's global generator. A tag's
    own preprocessing and QuickGELU setting are applied, so e.g. ``("ViT-B-32", "openai")`` reproduces OpenAI's
    features."""
    import open_clip

    check_model_name(model_name)
    device = resolve_device(device)
    if pretrained is None or pretrained == RANDOM_WEIGHTS:
        if seed is None:
            return _create(model_name, None, device, {})
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (open_clip initialises its weights on the CPU): torch.manual_seed would reseed
            # every GPU's stream too, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(int(seed))
            return _create(model_name, None, device, {})
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise ValueError(f"pretrained must be a weights file path or an open_clip tag, got {pretrained!r}")
    pretrained = str(pretrained)
    cfg = open_clip.pretrained.get_pretrained_cfg(model_name, pretrained)
    if os.path.isfile(os.path.expanduser(pretrained)):
        return _create_from_file(model_name, pretrained, device)
    if cfg and not _looks_like_path(pretrained):
        weights = _download_tag(model_name, pretrained, cfg)
        options = dict(_tag_preprocess(cfg), force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    elif _looks_like_path(pretrained):
        raise FileNotFoundError(f"pretrained weights file {pretrained!r} not found; pass an existing file or an "
                                f"open_clip tag")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        # (worded for the API's pretrained= and the commands' --pretrained alike)
        raise ValueError(f"pretrained weights {pretrained!r}: neither a file nor an open_clip tag of {model_name}; "
                         f"tags: {', '.join(tags) if tags else 'none (pass a weights file)'}")
    return _create(model_name, weights, device, options)


def _create_from_file(model_name: str, path: str, device: torch.device):
    """:func:`_create` from a local weights file, which may hold another model's weights, or no weights at all."""
    try:
        return _create(model_name, os.path.expanduser(path), device, {})
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:   # open_clip's loaders raise anything from KeyError to AssertionError on a foreign file
        raise ValueError(f"pretrained weights file {path!r} does not load into {model_name} ({type(exc).__name__}: "
                         f"{first_line(exc)[:200]}); pass the weights saved for {model_name}, or the model name "
                         "they were saved for") from exc


@contextlib.contextmanager
def root_logger_left_alone() -> Iterator[None]:
    """Run open_clip without it configuring the program's logging: it logs through the root logger
    (``logging.info``), which sets itself up (``basicConfig``: a stderr handler) when it has no handler, and the
    application's own ``logging.basicConfig(level=logging.INFO)`` afterwards did nothing (laic's progress lines, which
    the README shows that way, never came). A NullHandler holds the place meanwhile; open_clip's messages go where the
    application's handlers send them, and nowhere when it has none. The placeholder is the process's: a
    ``basicConfig`` that another thread calls while a model loads finds a handler and does nothing (configure logging
    before loading models in threads)."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeHandler(placeholder)


def tokenizer_of(model_name: str):
    """open_clip's tokenizer of ``model_name``."""
    import open_clip

    with root_logger_left_alone():
        return open_clip.get_tokenizer(model_name)


def _create(model_name: str, weights: Optional[str], device: torch.device, options: Dict):
    import open_clip

    with root_logger_left_alone():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device,
                                                                     **options)
    model.eval()
    return model, preprocess, tokenizer_of(model_name)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every tensor of the model (names, dtypes, shapes, values): two models give the same digest exactly
    when they hold the same tensors, whatever file or tag they came from. Hashed anew at each call (ViT-B/32's 600 MB
    in about 0.7 s here): a digest remembered per tensor version went stale after changes that bump no version (a
    fused optimiser's step, an update through ``.data``), and a cache was reused for the changed model (12-06)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())   # (the buffer itself: no copy)
    return h.hexdigest()


def module_classes(model: torch.nn.Module) -> List[str]:
    """The sorted class names of the model's leaf modules: what :func:`weights_digest` cannot see of how a model
    computes. The same weights build QuickGELU blocks from an open_clip tag that sets it (OpenAI's) and GELU blocks
    from a file, and the two embed the same images differently (far beyond rounding at ViT-B/32); containers are left
    out, so a renamed block class of a later open_clip changes nothing."""
    return sorted({type(m).__name__ for m in model.modules() if next(m.children(), None) is None})


def module_change(found: Sequence[str], here: Sequence[str], found_name: str = "there",
                  here_name: str = "here") -> str:
    """How two :func:`module_classes` lists differ, e.g. ``"QuickGELU there, GELU here"``."""
    only_found, only_here = sorted(set(found) - set(here)), sorted(set(here) - set(found))
    return (f"{', '.join(only_found) or 'nothing else'} {found_name}, "
            f"{', '.join(only_here) or 'nothing else'} {here_name}")


def clip_model(clip) -> torch.nn.Module:
    """The open_clip model of ``clip``: a ``(model, preprocess, tokenizer)`` tuple as from :func:`load_clip`, or the
    model itself."""
    model = clip[0] if isinstance(clip, (tuple, list)) else clip
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "visual"):
        raise ValueError("clip must be an open_clip model, as (model, preprocess, tokenizer) from "
                         f"laic.clip.load_clip, got {type(clip).__name__}")
    return model


def clip_record(clip, model_name: str, pretrained: Optional[str], seed: int, loaded: bool = True) -> Dict:
    """What rebuilds the encoder later with :func:`load_clip`: the model name, its weights (a file made absolute, a
    tag, or "random" with its seed) and the weights digest (to check the rebuilt one is the same). ``loaded``:
    ``clip`` was loaded from ``pretrained`` (None: random weights from ``seed``); a ``clip`` the caller built and
    passed without naming its weights is recorded with weights None, which no later load can rebuild."""
    if pretrained is not None and pretrained != RANDOM_WEIGHTS and os.path.isfile(os.path.expanduser(pretrained)):
        pretrained = os.path.abspath(os.path.expanduser(pretrained))
    if pretrained is None and loaded:
        pretrained = RANDOM_WEIGHTS
    # A file's path as its bytes (io.path_text): the model file may be loaded under another locale.
    model = clip_model(clip)
    return {"model": model_name, "pretrained": None if pretrained is None else io.path_text(pretrained),
            "seed": int(seed), "weights_digest": weights_digest(model), "modules": module_classes(model)}


def load_recorded_clip(record: Dict, device=None):
    """The encoder a :func:`clip_record` describes, loaded again."""
    if record["pretrained"] is None:
        raise ValueError(f"this model's base encoder ({record['model']}) was passed as clip= without pretrained=, so "
                         "its weights cannot be loaded again: pass the same encoder as clip= here (or fit with "
                         "pretrained=PATH|TAG, which the model then records)")
    pretrained = io.text_path(record["pretrained"])
    if pretrained != RANDOM_WEIGHTS and os.path.isabs(pretrained) and not os.path.exists(pretrained):
        # clip_record made a file's path absolute: the file has moved since (a run copied to another machine).
        raise FileNotFoundError(f"this model's base encoder weights file {pretrained!r} ({record['model']}) is gone: "
                                "moved or deleted since the fit? Say where it is now (laic predict: --pretrained "
                                "PATH; from Python: clip= the encoder loaded from it)")
    clip = load_clip(record["model"], pretrained, device, seed=record["seed"])
    if record.get("weights_digest") not in (None, weights_digest(clip_model(clip))):
        # (said "clip_model is not the base encoder" before, an argument of no command)
        pass_them = "pass them (laic predict: --pretrained PATH; from Python: clip= the encoder loaded from them)"
        if os.path.isabs(pretrained):    # a file, rewritten at its recorded path
            raise ValueError(f"this model's base encoder weights file {pretrained!r} ({record['model']}) holds other "
                             f"weights than at the fit: replaced since? Put the fit's weights back there, or "
                             f"{pass_them}")
        # A tag or random weights from a seed: this open_clip (or torch) builds them otherwise.
        raise ValueError(f"this model's base encoder weights {pretrained!r} ({record['model']}, seed "
                         f"{record['seed']}) come out otherwise here than at the fit (another open_clip or torch "
                         f"version?); use the fit's versions, or save the fit's weights to a file and {pass_them}")
    layers = module_classes(clip_model(clip))
    if record.get("modules") not in (None, layers):
        raise ValueError(f"this model's base encoder {pretrained!r} ({record['model']}) is built of other layers here "
                         f"than at the fit ({module_change(record['modules'], layers)}: "
                         "the fit's clip= was built otherwise, as with QuickGELU, or this open_clip builds it "
                         "otherwise); use the fit's open_clip, or pass the encoder built as at the fit as clip= "
                         "(from Python: laic predict cannot build it otherwise)")
    return clip


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _trimmed_text_encoder(model):
    """``encode_text`` that drops the padding after a batch's longest prompt, or None where that could change the
    result. CLIP's text tower is causal and pools at the end-of-text token (the largest id, ``argmax``), so positions
    after it never reach the output; prompts of a few words then cost ~10 of the 77 positions, not all 77."""
    import open_clip

    if not (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax"):
        return None
    from open_clip.transformer import text_global_pool

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        length = max(1, int(((tokens != 0) * positions).max()))  # 0 is the padding id
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        # The body of open_clip's CLIP.encode_text, on `length` positions instead of all of them.
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, "argmax")
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x if model.text_projection is None else x @ model.text_projection

    return encode


def text_encoder(model, tokenizer, device: torch.device):
    """The trimmed encoder when it reproduces ``model.encode_text`` on probe prompts (a guard against open_clip
    changing its text tower), else ``model.encode_text``."""
    trimmed = _trimmed_text_encoder(model)
    if trimmed is None:
        return model.encode_text
    probe = tokenizer(["a photo of a dog.", "itap of a traffic light in a video game.", "x"]).to(device)
    with torch.no_grad():
        same = torch.allclose(F.normalize(trimmed(probe).float(), dim=-1),
                              F.normalize(model.encode_text(probe).float(), dim=-1), atol=1e-4)
    return trimmed if same else model.encode_text
