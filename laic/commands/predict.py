"""Assign images to the clusters of a fitted run.

--model is a RUN_DIR written by `laic fit` (or its model file, or a file written by LAIC.save). Either --features as
for `laic fit` (a .npy [N, D] or a `laic embed` folder), from the same CLIP model, assigned by the fitted model
(stage 1's heads where the fit kept them, else its fused k-means centres or its semantic centres; on a run
fitted with --images these are the stage-1 model's, on the base encoder's features, not the fine-tuned encoder's
assignment: that is --images); or, for a run fitted with --images (stage 2), --images DIR: the images of DIR, in the order `laic embed` lists them
(sorted by path relative to DIR), assigned by the fine-tuned encoder, with a progress bar on stderr unless --quiet; an
image that cannot be read is reported and gets cluster -1 (its row of probabilities is NaN), so that row i is still
image i. The fine-tuned encoder is rebuilt on the base weights the fit recorded (a file's absolute path, or an
open_clip tag): where that file has moved, --pretrained names where it is now. Writes int64 cluster ids [N] to
--out (a .npy), or with --out X.csv each image's path, cluster and the cluster's names, one image a line (as `laic
report`'s assignments.csv; for --images, or --features of a `laic embed` folder, which lists its files), and with
--proba the cluster probabilities [N, K] (float32, a .npy); a file already there is replaced only with --overwrite,
and never one that laic wrote in a run or an embedding folder (another run's labels, a cache's sidecar).

Examples:
  laic predict --model runs/cifar10 --features new_cache/ --out new_labels.npy
  laic predict --model runs/photos --images new_photos/ --out new_labels.npy
  laic predict --model runs/photos --images new_photos/ --out new_photos.csv
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import warnings
from typing import List, Optional, Tuple

import numpy as np

from .. import io
from ..assignment import labels_of
from .common import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="a run folder written by `laic fit`, or a model file (LAIC.save)")
    parser.add_argument("--features", metavar="F.npy|DIR", help="image features to assign")
    parser.add_argument("--images", metavar="DIR",
                        help="images to assign with the fine-tuned encoder (runs fitted with --images)")
    parser.add_argument("--pretrained", metavar="PATH|TAG",
                        help="with --images: the base encoder's weights where the file the run recorded has moved "
                             "(checked against the weights the run was fitted from)")
    parser.add_argument("--out", required=True, metavar="LABELS.npy|X.csv",
                        help="where to write the cluster ids: a .npy [N], or a .csv of each image's path, cluster "
                             "and names (for --images, or --features of a `laic embed` folder)")
    add_device_argument(parser)
    parser.add_argument("--proba", metavar="PROBA.npy", help="also write the cluster probabilities [N, K] here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (with --images)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out / --proba where they exist (never a file laic wrote in a run or an "
                             "embedding folder)")


# With --images a bar on stderr as the images are embedded (laic.cli), unless --quiet.
PROGRESS = True


def features_proba(model, args: argparse.Namespace) -> Tuple[np.ndarray, Optional[List[str]]]:
    """Stage-1 probabilities of --features, and the image files of their rows (None for a bare array)."""
    from ..embed_cache import check_same_encoder, read_features
    from ..run_dir import model_path, recorded_encoder

    run_features = model_path(args.model).parent / "features.npy"   # --model is RUN_DIR or RUN_DIR/model
    given = pathlib.Path(args.features).expanduser().resolve()
    if getattr(model, "stage2_", None) is not None and run_features.is_file() and \
            given in (run_features.resolve(), run_features.parent.resolve()):
        raise ValueError(f"--features {args.features}: this run's features.npy holds its fine-tuned encoder's "
                         "embeddings, but --features are scored by the stage-1 model, fitted on the base encoder's; "
                         "predict with --images (the fine-tuned model), or pass the base encoder's features")
    features, sidecar = read_features(args.features)
    if features.shape[1] != model.n_features_in_:
        raise ValueError(f"--features has dimension {features.shape[1]} but the model in --model {args.model} was "
                         f"fitted on dimension {model.n_features_in_}; use features from the same CLIP model")
    check_same_encoder(sidecar, recorded_encoder(args.model), "--features", "--model")
    files = sidecar.get("files") if sidecar is not None else None
    if _as_csv(args.out) and not files:
        raise ValueError(f"--out {args.out}: a .csv lists each image's file, and --features {args.features} names "
                         "none (an array without a `laic embed` folder's file list); write the labels as .npy")
    return np.asarray(model.predict_proba(features), dtype=np.float32), files


def images_proba(model, args: argparse.Namespace) -> Tuple[np.ndarray, List[str]]:
    """Probabilities of the images of --images by the run's fine-tuned encoder (rebuilt on the recorded base
    model), and the images' files; unreadable images are reported on stderr."""
    from ..embed import UnreadableImagesWarning
    from ..images import list_images
    from ..run_dir import OLD_STAGE2_FILE

    if getattr(model, "stage2_", None) is None:
        if (pathlib.Path(args.model).expanduser() / OLD_STAGE2_FILE).is_file():
            raise ValueError(f"--model {args.model}: this run was written by an older laic ({OLD_STAGE2_FILE} beside "
                             "the model); refit it with `laic fit --images` to predict on images")
        raise ValueError(f"--model {args.model}: this run has no fine-tuned encoder; --images needs a run fitted "
                         "with `laic fit --images`, use --features for this one")
    paths = list_images(args.images, "--images")
    clip = base_encoder(model, args.pretrained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableImagesWarning)
        probs = model.predict_images_proba(paths, clip)
    for warning in caught:
        if issubclass(warning.category, UnreadableImagesWarning):
            print(f"laic predict: {warning.message} (cluster -1)", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return probs, [io.path_text(p) for p in paths]


def base_encoder(model, pretrained):
    """The base encoder loaded from --pretrained, checked to be the one the run was fitted from; None without it
    (the run's recorded weights are loaded)."""
    from ..clip import clip_model, load_clip, module_change, module_classes, weights_digest

    if pretrained is None:
        return None
    record = model.stage2_.clip
    clip = load_clip(record["model"], pretrained, model.torch_device(), seed=record["seed"])
    if weights_digest(clip_model(clip)) != record["weights_digest"]:
        raise ValueError(f"--pretrained {pretrained}: holds other weights than the base encoder this run was "
                         f"fitted from ({record['pretrained']}, model {record['model']}); pass that file")
    layers = module_classes(clip_model(clip))
    if record.get("modules") not in (None, layers):
        # (a fit given its encoder as clip= alone records no weights to name)
        how = (f"pass --pretrained {record['pretrained']} as the fit did" if record.get("pretrained") is not None
               else "the fit was given that encoder from Python (clip=): predict from Python with it as clip=")
        raise ValueError(f"--pretrained {pretrained}: holds the base encoder's weights, but loads built of other "
                         f"layers than at the fit ({module_change(record['modules'], layers)}: an open_clip tag "
                         f"such as OpenAI's builds QuickGELU, a file GELU); {how}")
    return clip


SIZES_SHOWN = 40   # cluster sizes printed (at K = 500 the line held 500 numbers)
WHAT_IT_WRITES = {"--out": "labels", "--proba": "probabilities"}   # in the refusals of an output path
EXAMPLE_NAME = {"--out": "labels.npy", "--proba": "proba.npy"}


def check_output_files(args: argparse.Namespace) -> None:
    """--out and --proba are two file names, neither a folder nor one of the inputs nor a file laic wrote in a run
    or an embedding folder (never overwritten), nor an existing file without --overwrite; --out a .npy or a .csv,
    --proba a .npy."""
    outputs = {arg: pathlib.Path(path).expanduser() for arg, path in (("--out", args.out), ("--proba", args.proba))
               if path is not None}
    for arg, path in outputs.items():
        io.check_name_length(path, arg)   # first: past the limit, path.is_dir() itself raised
        if path.is_dir():
            raise ValueError(f"{arg} {path}: is a folder; pass a file name such as {path / EXAMPLE_NAME[arg]}")
        io.check_can_create(path, arg)   # now, not after the images are assigned
    if len({path.resolve() for path in outputs.values()}) < len(outputs):
        raise ValueError(f"--out and --proba name the same file ({args.out}); pass two file names")
    for name, source in (("--features", args.features), ("--model", args.model)):
        if source is None:
            continue
        source = pathlib.Path(source).expanduser().resolve()
        # A file of a run folder (RUN_DIR/model) stands for its run: RUN_DIR/labels.npy was replaced by new rows.
        folder = source if source.is_dir() else source.parent if (source.parent / "clusters.json").is_file() \
            else None
        inputs = {p.resolve() for p in folder.iterdir()} if folder is not None else {source}
        for arg, path in outputs.items():
            if path.resolve() in inputs:
                raise ValueError(f"{arg} {path}: is a file of {name} {folder or source}; write the "
                                 f"{WHAT_IT_WRITES[arg]} elsewhere")
    for arg, path in outputs.items():
        # Replaced without a word before: another run's labels.npy (its report then named its clusters on these
        # labels), a cache's features.json (the cache then "damaged"), a data set's own labels.
        owner = laic_folder_of(path)
        if owner is not None and path.exists():
            raise ValueError(f"{arg} {path}: is a file laic wrote in {owner}; write the {WHAT_IT_WRITES[arg]} "
                             "elsewhere")
    # (Any other name was written as .npy bytes: labels.txt held a binary array.) Before "exists": its advice,
    # --overwrite, led to this refusal.
    if pathlib.Path(args.out).suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"--out {args.out}: the cluster ids are written as a .npy array [N], or as a .csv of each "
                         "image's path and cluster; name the file .npy or .csv")
    if args.proba is not None and pathlib.Path(args.proba).suffix.lower() != ".npy":
        raise ValueError(f"--proba {args.proba}: the probabilities are written as a .npy array [N, K]; name the file "
                         ".npy")
    for arg, path in outputs.items():
        if path.exists() and not args.overwrite:
            raise ValueError(f"{arg} {path}: exists; pass --overwrite to replace it, or write elsewhere")


