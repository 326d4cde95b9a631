"""Clustering quality on the real CLIP ViT-B/32 feature sets: LAIC against spherical k-means.

    python benchmarks/quality.py                                  # every set, seeds 0 1 2
    python benchmarks/quality.py --sets cifar10-test-first500 dtd-val --seeds 0 --sklearn --threads 1
    python benchmarks/quality.py --random-vocab                   # robustness: a vocabulary with no meaning
    python benchmarks/quality.py --missing-nouns 20               # robustness: the domain's own nouns left out
    python benchmarks/quality.py --noun-sample 20 --noun-draw 1   # robustness: 20 nouns drawn at random
    python benchmarks/quality.py --half --device cpu              # LAIC with the GPU's bf16 kernel operands
    python benchmarks/quality.py --auto-k --seeds 0 --threads 1   # K chosen without labels (LAIC(n_clusters="auto"))
    python benchmarks/quality.py --stress                         # few images a class (see stress_sets)
    python benchmarks/quality.py --near-copies 0.3 0.98           # robustness: near-duplicate photos added
    python benchmarks/quality.py --imbalance --sklearn            # two sets mixed unevenly, K = 2 (imbalanced_sets)

Each image set in the real-feature folder (``--data``, default $LAIC_DATA, else ``../shared/data/clip-vit-b32/``
beside the checkout; all folders but ``vocab``) is clustered with K = its number of
classes, with the 1403-noun vocabulary of ``vocab/``. The baseline is spherical k-means on the L2-normalised
features (``laic.stage0.spherical_kmeans``: greedy k-means++, n_init = 10, or 3 for K > 100 as in the data README);
``--sklearn`` adds scikit-learn's KMeans (same n_init) for reference. Labels are read only to score the clusterings
(``laic.metrics.evaluate``). "LAIC image-only" is laic's own image-only spherical k-means (``IMAGE_ONLY``), the bar
the default must clear. Prints a markdown table: ACC / NMI / ARI in % (mean ± std over seeds), the ACC gain of LAIC
over k-means and over image-only, the fewest non-empty clusters over the seeds, and wall times (after one
untimed warm-up fit of every method: see warm_up).
``--half`` also fits LAIC with bfloat16 kernel operands (what CUDA runs, forced here with
``laic.operands.half_operands``; on the CPU the reference kernels compute in float32 from the rounded operands;
``--half-dtype float16`` for fp16) and prints its scores and its ACC shift from the float32 fit (the mean of the
paired per-seed differences ± its standard error, and the same over all sets' seeds: the pipeline is chaotic in
the small, so one seed's shift is noise of a point or two either way and only many seeds measure a bias).

``--auto-k`` instead fits ``LAIC(n_clusters="auto")`` (laic.select_k, default range 2 to N // 4, at most 2048) and
prints per set: the true K, the chosen K (and whether it lies within [0.67x, 1.5x] of the true K), ACC / NMI at the
chosen K, NMI of a fit at the true K, and the wall time of the auto fit against one fit at the true K (both stages 0
and 1).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))   # the sibling modules of the --diagnostics and --ablation tables

import torch  # noqa: E402

from laic import LAIC  # noqa: E402
from laic.metrics import evaluate  # noqa: E402
from laic.model import default_n_init  # noqa: E402
from laic.runtime import DATA_ENV, data_dir  # noqa: E402
from laic.operands import half_operands  # noqa: E402
from laic.stage0 import spherical_kmeans  # noqa: E402
from scale import threads_said  # noqa: E402

METRICS = ("acc", "nmi", "ari")
IMAGENET = "imagenet-train-4shot-augavg"



def available_sets(root: pathlib.Path):
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "features.npy").is_file())


def load_set(root: pathlib.Path, name: str):
    features = np.load(root / name / "features.npy").astype(np.float32)
    labels = np.load(root / name / "labels.npy")
    return features, labels


def load_vocab(root: pathlib.Path):
    nouns = np.load(root / "vocab" / "embeddings.npy").astype(np.float32)
    names = (root / "vocab" / "nouns.txt").read_text().splitlines()
    return nouns, names


def without_class_nouns(nouns: np.ndarray, names, features: np.ndarray, labels: np.ndarray, per_class: int):
    """The vocabulary less the ``per_class`` nouns nearest each class's mean image: one that misses the domain's own
    nouns (as WordNet misses most pet breeds) but keeps real, nearby ones. Labels build this stress vocabulary only;
    no fit sees them."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    means = unit(np.stack([unit(features)[labels == c].mean(0) for c in np.unique(labels)]))
    nearest = np.argsort(-(means @ unit(nouns).T), axis=1, kind="stable")[:, :per_class]
    keep = np.setdiff1d(np.arange(len(nouns)), nearest)
    return nouns[keep], [names[i] for i in keep]


