"""neighbour_mean: the mean of each row's k neighbours' features (``laic.distributed.knn.neighbour_mean`` in one
process: one neighbour column at a time summed into an [N, D] buffer) against gathering all [N, k, D] neighbour rows
and averaging them (``features[neighbours].mean(1)``, k times the memory). GB/s count the rows read once."""
from __future__ import annotations

from functools import partial

import torch

from common import Case, unit_features
from laic.distributed.knn import neighbour_mean

# (N, k, D)
SIZES = {
    "small": [(2000, 10, 512), (100_000, 10, 512)],
    "large": [(100_000, 10, 512), (1_281_167, 10, 512)],
    "imagenet": [(1_281_167, 10, 512)],
}
# Above this N the gather (N x k x D float32: 26 GB at ImageNet size) is not timed.
MAX_GATHER_N = 200_000


def gathered_mean(features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    return features[neighbours].mean(1)


def cases(device: torch.device, scale: str):
    out = []
    for n, k, d in SIZES[scale]:
        features = unit_features(n, d, device, torch.float32, seed=0)
        gen = torch.Generator(device=device).manual_seed(1)
        neighbours = torch.randint(0, n, (n, k), generator=gen, device=device)
        runs = {"column sums (laic)": partial(neighbour_mean, features, neighbours)}
        if n <= MAX_GATHER_N:
            runs = {"gather and mean": partial(gathered_mean, features, neighbours), **runs}
        out.append(Case("neighbour_mean", f"N={n} k={k} D={d}", "float32", runs, bytes=4.0 * n * (k + 1) * d,
                        baseline="gather and mean" if n <= MAX_GATHER_N else "column sums (laic)"))
    return out
