"""Assign image features to the clusters of a fitted run.

--model is a RUN_DIR written by `laic fit` (or its model file); --features as for `laic fit` (a .npy [N, D] or a
`laic embed` folder), from the same CLIP model. Writes int64 cluster ids [N] to --out, and with --proba the
cluster probabilities [N, K] (float32).

Example:
  laic predict --model runs/cifar10 --features new_cache/ --out new_labels.npy
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

from .. import io
from .fit import load_features, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a run folder written by `laic fit`")
    parser.add_argument("--features", required=True, metavar="F.npy|DIR", help="image features to assign")
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


def run(args: argparse.Namespace) -> int:
    from ..model import LAIC

    path = model_path(args.model)
    features, _ = load_features(args.features)
    model = LAIC.load(path, device=resolve_device(args.device))
    dim = getattr(model, "n_features_in_", None)
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"--features has dimension {features.shape[1]} but the model in --model {args.model} was "
                         f"fitted on dimension {dim}; use features from the same CLIP model")
    labels = np.asarray(model.predict(features), dtype=np.int64)
    io.save_npy(args.out, labels)
    if args.proba:
        io.save_npy(args.proba, np.asarray(model.predict_proba(features), dtype=np.float32))
    sizes = np.bincount(labels, minlength=model.n_clusters)
    print(f"laic predict: {labels.size} images into {model.n_clusters} clusters; sizes {' '.join(map(str, sizes))}")
    print(f"wrote {args.out}" + (f" and {args.proba}" if args.proba else ""))
    return 0
