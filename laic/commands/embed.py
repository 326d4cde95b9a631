"""Embed a folder of images with an open_clip model, into a cache folder that `laic fit` reads.

OUT receives features.npy (float32 [N, D], L2-normalised), features.json (model, weights digest, preprocessing, the
files in row order, the unreadable files that were skipped), files.txt (the files in row order) and input_stat.npy
(each file's size and time). Running it again reuses the result; an interrupted run resumes where it stopped. An OUT
written for another model or other files is refused (use another OUT, or --overwrite); after images were added,
removed or changed, --update embeds only those added or changed and keeps the rest.

Examples:
  laic embed photos/ --model ViT-B-32 --pretrained openai --out cache/photos
  laic embed photos/ --model ViT-B-32 --pretrained ~/weights/vit-b-32.pt --out cache/photos
  laic embed photos/ --model ViT-B-32 --pretrained openai --out cache/photos --update   # after adding photos
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional

from .common import add_device_argument, check_seed, file_stamp, int_at_least


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --pretrained / --seed / --device, shared with `laic vocab`."""
    parser.add_argument("--model", required=True,
                        help="open_clip model name, e.g. ViT-B-32 (see open_clip.list_models())")
    parser.add_argument("--pretrained", required=True, metavar="PATH|TAG",
                        help="weights: a local file, or an open_clip tag such as 'openai' (downloaded once); "
                             "'random' for random weights drawn from --seed (testing only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --pretrained random (default 0)")
    add_device_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="cache folder for features.npy + features.json")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int_at_least(0), default=2,
                        help="image decoding processes (default 2; 0: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="compute the features again, replacing those in DIR (made with another model or for "
                             "other files, or with images skipped as unreadable then)")
    parser.add_argument("--update", action="store_true",
                        help="bring DIR, embedded by the same model and preprocessing, up to date with FOLDER: keep "
                             "the features of the files unchanged since (same path, size and modification time), "
                             "embed those added or changed (and those skipped as unreadable before), drop those "
                             "removed; also finishes a run stopped before files changed, keeping what it embedded")
    parser.add_argument("--shard-size", type=int_at_least(1), default=1024,
                        help="images per resumable shard (default 1024; under torchrun the shards are dealt out to "
                             "the processes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# Skipped images listed with the reason they could not be read (the rest by path alone).
SKIPPED_WITH_REASONS = 10
# Under torchrun each process embeds its share of the shards into the one cache folder (laic.embed.embed_images).
DISTRIBUTED = True


def _check_model(model: str) -> None:
    """--model names an open_clip model: said with the flag (the library's own check names its argument model_name),
    before anything is loaded; under torchrun a step every process takes (one refused on one process alone stops
    them all, said by process 0, naming that one)."""
    from ..clip import check_model_name
    from ..distributed import current, stop_all_on_failure

    stop_all_on_failure(current().group, lambda: check_model_name(model, "--model"), "checking --model")


def run(args) -> int:
    import warnings

    from ..distributed import is_main
    from ..embed import UnreadableImagesWarning, embed_images, why_unreadable
    from ..embed_cache import IMAGE_STEM
    from ..runtime import resolve_device

    resolve_device(args.device, "--device")   # a bad device fails here, naming the option, before any loading
    check_seed(args.seed)
    _check_model(args.model)
    # interrupted(): a sidecar written by this run, or an earlier one's (kept until this run's replaces it).
    args.sidecar_before = file_stamp(pathlib.Path(args.out).expanduser() / f"{IMAGE_STEM}.json")
    with warnings.catch_warnings():
        # Reported below, in full, instead of as a warning.
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        result = embed_images(args.folder, args.model, args.pretrained, cache_dir=args.out, seed=args.seed,
                              batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                              progress=not args.quiet, overwrite=args.overwrite, update=args.update,
                              shard_size=args.shard_size)
    if not is_main():
        return 0
    n, d = result.features.shape
    how = "reused from the cache" if result.from_cache else "computed"
    if result.kept_by_update:
        how = (f"{len(result.paths) + len(result.skipped) - result.kept_by_update} computed, the others kept from the "
               "earlier cache")
    out = pathlib.Path(args.out)
    print(f"{n} images embedded ({d} dims, {how}) in {out / 'features.npy'}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s) (listed in {out / 'features.json'}):",
              file=sys.stderr)
        # Why, for the first few (each is read again): a broken file and one over PIL's size limit need other fixes.
        for i, path in enumerate(result.skipped):
            print(f"  {path}" + (f" ({why_unreadable(path)})" if i < SKIPPED_WITH_REASONS else ""), file=sys.stderr)
    return 0


def resumable(args) -> Optional[str]:
    """How to go on after a failure that was the machine's (for laic.cli): the shards finished so far are kept."""
    from ..embed_cache import shard_progress

    progress = shard_progress(args.out)
    if progress is None or progress[0] == 0:
        return None
    return f"{progress[0]} of {progress[1]} shards are kept: rerun to resume"


def interrupted(args) -> str:
    """What Ctrl-C left in OUT (for laic.cli)."""
    from ..embed_cache import IMAGE_STEM, earlier_rows_dir, shard_progress

    progress = shard_progress(args.out)
    sidecar = pathlib.Path(args.out).expanduser() / f"{IMAGE_STEM}.json"
    if progress is None and file_stamp(sidecar) not in (None, getattr(args, "sidecar_before", None)):
        # Written last, by this run: the cache is complete (a stop while its shards were deleted said "untouched").
        return f"interrupted; the cache in {args.out} is complete ({IMAGE_STEM}.npy and {IMAGE_STEM}.json)"
    if progress is None and earlier_rows_dir(args.out).is_dir():   # an update stopped as it took a run over
        return "interrupted; the rows it took over from the interrupted run are kept: rerun with --update to go on"
    if progress is None:
        return f"interrupted before any image was embedded; {args.out} is untouched"
    return f"interrupted after {progress[0]} of {progress[1]} shards; rerun to resume"
