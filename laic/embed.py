"""Image and text embeddings with an open_clip model (``laic.clip``), cached on disk and resumable.

``embed_images`` and ``embed_texts`` compute L2-normalised float32 embeddings in batches; with a cache folder the
result is stored there, reused when asked again, and an interrupted run resumes from its last finished shard (the
format is ``laic.embed_cache``'s). Unreadable images are skipped and reported (an error only where none can be read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import io
from .clip import check_model_name, load_clip, model_device, module_classes, text_encoder, weights_digest
from .embed_cache import (CACHE_FORMAT, EMBED, FILE_LIST, IMAGE_STEM, TEXT_STEM, Cache, KeptRows, concat_parts,
                          name_off_its_line, shard_part, texts_digest)
from .images import (DECODE_ERRORS, ImageDataset, PathLike, files_digest, files_stat, list_images, make_loader,
                     open_rgb, worker_deaths_named)
from .interrupts import stop_if_interrupted
from .profiling import progress_bar
from .distributed.failure import from_main, same_on_all_ranks, stop_all_on_failure
from .distributed.world import current as current_world
from .runtime import first_line, own_grad_and_precision, resolve_device, warn_at_caller
from .vocab import shown_name

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

class UnreadableImagesWarning(UserWarning):
    """Some images could not be decoded; they were skipped and are listed in the result and the sidecar."""


@dataclasses.dataclass
class EmbeddingResult:
    """``features[i]`` (float32, unit norm) is the embedding of ``paths[i]``; ``skipped`` are the unreadable files.
    ``from_cache``: all of it read from a cache; ``kept_by_update``: how many items an update kept from the earlier
    cache (laic.embed_cache.KeptRows; the others were embedded)."""

    features: np.ndarray
    paths: List[pathlib.Path]
    skipped: List[pathlib.Path]
    metadata: Dict
    from_cache: bool = False
    kept_by_update: int = 0



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


def _checked_inputs(paths_or_folder, model_name, pretrained, clip, device, seed, batch_size: int, shard_size: int,
                    overwrite: bool = False, update: bool = False):
    """embed_images' arguments checked: (image paths, where they are, the loaded or given model)."""
    from laic_kernels import checks

    checks.int_in_range("batch_size", batch_size, 1, 1 << 20)
    checks.int_in_range("shard_size", shard_size, 1, 1 << 30)
    if overwrite and update:
        raise ValueError("overwrite and update are alternatives (laic embed --overwrite / --update): overwrite embeds "
                         "every image again, update only those added or changed since; pass one")
    paths, where = _resolve_inputs(paths_or_folder)
    if clip is None:
        clip = load_clip(model_name, pretrained, device, seed=seed)
    else:
        check_model_name(model_name)
    return paths, where, clip


def preprocess_description(preprocess) -> str:
    """What a cache records of a preprocess: its ``str``, without the memory addresses of default reprs (a function
    in a Compose, as CLIP pipelines convert to RGB: ``<function _convert_image_to_rgb at 0x7f...>`` named another
    address in each process, and no later run could reuse its cache, nor resume it)."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", str(preprocess))


def encode_batch(encode_fn, batch: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None
                 ) -> np.ndarray:
    """Features of one batch, L2-normalised in float32 (AMP float16 on CUDA for the forward pass only). ``dtype``:
    the model's, for floating-point batches (images) where no autocast casts them (a float16 or bfloat16 tower on the
    CPU refused float32 images)."""
    batch = batch.to(device, non_blocking=True)
    if dtype is not None and device.type != "cuda" and batch.is_floating_point():
        batch = batch.to(dtype)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        out = encode_fn(batch)
    return F.normalize(out.float(), dim=-1).cpu().numpy()


def _image_shards(model, dataset: ImageDataset, work, batch_size: int, num_workers: int, device: torch.device,
                  bar) -> Iterator[Tuple[Tuple[int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Encode the items of each ``(range, items)`` of ``work`` in order; yield each range with its (features, kept,
    skipped) once done (a range with no items at once, with none)."""
    batches = [items[b:b + batch_size].tolist() for _, items in work for b in range(0, len(items), batch_size)]
    # (no loader, and no worker processes, where an update embeds nothing)
    loader = iter(make_loader(dataset, batch_sampler=batches, num_workers=num_workers,
                              pin_memory=device.type == "cuda")) if batches else iter(())
    tower_dtype = next(model.visual.parameters()).dtype
    for shard, items in work:
        feats, kept, skipped = [], [], []
        for _ in range(0, len(items), batch_size):
            images, indices, bad = next(loader)
            if images is not None:
                feats.append(encode_batch(model.encode_image, images, device, tower_dtype))
                kept.extend(indices.tolist())
            skipped.extend(bad)
            bar.update(len(indices) + len(bad))
            stop_if_interrupted()   # a Ctrl-C that something swallowed (laic.interrupts) stops the run at this batch
        yield shard, shard_part(feats, kept, skipped)


