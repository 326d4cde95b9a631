"""Cluster images into K named clusters and save the run (stages 0 and 1; stage 2 with --images).

Inputs: image features, either a .npy [N, D] or a folder written by `laic embed` (features.npy + features.json), and
a noun vocabulary with embeddings: a folder with embeddings.npy + nouns.txt (as written by `laic vocab`).
Labels are never an input: clustering is unsupervised (score it afterwards with `laic evaluate`).

Stage 2 (self-enhancement): with --images DIR --model NAME --pretrained P instead of --features, the images are
embedded with that open_clip model (reusing or filling a `laic embed` cache given by --embed-cache), stages 0 and 1
cluster them, and the vision encoder is then fine-tuned on the model's confident clusters (laic.stage2; settings with
--stage2 NAME=VALUE, see help(laic.stage2.Stage2Config)). After every epoch a checkpoint goes to
RUN_DIR.stage2-checkpoint/ beside RUN_DIR; --resume continues an interrupted run from it (with the same inputs and
settings), and it is removed once the run is written.

RUN_DIR receives, all at once when the fit succeeds (nothing is written if it fails):
  model          the fitted LAIC estimator (laic.LAIC.load(RUN_DIR/model); used by `laic predict`), with the
                 fine-tuned part of the encoder after stage 2
  labels.npy     int64 [N], the cluster of each image
  clusters.json  per cluster: its size and its names (the nouns nearest its centre)
  run.json       the inputs and settings of the run
and with --profile also profile.json (wall time and peak memory per step, laic.profiling; with --images also the
embedding of the images and one step per stage-2 epoch) and trace.json (a torch.profiler Chrome trace of the fit; with
--images on the CPU only, as on CUDA it would hold every kernel of every training step; on the CPU it grows with every
epoch: profile stage 2 there on small runs).
With --images, also (so that `laic report RUN_DIR` works):
  features.npy   float32 [N, D], the fine-tuned embeddings of the images
  images.txt     the N readable images, one path per line, in row order (unreadable ones are skipped)

As it runs, each step of the fit prints its wall time on stderr as it ends (with --images also each stage-2 epoch, with
its loss); --quiet hides these lines.

Method switches (LAIC's options of the same names, with its defaults: --neighbour-filter text, --relation-fused
auto, --pseudo-labels kmeans; --relation-view and --semantic-centres off):
--neighbour-filter, --relation-view, --relation-fused, --semantic-centres and --pseudo-labels (see their help
below); the run records those set away from the default in run.json's "options", with any --set NAME=VALUE.

Under torchrun (`torchrun --nproc_per_node=G -m laic fit --features ...`) each process reads its block of the
feature rows and they fit together (laic.distributed); process 0 alone writes RUN_DIR, the run one process writes
(labels equal up to float reduction order). With --images each process also fine-tunes stage 2 on its share of every
batch (DDP; --embed-cache required); --k auto searches K on all processes' rows together.

Examples:
  laic fit --features cache/ --vocab vocab/ --k 10 --out runs/cifar10
  torchrun --nproc_per_node=4 -m laic fit --features cache/ --vocab vocab/ --k 1000 --out runs/big
  laic fit --images photos/ --model ViT-B-32 --pretrained openai --vocab vocab/ --k 10 --out runs/photos \\
      --stage2 epochs=5 --stage2 n_blocks=2
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from .common import (add_device_argument, add_method_arguments, add_threads_argument, arguments_named_as_flags,
                     describe_options, fit_settings, new_model, process_arguments, publish_fit, recorded_path,
                     run_dir_of, threads_for_the_run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", metavar="F.npy|DIR",
                        help="image features: a .npy [N, D], or a folder written by `laic embed` (or use --images)")
    parser.add_argument("--vocab", required=True, metavar="DIR",
                        help="noun vocabulary with embeddings (a folder with embeddings.npy + nouns.txt, e.g. from "
                             "`laic vocab`)")
    parser.add_argument("--k", required=True, metavar="K|auto",
                        help="number of clusters K (2 <= K <= N, with N >= 3 images), or 'auto': chosen without "
                             "labels (laic.select_k), the score of every candidate K printed")
    parser.add_argument("--k-range", metavar="LO:HI",
                        help="with --k auto: the range of K searched (default 2 to N/4, at most 2048)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for the run's files")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_device_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the LAIC estimator, e.g. --set stage1_steps=100, VALUE a Python literal (True, 0.1, "
                             "None; repeatable; see "
                             "help(laic.LAIC)); options with a flag of their own (--k, --k-range, --seed, --device, "
                             "--threads, --profile, the method switches) are set with that flag")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in RUN_DIR")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default each step of the fit prints its time there as it "
                             "ends; with --images each stage-2 epoch its loss, and the passes over the images a bar)")
    parser.add_argument("--profile", action="store_true",
                        help="record wall time and peak memory of each step of the fit (with --images also each "
                             "stage-2 epoch): RUN_DIR/profile.json, a torch.profiler Chrome trace RUN_DIR/trace.json "
                             "(with --images on the CPU only), and a table printed here")
    add_method_arguments(parser)
    stage2 = parser.add_argument_group("stage 2 (fine-tune the image encoder; instead of --features)")
    stage2.add_argument("--images", metavar="DIR", help="folder of images (searched recursively), embedded with "
                                                         "--model and then used to fine-tune it")
    stage2.add_argument("--model", help="open_clip model name, e.g. ViT-B-32 (the one --vocab was encoded with)")
    stage2.add_argument("--pretrained", metavar="PATH|TAG",
                        help="its weights: a local file, an open_clip tag such as 'openai', or 'random' (random "
                             "weights drawn from --seed; testing only)")
    stage2.add_argument("--embed-cache", metavar="DIR",
                        help="a `laic embed` cache folder of these images and this model: reused when it holds them, "
                             "filled otherwise")
    stage2.add_argument("--stage2", dest="stage2_options", action="append", default=[], metavar="NAME=VALUE",
                        help="a stage-2 setting, e.g. --stage2 epochs=5 (repeatable; see "
                             "help(laic.stage2.Stage2Config))")
    stage2.add_argument("--resume", action="store_true",
                        help="continue an interrupted stage-2 run from RUN_DIR.stage2-checkpoint/")


# Under torchrun the processes share the rows of --features, or of --images and stage 2's batches.
DISTRIBUTED = True
# Each step's end (and each stage-2 epoch) is a line on stderr as the fit runs (laic.cli), unless --quiet.
PROGRESS = True


def run(args: argparse.Namespace) -> int:
    from ..distributed import CollectiveError, current, same_on_all_ranks

    world = current()
    # Processes given other arguments would fit other data or settings together (or stop in a collective with an
    # error that names nothing): refused before anything else is read.
    same_on_all_ranks(world.group, process_arguments(args))
    # Refusals that every process reaches alike are CollectiveErrors: process 0 alone prints them.
    if args.images is not None:
        from .fit_images import run_images
        return run_images(args)
    if args.features is None:
        raise CollectiveError("pass the images: --features F.npy|DIR (precomputed features), or --images DIR --model "
                              "NAME --pretrained P (embed them and fine-tune the encoder)")
    _refuse_stage2_flags(args)
    from ..distributed import RowBlocks, from_main, gather_labels, stop_all_on_failure
    from ..runtime import torch_threads
    from .k_search import cli_k_options, k_search_record, print_k_choice

    # Check everything before the (possibly long) fit, so a typo costs nothing; on every process, and a bad input
    # on one of them stops all of them.
    features, feature_sidecar, fingerprint, vocab = stop_all_on_failure(
        world.group, lambda: _read_inputs(args, world), "reading the inputs")
    # The same path can name different files on two machines (or a file rewritten meanwhile): the rows would mix.
    same_on_all_ranks(world.group, {"--features (the file's contents)": fingerprint,
                                    "--vocab (its nouns and embeddings)": _vocabulary_digest(vocab)})
    rows = RowBlocks(len(features), world.group)
    n_images = rows.n_rows
    _check_enough_rows(args.features, rows, world.size)
    try:   # the same arguments and N on every process: each refuses alike
        n_clusters, k_range = cli_k_options(args.k, args.k_range, n_images)
    except ValueError as exc:
        raise CollectiveError(str(exc)) from None
    options, out, device = stop_all_on_failure(world.group, lambda: fit_settings(args), "checking the options")
    processes = f", {world.size} processes" if world.size > 1 else ""
    if world.is_main():
        print(f"laic fit: {n_images} images, {len(vocab)} nouns, D = {features.shape[1]}, K = {args.k}, "
              f"device {device}{processes}{describe_options(options)}")
    start = time.perf_counter()
    model = new_model(args, n_clusters, k_range, device, options)
    threads = threads_for_the_run(args.threads)
    with torch_threads(threads, "--threads"), arguments_named_as_flags(args, f"--features {args.features}"):
        model.fit(features, vocab.embeddings, noun_names=vocab.names)
    gather_labels(model)   # all labels on process 0, which alone writes the run
    if not world.is_main():
        from_main(world.group, lambda: None, "writing the run")   # wait for process 0's run (or its error)
        return 0
    args.k = print_k_choice(model)
    seconds = time.perf_counter() - start
    run_info = {"features": recorded_path(args.features), "features_fingerprint": fingerprint,
                "vocab": recorded_path(args.vocab), "k": args.k,
                "seed": args.seed,
                "device": device, "threads": threads, "options": options,
                "n_images": n_images, "n_nouns": len(vocab), "dim": int(features.shape[1]),
                "fit_seconds": round(seconds, 3),
                "encoder": {k: (feature_sidecar or {}).get(k) for k in ("model", "weights_digest", "modules")},
                **k_search_record(model, k_range, n_images)}

    def published():
        args.published = True   # for interrupted(): a Ctrl-C from here on finds the run complete

    return publish_fit(args, world, model, out, seconds, run_info, published)


def _refuse_stage2_flags(args: argparse.Namespace) -> None:
    from ..distributed import CollectiveError

    stage2_only = [flag for flag, value in (("--model", args.model), ("--pretrained", args.pretrained),
                                            ("--embed-cache", args.embed_cache), ("--stage2", args.stage2_options),
                                            ("--resume", args.resume)) if value]
    if stage2_only:
        verb = "applies" if len(stage2_only) == 1 else "apply"
        raise CollectiveError(f"{', '.join(stage2_only)} only {verb} to stage 2, which needs the images: pass "
                              "--images DIR instead of --features")


def _check_enough_rows(features_arg, rows, world_size: int) -> None:
    """Enough images for a fit, and a row at least for every process (alike on every process: CollectiveErrors)."""
    from ..distributed import CollectiveError
    from ..model import MIN_IMAGES

    if rows.n_rows < MIN_IMAGES:
        raise CollectiveError(f"--features {features_arg}: holds {rows.n_rows} image(s); laic needs at least "
                              f"{MIN_IMAGES}")
    if 0 in rows.counts:
        raise CollectiveError(f"--features holds {rows.n_rows} images, fewer than the {world_size} processes: run at "
                              f"most {rows.n_rows} processes (e.g. torchrun --nproc_per_node {rows.n_rows})")


def _vocabulary_digest(vocab) -> str:
    """The vocabulary by its names and embeddings: under torchrun another --vocab on one machine was found by
    LAIC.fit only, after the command's first line, naming its API argument noun_names."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256("\n".join(vocab.names).encode("utf-8", errors="surrogatepass"))
    digest.update(np.ascontiguousarray(vocab.embeddings).tobytes())
    return digest.hexdigest()