def with_near_copies(features: np.ndarray, labels: np.ndarray, share: float, cosine: float, seed: int = 0):
    """(features, labels) with ``round(share x N)`` near-copies appended: rows drawn at random (with replacement), each
    its source's unit row plus isotropic Gaussian noise scaled to put it at cosine ``cosine`` to its source (in
    expectation: as a re-encoded, resized or burst photo sits near its original), labelled as its source (labels only
    score)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(unit), int(round(share * len(unit))), replace=True)
    # |u + e|^2 = 1 + D s^2 for a unit u and noise e of per-coordinate std s: cosine 1 / sqrt(1 + D s^2).
    s = np.sqrt((1 / cosine ** 2 - 1) / unit.shape[1])
    copies = unit[sources] + s * rng.standard_normal((len(sources), unit.shape[1]))
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return np.concatenate([unit, copies]).astype(np.float32), np.concatenate([labels, labels[sources]])


# Stress configurations: few images per cluster (test and val splits merged, each class subsampled to at most this
# many images with a fixed seed). Labels pick the subsample and score; they never reach a fit.
STRESS_SOURCES = {"caltech101": ("caltech101-test", "caltech101-val"), "dtd": ("dtd-test", "dtd-val")}
STRESS_PER_CLASS = (5, 10, 20)
STRESS_SEED = 0
# ImageNet class subsets (4 images a class): K random classes of the 1000, and 15 random dog breeds (ImageNet-1k's
# classes 151-268 in its standard order, which the set's labels follow: those rows' nearest nouns are dog nouns), as
# the ImageNet-10 / -Dogs / Tiny-ImageNet sets of the clustering literature are drawn from ImageNet.
IMAGENET_SUBSET_CLASSES = (25, 50, 100, 200)
IMAGENET_DOG_CLASSES = range(151, 269)
IMAGENET_DOG_BREEDS = 15


def subsample_classes(labels: np.ndarray, per_class: int, seed: int = STRESS_SEED) -> np.ndarray:
    """Sorted row indices keeping at most ``per_class`` rows of each class (a fixed random choice)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def class_subset(labels: np.ndarray, classes, n_classes: int, seed: int = STRESS_SEED) -> np.ndarray:
    """Sorted row indices of ``n_classes`` classes drawn at random (a fixed choice) from ``classes``."""
    chosen = np.random.default_rng(seed).choice(np.asarray(classes), n_classes, replace=False)
    return np.flatnonzero(np.isin(labels, chosen))


def stress_sets(root: pathlib.Path):
    """``(name, features, labels)`` of each stress configuration whose source sets are present: caltech101 and dtd
    at 5, 10 and 20 images a class, the ImageNet set as it is (4 a class, K = 1000), and its class subsets (25, 50,
    100 and 200 random classes; 15 random dog breeds)."""
    for source, parts in STRESS_SOURCES.items():
        if not all((root / part / "features.npy").is_file() for part in parts):
            continue
        loaded = [load_set(root, part) for part in parts]
        features = np.concatenate([f for f, _ in loaded])
        labels = np.concatenate([lab for _, lab in loaded])
        for per_class in STRESS_PER_CLASS:
            rows = subsample_classes(labels, per_class)
            yield f"{source}-{per_class}/class", features[rows], labels[rows]
    if (root / IMAGENET / "features.npy").is_file():
        features, labels = load_set(root, IMAGENET)
        yield "imagenet-4/class", features, labels
        for n_classes in IMAGENET_SUBSET_CLASSES:
            rows = class_subset(labels, np.unique(labels), n_classes)
            yield f"imagenet-{n_classes}classes", features[rows], labels[rows]
        rows = class_subset(labels, IMAGENET_DOG_CLASSES, IMAGENET_DOG_BREEDS)
        yield f"imagenet-dogs-{IMAGENET_DOG_BREEDS}", features[rows], labels[rows]


