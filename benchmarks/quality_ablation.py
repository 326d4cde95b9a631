"""``quality.py --ablation``: each component of LAIC switched against the default, on every set.

Every variant is the default LAIC with one switch flipped (``ABLATIONS``: a component the default uses turned off,
one it leaves off turned on), plus laic's image-only spherical k-means (no text, no stage 1: the bar). Prints ACC in
% (mean ± std over the seeds) per set and variant, then per variant: the mean over sets, its mean gain over laic's
image-only k-means and its worst set against it, and the mean gain over scikit-learn's KMeans on the sets whose
figures the data README lists (read from that README; sets without a figure are left out of that mean).
"""
from __future__ import annotations

import json
import pathlib
import re
import time

import numpy as np

from laic import LAIC
from laic.metrics import cluster_accuracy

IMAGE_ONLY = {"use_text": False, "stage1_steps": 0}
# (name, the options that flip one component of the default). The default is LAIC()'s own settings.
ABLATIONS = (
    ("default", {}),
    ("image-only k-means", IMAGE_ONLY),
    ("no text (use_text=False)", {"use_text": False}),
    ("no stage 1 (stage1_steps=0)", {"stage1_steps": 0}),
    # Below 8 images a cluster the default does not train stage 1 (laic.stage1.MIN_IMAGES_PER_CLUSTER): this variant
    # trains it there, and is the default elsewhere.
    ("stage 1 at any cluster size (min_cluster_size=0)", {"min_cluster_size": 0}),
    ("no neighbour filter", {"neighbour_filter": "none"}),
    ("no partition weighting", {"partition_weighting": False}),
    ("relation neighbours", {"neighbour_filter": "relation"}),
    ("relation view (stage 1)", {"relation_view": True}),
    ("relation fused space (always)", {"relation_fused": True}),
    ("no relation in the fused space", {"relation_fused": False}),
    ("relation nouns weighted alike", {"usage_weighting": False}),
    ("relation nouns weighted by usage (always)", {"usage_weighting": True}),
)


def sklearn_figures(root: pathlib.Path) -> dict:
    """ACC (%) of scikit-learn's KMeans per set, from the data README's reference table ('| set | a / n / r |')."""
    readme = root / "README.md"
    if not readme.is_file():
        return {}
    figures = {}
    for line in readme.read_text().splitlines():
        match = re.match(r"\|\s*([\w.-]+)(?:\s*\([^)]*\))?\s*\|\s*([\d.]+) / [\d.]+ / [\d.]+\s*\|\s*$", line)
        if match:
            figures[match.group(1)] = float(match.group(2))
    return figures


def print_ablation(loaded, nouns, names, seeds, device, root: pathlib.Path, defaults: dict, variants=None,
                   raw_path=None) -> int:
    """``defaults``: the options every variant starts from (the benchmark's default LAIC); ``variants``: names of
    ``ABLATIONS`` to run (default all); ``raw_path``: also write every fit's ACC there (JSON, variant -> set ->
    one ACC per seed), to merge runs over different seeds."""
    chosen = [(n, o) for n, o in ABLATIONS if variants is None or n in variants or n == "image-only k-means"]
    sklearn = sklearn_figures(root)
    start = time.perf_counter()
    print(f"# Ablation: ACC in % (mean ± std over seeds {seeds}); each variant is the default "
          f"({defaults or 'LAIC()'}) with one switch flipped")
    header = ["set", "K"] + [n for n, _ in chosen] + ["sklearn KMeans"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    acc = {n: [] for n, _ in chosen}
    raw = {n: {} for n, _ in chosen}
    for name, features, labels in loaded:
        k = len(np.unique(labels))
        cells = []
        for variant, options in chosen:
            scores = [100 * cluster_accuracy(labels, LAIC(n_clusters=k, random_state=s, device=device,
                                                          **{**defaults, **options}).fit(features, nouns, names).labels_)
                      for s in seeds]
            acc[variant].append(np.mean(scores))
            raw[variant][name] = scores
            if raw_path is not None:
                pathlib.Path(raw_path).write_text(json.dumps({"seeds": list(seeds), "acc": raw}, indent=1))
            cells.append(f"{np.mean(scores):.1f}±{np.std(scores):.1f}")
        cells.append(f"{sklearn[name]:.1f}" if name in sklearn else "n/a")
        print("| " + " | ".join([name, str(k)] + cells) + " |", flush=True)
    set_names = [name for name, _, _ in loaded]
    with_sklearn = [i for i, name in enumerate(set_names) if name in sklearn]
    print("\n| variant | mean ACC | vs image-only: mean / worst set | vs sklearn KMeans (mean, "
          f"{len(with_sklearn)} sets) |\n|---|---|---|---|")
    base = np.array(acc["image-only k-means"])
    for variant, _ in chosen:
        a = np.array(acc[variant])
        over_sklearn = (f"{np.mean([a[i] - sklearn[set_names[i]] for i in with_sklearn]):+.2f}" if with_sklearn
                        else "n/a")
        print(f"| {variant} | {a.mean():.2f} | {np.mean(a - base):+.2f} / {np.min(a - base):+.2f} "
              f"({set_names[int(np.argmin(a - base))]}) | {over_sklearn} |")
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0