def _as_csv(path) -> bool:
    return pathlib.Path(path).suffix.lower() == ".csv"


def laic_folder_of(path: pathlib.Path):
    """The laic folder ``path`` is one of the files of, in words ("the run runs/a", "the embedding folder cache"),
    or None."""
    from ..embed_cache import FILE_LIST, IMAGE_STEM, INPUT_STAT, TEXT_STEM
    from ..run_dir import RUN_FILES
    from ..vocab import NAMES_FILE

    folder = path.parent
    if path.name in RUN_FILES and (folder / "clusters.json").is_file():
        return f"the run {folder}"
    cache_files = {f"{stem}.{ext}" for stem in (IMAGE_STEM, TEXT_STEM) for ext in ("npy", "json")}
    cache_files |= {FILE_LIST, INPUT_STAT, NAMES_FILE}
    if path.name in cache_files and any((folder / f"{stem}.json").is_file() for stem in (IMAGE_STEM, TEXT_STEM)):
        return f"the embedding folder {folder}"
    return None


def load_model(args: argparse.Namespace, device):
    """The model of --model, on ``device``; a file that holds none is refused naming --model and the run folder to
    pass (LAIC.load's refusals name the file alone, and advise Python: "save the model again")."""
    from ..model import LAIC
    from ..run_dir import MODEL_FILE, model_path

    path = model_path(args.model)
    try:
        return LAIC.load(path, device=str(device))
    except ValueError as exc:
        message = str(exc).replace("save the model again", "fit the run again (laic fit --overwrite)")
        beside = path.parent / MODEL_FILE
        hint = f"; its run folder is {path.parent}, pass that" if path != beside and beside.is_file() else ""
        raise ValueError(f"--model: {message}{hint}") from None


