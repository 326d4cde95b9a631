"""``LAIC.fit`` on a process group: what the estimator needs beyond the stages' own collectives.

The API: inside an initialised process group (torchrun, ``laic.distributed.init`` or the caller's own
``torch.distributed.init_process_group``) every rank calls ``LAIC(...).fit(rows, nouns, names)`` with its own block of
image rows (the blocks concatenated in rank order are the data set) and the same nouns. Every fitted attribute that
``predict`` and ``save`` use is then the same on every rank, except ``labels_``, which holds the labels of the rank's
own rows; :func:`gather_labels` brings all of them to rank 0, which can then save the model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .rows import RowBlocks
from .world import comm_device, current


def fit_group() -> Optional[dist.ProcessGroup]:
    """The process group ``LAIC.fit`` shares its work with: the default group when one with several ranks is
    initialised (not inside :func:`laic.distributed.one_process`), else None (one process)."""
    return current().group


def check_compute_device(device: torch.device, group: Optional[dist.ProcessGroup]) -> None:
    """On a process group the fit passes its own tensors to the collectives (the kNN ring's sends, stage 1's sums):
    they must be where the group's backend takes them (NCCL: the GPU; gloo: the CPU)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    where = comm_device(group)
    if where.type != device.type:
        backend = dist.get_backend(group)
        raise ValueError(f"device={str(device)!r}: the processes communicate through {backend}, which takes "
                         f"{where.type} tensors; fit on device={where.type!r}, or start the process group with the "
                         f"backend of {device.type} ({'nccl' if device.type == 'cuda' else 'gloo'})")


def total_rows(images: torch.Tensor, nouns: torch.Tensor, group: Optional[dist.ProcessGroup]) -> RowBlocks:
    """The row blocks of the ranks' ``images``; on a group, a ``ValueError`` on every rank when the ranks' image
    dimensions or nouns differ (the nouns must be the same everywhere: each rank computes with all of them)."""
    rows = RowBlocks(images.shape[0], group, width=images.shape[1])
    if not rows.distributed:
        return rows
    if len(set(rows.widths)) > 1:
        raise ValueError(f"image_features must have the same dimension D on every rank, got {rows.widths} (by rank)")
    # Two weighted sums identify the nouns well enough to catch a rank given another vocabulary or order.
    weights = torch.arange(1, nouns.numel() + 1, dtype=torch.float64, device=nouns.device).reshape(nouns.shape)
    mine = (tuple(nouns.shape), float(nouns.double().sum()), float((nouns.double() * weights).sum()))
    signatures = [None] * rows.size
    dist.all_gather_object(signatures, mine, group=group)
    differ = [r for r, s in enumerate(signatures) if s != signatures[0]]
    if differ:
        raise ValueError(f"noun_features must be the same on every rank; ranks {differ} differ from rank 0 "
                         f"(shapes by rank: {[s[0] for s in signatures]}); pass every rank the same vocabulary")
    return rows


class GatheredBlock(tuple):
    """``row_block_`` ``(start, stop, N)`` of a rank other than 0 once :func:`gather_labels` has sent its labels:
    they are still this rank's block, and a repeated call knows that the gather is done."""


def gather_labels(model) -> Optional[np.ndarray]:
    """After ``fit`` on a process group (collective: every rank calls it): all N labels in rank order on rank 0,
    which also keeps them as ``model.labels_`` (so that it can ``save`` the model); None on the other ranks. In one
    process, ``model.labels_``. Calling it again (before another fit) returns the same on every rank at once (rank 0
    alone used to return, the others to wait in a gather that never came)."""
    model._check_fitted()
    block = getattr(model, "row_block_", None)
    if block is None:
        return model.labels_
    if isinstance(block, GatheredBlock):
        return None
    group = fit_group()
    rows = RowBlocks(len(model.labels_), group)
    if rows.n_rows != block[2]:
        # Outside the fit's group (one_process(), another process) one rank's block passed for all N labels, and
        # save wrote it.
        raise ValueError(f"this model was fitted on a process group and holds rows {block[0]} to {block[1]} of "
                         f"{block[2]}; call gather_labels on every rank of that group (not inside one_process() "
                         "nor in another process)")
    labels = rows.gather_to_main(torch.from_numpy(np.ascontiguousarray(model.labels_)))
    if labels is None:
        model.row_block_ = GatheredBlock(block)
        return None
    model.labels_ = labels.numpy()
    model.row_block_ = None
    return model.labels_