# Two sets mixed unevenly, each one cluster (K = 2): a majority set with classes of its own, a minority set.
IMBALANCE_PAIRS = (("food101-10class-train", "cifar10-test-first500"), ("dtd-test", "cifar10-test-first500"),
                   ("caltech101-test", "dtd-test"))
IMBALANCE_SPLITS = ((500, 500), (800, 200), (900, 100))


def imbalanced_sets(root: pathlib.Path):
    """``(name, features, labels)`` of each two-set mixture of IMBALANCE_PAIRS at each split of IMBALANCE_SPLITS
    (rows drawn at random, a fixed choice), labelled by set: a test of LAIC's prior of balanced clusters (Sinkhorn
    balancing, the centring by the mean image, which the majority sets)."""
    rng = np.random.default_rng(STRESS_SEED)
    for majority, minority in IMBALANCE_PAIRS:
        if not all((root / part / "features.npy").is_file() for part in (majority, minority)):
            continue
        (a, _), (b, _) = load_set(root, majority), load_set(root, minority)
        for n_a, n_b in IMBALANCE_SPLITS:
            rows_a, rows_b = rng.permutation(len(a))[:n_a], rng.permutation(len(b))[:n_b]
            yield (f"{majority.split('-')[0]}+{minority.split('-')[0]} {n_a}/{n_b}",
                   np.concatenate([a[rows_a], b[rows_b]]), np.r_[np.zeros(n_a, np.int64), np.ones(n_b, np.int64)])


def run_kmeans(features, k, seed):
    return spherical_kmeans(torch.from_numpy(features), k, n_init=default_n_init(k), seed=seed).labels.numpy()


def run_sklearn(features, k, seed):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    # The threads LAIC gets with --threads, for a fair time (without it LAIC's default may take fewer: threads_note).
    with threadpool_limits(torch.get_num_threads()):
        return KMeans(k, n_init=default_n_init(k), random_state=seed).fit_predict(unit)


def n_init_said(ks) -> str:
    """The n_init the k-means fits ran with over sets of ``ks`` clusters (default_n_init: fewer restarts at large
    K), e.g. "n_init=10" or "n_init=10 (K = 10, 47), 3 (K = 1000)"."""
    by_n_init = {}
    for k in sorted(set(ks)):
        by_n_init.setdefault(default_n_init(k), []).append(k)
    if len(by_n_init) == 1:
        return f"n_init={next(iter(by_n_init))}"
    return "n_init=" + ", ".join(f"{n} (K = {', '.join(map(str, group))})"
                                 for n, group in sorted(by_n_init.items(), reverse=True))


def threads_note(args) -> str:
    """The main table's threads: with --threads every fit's; without, LAIC's default takes the cores free at each
    fit (scale.threads_said: up to torch's count) while the baselines run at torch's count."""
    if args.threads:
        return threads_said(args)
    baselines = "k-means and scikit-learn" if args.sklearn else "k-means"
    return f"LAIC at {threads_said(args)}, {baselines} at {torch.get_num_threads()}"


def sklearn_time_said(args, ks) -> str:
    """What the summary's time ratio compares: LAIC against this KMeans, at these threads."""
    threads = "same threads" if args.threads else \
        f"LAIC at up to {torch.get_num_threads()} threads, scikit-learn at {torch.get_num_threads()}"
    return f"LAIC's fit time over scikit-learn KMeans({n_init_said(ks)})'s ({threads})"


