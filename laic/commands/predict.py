"""Assign images to the clusters of a fitted run.

--model is a RUN_DIR written by `laic fit` (or its model file). Either --features as for `laic fit` (a .npy [N, D] or a
`laic embed` folder), from the same CLIP model, assigned by the stage-1 model; or, for a run fitted with --images
(stage 2, it holds stage2.pt), --images DIR: the images of DIR, in the order `laic embed` lists them (sorted by path
relative to DIR), assigned by the fine-tuned encoder. Writes int64 cluster ids [N] to --out, and with --proba the
cluster probabilities [N, K] (float32).

Examples:
  laic predict --model runs/cifar10 --features new_cache/ --out new_labels.npy
  laic predict --model runs/photos --images new_photos/ --out new_labels.npy
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from .. import io
from .fit import STAGE2_FILE, load_features, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a run folder written by `laic fit`")
    parser.add_argument("--features", metavar="F.npy|DIR", help="image features to assign")
    parser.add_argument("--images", metavar="DIR",
                        help="images to assign with the fine-tuned encoder (runs fitted with --images)")
    parser.add_argument("--out", required=True, metavar="LABELS.npy", help="where to write the cluster ids")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--proba", metavar="PROBA.npy", help="also write the cluster probabilities [N, K] here")


def model_path(run_dir: str) -> pathlib.Path:
    p = pathlib.Path(run_dir).expanduser()
    if p.is_dir() and (p / "model").exists():
        return p / "model"
    if p.exists() and p.name == "model":
        return p
    raise FileNotFoundError(f"--model {run_dir}: no fitted model there (expected RUN_DIR/model, written by "
                            f"`laic fit --out RUN_DIR`)")


def features_proba(args: argparse.Namespace) -> np.ndarray:
    """Stage-1 probabilities of --features."""
    from ..model import LAIC

    path = model_path(args.model)
    features, _ = load_features(args.features)
    model = LAIC.load(path, device=resolve_device(args.device))
    dim = getattr(model, "n_features_in_", None)
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"--features has dimension {features.shape[1]} but the model in --model {args.model} was "
                         f"fitted on dimension {dim}; use features from the same CLIP model")
    return np.asarray(model.predict_proba(features), dtype=np.float32)


def images_proba(args: argparse.Namespace) -> np.ndarray:
    """Probabilities of the images of --images by the run's fine-tuned encoder, rebuilt on the recorded base model."""
    from .. import stage2
    from ..images import list_images

    run_dir = model_path(args.model).parent
    if not (run_dir / STAGE2_FILE).is_file():
        raise FileNotFoundError(f"--model {args.model}: this run has no fine-tuned encoder ({STAGE2_FILE}); --images "
                                "needs a run fitted with `laic fit --images`, use --features for this one")
    encoder_info = json.loads((run_dir / "run.json").read_text())["encoder"]
    paths = list_images(args.images)
    device = resolve_device(args.device)
    clip = stage2.load_base_clip(encoder_info["model"], encoder_info["pretrained"], seed=encoder_info["seed"],
                                 device=device)
    encoder = stage2.FineTunedEncoder.load(run_dir / STAGE2_FILE, clip[0], device=device)
    return encoder.predict_proba(paths)


def run(args: argparse.Namespace) -> int:
    if (args.features is None) == (args.images is None):
        raise ValueError("pass what to assign: --features F.npy|DIR, or --images DIR (runs fitted with --images)")
    probs = features_proba(args) if args.features is not None else images_proba(args)
    labels = probs.argmax(1).astype(np.int64)
    io.save_npy(args.out, labels)
    if args.proba:
        io.save_npy(args.proba, probs)
    sizes = np.bincount(labels, minlength=probs.shape[1])
    print(f"laic predict: {labels.size} images into {probs.shape[1]} clusters; sizes {' '.join(map(str, sizes))}")
    print(f"wrote {args.out}" + (f" and {args.proba}" if args.proba else ""))
    return 0
