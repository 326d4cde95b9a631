"""Run LAIC end to end on generated data (no downloads): metrics against k-means, and the clusters' names.

The data (laic/demo_data.py) imitates CLIP embeddings: K concepts in groups of confusable siblings (cat, dog, horse,
...), images that also vary in style and background (variation that words do not describe), and a vocabulary of
named nouns: the concepts, their near relatives and many distractors. Image-space k-means is misled by the nuisance
variation; LAIC reads the images through the nouns. The true labels are used only to score the clusterings.

With --save-data DIR the generated inputs are also written (features.npy, labels.npy, classes.txt, vocab/ with
embeddings.npy and nouns.txt; files of those names already there are replaced only with --overwrite, removed before
the new ones are written), to try the other commands on them:
  laic demo --save-data demo/
  laic fit --features demo/features.npy --vocab demo/vocab --k 10 --out demo/run
  laic evaluate --labels demo/labels.npy --run demo/run
"""
from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from .. import io
from ..demo_data import BACKGROUNDS, STYLES, DemoData, make_semantic_dataset, max_classes
from ..metrics import evaluate
from .common import check_seed


MAX_DIM = 4096
MAX_PER_CLASS = 100_000
# At most this many generated feature values (K x n-per-class x D; the generator holds a few float64 copies).
MAX_VALUES = 50_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=10, help=f"number of concepts, 2 to {max_classes()} (default 10)")
    parser.add_argument("--n-per-class", type=int, default=100,
                        help="images in the largest class; the smallest has half as many (default 100)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of both clusterings (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    # The demo's problem is small: a single thread avoids the synchronisation cost of torch's intra-op parallelism,
    # which dominates at this size and grows when the machine is busy (measured on a loaded 2-core machine: LAIC's
    # fit took 4.4 s wall with one thread, 29 s with two).
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: fastest for a problem this small)")
    parser.add_argument("--save-data", metavar="DIR", help="also write the generated inputs to DIR")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --save-data: replace the inputs an earlier demo wrote to DIR")


# What --save-data writes, relative to DIR.
DATA_FILES = ("features.npy", "labels.npy", "classes.txt", "vocab/embeddings.npy", "vocab/nouns.txt")


def check_save_data(folder: pathlib.Path, overwrite: bool) -> None:
    """DIR of --save-data may be absent or a folder; files of the names the demo writes are replaced only with
    --overwrite (they may be a data set's own features and labels, or the inputs of a run fitted on them)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--save-data {folder}: exists and is not a folder; choose a folder for the inputs")
    for name in DATA_FILES:   # before the demo's work, as every command's outputs (a file on the way, read-only)
        io.check_can_create(folder / name, "--save-data")
    taken = [name for name in DATA_FILES if (folder / name).exists()]
    if taken and not overwrite:
        raise ValueError(f"--save-data {folder}: already holds {', '.join(taken)}; pass --overwrite to replace them, "
                         "or choose another folder")


def save_data(data: DemoData, folder: pathlib.Path) -> None:
    from ..embed_cache import FILE_LIST, INPUT_STAT, laic_sidecar
    from ..vocab import write_folder

    # An earlier data set's files go first, with the sidecars that `laic vocab` or `laic embed` wrote there, which
    # describe other embeddings (a cache's kept: `laic embed` reused the demo's rows as its images' and `laic report`
    # drew them so): interrupted, the folder holds some of the new files, never new features beside old labels. A
    # JSON file of those names that laic did not write (no "kind" of laic's) is the user's, and stays.
    sidecars = [name for name, kind in (("vocab/embeddings.json", "text"), ("features.json", "image"))
                if laic_sidecar(folder / name, kind) is not None]
    # The cache's list of its images and their sizes and times (laic.embed_cache).
    cache_list = [FILE_LIST, INPUT_STAT] if "features.json" in sidecars else []
    for name in [*DATA_FILES, *sidecars, *cache_list]:
        (folder / name).unlink(missing_ok=True)
    io.save_npy(folder / "features.npy", data.features)
    io.save_npy(folder / "labels.npy", data.labels)
    io.write_text(folder / "classes.txt", io.lines_text(data.class_names))
    write_folder(folder / "vocab", data.noun_features, data.noun_names)


def kmeans_baseline(features: np.ndarray, k: int, seed: int, device: str) -> np.ndarray:
    """Spherical k-means on the image features alone: what clustering without language gives."""
    import torch

    from ..stage0 import spherical_kmeans

    x = torch.as_tensor(features, device=device)
    return np.asarray(spherical_kmeans(x, k, seed=seed).labels.cpu(), dtype=np.int64)


def majority(labels_true: np.ndarray, labels_pred: np.ndarray, k: int):
    """For each cluster 0..k-1: its most common true class and that class's share of the cluster."""
    classes = np.unique(labels_true)
    table = np.zeros((classes.size, k), dtype=np.int64)
    np.add.at(table, (np.searchsorted(classes, labels_true), labels_pred), 1)
    sizes = table.sum(0)
    top = table.argmax(0)
    share = np.where(sizes > 0, table.max(0) / np.maximum(sizes, 1), 0.0)
    return classes[top], share, sizes


