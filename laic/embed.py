"""Image and text embeddings with open_clip, cached on disk and resumable.

Weights: ``pretrained`` is a local file (a state dict or open_clip checkpoint), an open_clip tag such as ``openai``
(downloaded once into the usual open_clip / Hugging Face cache), or None for random weights (tests only).

Cache layout: a cache folder holds one embedding set per kind, each as an array plus a JSON sidecar:

  features.npy / features.json      images: float32 [N, D], L2-normalised; row i is sidecar["files"][i]
  embeddings.npy / embeddings.json  texts (prompt-ensembled), same layout as a vocabulary folder (+ nouns.txt)

The sidecar records the model name, the weights digest (a hash of the loaded tensors, so it is right for a local file,
a tag, random weights or a fine-tuned model alike), the preprocessing (or the prompt templates), and the inputs (the
file list with a digest of sizes and modification times, or a digest of the texts). Files are written atomically (laic.io)
and the sidecar last, so a cache is either complete or absent. While a run is going on, finished shards are kept in
``.<stem>.shards/`` beside the array; an interrupted run resumes from them and they are removed at the end.

A folder that already holds embeddings made differently (another model or weights, other preprocessing or templates,
other files) is never silently reused or replaced: it raises ValueError saying what differs; pass ``overwrite=True``
(CLI: ``--overwrite``) to replace it, or use another folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import pathlib
import shutil
import socket
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from . import io as laic_io
from .images import ImageDataset, PathLike, list_images, make_loader

# The seven-template ensemble used for zero-shot ImageNet by CLIP (Radford et al., 2021, prompt-engineering notebook)
# and by the language-assisted clustering methods that followed it.
SEVEN_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
PHOTO_TEMPLATE = ("a photo of a {}.",)

CACHE_FORMAT = 1
IMAGE_STEM = "features"
TEXT_STEM = "embeddings"


class WeightsUnavailableError(FileNotFoundError):
    """The weights of an open_clip tag are not on this machine and cannot be downloaded (e.g. no network)."""


class UnreadableImagesWarning(UserWarning):
    """Some images could not be decoded; they were skipped and are listed in the result and the sidecar."""


@dataclasses.dataclass
class EmbeddingResult:
    """``features[i]`` (float32, unit norm) is the embedding of ``paths[i]``; ``skipped`` are the unreadable files."""

    features: np.ndarray
    paths: List[pathlib.Path]
    skipped: List[pathlib.Path]
    metadata: Dict
    from_cache: bool = False


# ---------------------------------------------------------------------------------------------------------- loading

def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu' (--device cpu)")
    return device


def _check_model_name(model_name: str) -> None:
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be an open_clip model name such as 'ViT-B-32', got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")) or open_clip.get_model_config(model_name) is not None:
        return
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"model_name {model_name!r} is not an open_clip model; {hint}see open_clip.list_models()")


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
    advice = "download them once on a machine with network access, or pass a local weights file (--pretrained PATH)"
    if not host or not _reachable(host):
        raise WeightsUnavailableError(
            f"cannot download the open_clip weights {model_name}/{tag}: no network ({host or 'no host'} unreachable); "
            f"{advice}")
    try:
        return open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:  # network, HTTP and hub errors come in many types; all mean "not available"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(
            f"cannot download the open_clip weights {model_name}/{tag}: {reason}; {advice}") from exc


def _tag_preprocess(cfg: Dict) -> Dict:
    """The preprocessing a tag was trained with (open_clip stores it in the tag's config), as the keyword arguments
    of ``open_clip.create_model_and_transforms``."""
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    return {names[k]: v for k, v in cfg.items() if k in names}


def load_clip(model_name: str, pretrained: Optional[str] = None, device=None):
    """``(model, preprocess, tokenizer)``: the open_clip model in eval mode on ``device`` (default: CUDA when present),
    its inference preprocessing, and its tokenizer.

    ``pretrained``: a local weights file, an open_clip tag (downloaded once, then read from the cache; no network
    raises WeightsUnavailableError with one line saying so), or None for random weights. A tag's own preprocessing
    and QuickGELU setting are applied, so e.g. ``("ViT-B-32", "openai")`` reproduces OpenAI's features."""
    import open_clip

    _check_model_name(model_name)
    device = resolve_device(device)
    options = {}
    weights = None
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
            raise ValueError(f"pretrained must be a weights file path or an open_clip tag, got {pretrained!r}")
        pretrained = str(pretrained)
        cfg = open_clip.pretrained.get_pretrained_cfg(model_name, pretrained)
        if os.path.isfile(os.path.expanduser(pretrained)):
            weights = os.path.expanduser(pretrained)
        elif cfg and not _looks_like_path(pretrained):
            weights = _download_tag(model_name, pretrained, cfg)
            options = dict(_tag_preprocess(cfg), force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        elif _looks_like_path(pretrained):
            raise FileNotFoundError(f"pretrained weights file {pretrained!r} not found; pass an existing file or an "
                                    f"open_clip tag")
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name}; "
                             f"tags: {', '.join(tags) if tags else 'none (pass a weights file)'}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device,
                                                                 **options)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every tensor of the model (names, dtypes, shapes, values): two models give the same digest exactly
    when they compute the same thing, whatever file or tag they came from."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------------------ cache

