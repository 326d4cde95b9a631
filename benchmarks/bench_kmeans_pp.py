"""kmeans_pp: greedy k-means++ seeding of ``n_init`` restarts as ``laic.kmeans._kmeans_pp`` runs them, in lockstep
(one product of all the restarts' candidates with the rows a step), against the same seedings one after another
(the same random numbers: on these random rows the same seeds, see tests/test_stage0.py). Without the Gram matrix,
the path beyond 4096 seeding rows: at K = 1000 the seeding reads the whole 20k-row sample K times a restart, and
the rows' bytes set its time (memory-bound products of 2 + log K rows). The fused k-means' shapes: n_init = 10 up
to K = 100, else 3 (laic.model.default_n_init)."""
from __future__ import annotations

from functools import partial

import torch

from common import Case, unit_features
from laic import kmeans

# (N seeding rows, D, K, n_init)
SIZES = {
    "small": [(10_000, 512, 100, 10)],
    "large": [(20_000, 512, 1000, 3)],
    "imagenet": [(20_000, 512, 1000, 3)],
}


def one_after_another(x: torch.Tensor, k: int, n_init: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.cat([kmeans._kmeans_pp(x, k, generator) for _ in range(n_init)])


def in_lockstep(x: torch.Tensor, k: int, n_init: int) -> torch.Tensor:
    return kmeans._kmeans_pp(x, k, torch.Generator().manual_seed(0), n_starts=n_init)


def cases(device: torch.device, scale: str):
    out = []
    for n, d, k, n_init in SIZES[scale]:
        x = unit_features(n, d, device, torch.float32, seed=0)
        trials = kmeans.n_trials(k)
        runs = {"one after another": partial(one_after_another, x, k, n_init),
                "lockstep (laic)": partial(in_lockstep, x, k, n_init)}
        # The products of every candidate with every row: (K - 1) steps x trials candidates x n_init restarts.
        out.append(Case("kmeans_pp", f"N={n} D={d} K={k} n_init={n_init}", "float32", runs,
                        flops=2.0 * n * d * (k - 1) * trials * n_init, baseline="one after another"))
    return out