def check_option_combinations(parser, args) -> None:
    """Options that a chosen table would ignore without a word: refused (a table without what was asked for)."""
    table = next((flag for flag, on in (("--auto-k", args.auto_k), ("--ablation", args.ablation),
                                        ("--diagnostics", args.diagnostics)) if on), None)
    main_only = [flag for flag, on in (("--sklearn", args.sklearn), ("--half", args.half),
                                       ("--missing-nouns", args.missing_nouns)) if on]
    if table and main_only:
        parser.error(f"{', '.join(main_only)} appl{'y' if len(main_only) > 1 else 'ies'} to the main table only, "
                     f"not to {table}")
    for flag, given, needed, on in (("--variants", args.variants is not None, "--ablation", args.ablation),
                                    ("--raw", args.raw is not None, "--ablation", args.ablation),
                                    ("--verbose", args.verbose, "--auto-k", args.auto_k),
                                    ("--half-dtype", args.half_dtype is not None, "--half", args.half)):
        if given and not on:
            parser.error(f"{flag} applies with {needed} only")
    if args.near_copies and not (args.near_copies[0] > 0 and 0 < args.near_copies[1] < 1):
        parser.error(f"--near-copies SHARE COSINE: SHARE must be > 0 and COSINE between 0 and 1, got "
                     f"{args.near_copies}")
    if args.variants is not None:   # (an unknown name ran the image-only variant alone)
        from quality_ablation import ABLATIONS
        known = [name for name, _ in ABLATIONS]
        unknown = [name for name in args.variants if name not in known]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {known}")


# --threads: every LAIC fit runs at exactly that many (None: LAIC's default, the cores free at each fit, at most
# torch's count).
FIT_THREADS = None


def run_laic(features, k, seed, nouns, names, device, **options):
    return LAIC(n_clusters=k, random_state=seed, device=device, n_threads=FIT_THREADS, **options).fit(
        features, nouns, noun_names=names).labels_


# laic's own image-only spherical k-means (centred features, neighbour smoothing, restarts, no text, no stage 1): the
# baseline the default must never fall below.
IMAGE_ONLY = {"use_text": False, "stage1_steps": 0}


def run_laic_half(features, k, seed, nouns, names, device, dtype=torch.bfloat16):
    with half_operands(dtype):
        return run_laic(features, k, seed, nouns, names, device)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def warm_up(methods, features) -> None:
    """One untimed fit of every method on a few rows, so that no set's time holds what only a process's first fit
    pays: torch's first optimiser imports torch._dynamo (about a second, once per process), BLAS and thread pools
    start."""
    for fn in methods.values():
        fn(features[:300], 5, 0)


def fmt(scores):
    """'mean ± std' for each metric, in %."""
    a = np.array([[s[m] for m in METRICS] for s in scores]) * 100
    return " / ".join(f"{mu:.1f}±{sd:.1f}" for mu, sd in zip(a.mean(0), a.std(0)))


