"""Stage 2 in a process group (``torchrun``, :func:`laic.distributed.spawn`): the same training as one process whose
batch is the combined batch of all ranks.

- Batches: every rank draws the same permutation of the epoch's pseudo-labelled images (seeded by (seed, epoch), as
  in one process), cuts it into batches of ``batch_size`` images (the combined batch: ``batch_size`` is
  world-size-free, so a checkpoint resumes on any number of processes), and takes the r-th contiguous part of each
  (:func:`laic.distributed.row_counts`: parts differ by at most one image; in a last batch smaller than the world a
  rank may get none). Concatenated in rank order, the parts are one process's batch, in its order.
- Gradients: the trainable modules are wrapped in DistributedDataParallel, which averages gradients over the ranks.
  Each rank's loss is its share of the combined batch's loss scaled by the world size (a sum over its images divided
  by the combined batch size, times G), so the average is the gradient of the combined batch's mean loss, whatever
  the split (uneven last batches included: nothing is dropped or padded). A rank without images in a last batch runs
  one blank image with weight zero, so that it still takes part in the gradient all-reduce.
- Batch statistics: the open_clip ViT towers stage 2 accepts use LayerNorm (per image) and no BatchNorm; the one
  cross-image term is the in-batch contrastive loss against the text counterparts, computed on the features gathered
  from every rank (each rank's own rows keep their gradient), i.e. on the combined batch.
  Randomness: augmentations are seeded per image, so no rank's global RNG enters the result (a tower with dropout
  enabled would draw it per rank, and then match one process only in distribution).
- Relabelling and the final predictions: every rank embeds its contiguous block of the training images and the
  blocks are gathered, so every rank holds the same probabilities and the same pseudo-labels.
- Failure: each step's reading and forward pass, the checkpoint write (rank 0) and ``on_epoch_end`` end in an
  agreement among the ranks (laic.distributed.failure), so an error on one rank is raised on all of them.

In one process the same code runs with one share per batch and no wrapper.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.world import World, row_counts
from .data import epoch_seed


class EpochBatches:
    """One epoch's batches for this rank: ``len`` steps; iterating yields this rank's dataset positions per step
    (possibly an empty list in a last batch smaller than the world), the ``batch_sampler`` of a DataLoader."""

    def __init__(self, n_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, size: int = 1):
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        self.order = torch.randperm(n_items, generator=generator)
        self.batch_size, self.rank, self.size = batch_size, rank, size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def combined(self, step: int) -> torch.Tensor:
        """The dataset positions of the whole batch of ``step`` (every rank's part, in rank order)."""
        return self.order[step * self.batch_size:(step + 1) * self.batch_size]

    def counts(self, step: int) -> List[int]:
        """Images of ``step`` per rank."""
        return row_counts(len(self.combined(step)), self.size)

    def local(self, step: int) -> torch.Tensor:
        counts = self.counts(step)
        start = sum(counts[:self.rank])
        return self.combined(step)[start:start + counts[self.rank]]

    def __iter__(self):
        for step in range(len(self)):
            yield self.local(step).tolist()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when ``world`` is a group (DDP broadcasts rank 0's weights, so every
    replica starts equal), else ``model`` itself."""
    if world.group is None:
        return model
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise ValueError(f"stage 2 in a process group needs a tower without BatchNorm (found {batch_norms[0]}); "
                         "per-rank batch statistics would differ from one process's: use a ViT tower")
    if dist.get_backend(world.group) == "nccl" and device.type != "cuda":
        raise ValueError(f"stage 2 under NCCL runs on each rank's GPU, got device={device}; pass device='cuda' "
                         "(or 'auto')")
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def gather_with_local_grad(x: torch.Tensor, counts: Sequence[int], world: World) -> torch.Tensor:
    """The rows of every rank (``counts[r]`` from rank r, concatenated in rank order), where this rank's rows are
    ``x`` itself, gradient included, and the others' are copies (their gradients flow on their own ranks)."""
    if world.group is None:
        return x
    width = max(counts)
    padded = x.detach().new_zeros((width,) + tuple(x.shape[1:]))
    padded[:len(x)] = x.detach()
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=world.group)
    return torch.cat([x if r == world.rank else g[:c] for r, (g, c) in enumerate(zip(gathered, counts))])


def sum_over_ranks(x: torch.Tensor, world: World) -> torch.Tensor:
    """``x`` summed over the ranks (on every rank)."""
    if world.group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=world.group)
    return x


def no_sync(model: nn.Module, accumulating: bool):
    """DDP's ``no_sync`` while accumulating gradients (they are all-reduced once, at the optimiser step)."""
    import contextlib

    if accumulating and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()