# What makes two embedding sets the same; everything else in a sidecar is description.
IDENTITY_KEYS = ("kind", "format", "model", "weights_digest", "preprocess", "templates", "inputs_digest")


def _describe_mismatch(found: Dict, wanted: Dict) -> str:
    diffs = [key for key in IDENTITY_KEYS if found.get(key) != wanted.get(key)]
    if "inputs_digest" in diffs and "inputs" in wanted:
        before, after = set(found.get("inputs", [])), set(wanted["inputs"])
        added, removed = len(after - before), len(before - after)
        what = (f"{added} file(s) added and {removed} removed" if added or removed
                else "some files were modified since (size or modification time)")
        diffs[diffs.index("inputs_digest")] = f"the image files ({what})"
    elif "inputs_digest" in diffs:
        diffs[diffs.index("inputs_digest")] = "the texts"
    if "model" in diffs or "weights_digest" in diffs:
        return (f"it was written by model {found.get('model')!r} (weights {str(found.get('weights_digest'))[:12]}), "
                f"not {wanted.get('model')!r} (weights {str(wanted.get('weights_digest'))[:12]})")
    return "it differs in " + ", ".join(diffs)


def _identity_matches(found: Dict, wanted: Dict) -> bool:
    return all(found.get(k) == wanted.get(k) for k in IDENTITY_KEYS)