def noun_sample(nouns: np.ndarray, names, n: int, draw: int, parser):
    """``n`` of the vocabulary's nouns (rows and names), drawn without replacement by seed ``draw``, in row order."""
    if not 1 <= n <= len(names):
        parser.error(f"--noun-sample must be between 1 and the vocabulary's {len(names)} nouns, got {n}")
    rows = np.sort(np.random.default_rng(draw).choice(len(names), n, replace=False))
    return nouns[rows], [names[i] for i in rows]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, default=data_dir(),
                        help=f"feature folder (default ${DATA_ENV}, else ../shared/data/clip-vit-b32: {data_dir()})")
    parser.add_argument("--sets", nargs="*", default=None, help="image sets (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sklearn", action="store_true", help="also run scikit-learn KMeans (reference)")
    parser.add_argument("--random-vocab", action="store_true",
                        help="robustness check: replace the nouns by random unit vectors (a vocabulary that misses "
                             "every domain); LAIC should then fall back to the image space, not below k-means")
    parser.add_argument("--noun-sample", type=int, default=None, metavar="N",
                        help="robustness: a vocabulary of N nouns drawn at random from vocab/ (draw --noun-draw): "
                             "a small vocabulary that may not name the classes")
    parser.add_argument("--noun-draw", type=int, default=0, metavar="S",
                        help="the seed of --noun-sample's draw (default 0)")
    parser.add_argument("--missing-nouns", type=int, default=0, metavar="M",
                        help="robustness: per set, leave out of the vocabulary the M nouns nearest each class's mean "
                             "image (labels only build the vocabulary; see without_class_nouns)")
    parser.add_argument("--near-copies", type=float, nargs=2, default=None, metavar=("SHARE", "COSINE"),
                        help="robustness: per set, append SHARE x N near-copies of random rows, each at cosine "
                             "COSINE to its source (e.g. 0.3 0.98; see with_near_copies), scored with the rest")
    parser.add_argument("--half", action="store_true",
                        help="also fit LAIC with bfloat16 kernel operands on any device (the CUDA path's rounding) "
                             "and print the ACC shift from float32")
    # (default None, read as bfloat16: so that the option given without --half is refused)
    parser.add_argument("--half-dtype", choices=("bfloat16", "float16"), default=None,
                        help="with --half: its operand dtype (default bfloat16, what CUDA sm80+ runs)")
    parser.add_argument("--auto-k", action="store_true",
                        help="choose K without labels (n_clusters='auto') and compare it with the true K")
    parser.add_argument("--verbose", action="store_true", help="with --auto-k: print every candidate's score")
    parser.add_argument("--stress", action="store_true",
                        help="the stress configurations instead of the sets: few images a class (caltech101 and dtd "
                             f"at {', '.join(map(str, STRESS_PER_CLASS))} a class, ImageNet at 4 a class and its "
                             "class subsets)")
    parser.add_argument("--imbalance", action="store_true",
                        help="two sets mixed 500/500, 800/200 and 900/100, K = 2, instead of the sets (see "
                             "imbalanced_sets)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="print the 10-NN label consistency of each stage-0 space (image, text, relation, the "
                             "consistent neighbours) instead of clustering (benchmarks/quality_diagnostics.py)")
    parser.add_argument("--ablation", action="store_true",
                        help="print each component switched on / off against the default LAIC "
                             "(benchmarks/quality_ablation.py)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="with --ablation: only these variants (names as printed; default all)")
    parser.add_argument("--raw", type=pathlib.Path, default=None,
                        help="with --ablation: also write every fit's ACC to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every fit (default: LAIC's own, the cores free at each fit, at most "
                             "torch's count; the baselines at torch's count; 1 is faster on a machine busy with other "
                             "jobs)")
    return parser


def chosen_sets(args, parser) -> list:
    """[(name, features, labels)] of the sets the options choose: the stress or imbalance configurations, or the
    data folder's sets, less those --sets leaves out."""
    if args.stress:
        everything = list(stress_sets(args.data))
    elif args.imbalance:
        everything = list(imbalanced_sets(args.data))
    else:
        everything = [(name, None, None) for name in available_sets(args.data)]
    names_found = [name for name, _, _ in everything]
    if args.sets:
        unknown = sorted(set(args.sets) - set(names_found))
        if unknown:
            parser.error(f"--sets: unknown {unknown}; choose from {names_found}")
        everything = [entry for entry in everything if entry[0] in args.sets]
    loaded = [entry if entry[1] is not None else (entry[0], *load_set(args.data, entry[0])) for entry in everything]
    if args.near_copies:
        loaded = [(name, *with_near_copies(features, labels, *args.near_copies)) for name, features, labels in loaded]
    return loaded


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_option_combinations(parser, args)
    args.half_dtype = args.half_dtype or "bfloat16"
    if args.threads:
        global FIT_THREADS
        torch.set_num_threads(args.threads)
        FIT_THREADS = args.threads
    if not args.data.is_dir() or not (args.data / "vocab").is_dir():
        print(f"quality: skipped, no real CLIP features at {args.data} (needs the image sets and vocab/); point "
              f"{DATA_ENV}=PATH or --data PATH at the clip-vit-b32 folder")
        return 0
    loaded = chosen_sets(args, parser)
    nouns, names = load_vocab(args.data)
    if args.random_vocab:
        nouns = np.random.default_rng(0).standard_normal(nouns.shape).astype(np.float32)
    if args.noun_sample is not None:
        nouns, names = noun_sample(nouns, names, args.noun_sample, args.noun_draw, parser)
    if args.auto_k:
        return auto_k_table(args, loaded, nouns, names)
    if args.ablation:
        from quality_ablation import print_ablation
        return print_ablation(loaded, nouns, names, args.seeds, args.device, args.data, {}, args.variants,
                              args.raw)
    if args.diagnostics:
        from quality_diagnostics import print_diagnostics
        return print_diagnostics(loaded, nouns, torch.get_num_threads())
    return quality_table(args, loaded, nouns, names)


def quality_table(args, loaded, nouns, names) -> int:
    """The quality table: per set, every method's scores over the seeds, the gains and the times."""
    half_name = f"LAIC {args.half_dtype} operands"

    def set_methods(nouns, names):
        methods = {"k-means": lambda f, k, s: run_kmeans(f, k, s),
                   "LAIC image-only": lambda f, k, s: run_laic(f, k, s, nouns, names, args.device, **IMAGE_ONLY),
                   "LAIC": lambda f, k, s: run_laic(f, k, s, nouns, names, args.device)}
        if args.sklearn:
            methods["sklearn KMeans"] = lambda f, k, s: run_sklearn(f, k, s)
        if args.half:
            methods[half_name] = lambda f, k, s: run_laic_half(f, k, s, nouns, names, args.device,
                                                               getattr(torch, args.half_dtype))
        return methods

    methods = set_methods(nouns, names)
    start = time.perf_counter()
    vocab = "random unit vectors in place of the nouns" if args.random_vocab else f"{len(names)} nouns"
    if args.noun_sample is not None:
        vocab += f" drawn at random (draw {args.noun_draw})"
    if args.missing_nouns:
        vocab += f" less the {args.missing_nouns} nearest each class's mean image"
    print(f"# LAIC vs spherical k-means, ACC / NMI / ARI in % (mean ± std over seeds {args.seeds}), vocabulary: "
          f"{vocab}, device {args.device}, {threads_note(args)}")
    header = (["set", "N", "K"] + list(methods) + ["ACC gain", "vs image-only", "non-empty (image-only, LAIC)"]
              + [f"{args.half_dtype} ACC shift"] * args.half + ["s / seed (k-means, LAIC)"]
              + ["s / seed sklearn (LAIC / sklearn)"] * args.sklearn)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    gains, own_gains, shifts, time_ratios, paired_shifts, ks = [], [], [], [], [], []
    if loaded:
        warm_up(methods, loaded[0][1])
    for name, features, labels in loaded:
        k = len(np.unique(labels))
        ks.append(k)
        if args.missing_nouns:
            methods = set_methods(*without_class_nouns(nouns, names, features, labels, args.missing_nouns))
        scores = {m: [] for m in methods}
        seconds = {m: 0.0 for m in methods}
        non_empty = {m: [] for m in methods}
        for seed in args.seeds:
            for method, fn in methods.items():
                pred, secs = timed(fn, features, k, seed)
                scores[method].append(evaluate(labels, pred))
                seconds[method] += secs / len(args.seeds)
                non_empty[method].append(len(np.unique(pred)))

        def mean_acc(method):
            return 100 * np.mean([s["acc"] for s in scores[method]])

        gains.append(mean_acc("LAIC") - mean_acc("k-means"))
        own_gains.append(mean_acc("LAIC") - mean_acc("LAIC image-only"))
        row = [name, str(len(labels)), str(k)] + [fmt(scores[m]) for m in methods]
        row += [f"{gains[-1]:+.1f}", f"{own_gains[-1]:+.1f}",
                f"{min(non_empty['LAIC image-only'])}, {min(non_empty['LAIC'])}"]
        if args.half:
            paired = 100 * np.array([h["acc"] - f["acc"] for h, f in zip(scores[half_name], scores["LAIC"])])
            shifts.append(paired.mean())
            paired_shifts.extend(paired)
            row += [f"{shifts[-1]:+.2f} ± {standard_error(paired):.2f}"]
        row += [f"{seconds['k-means']:.1f}, {seconds['LAIC']:.1f}"]
        if args.sklearn:
            time_ratios.append(seconds["LAIC"] / seconds["sklearn KMeans"])
            row += [f"{seconds['sklearn KMeans']:.1f} ({time_ratios[-1]:.1f}x)"]
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nmean ACC gain of LAIC over k-means: {np.mean(gains):+.2f} points (worst set {min(gains):+.2f}); "
          f"over LAIC image-only: {np.mean(own_gains):+.2f} (worst {min(own_gains):+.2f}); "
          f"wall time {time.perf_counter() - start:.0f} s")
    if args.sklearn:
        print(f"{sklearn_time_said(args, ks)}: largest {max(time_ratios):.2f}x, median {np.median(time_ratios):.2f}x")
    if args.half:
        print(f"{args.half_dtype} operands: largest ACC shift from float32 {max(shifts, key=abs):+.2f} points "
              f"(mean over seeds; ± its standard error over the paired seeds); over all {len(paired_shifts)} "
              f"(set, seed) pairs {np.mean(paired_shifts):+.2f} ± {standard_error(np.array(paired_shifts)):.2f}, "
              f"per-pair spread (std) {np.std(paired_shifts, ddof=1):.2f}")
    return 0


def standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


AUTO_K_BAND = (0.67, 1.5)   # the chosen K counts as right within this factor of the true K


def auto_k_table(args, loaded, nouns, names) -> int:
    """``--auto-k``: per set and seed, LAIC with K chosen by laic.select_k against LAIC at the true K."""
    start = time.perf_counter()
    print(f"# K chosen without labels (LAIC n_clusters='auto', default range 2 to min(N // 4, 2048)) vs the true K; "
          f"seeds {args.seeds}, device {args.device}, {threads_said(args)}. ACC / NMI in %.")
    header = ["set", "N", "true K", "seed", "chosen K", "in band", "ACC / NMI at chosen K", "NMI at true K",
              "s auto", "s one fit", "time ratio"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    hits, ratios = [], []
    for name, features, labels in loaded:
        k = len(np.unique(labels))
        for seed in args.seeds:
            auto, auto_s = timed(lambda: LAIC(n_clusters="auto", random_state=seed, device=args.device,
                                              n_threads=FIT_THREADS).fit(
                features, nouns, noun_names=names))
            fixed, fixed_s = timed(run_laic, features, k, seed, nouns, names, args.device)
            chosen = auto.n_clusters_
            hit = AUTO_K_BAND[0] * k <= chosen <= AUTO_K_BAND[1] * k
            hits.append(hit)
            ratios.append(auto_s / fixed_s)
            at_chosen, at_true = evaluate(labels, auto.labels_), evaluate(labels, fixed)
            row = [name, str(len(labels)), str(k), str(seed), str(chosen), "yes" if hit else "no",
                   f"{100 * at_chosen['acc']:.1f} / {100 * at_chosen['nmi']:.1f}", f"{100 * at_true['nmi']:.1f}",
                   f"{auto_s:.1f}", f"{fixed_s:.1f}", f"{auto_s / fixed_s:.1f}x"]
            print("| " + " | ".join(row) + " |", flush=True)
            if args.verbose:
                print("    scores: " + ", ".join(f"{c}:{s:.3f}" for c, s in auto.k_scores_), flush=True)
    print(f"\nchosen K within [{AUTO_K_BAND[0]}x, {AUTO_K_BAND[1]}x] of the true K: {sum(hits)} of {len(hits)} "
          f"fits; time of auto over one fit at the true K: median {np.median(ratios):.1f}x, worst "
          f"{max(ratios):.1f}x; wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