def report_skipped(skipped: Sequence[PathLike], total: int, where: str) -> None:
    """An UnreadableImagesWarning at the caller's line: how many of ``total`` were skipped, the first five named with
    the reason each could not be read (laic.embed and the fine-tuned encoder alike)."""
    if skipped:
        warn_at_caller(f"skipped {len(skipped)} unreadable image(s) of {total} ({where}): "
                       f"{named_with_reasons(skipped)}", UnreadableImagesWarning)


def none_could_be_read(paths: Sequence[PathLike], where: str = "") -> ValueError:
    """The error where not one of ``paths`` could be read (``where``: " (folder)", or nothing), each of the first
    named with its reason: the reasons differ, and a broken file and one over PIL's pixel limit need other fixes."""
    return ValueError(f"none of the {len(paths)} images{where} could be read: {named_with_reasons(paths)}; check "
                      "that they are image files")


def named_with_reasons(unreadable: Sequence[PathLike], shown: int = 5) -> str:
    """The first ``shown`` of ``unreadable`` images, each with why it could not be read (:func:`why_unreadable`)."""
    return (", ".join(f"{p} ({why_unreadable(pathlib.Path(p))})" for p in unreadable[:shown])
            + (", ..." if len(unreadable) > shown else ""))


def _size(path: pathlib.Path) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def why_unreadable(path: pathlib.Path) -> str:
    """Why ``path`` could not be read, read again for the report (a few files): a broken file and one over PIL's
    size limit (Image.MAX_IMAGE_PIXELS) need different fixes."""
    from PIL import Image

    try:
        open_rgb(path)
    except Image.DecompressionBombError as exc:   # (PIL's words name no way past its limit)
        return (f"{first_line(exc)[:160].rstrip('.')}; over PIL's pixel limit: shrink the image (or, from Python, "
                "raise PIL.Image.MAX_IMAGE_PIXELS first)")
    except DECODE_ERRORS as exc:
        if _size(path) == 0:   # (PIL says "cannot identify image file", as of a text file)
            return "empty file (0 bytes)"
        return first_line(exc)[:160]
    # Skipped for the machine's sake (no permission then, a network drive away): the cache keeps it skipped.
    return ("readable now (a cache keeps it skipped: laic embed --overwrite, overwrite=True in Python, embeds it "
            "again)")


def _image_identity(model, preprocess, model_name: str, paths: Sequence[pathlib.Path], stat_rows: np.ndarray
                    ) -> Dict:
    """What an image cache's rows depend on: another value of any of these makes other features. ``stat_rows``:
    the paths' laic.images.files_stat."""
    return {"kind": "image", "format": CACHE_FORMAT, "model": model_name, "weights_digest": weights_digest(model),
            "modules": module_classes(model), "preprocess": preprocess_description(preprocess),
            "inputs_digest": files_digest(paths, stat_rows)}