def _read_inputs(args, world):
    """(this process's feature rows, the features' sidecar, the file's fingerprint, the vocabulary), checked."""
    from ..embed_cache import check_same_encoder, features_fingerprint, read_features
    from ..vocab import read_embedded_vocabulary

    shard = world.row_shard if world.size > 1 else None
    features, feature_sidecar = read_features(args.features, shard=shard)
    vocab = read_embedded_vocabulary(args.vocab)
    if vocab.embeddings.shape[1] != features.shape[1]:
        raise ValueError(f"--features has dimension {features.shape[1]} but --vocab has {vocab.embeddings.shape[1]}; "
                         "both must come from the same CLIP model")
    check_same_encoder(feature_sidecar, vocab.sidecar)
    return features, feature_sidecar, features_fingerprint(args.features), vocab


def interrupted(args) -> str:
    """What Ctrl-C left (for laic.cli): RUN_DIR as it was, and with --images stage 2's checkpoint when it has one;
    or, once the run is published (the summary still printing), the complete run."""
    if getattr(args, "published", False):
        return f"interrupted after {args.out} was written: the run there is complete"
    message = f"interrupted; {args.out} is untouched (a run is published whole)"
    resume = resumable(args)
    return message if resume is None else f"{message}; {resume}"


def resumable(args) -> Optional[str]:
    """How to go on from what a stopped or failed fit kept (for laic.cli): with --images, stage 2's checkpoint of
    its last finished epoch; None when there is none."""
    from ..run_dir import checkpoint_dir
    from ..stage2 import CHECKPOINT_NAME

    # (A folder without the checkpoint file: nothing saved yet, or only a killed write's temporary.)
    if args.images is not None and (checkpoint_dir(run_dir_of(args)) / CHECKPOINT_NAME).is_file():
        return "rerun with --resume to continue stage 2 from its last finished epoch"
    return None
