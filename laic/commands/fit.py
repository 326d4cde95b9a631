"""Cluster images into K named clusters and save the run (stages 0 and 1; stage 2 with --images).

Inputs: image features, either a .npy [N, D] or a folder written by `laic embed` (features.npy + features.json), and
a noun vocabulary with embeddings: a folder with embeddings.npy + nouns.txt (as written by `laic vocab`).
Labels are never an input: clustering is unsupervised (score it afterwards with `laic evaluate`).

Stage 2 (self-enhancement): with --images DIR --model NAME --pretrained P instead of --features, the images are
embedded with that open_clip model, stages 0 and 1 cluster them, and the vision encoder is then fine-tuned on the
model's confident clusters (laic.stage2; settings with --stage2 NAME=VALUE, see help(laic.stage2.Stage2Config)).
After every epoch a checkpoint goes to RUN_DIR.stage2-checkpoint/ beside RUN_DIR; --resume continues an interrupted
run from it (with the same inputs and settings), and it is removed once the run is written.

RUN_DIR receives, all at once when the fit succeeds (nothing is written if it fails):
  model          the fitted LAIC estimator (laic.LAIC.load(RUN_DIR/model); used by `laic predict`)
  labels.npy     int64 [N], the cluster of each image
  clusters.json  per cluster: its size and its names (the nouns nearest its centre)
  run.json       the inputs and settings of the run
and with --images also (so that `laic report RUN_DIR` and `laic predict --images` work):
  stage2.pt      the fine-tuned part of the encoder (laic.stage2.FineTunedEncoder.load(path, base open_clip model))
  features.npy   float32 [N, D], the fine-tuned embeddings of the images
  images.txt     the N readable images, one path per line, in row order (unreadable ones are skipped)

Examples:
  laic fit --features cache/ --vocab vocab/ --k 10 --out runs/cifar10
  laic fit --images photos/ --model ViT-B-32 --pretrained openai --vocab vocab/ --k 10 --out runs/photos \
      --stage2 epochs=5 --stage2 n_blocks=2
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import os
import pathlib
import secrets
import shutil
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import io

RUN_FILES = ("model", "labels.npy", "clusters.json", "run.json", "stage2.pt", "features.npy", "images.txt")
STAGE2_FILE = "stage2.pt"
CHECKPOINT_SUFFIX = ".stage2-checkpoint"
FEATURES_FILE = "features.npy"  # inside a `laic embed` cache folder, with its sidecar features.json
VOCAB_SIDECAR = "embeddings.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", metavar="F.npy|DIR",
                        help="image features: a .npy [N, D], or a folder written by `laic embed` (or use --images)")
    parser.add_argument("--vocab", required=True, metavar="DIR",
                        help="noun vocabulary with embeddings (a folder with embeddings.npy + nouns.txt, e.g. from "
                             "`laic vocab`)")
    parser.add_argument("--k", required=True, type=int, help="number of clusters K (2 <= K <= N)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for the run's files")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice; 1 is often faster for small inputs)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the LAIC estimator, e.g. --set stage1_steps=100 (repeatable; see "
                             "help(laic.LAIC))")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in RUN_DIR")
    stage2 = parser.add_argument_group("stage 2 (fine-tune the image encoder; instead of --features)")
    stage2.add_argument("--images", metavar="DIR", help="folder of images (searched recursively), embedded with "
                                                         "--model and then used to fine-tune it")
    stage2.add_argument("--model", help="open_clip model name, e.g. ViT-B-32 (the one --vocab was encoded with)")
    stage2.add_argument("--pretrained", metavar="PATH|TAG",
                        help="its weights: a local file, an open_clip tag such as 'openai', or 'random' (random "
                             "weights drawn from --seed; testing only)")
    stage2.add_argument("--stage2", dest="stage2_options", action="append", default=[], metavar="NAME=VALUE",
                        help="a stage-2 setting, e.g. --stage2 epochs=5 (repeatable; see "
                             "help(laic.stage2.Stage2Config))")
    stage2.add_argument("--resume", action="store_true",
                        help="continue an interrupted stage-2 run from RUN_DIR.stage2-checkpoint/")


# ------------------------------------------------------------------------------------------------------------ inputs

def load_features(path: str, arg: str = "--features") -> Tuple[np.ndarray, Optional[Dict]]:
    """Image features [N, D] as float32 from a .npy file or a `laic embed` cache folder, with that folder's sidecar
    (None for a bare .npy). Errors name ``arg``."""
    p = pathlib.Path(path).expanduser()
    sidecar = None
    if p.is_dir():
        array_path = p / FEATURES_FILE
        if not array_path.is_file():
            raise FileNotFoundError(f"{arg} {path}: the folder has no {FEATURES_FILE}; pass a .npy file or a folder "
                                    f"written by `laic embed`")
        sidecar_path = p / "features.json"
        if sidecar_path.is_file():
            sidecar = json.loads(sidecar_path.read_text())
        p = array_path
    elif not p.is_file():
        raise FileNotFoundError(f"{arg} {path}: no such file or folder")
    features = io.read_npy(p, arg)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{arg} {path}: expected a non-empty 2-D array [N, D] of image features, got shape "
                         f"{features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{arg} {path}: expected floating-point features, got dtype {features.dtype}")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ValueError(f"{arg} {path}: {bad} row(s) contain NaN or infinite values; drop or recompute them")
    return features.astype(np.float32, copy=False), sidecar


def load_vocab(source: str, arg: str = "--vocab"):
    """(names, embeddings [M, D] float32, sidecar or None) of a vocabulary that has embeddings."""
    from ..vocab import load_vocabulary

    try:
        vocab = load_vocabulary(source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{arg} {source}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{arg} {source}: {exc}") from None
    if vocab.embeddings is None:
        raise ValueError(f"{arg} {source}: this vocabulary has names but no embeddings; encode it first with "
                         f"`laic vocab --source {source} --model ... --out DIR` and pass --vocab DIR")
    sidecar_path = pathlib.Path(source).expanduser() / VOCAB_SIDECAR
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
    return list(vocab.names), np.asarray(vocab.embeddings, dtype=np.float32), sidecar


def check_same_encoder(feature_sidecar: Optional[Dict], vocab_sidecar: Optional[Dict], what: str = "--features"
                       ) -> None:
    """Image and text embeddings must come from one CLIP model; compare when both record theirs."""
    if not feature_sidecar or not vocab_sidecar:
        return
    for key in ("model", "weights_digest"):
        a, b = feature_sidecar.get(key), vocab_sidecar.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"{what} and --vocab come from different encoders ({key}: {a!r} vs {b!r}); "
                             f"embed both with the same model and weights")


def check_k(k: int, n: int, arg: str = "--k") -> None:
    if not 2 <= k <= n:
        raise ValueError(f"{arg} must be between 2 and the number of images N = {n}, got {k}")


def parse_options(pairs: List[str], estimator, flag: str = "--set",
                  reserved: Optional[Dict[str, str]] = None) -> Dict:
    """``NAME=VALUE`` strings as keyword arguments of ``estimator`` (a class or dataclass); VALUE is read as a Python
    literal when it is one (50, 0.1, True, None, [1, 2]) and kept as a string otherwise. ``reserved`` maps the
    names that have their own flag to that flag."""
    params = inspect.signature(estimator).parameters
    if reserved is None:
        reserved = {"n_clusters": "--k", "random_state": "--seed", "device": "--device"}
    example = f"{flag} {next(p for p in params if p not in reserved and p != 'self')}=..."
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE, e.g. {example}")
        if name in reserved:
            raise ValueError(f"{flag} {name}: set it with its own flag ({reserved[name]})")
        if name not in params:
            known = ", ".join(p for p in params if p not in reserved and p != "self")
            raise ValueError(f"{flag} {name}: {estimator.__name__} has no option {name!r}; its options are: {known}")
        try:
            options[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[name] = text.strip()
    return options


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: leave torch's setting), then restore the setting."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> str:
    if name == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------------------------------------- outputs

def check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    """RUN_DIR may be absent or empty; an earlier run only with --overwrite; anything else is left alone."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose another RUN_DIR")
    entries = {e.name for e in out.iterdir()}
    if not entries:
        return
    if entries <= set(RUN_FILES):
        if overwrite:
            return
        raise ValueError(f"--out {out}: holds an earlier run; pass --overwrite to replace it, or choose another "
                         f"RUN_DIR")
    raise ValueError(f"--out {out}: is not empty and is not a laic run (it holds {', '.join(sorted(entries)[:5])}); "
                     f"choose another RUN_DIR")