def _text_identity(model, model_name: str, templates: Sequence[str], texts: Sequence[str]) -> Dict:
    """What a text cache's rows depend on, as :func:`_image_identity` for images."""
    return {"kind": "text", "format": CACHE_FORMAT, "model": model_name, "weights_digest": weights_digest(model),
            "modules": module_classes(model), "templates": list(templates), "inputs_digest": texts_digest(texts)}


def _check_cacheable(identity: Dict, cache_dir, world_size: int, update: bool) -> None:
    if update and not cache_dir:
        raise ValueError("update=True brings a cache up to date: pass the cache folder as cache_dir (laic embed --out)")
    if world_size > 1 and not cache_dir:
        raise ValueError(f"under torchrun ({world_size} processes) each process embeds its share of the images into "
                         "one cache folder: pass cache_dir (laic embed --out)")
    if cache_dir and "Lambda()" in identity["preprocess"]:
        # The cache knows a preprocessing by its description, and a Lambda's hides what it does (a greyscale one
        # reused a colour one's cache).
        raise ValueError(f"clip's preprocess ({identity['preprocess'][:200]!r}) holds a transforms.Lambda, which does "
                         "not say what it does, so a cache cannot tell it from another: pass a function or a transform "
                         "class in its place (named in the description), or embed without cache_dir")


@own_grad_and_precision()   # the caller's CPU autocast changed the features (and a cache kept them)
def embed_images(paths_or_folder: Union[PathLike, Sequence[PathLike]], model_name: str,
                 pretrained: Optional[str] = None, *, cache_dir: Optional[PathLike] = None, batch_size: int = 64,
                 num_workers: int = 2, device=None, progress: bool = True, clip=None, shard_size: int = 1024,
                 overwrite: bool = False, update: bool = False, seed: Optional[int] = None) -> EmbeddingResult:
    """L2-normalised float32 image embeddings of a folder (recursive, sorted; see laic.images.list_images) or of a
    list of files (kept in the given order).

    Images are decoded in ``num_workers`` processes and encoded in batches (AMP on CUDA). Unreadable files are
    skipped, returned in ``skipped``, listed in the sidecar and reported with an UnreadableImagesWarning.
    With ``cache_dir`` the result is stored there (see the module doc), reused when asked again (``overwrite``:
    computed again, skipped images read anew, replacing it; ``update``: a cache of the same model and preprocessing
    made from other files, or from other versions of them, keeps the rows of the files unchanged since and embeds the
    others, see laic.embed_cache), and an interrupted run resumes from its last finished shard of ``shard_size``
    images. ``clip``: an already loaded ``(model, preprocess, ...)`` (e.g. from load_clip,
    or a fine-tuned model) to use instead of loading ``model_name``/``pretrained`` (random weights, ``pretrained``
    None or "random", are drawn from ``seed``: see laic.clip.load_clip); ``model_name`` still names it in the
    sidecar."""
    world = current_world()
    # On every rank together: a bad argument (reached alike by every rank) is reported once, and one rank that cannot
    # find the images or the model stops the others instead of leaving them waiting in the next collective.
    paths, where, clip = stop_all_on_failure(
        world.group, lambda: _checked_inputs(paths_or_folder, model_name, pretrained, clip, device, seed, batch_size,
                                             shard_size, overwrite, update), "reading the inputs")
    model, preprocess = clip[0], clip[1]
    device = resolve_device(device) if device is not None else model_device(model)
    stat_rows = files_stat(paths)
    identity = _image_identity(model, preprocess, model_name, paths, stat_rows)
    sidecar = dict(identity, pretrained=None if pretrained is None else str(pretrained),
                   inputs=[io.path_text(p) for p in paths])
    _check_cacheable(identity, cache_dir, world.size, update)
    # Ranks with other weights or images would fill one cache with mixed rows under rank 0's identity (which every
    # rank reads back at the end: the images must be the same files, by path, size and time, on every machine).
    same_on_all_ranks(world.group, {"the model's weights": identity["weights_digest"], "model_name": model_name,
                                    "the preprocessing": identity["preprocess"],
                                    "the image files (every process must list the same files at the same "
                                    "absolute paths, with the same sizes and modification times: copies keep "
                                    "their times with cp -p or rsync -t)": identity["inputs_digest"],
                                    "shard_size": shard_size})
    cache = (Cache(cache_dir, IMAGE_STEM, sidecar, len(paths), shard_size, overwrite, update, stat_rows)
             if cache_dir else None)
    with cache or contextlib.nullcontext():   # the folder is held while this process computes in it
        # Rank 0 alone reads (and may replace) what the folder holds and records the run; every rank learns the outcome.
        # A finished result rank 0 read is kept: a second read of ImageNet's features is 2.6 GB more.
        reused = []

        def look_in_cache():
            found = cache.load()
            reused.append(found)
            return None if found else cache.start_run()

        todo = (from_main(world.group, look_in_cache, "reading the cache folder") if cache else [(0, len(paths))])
        if cache and world.size > 1:
            try:
                stop_all_on_failure(world.group, lambda: cache.check_shared(world.rank, finished=todo is None),
                                    "finding the cache folder")
            except Exception:
                # A run that computed nothing is no interrupted run: left, it was refused as one by the next run
                # of other settings (an earlier run's shards, which it resumed, stay).
                if world.is_main() and todo is not None and len(todo) == len(cache.ranges()):
                    cache.discard_empty_run()
                raise
        if todo is not None:
            # Every process reads what an update keeps (the earlier result stays whole until rank 0 replaces it).
            kept_rows = stop_all_on_failure(world.group, lambda: cache.rows_to_keep(stat_rows),
                                            "reading the cache to update") if cache else None
            parts = _embed_shards(model, ImageDataset(paths, preprocess), cache, todo[world.rank::world.size],
                                  world.is_main() and progress, batch_size, num_workers, device, kept_rows)
            if cache:
                from_main(world.group, lambda: None, "waiting for every rank's shards")  # all on disk after this
            if world.is_main():
                features, kept, skipped = cache.gather() if cache else concat_parts(parts)
            # Rank 0 writes the cache (or says why it cannot: then every rank raises); the other ranks then read it.
            finished = []
            from_main(world.group, lambda: finished.append(_finished_result(features, kept, skipped, paths, where,
                                                                             sidecar, cache, stat_rows, kept_rows)),
                      "writing the cache")
            if world.is_main():
                return finished[0]
        features, found = reused[0] if reused else cache.finished()   # (load() is None with overwrite)
        recorded = [[pathlib.Path(io.text_path(p)) for p in found[key]] for key in ("files", "skipped")]
        result = EmbeddingResult(features, *recorded, found, from_cache=todo is None)
        if todo is None and world.is_main():   # reused: the images it skipped are still missing from the rows
            report_skipped(result.skipped, len(paths), where)
        return result


