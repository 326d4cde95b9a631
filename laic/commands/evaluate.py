"""Score a clustering against ground-truth labels: ACC (Hungarian matching), NMI and ARI.

--labels is the ground truth, [N] class ids >= 0 (or class names, or booleans) in a .npy; the clustering is --pred
(a .npy of cluster ids, e.g. from `laic predict`) or --run (a RUN_DIR from `laic fit`, its labels.npy). Labels are only
ever used here, for scoring.

Example:
  laic evaluate --labels labels.npy --run runs/cifar10
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from ..io import read_labels
from ..metrics import evaluate


def needs_torch(args: argparse.Namespace) -> bool:
    """Two label files are scored with numpy alone: laic.cli need not load torch first. --run reads the run through
    laic.run_dir, which loads it: loaded before the command, where a stop during its import is only noted."""
    return args.run is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, metavar="TRUE.npy",
                        help="ground-truth labels [N]: class ids >= 0, class names or booleans")
    pred = parser.add_mutually_exclusive_group(required=True)
    pred.add_argument("--pred", metavar="PRED.npy", help="predicted cluster ids, int [N]")
    pred.add_argument("--run", metavar="RUN_DIR", help="a run folder from `laic fit` (its labels.npy)")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")


def check_not_the_truth(args: argparse.Namespace) -> None:
    """The clustering read is not --labels itself: `--run data` (meant: data/run), a folder whose labels.npy is the
    ground truth, scored the truth against itself, 100 % (a QA check)."""
    pred_arg, given = ("--run", pathlib.Path(args.run).expanduser() / "labels.npy") if args.run is not None \
        else ("--pred", pathlib.Path(args.pred).expanduser())
    truth = pathlib.Path(args.labels).expanduser()
    if truth.is_file() and given.is_file() and truth.resolve() == given.resolve():
        raise ValueError(f"{pred_arg} {args.run if args.run is not None else args.pred}: reads {given}, which is "
                         f"--labels itself; pass the clustering to score (a RUN_DIR from `laic fit`, or its labels)")


def run(args: argparse.Namespace) -> int:
    check_not_the_truth(args)
    truth = read_labels(args.labels, "--labels", truth=True)
    if args.run is not None:
        from .. import run_dir

        pred_arg, pred = "--run", run_dir.read_labels(args.run, "--run")
    else:
        pred_arg, pred = "--pred", read_labels(args.pred, "--pred")
    if (pred < -1).any():
        raise ValueError(f"{pred_arg} holds cluster id {int(pred.min())}: cluster ids are >= 0, and -1 only marks an "
                         "image `laic predict` could not read")
    if truth.size != pred.size:
        raise ValueError(f"--labels has {truth.size} labels but {pred_arg} has {pred.size}; they must describe the "
                         f"same images in the same order")
    scores = evaluate(truth, pred)
    unclustered = int((pred < 0).sum())
    clusters = int(np.unique(pred[pred >= 0]).size)
    if args.json:
        print(json.dumps({**scores, "n": int(truth.size), "classes": int(np.unique(truth).size),
                          "clusters": clusters, "unclustered": unclustered}))
        return 0
    print(f"{truth.size} images, {np.unique(truth).size} classes, {clusters} clusters")
    if unclustered:
        print(f"  {unclustered} image{'s' if unclustered != 1 else ''} without a cluster (-1: unreadable in "
              "`laic predict`): wrong for ACC, each a cluster of its own for ARI, for NMI the lesser of that and one "
              "cluster")
    for name in ("acc", "nmi", "ari"):
        print(f"  {name.upper()}  {100 * scores[name]:6.2f} %")
    return 0
