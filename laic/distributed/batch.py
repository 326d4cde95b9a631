"""What stage 1 (``laic.stage1.train_heads``) needs across ranks: one training batch spread over the ranks and
trained as one process would train it, and the per-cluster selection of confident rows.

The scheme, for replicated heads (same seed, same initialisation on every rank):
  - every rank draws the same global batch (same generator, same permutation of all N rows) and runs the heads on the
    batch rows it holds (``laic.stage1._group_epoch``, by ``RowBlocks.local_part``);
  - BatchNorm's batch statistics are those of the whole batch (:class:`GroupBatchNorm1d`, autograd-aware
    all-reduces of the sums);
  - the batch's outputs are put back together on every rank in batch order (:func:`whole_batch`), so that the loss,
    its batch-level terms (cluster centres, Sinkhorn targets, running shares) and its value are one process's, on
    every rank alike;
  - each rank's backward reaches the parameters only through its own rows: :func:`sum_gradients` adds the ranks'
    parameter gradients, which gives the gradient one process computes on the whole batch (up to the order of float
    additions), and every rank takes the same optimiser step.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .rows import RowBlocks


class GroupBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of the rows of every rank of ``group`` together (a
    rank may hold none). Eval mode, the parameters and the state dict are plain BatchNorm's.

    The mean and the (biased) variance are all-reduced sums divided by the total row count, in two passes as one
    process computes them; the running variance is updated with the unbiased variance, as ``nn.BatchNorm1d`` does.
    The all-reduces are autograd-aware: their backward adds the ranks' gradients of the statistics."""

    def __init__(self, num_features: int, group: dist.ProcessGroup, **factory):
        super().__init__(num_features, **factory)
        self.group = group

    def _total(self, x: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(x, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # The row count travels with the sums: one all-reduce for both.
        sums = self._total(torch.cat([x.sum(0), x.new_full((1,), float(x.shape[0]))]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean
        var = self._total((centred * centred).sum(0)) / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
            self.num_batches_tracked.add_(1)
        return centred * torch.rsqrt(var + self.eps) * self.weight + self.bias


class _SumOverRanks(torch.autograd.Function):
    """The sum of ``x`` over the ranks; backward, the sum of the ranks' gradients (each rank's loss depends on the
    sum through its own rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _WholeBatch(torch.autograd.Function):
    """The sum over ranks of per-rank buffers that are zero outside each rank's rows. Backward passes the gradient
    through unchanged: valid because every rank computes the same loss from the same whole batch, so each rank
    already holds the gradient of the one loss with respect to its own rows."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = buffer.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def whole_batch(local: torch.Tensor, positions: torch.Tensor, batch_size: int, group: dist.ProcessGroup
                ) -> torch.Tensor:
    """``[batch_size, C]`` on every rank: row ``p`` is the rank that holds it's ``local`` row for position ``p``
    (``local[i]`` is at ``positions[i]``). Exact (the other ranks add zeros); gradients reach ``local``."""
    buffer = local.new_zeros(batch_size, local.shape[1]).index_put((positions,), local)
    return _WholeBatch.apply(buffer, group)


def sum_gradients(parameters: Iterable[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Add the ranks' gradients of ``parameters`` (in one all-reduce); a parameter without a gradient counts as
    zero."""
    parameters = list(parameters)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat, group=group)
    for p, g in zip(parameters, flat.split([p.numel() for p in parameters])):
        p.grad = g.view_as(p).clone()


# ------------------------------------------------------------------------------------------------------------------
# The largest values per group, over all ranks' rows


def top_per_group(values: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, rows: RowBlocks
                  ) -> torch.Tensor:
    """Which of this rank's rows are among the ``quota[g]`` largest ``values`` of their group ``g`` over all ranks'
    rows, equal values by lower global row (bool ``[n_local]``). ``values`` are non-negative floats.

    The threshold of each group (its ``quota``-th largest value) is found by bisection on the float32 bit patterns,
    which sort as the non-negative values do: 31 all-reduces of per-group counts, nothing of size N on any rank."""
    n_groups = quota.shape[0]
    bits = values.float().contiguous().view(torch.int32).long()

    def counts(mask: torch.Tensor) -> torch.Tensor:
        return rows.sum_(torch.bincount(groups[mask], minlength=n_groups))

    # Invariant: at least quota rows are >= lo, fewer than quota are >= hi.
    lo = torch.zeros(n_groups, dtype=torch.int64, device=values.device)
    hi = torch.full_like(lo, 1 << 31)
    for _ in range(31):
        mid = (lo + hi) // 2
        enough = counts(bits >= mid[groups]) >= quota
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    threshold = lo[groups]
    greater, equal = bits > threshold, bits == threshold
    room = quota - counts(greater)   # how many of the rows equal to the threshold each group keeps
    # Equal rows in global row order: the ranks before this one first, then this rank's in local order.
    per_rank = torch.bincount(groups[equal], minlength=n_groups)
    before = _exclusive_prefix(per_rank, rows)
    idx = equal.nonzero().flatten()
    order = torch.argsort(groups[idx], stable=True)
    sorted_groups = groups[idx][order]
    tie_rank = torch.empty_like(idx)
    tie_rank[order] = torch.arange(len(idx), device=idx.device) - torch.searchsorted(sorted_groups, sorted_groups)
    keep = greater.clone()
    keep[idx] = tie_rank + before[groups[idx]] < room[groups[idx]]
    return keep


def _exclusive_prefix(x: torch.Tensor, rows: RowBlocks) -> torch.Tensor:
    """The sum of ``x`` over the ranks before this one (zeros on rank 0)."""
    if not rows.distributed:
        return torch.zeros_like(x)
    gathered = [torch.empty_like(x, device=rows.device) for _ in range(rows.size)]
    dist.all_gather(gathered, x.to(rows.device), group=rows.group)
    return torch.stack(gathered[:rows.rank]).sum(0).to(x.device) if rows.rank else torch.zeros_like(x)


def group_of(rows: Optional[RowBlocks]) -> Optional[dist.ProcessGroup]:
    """The process group of ``rows`` when the rows are spread over several ranks, else None."""
    return rows.group if rows is not None and rows.distributed else None