def run(args: argparse.Namespace) -> int:
    from ..runtime import fitting_device

    if args.features is not None and args.images is not None:
        raise ValueError("pass one of --features and --images, not both (--images: runs fitted with --images)")
    if args.features is None and args.images is None:
        raise ValueError("pass what to assign: --features F.npy|DIR, or --images DIR (runs fitted with --images)")
    if args.pretrained is not None and args.images is None:
        raise ValueError("--pretrained goes with --images (the base encoder the fine-tuned one is rebuilt on); "
                         "--features needs no encoder")
    check_output_files(args)
    model = load_model(args, fitting_device(args.device, "--device"))
    probs, files = features_proba(model, args) if args.features is not None else images_proba(model, args)
    labels = labels_of(probs)
    if _as_csv(args.out):
        from ..report import assignments_writer

        out = assignments_writer(files, labels, model.cluster_names_)
    else:
        out = io.npy_writer(labels)
    # Together: a stop leaves both as they were, never new labels beside earlier probabilities.
    io.replace_together({args.out: out, **({args.proba: io.npy_writer(probs)} if args.proba else {})})
    sizes = np.bincount(labels[labels >= 0], minlength=probs.shape[1])
    shown = " ".join(map(str, sizes[:SIZES_SHOWN])) + (f" ... ({sizes.size - SIZES_SHOWN} more)"
                                                       if sizes.size > SIZES_SHOWN else "")
    images = "image" if labels.size == 1 else "images"
    print(f"laic predict: {labels.size} {images} into {probs.shape[1]} clusters; sizes {shown}")
    print(f"wrote {args.out}" + (f" and {args.proba}" if args.proba else ""))
    return 0