def _row(name: str, scores, seconds: float) -> str:
    return (f"  {name:<22}{100 * scores['acc']:6.1f}{100 * scores['nmi']:8.1f}{100 * scores['ari']:8.1f}"
            f"{seconds:9.1f} s")


def interrupted(args) -> str:
    folder = pathlib.Path(args.save_data).expanduser() if args.save_data else None
    saving = getattr(args, "saving", None)
    if folder is None or saving is None:
        return "interrupted; nothing was written" + (f" to {folder}" if folder else "")
    if saving == "done":
        return f"interrupted; the inputs in {folder} are complete"
    written = [name for name in DATA_FILES if (folder / name).exists()]
    return (f"interrupted while writing the inputs: {folder} holds {', '.join(written) or 'none of them'} (an "
            "earlier set's files were removed first); run again with --overwrite")


def run(args: argparse.Namespace) -> int:
    from ..runtime import checked_threads, fitting_device, torch_threads

    if not 2 <= args.k <= max_classes():
        raise ValueError(f"--k must be between 2 and {max_classes()} (the concepts the demo knows), got {args.k}")
    # Upper bounds: the generator draws a dense D x D basis and N x D images in memory (D = 100000 asked for 80 GB
    # and ended in a raw MemoryError); CLIP's widths are 512 to 1280.
    if not 4 <= args.n_per_class <= MAX_PER_CLASS:
        raise ValueError(f"--n-per-class must be between 4 and {MAX_PER_CLASS}, got {args.n_per_class}")
    if not 32 <= args.dim <= MAX_DIM:
        raise ValueError(f"--dim must be between 32 and {MAX_DIM}, got {args.dim}")
    check_seed(args.seed)   # LAIC's random_state: checked here, before any data is written
    checked_threads(args.threads, "--threads")
    values = args.k * args.n_per_class * args.dim
    if values > MAX_VALUES:
        raise ValueError(f"--k {args.k} x --n-per-class {args.n_per_class} x --dim {args.dim} is {values:.2g} feature "
                         f"values, more than the demo's {MAX_VALUES:.0e}; make one of them smaller")
    if args.save_data:
        check_save_data(pathlib.Path(args.save_data).expanduser(), args.overwrite)
    elif args.overwrite:
        raise ValueError("--overwrite applies to --save-data DIR only (the demo writes nothing else); pass both")
    from ..model import LAIC

    device = str(fitting_device(args.device, "--device"))   # the demo fits: the CPU or CUDA
    data = make_semantic_dataset(args.k, args.n_per_class, args.dim, seed=args.seed)
    n, dim = data.features.shape
    print(f"laic demo: generated data, no downloads (seed {args.seed})")
    print(f"  {n} images (D = {dim}) of {args.k} concepts: {', '.join(data.class_names)}")
    print(f"  drawn in {len(STYLES)} styles ({', '.join(STYLES)}) on {len(BACKGROUNDS)} backgrounds; "
          f"{len(data.noun_names)} nouns, mostly distractors")
    if args.save_data:
        args.saving = "started"     # what Ctrl-C left: interrupted()
        save_data(data, pathlib.Path(args.save_data).expanduser())
        args.saving = "done"
        print(f"  inputs written to {pathlib.Path(args.save_data)}/")

    with torch_threads(args.threads, "--threads"):
        start = time.perf_counter()
        baseline = kmeans_baseline(data.features, args.k, args.seed, device)
        kmeans_seconds = time.perf_counter() - start
        start = time.perf_counter()
        model = LAIC(n_clusters=args.k, random_state=args.seed, device=device)
        model.fit(data.features, data.noun_features, noun_names=data.noun_names)
        laic_seconds = time.perf_counter() - start
    labels = np.asarray(model.labels_, dtype=np.int64)

    print()
    print(f"  {'method':<22}{'ACC':>6}{'NMI':>8}{'ARI':>8}{'time':>11}   (%, against the true concepts)")
    print(_row("k-means (images only)", evaluate(data.labels, baseline), kmeans_seconds))
    print(_row("LAIC", evaluate(data.labels, labels), laic_seconds))

    print()
    print("  LAIC's clusters (named from the nouns alone; 'mostly' = their most common true concept):")
    print(f"  {'cluster':>7}  {'size':>5}  {'mostly':<18}  names")
    top, share, sizes = majority(data.labels, labels, args.k)
    for c in np.argsort(top, kind="stable"):
        mostly = f"{data.class_names[top[c]]} ({100 * share[c]:.0f}%)" if sizes[c] else "(empty)"
        print(f"  {c:>7}  {sizes[c]:>5}  {mostly:<18}  {', '.join(model.cluster_names_[c][:5])}")
    return 0