def _embed_shards(model, dataset: ImageDataset, cache: Optional[Cache], ranges, progress: bool, batch_size: int,
                  num_workers: int, device: torch.device, kept_rows: Optional[KeptRows] = None) -> list:
    """Encode the shard ranges in order; with a cache each shard is written to it as soon as it is done (and
    nothing is returned), else the shards' (features, kept indices, skipped indices) are returned. ``kept_rows``:
    what an update keeps of the earlier cache (only the other images are encoded)."""
    was_training = model.training
    model.eval()
    parts = []
    work = [((s, e), kept_rows.to_embed(s, e) if kept_rows else np.arange(s, e)) for s, e in ranges]
    try:
        with progress_bar(sum(len(items) for _, items in work), progress, "img", "embedding images") as bar, \
                worker_deaths_named():
            for (start, end), part in _image_shards(model, dataset, work, batch_size, num_workers, device, bar):
                if kept_rows:
                    part = kept_rows.merged(start, end, part)
                if cache:
                    cache.save_shard(start, end, *part)
                else:
                    parts.append(part)
    finally:
        model.train(was_training)
    return parts


def _finished_result(features, kept, skipped, paths, where: str, sidecar: Dict, cache: Optional[Cache],
                     stat_rows: np.ndarray, kept_rows: Optional[KeptRows]):
    """The result of a computed run, written to the cache when there is one (with the inputs' ``stat_rows``)."""
    if len(kept) == 0:
        if cache:
            cache.discard_empty_run()
        raise none_could_be_read(paths, f" ({where})")
    sidecar.update(rows=int(len(kept)), dim=int(features.shape[1]), dtype="float32", normalized=True,
                   files=[io.path_text(paths[i]) for i in kept], skipped=[io.path_text(paths[i]) for i in skipped])
    if cache:
        cache.finish(features, sidecar, texts={FILE_LIST: io.lines_text(sidecar["files"])},
                     stat_rows=stat_rows)
    n_kept = int((kept_rows.rows != EMBED).sum()) if kept_rows else 0
    result = EmbeddingResult(features, [paths[i] for i in kept], [paths[i] for i in skipped], sidecar,
                             kept_by_update=n_kept)
    report_skipped(result.skipped, len(paths), where)
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
            raise ValueError(f"each template (--template) must be a string with exactly one '{{}}' for the name, "
                             f"got {t!r}")
        try:
            t.format("name")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"template (--template) {t!r} has a field other than its one '{{}}'; write literal "
                             "braces as '{{' and '}}'") from None
    return templates