class _Cache:
    """One embedding set in ``folder``: ``<stem>.npy`` + ``<stem>.json``, and resumable shards while computing."""

    def __init__(self, folder: PathLike, stem: str, identity: Dict, n_items: int, shard_size: int, overwrite: bool):
        self.folder = pathlib.Path(folder).expanduser()
        self.array_path = self.folder / f"{stem}.npy"
        self.sidecar_path = self.folder / f"{stem}.json"
        self.shard_dir = self.folder / f".{stem}.shards"
        self.identity = identity
        self.n_items = n_items
        self.shard_size = shard_size
        self.overwrite = overwrite
        self.what = f"{'image features' if stem == IMAGE_STEM else 'text embeddings'} in {str(self.folder)!r}"

    def _refuse(self, found: Dict) -> None:
        raise ValueError(f"cannot reuse the {self.what}: {_describe_mismatch(found, self.identity)}; use another "
                         f"cache folder (--out), or pass overwrite=True (--overwrite) to replace it")

    def load(self) -> Optional[Tuple[np.ndarray, Dict]]:
        """The finished result when the folder holds one made the same way, None when there is none; raises when it
        holds one made differently (unless overwrite)."""
        if not self.sidecar_path.is_file():
            # An array with neither sidecar nor shards was not written by us (e.g. a shared vocabulary folder):
            # never overwrite someone else's data unasked.
            if self.array_path.is_file() and not self.shard_dir.exists() and not self.overwrite:
                raise ValueError(f"{str(self.array_path)!r} exists but was not written by laic (no "
                                 f"{self.sidecar_path.name} beside it); use another folder (--out), or pass "
                                 f"overwrite=True (--overwrite) to replace it")
            return None
        found = json.loads(self.sidecar_path.read_text())
        if not _identity_matches(found, self.identity):
            if not self.overwrite:
                self._refuse(found)
            self.sidecar_path.unlink()  # replaced: nothing stale may survive an interruption of the new run
            self.array_path.unlink(missing_ok=True)
            return None
        array = np.load(self.array_path, allow_pickle=False)
        if array.shape[0] != found["rows"]:
            raise ValueError(f"the {self.what} are damaged ({self.array_path.name} has {array.shape[0]} rows, its "
                             f"sidecar says {found['rows']}); delete them or pass overwrite=True to recompute")
        return array.astype(np.float32, copy=False), found

    def ranges(self) -> List[Tuple[int, int]]:
        return [(s, min(self.n_items, s + self.shard_size)) for s in range(0, self.n_items, self.shard_size)]

    def _shard_path(self, start: int, end: int) -> pathlib.Path:
        return self.shard_dir / f"shard_{start:09d}_{end:09d}.npz"

    def start_run(self) -> List[Tuple[int, int]]:
        """The shard ranges still to compute: all of them, or those a previous interrupted run did not finish."""
        run_meta = {k: self.identity.get(k) for k in IDENTITY_KEYS + ("inputs",)}
        run_meta.update(shard_size=self.shard_size, n_items=self.n_items)
        meta_path = self.shard_dir / "run.json"
        if meta_path.is_file():
            found = json.loads(meta_path.read_text())
            if not _identity_matches(found, self.identity) and not self.overwrite:
                self._refuse(found)
            if found != run_meta:
                shutil.rmtree(self.shard_dir)  # overwrite, or the same inputs in another shard size: start afresh
        if not meta_path.is_file():
            laic_io.write_json(meta_path, run_meta)
        return [r for r in self.ranges() if not self._shard_path(*r).is_file()]

    def save_shard(self, start: int, end: int, features: np.ndarray, kept: np.ndarray, skipped: np.ndarray) -> None:
        with laic_io.atomic_path(self._shard_path(start, end)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, kept=kept, skipped=skipped)

    def gather(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All shards in order: (features of kept items, kept item indices, skipped item indices)."""
        parts = []
        for start, end in self.ranges():
            with np.load(self._shard_path(start, end), allow_pickle=False) as shard:
                parts.append((shard["features"], shard["kept"], shard["skipped"]))
        return _concat(parts)

    def finish(self, array: np.ndarray, sidecar: Dict) -> None:
        laic_io.save_npy(self.array_path, array)
        laic_io.write_json(self.sidecar_path, sidecar)  # last: its presence marks the cache complete
        if self.shard_dir.exists():
            shutil.rmtree(self.shard_dir)


def _part(feats: List[np.ndarray], kept, skipped) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's result; features are [0, 0] when none of its items was readable."""
    features = np.concatenate(feats).astype(np.float32, copy=False) if feats else np.zeros((0, 0), np.float32)
    return features, np.asarray(kept, np.int64).reshape(-1), np.asarray(skipped, np.int64).reshape(-1)


def _concat(parts: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    kept = [k for _, k, _ in parts]
    skipped = [s for _, _, s in parts]
    return _part([f for f, _, _ in parts if f.size], np.concatenate(kept) if kept else [],
                 np.concatenate(skipped) if skipped else [])


def _progress(total: int, enabled: bool, unit: str, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------- images

def _resolve_inputs(paths_or_folder) -> Tuple[List[pathlib.Path], str]:
    if isinstance(paths_or_folder, (str, os.PathLike)):
        return list_images(paths_or_folder), os.path.abspath(os.path.expanduser(paths_or_folder))
    # Absolute but not symlink-resolved: the paths come back as the caller knows them.
    paths = [pathlib.Path(os.path.abspath(os.path.expanduser(p))) for p in paths_or_folder]
    if not paths:
        raise ValueError("paths_or_folder is an empty list; pass a folder or at least one image path")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"paths_or_folder: {len(missing)} path(s) are not existing files, e.g. {str(missing[0])!r}")
    if len(set(paths)) != len(paths):
        raise ValueError("paths_or_folder lists some files twice; pass each image once")
    return paths, f"{len(paths)} listed files"


def _files_digest(paths: Sequence[pathlib.Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _encode(encode_fn, batch: torch.Tensor, device: torch.device) -> np.ndarray:
    """Features of one batch, L2-normalised in float32 (AMP float16 on CUDA for the forward pass only)."""
    batch = batch.to(device, non_blocking=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        out = encode_fn(batch)
    return F.normalize(out.float(), dim=-1).cpu().numpy()


def _image_shards(model, dataset: ImageDataset, ranges, batch_size: int, num_workers: int, device: torch.device,
                  bar) -> Iterator[Tuple[Tuple[int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Encode ``ranges`` of the dataset in order; yield each range with its (features, kept, skipped) once done."""
    batches, owner = [], []
    for r in ranges:
        for b in range(r[0], r[1], batch_size):
            batches.append(list(range(b, min(r[1], b + batch_size))))
            owner.append(r)
    loader = make_loader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    current, feats, kept, skipped = None, [], [], []
    for batch_no, (images, indices, bad) in enumerate(loader):
        if current is not None and owner[batch_no] != current:
            yield current, _part(feats, kept, skipped)
            feats, kept, skipped = [], [], []
        current = owner[batch_no]
        if images is not None:
            feats.append(_encode(model.encode_image, images, device))
            kept.extend(indices.tolist())
        skipped.extend(bad)
        bar.update(len(indices) + len(bad))
    if current is not None:
        yield current, _part(feats, kept, skipped)


def _report_skipped(skipped: Sequence[pathlib.Path], total: int, where: str) -> None:
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {total} ({where}): {shown}",
                      UnreadableImagesWarning, stacklevel=3)


def embed_images(paths_or_folder: Union[PathLike, Sequence[PathLike]], model_name: str,
                 pretrained: Optional[str] = None, *, cache_dir: Optional[PathLike] = None, batch_size: int = 64,
                 num_workers: int = 2, device=None, progress: bool = True, clip=None, shard_size: int = 1024,
                 overwrite: bool = False) -> EmbeddingResult:
    """L2-normalised float32 image embeddings of a folder (recursive, sorted; see laic.images.list_images) or of a
    list of files (kept in the given order).

    Images are decoded in ``num_workers`` processes and encoded in batches (AMP on CUDA). Unreadable files are
    skipped, returned in ``skipped``, listed in the sidecar and reported with an UnreadableImagesWarning.
    With ``cache_dir`` the result is stored there (see the module doc), reused when asked again, and an interrupted
    run resumes from its last finished shard of ``shard_size`` images. ``clip``: an already loaded
    ``(model, preprocess, ...)`` (e.g. from load_clip, or a fine-tuned model) to use instead of loading
    ``model_name``/``pretrained``; ``model_name`` still names it in the sidecar."""
    from laic_kernels import checks

    checks.int_in_range("batch_size", batch_size, 1, 1 << 20)
    checks.int_in_range("shard_size", shard_size, 1, 1 << 30)
    paths, where = _resolve_inputs(paths_or_folder)
    if clip is None:
        clip = load_clip(model_name, pretrained, device)
    else:
        _check_model_name(model_name)
    model, preprocess = clip[0], clip[1]
    device = resolve_device(device) if device is not None else _model_device(model)
    identity = {"kind": "image", "format": CACHE_FORMAT, "model": model_name, "weights_digest": weights_digest(model),
                "preprocess": str(preprocess), "inputs_digest": _files_digest(paths)}
    sidecar = dict(identity, pretrained=None if pretrained is None else str(pretrained), inputs=[str(p) for p in paths])

    cache = _Cache(cache_dir, IMAGE_STEM, sidecar, len(paths), shard_size, overwrite) if cache_dir else None
    cached = cache.load() if cache else None
    if cached is not None:
        features, found = cached
        result = EmbeddingResult(features, [pathlib.Path(p) for p in found["files"]],
                                 [pathlib.Path(p) for p in found["skipped"]], found, from_cache=True)
        _report_skipped(result.skipped, len(paths), where)
        return result

    dataset = ImageDataset(paths, preprocess)
    todo = cache.start_run() if cache else [(0, len(paths))]
    was_training = model.training
    model.eval()
    parts = []
    try:
        with _progress(sum(e - s for s, e in todo), progress, "img", "embedding images") as bar:
            for (start, end), part in _image_shards(model, dataset, todo, batch_size, num_workers, device, bar):
                if cache:
                    cache.save_shard(start, end, *part)
                else:
                    parts.append(part)
    finally:
        model.train(was_training)
    features, kept, skipped = cache.gather() if cache else _concat(parts)

    if len(kept) == 0:
        raise ValueError(f"none of the {len(paths)} images ({where}) could be read; check that they are image files")
    sidecar.update(rows=int(len(kept)), dim=int(features.shape[1]), dtype="float32", normalized=True,
                   files=[str(paths[i]) for i in kept], skipped=[str(paths[i]) for i in skipped])
    if cache:
        # files.txt first: once the sidecar exists the run counts as complete and is not redone.
        laic_io.write_text(cache.folder / "files.txt", "".join(f + "\n" for f in sidecar["files"]))
        cache.finish(features, sidecar)
    result = EmbeddingResult(features, [paths[i] for i in kept], [paths[i] for i in skipped], sidecar)
    _report_skipped(result.skipped, len(paths), where)
    return result


# ------------------------------------------------------------------------------------------------------------ texts

def _check_templates(templates) -> Tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty; pass at least one prompt template such as 'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template must be a string with exactly one '{{}}' for the name, got {t!r}")
    return templates


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


def _text_encoder(model, tokenizer, device: torch.device):
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


def _encode_texts(encode_fn, tokenizer, texts: Sequence[str], templates: Sequence[str],
                  device: torch.device) -> np.ndarray:
    """Prompt ensemble of each text: the mean of its per-template unit embeddings, normalised again."""
    prompts = [template.format(text) for text in texts for template in templates]
    per_prompt = _encode(encode_fn, tokenizer(prompts), device)
    mean = per_prompt.reshape(len(texts), len(templates), -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def _texts_digest(texts: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()


def embed_texts(texts: Sequence[str], model_name: str, pretrained: Optional[str] = None, *,
                templates: Union[str, Sequence[str]] = SEVEN_TEMPLATES, cache_dir: Optional[PathLike] = None,
                batch_size: int = 512, device=None, progress: bool = True, clip=None, shard_size: int = 4096,
                overwrite: bool = False) -> np.ndarray:
    """float32 [len(texts), D] L2-normalised text embeddings: for each text, every template is filled with it and
    encoded, the unit embeddings are averaged over templates and normalised again (CLIP's prompt ensembling).
    ``batch_size`` counts prompts per forward pass. Cached (``embeddings.npy`` + ``embeddings.json`` in ``cache_dir``)
    and resumable like embed_images; ``clip`` as there (the tokenizer is its third item)."""
    from laic_kernels import checks

    templates = _check_templates(templates)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings (e.g. nouns)")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one name to encode")
    checks.int_in_range("batch_size", batch_size, 1, 1 << 20)
    checks.int_in_range("shard_size", shard_size, 1, 1 << 30)
    if clip is None:
        clip = load_clip(model_name, pretrained, device)
    else:
        _check_model_name(model_name)
    model, tokenizer = clip[0], clip[2]
    device = resolve_device(device) if device is not None else _model_device(model)
    identity = {"kind": "text", "format": CACHE_FORMAT, "model": model_name, "weights_digest": weights_digest(model),
                "templates": list(templates), "inputs_digest": _texts_digest(texts)}
    sidecar = dict(identity, pretrained=None if pretrained is None else str(pretrained))

    cache = _Cache(cache_dir, TEXT_STEM, sidecar, len(texts), shard_size, overwrite) if cache_dir else None
    cached = cache.load() if cache else None
    if cached is not None:
        return cached[0]

    texts_per_batch = max(1, batch_size // len(templates))
    todo = cache.start_run() if cache else [(0, len(texts))]
    was_training = model.training
    model.eval()
    parts = []
    try:
        encode_fn = _text_encoder(model, tokenizer, device)
        with _progress(sum(e - s for s, e in todo), progress, "text", "embedding texts") as bar:
            for start, end in todo:
                chunk = []
                for b in range(start, end, texts_per_batch):
                    chunk.append(_encode_texts(encode_fn, tokenizer, texts[b:min(end, b + texts_per_batch)], templates,
                                               device))
                    bar.update(len(chunk[-1]))
                features = np.concatenate(chunk).astype(np.float32)
                if cache:
                    cache.save_shard(start, end, features, np.arange(start, end), np.zeros(0, np.int64))
                else:
                    parts.append(features)
    finally:
        model.train(was_training)
    features = cache.gather()[0] if cache else np.concatenate(parts).astype(np.float32)
    if cache:
        sidecar.update(rows=len(texts), dim=int(features.shape[1]), dtype="float32", normalized=True)
        cache.finish(features, sidecar)
    return features