def cluster_summary(labels: np.ndarray, names: List[List[str]], k: int) -> List[Dict]:
    sizes = np.bincount(labels, minlength=k)
    return [{"cluster": c, "size": int(sizes[c]), "names": list(names[c])} for c in range(k)]


def _new_hidden_dir(out: pathlib.Path, what: str) -> pathlib.Path:
    """A new empty folder beside ``out``, with the usual permissions (mkdtemp's are owner-only, and the staging
    folder becomes RUN_DIR)."""
    for _ in range(100):
        path = out.parent / f".{out.name}.{what}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder beside {out}")


def publish_run(out: pathlib.Path, write_files) -> None:
    """Write the run into a staging folder beside ``out`` with ``write_files(folder)``, then move it into place, so
    that ``out`` only ever holds a complete run: a failure (or a kill) leaves at most a hidden staging folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_hidden_dir(out, "partial")
    try:
        write_files(staging)
        if out.exists():
            # An empty folder, or an earlier run the user asked to replace (check_out_dir): set it aside first.
            old = _new_hidden_dir(out, "old")
            os.replace(out, old / "run")
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old / "run", out)  # put the earlier run back: RUN_DIR never goes missing
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def print_clusters(clusters: List[Dict], max_names: int = 5, max_rows: int = 40) -> None:
    """The clusters as a table; with many clusters, the first ``max_rows`` (the rest are in clusters.json)."""
    print(f"{'cluster':>7}  {'size':>6}  names")
    for c in clusters[:max_rows]:
        print(f"{c['cluster']:>7}  {c['size']:>6}  {', '.join(c['names'][:max_names])}")
    if len(clusters) > max_rows:
        print(f"{'...':>7}  {len(clusters) - max_rows} more in clusters.json")


# --------------------------------------------------------------------------------------------------------------- run

def checkpoint_dir(out: pathlib.Path) -> pathlib.Path:
    """Where stage 2 keeps its per-epoch checkpoint: beside RUN_DIR, since RUN_DIR itself is published whole."""
    return out.parent / (out.name + CHECKPOINT_SUFFIX)


def run_settings(args: argparse.Namespace):
    """(LAIC options, RUN_DIR, device) checked, for both kinds of input."""
    from ..model import LAIC

    options = parse_options(args.options, LAIC)
    out = pathlib.Path(args.out).expanduser()
    check_out_dir(out, args.overwrite)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    return options, out, resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    if args.images is not None:
        return run_images(args)
    if args.features is None:
        raise ValueError("pass the images: --features F.npy|DIR (precomputed features), or --images DIR --model NAME "
                         "--pretrained P (embed them and fine-tune the encoder)")
    stage2_only = [flag for flag, value in (("--model", args.model), ("--pretrained", args.pretrained),
                                            ("--stage2", args.stage2_options), ("--resume", args.resume)) if value]
    if stage2_only:
        raise ValueError(f"{', '.join(stage2_only)} only apply to stage 2, which needs the images: pass --images DIR "
                         "instead of --features")
    from ..model import LAIC

    # Check everything before the (possibly long) fit, so a typo costs nothing.
    features, feature_sidecar = load_features(args.features)
    names, nouns, vocab_sidecar = load_vocab(args.vocab)
    if nouns.shape[1] != features.shape[1]:
        raise ValueError(f"--features has dimension {features.shape[1]} but --vocab has {nouns.shape[1]}; both must "
                         f"come from the same CLIP model")
    check_same_encoder(feature_sidecar, vocab_sidecar)
    check_k(args.k, features.shape[0])
    options, out, device = run_settings(args)

    print(f"laic fit: {features.shape[0]} images, {len(names)} nouns, D = {features.shape[1]}, K = {args.k}, "
          f"device {device}")
    start = time.perf_counter()
    model = LAIC(n_clusters=args.k, random_state=args.seed, device=device, **options)
    with torch_threads(args.threads):
        model.fit(features, nouns, noun_names=names)
    seconds = time.perf_counter() - start
    labels = np.asarray(model.labels_, dtype=np.int64)

    clusters = cluster_summary(labels, model.cluster_names_, args.k)
    run_info = {"features": str(args.features), "vocab": str(args.vocab), "k": args.k, "seed": args.seed,
                "device": device, "threads": args.threads, "options": options,
                "n_images": int(features.shape[0]), "n_nouns": len(names), "dim": int(features.shape[1]),
                "fit_seconds": round(seconds, 3),
                "encoder": {k: (feature_sidecar or {}).get(k) for k in ("model", "weights_digest")}}

    def write_files(folder: pathlib.Path) -> None:
        model.save(folder / "model")
        io.save_npy(folder / "labels.npy", labels)
        io.write_json(folder / "clusters.json", {"k": args.k, "n_images": int(labels.size), "clusters": clusters})
        io.write_json(folder / "run.json", run_info)

    publish_run(out, write_files)
    print(f"fitted in {seconds:.1f} s")
    print_clusters(clusters)
    print(f"wrote {out}/ ({', '.join(f for f in RUN_FILES if (out / f).exists())})")
    return 0


def stage2_config(args: argparse.Namespace):
    from ..stage2 import Stage2Config

    options = parse_options(args.stage2_options, Stage2Config, flag="--stage2", reserved={"seed": "--seed"})
    return Stage2Config(seed=args.seed, **options).validate()


def print_epoch(epoch: int, stats: Dict, epochs: int) -> None:
    print(f"stage 2 epoch {epoch + 1}/{epochs}: loss {stats['loss']:.4f} (cross-entropy {stats['ce']:.4f}, text "
          f"{stats['text']:.4f}), {stats['n_pseudo']} pseudo-labels, {stats['images_per_s']:.1f} images/s", flush=True)


def run_images(args: argparse.Namespace) -> int:
    """Stages 0 to 2 on a folder of images (laic.stage2.fit_images)."""
    from .. import report, stage2
    from ..images import list_images
    from ..model import LAIC
    from .embed import pretrained_arg

    if args.features is not None:
        raise ValueError("--features and --images are alternatives (--images embeds the images itself); pass one")
    if not args.model or not args.pretrained:
        raise ValueError("--images needs --model NAME and --pretrained PATH|TAG: the open_clip encoder --vocab was "
                         "encoded with, which is fine-tuned ('random' for random weights, testing only)")
    names, nouns, vocab_sidecar = load_vocab(args.vocab)
    options, out, device = run_settings(args)
    config = stage2_config(args)
    checkpoint = checkpoint_dir(out)
    if checkpoint.exists() and not args.resume:
        raise ValueError(f"{checkpoint} holds an interrupted stage-2 run; pass --resume to continue it, or delete that "
                         "folder to start over")
    images = list_images(args.images)
    check_k(args.k, len(images))
    pretrained = pretrained_arg(args.pretrained)
    clip = stage2.load_base_clip(args.model, pretrained, seed=args.seed, device=device)
    encoder = stage2.clip_record(clip, args.model, pretrained, args.seed)
    check_same_encoder({"model": args.model, "weights_digest": encoder["weights_digest"]}, vocab_sidecar,
                       what="--model/--pretrained")
    dim = clip[0].visual.output_dim
    if nouns.shape[1] != dim:
        raise ValueError(f"--model {args.model} embeds in dimension {dim} but --vocab has {nouns.shape[1]}; encode "
                         "the vocabulary with the same model")

    print(f"laic fit: {len(images)} images in {args.images}, {len(names)} nouns, D = {dim}, K = {args.k}, device "
          f"{device}; stage 2: {config.epochs} epochs")
    start = time.perf_counter()
    model = LAIC(n_clusters=args.k, random_state=args.seed, device=device, **options)
    with torch_threads(args.threads):
        # print_epoch is looked up at each call, so a test can replace it to interrupt the run.
        result = stage2.fit_images(model, images, nouns, names, clip=clip, model_name=args.model, config=config,
                                   checkpoint_dir=checkpoint, resume=args.resume,
                                   on_epoch_end=lambda epoch, stats: print_epoch(epoch, stats, config.epochs))
    seconds = time.perf_counter() - start
    for note in result.notes:
        print(f"note: {note}")
    labels = result.labels
    clusters = cluster_summary(labels, model.cluster_names_, args.k)
    run_info = {"images": str(args.images), "vocab": str(args.vocab), "k": args.k, "seed": args.seed,
                "device": device, "threads": args.threads, "options": options, "n_images": len(result.paths),
                "n_skipped": len(images) - len(result.paths), "n_nouns": len(names), "dim": dim,
                "fit_seconds": round(seconds, 3), "encoder": encoder, "stage2": dataclasses.asdict(config),
                "stage2_history": result.history, "stage2_notes": result.notes}

    def write_files(folder: pathlib.Path) -> None:
        model.save(folder / "model")
        report.write_run_dir(folder, labels, result.features, result.paths, cluster_names=model.cluster_names_,
                             n_clusters=args.k)
        result.encoder.save(folder / STAGE2_FILE)
        io.write_json(folder / "run.json", run_info)

    publish_run(out, write_files)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: nothing left to resume
    print(f"fitted in {seconds:.1f} s")
    print_clusters(clusters)
    print(f"wrote {out}/ ({', '.join(f for f in RUN_FILES if (out / f).exists())})")
    return 0