def _encode_texts(encode_fn, tokenizer, texts: Sequence[str], templates: Sequence[str],
                  device: torch.device) -> np.ndarray:
    """Prompt ensemble of each text: the mean of its per-template unit embeddings, normalised again."""
    prompts = [template.format(text) for text in texts for template in templates]
    per_prompt = encode_batch(encode_fn, tokenizer(prompts), device)
    mean = per_prompt.reshape(len(texts), len(templates), -1).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def _checked_texts(texts: Iterable[str]) -> List[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings (e.g. nouns)")
    texts = list(texts)   # first: the check below would use a generator up
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings (e.g. nouns)")
    broken = name_off_its_line(texts)
    if broken is not None:   # a names file holds one name a line; the cache's digest joins them with line breaks
        raise ValueError(f"texts[{broken}] = {texts[broken]!r} is blank or spans lines; one name per text")
    if not texts:
        raise ValueError("texts is empty; pass at least one name to encode")
    return texts


def _cut_by_the_context(tokenizer, texts: Sequence[str], templates: Sequence[str]) -> List[str]:
    """The texts whose prompt, in some template, holds more tokens than the text encoder reads: open_clip's
    tokenizers cut a prompt at their context length without a word, so such a name is embedded by its start (100
    words of description ending in "dog" and in "cat" got one row). Only prompts of as many UTF-8 bytes as the
    context are tokenized (a byte-level BPE token holds at least one byte): WordNet's 82k names take no time. A
    tokenizer that does not say its context length or count its tokens is not checked."""
    context, encode = getattr(tokenizer, "context_length", None), getattr(tokenizer, "encode", None)
    if not isinstance(context, int) or not callable(encode):
        return []
    room = context - 2   # the start and end tokens
    longest = max(len(t.encode("utf-8")) for t in templates) - 2   # (without the "{}")
    return [text for text in texts if len(text.encode("utf-8", "surrogatepass")) + longest > room
            and any(len(encode(t.format(text))) > room for t in templates)]


@own_grad_and_precision()   # the caller's CPU autocast changed the features (and a cache kept them)
def embed_texts(texts: Iterable[str], model_name: str, pretrained: Optional[str] = None, *,
                templates: Union[str, Sequence[str]] = SEVEN_TEMPLATES, cache_dir: Optional[PathLike] = None,
                batch_size: int = 512, device=None, progress: bool = True, clip=None, shard_size: int = 4096,
                overwrite: bool = False, update: bool = False, seed: Optional[int] = None,
                names_file: Optional[str] = None) -> np.ndarray:
    """float32 [len(texts), D] L2-normalised text embeddings: for each text, every template is filled with it and
    encoded, the unit embeddings are averaged over templates and normalised again (CLIP's prompt ensembling).
    ``texts``: the names, any iterable of str (a generator too). ``batch_size`` counts prompts per forward pass.
    Cached (``embeddings.npy`` + ``embeddings.json`` in ``cache_dir``; ``overwrite``: encoded again; ``update``: a
    cache of the same model and templates made from other texts keeps the rows of the texts it holds and encodes the
    others, see laic.embed_cache) and resumable like embed_images; ``clip`` as there (the tokenizer is its third
    item). ``names_file``: a file of ``cache_dir`` written with the result, one text a line (`laic vocab`'s
    nouns.txt: moved in with the rows, a stop between them left new rows beside the earlier names)."""
    from laic_kernels import checks

    templates = _check_templates(templates)
    texts = _checked_texts(texts)
    checks.int_in_range("batch_size", batch_size, 1, 1 << 20)
    checks.int_in_range("shard_size", shard_size, 1, 1 << 30)
    if overwrite and update:
        raise ValueError("overwrite and update are alternatives (laic vocab --overwrite / --update): overwrite "
                         "encodes every text again, update only those added since; pass one")
    if update and not cache_dir:
        raise ValueError("update=True brings a cache up to date: pass the cache folder as cache_dir (laic vocab --out)")
    if clip is None:
        clip = load_clip(model_name, pretrained, device, seed=seed)
    else:
        check_model_name(model_name)
    model, tokenizer = clip[0], clip[2]
    device = resolve_device(device) if device is not None else model_device(model)
    cut = _cut_by_the_context(tokenizer, texts, templates)
    if cut:
        warn_at_caller(f"{len(cut)} of the {len(texts)} names, in a template, hold more tokens than the text encoder "
                       f"reads ({tokenizer.context_length}, its start and end included) and are embedded by their "
                       f"start alone (names that share it get the same row): {', '.join(map(shown_name, cut[:3]))}"
                       f"{', ...' if len(cut) > 3 else ''}; shorten them")
    identity = _text_identity(model, model_name, templates, texts)
    sidecar = dict(identity, pretrained=None if pretrained is None else str(pretrained))

    cache = (Cache(cache_dir, TEXT_STEM, sidecar, len(texts), shard_size, overwrite, update, texts=texts)
             if cache_dir else None)
    with cache or contextlib.nullcontext():   # the folder is held while this process computes in it
        cached = cache.load() if cache else None
        if cached is not None:
            return cached[0]

        texts_per_batch = max(1, batch_size // len(templates))
        todo = cache.start_run() if cache else [(0, len(texts))]
        kept_rows = cache.text_rows_to_keep(texts) if cache else None
        # Each shard's texts to encode now (an update's kept rows are merged into its shard).
        work = [((s, e), kept_rows.to_embed(s, e) if kept_rows else np.arange(s, e)) for s, e in todo]
        was_training = model.training
        model.eval()
        parts = []
        try:
            encode_fn = text_encoder(model, tokenizer, device)
            with progress_bar(sum(len(items) for _, items in work), progress, "text", "embedding texts") as bar:
                for (start, end), items in work:
                    chunk = []
                    for b in range(0, len(items), texts_per_batch):
                        batch = [texts[i] for i in items[b:b + texts_per_batch]]
                        chunk.append(_encode_texts(encode_fn, tokenizer, batch, templates, device))
                        bar.update(len(chunk[-1]))
                    part = shard_part(chunk, items, np.zeros(0, np.int64))
                    if kept_rows:
                        part = kept_rows.merged(start, end, part)
                    if cache:
                        cache.save_shard(start, end, *part)
                    else:
                        parts.append(part[0])
        finally:
            model.train(was_training)
        features = cache.gather()[0] if cache else np.concatenate(parts).astype(np.float32)
        if cache:
            # The texts, row for row: what a later update keeps rows by.
            sidecar.update(rows=len(texts), dim=int(features.shape[1]), dtype="float32", normalized=True,
                           texts=texts)
            cache.finish(features, sidecar,
                         texts={names_file: io.lines_text(texts)} if names_file else None)
        return features
