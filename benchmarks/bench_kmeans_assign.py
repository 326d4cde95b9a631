"""kmeans_assign: one Lloyd assignment (nearest of K unit centres for N unit rows, with the per-cluster sums), as
``laic.kmeans`` runs it, against the same without the CPU's centre padding (``laic.kmeans.padded_centres``: on the
CPU, in float32 operands, K is padded with copies of centres to a multiple of ``CPU_CENTRE_MULTIPLE``, where the
BLAS multiplies [N, D] by [D, K] much faster). Elsewhere the two runs are the same code, so there are no GPU sizes.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from common import Case, unit_features
from laic import kmeans

# (N, D, K): the dev sets' shapes (food101-train, dtd-val), a K that is a multiple already, and a large N.
SIZES = {
    "small": [(2000, 512, 10), (1128, 512, 47), (2000, 512, 64), (100_000, 512, 100)],
    "large": [],
    "imagenet": [],
}


@contextmanager
def unpadded():
    saved = kmeans.CPU_CENTRE_MULTIPLE
    kmeans.CPU_CENTRE_MULTIPLE = 1
    try:
        yield
    finally:
        kmeans.CPU_CENTRE_MULTIPLE = saved


def assign_unpadded(x: torch.Tensor, centres: torch.Tensor):
    with unpadded():
        return kmeans._assign(x, centres)


def cases(device: torch.device, scale: str):
    if device.type != "cpu":
        return []
    out = []
    for n, d, k in SIZES[scale]:
        x = unit_features(n, d, device, torch.float32, seed=0)
        centres = unit_features(k, d, device, torch.float32, seed=1)
        runs = {"unpadded": partial(assign_unpadded, x, centres), "padded (laic)": partial(kmeans._assign, x, centres)}
        padded_k = kmeans.padded_centres(centres)[0].shape[0]
        out.append(Case("kmeans_assign", f"N={n} D={d} K={k}", "float32", runs, flops=2.0 * n * d * k,
                        baseline="unpadded", notes={"padded (laic)": f"{padded_k} centres searched"}))
    return out
