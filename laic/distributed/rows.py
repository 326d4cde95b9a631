"""Collectives over a matrix whose rows are split over the ranks of a process group.

Rank ``r`` holds a contiguous block of rows, the blocks in rank order (rank 0 holds the first rows); the blocks may
differ in size and may be empty. :class:`RowBlocks` learns every block's size once and then offers what the
distributed algorithms need: sums over all rows, the rows at given global indices, the globally smallest values,
the whole matrix gathered. With ``group=None`` one process holds every row and each method does the plain
single-process thing, so an algorithm written against it has one code path for both.

Input checks that must fail on every rank alike are :func:`laic.distributed.failure.stop_all_on_failure`'s job.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..operands import best_by_value
from .failure import CollectiveError
from .world import comm_device, group_rank, group_size

__all__ = ["CollectiveError", "RowBlocks", "comm_device", "group_rank", "group_size", "row_sample"]


def row_sample(n_rows: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """``size`` distinct row indices of ``n_rows`` (global indices), uniform, ascending, drawn by the CPU ``generator``:
    alike on every device and on every rank whose generator is in the same state."""
    return torch.randperm(n_rows, generator=generator)[:size].sort().values.to(device)


class RowBlocks:
    """The row blocks of one ``[N, D]`` matrix over the ranks of ``group`` (collective to construct: every rank
    passes the number of rows it holds, and optionally its width D so that callers can check that all agree)."""

    def __init__(self, n_local: int, group: Optional[dist.ProcessGroup] = None, *, width: int = 0):
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)
        self.device = comm_device(group)
        shape = torch.tensor([[n_local, width]], dtype=torch.int64, device=self.device)
        if self.size > 1:
            gathered = [torch.empty_like(shape) for _ in range(self.size)]
            dist.all_gather(gathered, shape, group=group)
            shape = torch.cat(gathered)
        self.counts: List[int] = shape[:, 0].tolist()
        self.widths: List[int] = shape[:, 1].tolist()
        self.starts: List[int] = [sum(self.counts[:r]) for r in range(self.size)]
        self.n_rows = sum(self.counts)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def start(self) -> int:
        """Global index of this rank's first row."""
        return self.starts[self.rank]

    def global_rank(self, rank: int) -> int:
        """``rank`` of this group as a rank of the default group (what point-to-point calls take)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # -- reductions -------------------------------------------------------------------------------------------------

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place. Float sums are added in the all-reduce's order, not row order: the
        result can differ from a single-process sum in the last bits."""
        return self._all_reduce_(x, dist.ReduceOp.SUM)

    def min_(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s elementwise minimum over the ranks, in place."""
        return self._all_reduce_(x, dist.ReduceOp.MIN)

    def _all_reduce_(self, x: torch.Tensor, op) -> torch.Tensor:
        """``x`` reduced over the ranks by ``op``, in place (through the group's device: a CUDA tensor under gloo)."""
        if self.distributed:
            staged = x.to(self.device)
            dist.all_reduce(staged, op=op, group=self.group)
            x.copy_(staged)
        return x

    def total(self, x: torch.Tensor) -> float:
        """The sum of ``x`` over all rows of all ranks, as a Python float (accumulated in float64 across ranks)."""
        return float(self.sum_(x.sum().double().reshape(1)))

    def value_counts(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(distinct, counts)``: the distinct entries of the whole ``[N]`` integer vector (this rank holds
        ``values``), ascending, and how often each occurs. Each rank counts its own rows; the (value, count) lists
        are all-gathered (padded to the longest), so the traffic is at most the distinct values, not a dense table."""
        distinct, counts = torch.unique(values, return_counts=True)
        if not self.distributed:
            return distinct, counts
        longest = torch.tensor([len(distinct)], device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
        padded = torch.zeros((2, int(longest)), dtype=torch.int64, device=self.device)
        padded[0, :len(distinct)], padded[1, :len(distinct)] = distinct.to(self.device), counts.to(self.device)
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        listed = torch.cat(gathered, dim=1)
        listed = listed[:, listed[1] > 0].to(values.device)     # padding counts nothing
        distinct, where = torch.unique(listed[0], return_inverse=True)
        return distinct, torch.zeros_like(distinct).index_add_(0, where, listed[1])

    def all_true(self, flag: bool) -> bool:
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    # -- rows by global index ---------------------------------------------------------------------------------------

    def local_part(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(which, local)``: the positions in ``indices`` (global row indices) that this rank holds, and those
        rows' local indices."""
        local = indices - self.start
        which = ((local >= 0) & (local < self.counts[self.rank])).nonzero().flatten()
        return which, local[which]

    def take(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``full[indices]`` on every rank, ``full`` being the whole matrix (each row comes from its owner)."""
        if not self.distributed:
            return x[indices]
        out = x.new_zeros((len(indices),) + tuple(x.shape[1:]))
        which, local = self.local_part(indices)
        out[which] = x[local]
        return self.sum_(out)   # one owner per row, zeros elsewhere: the sum is that row exactly

    def smallest(self, values: torch.Tensor, m: int) -> torch.Tensor:
        """Global indices of the ``m`` smallest entries of the whole ``[N]`` vector (this rank holds ``values``),
        smallest first, equal values by lower index."""
        if not self.distributed:
            return torch.sort(values, stable=True).indices[:m]
        m = min(m, self.n_rows)   # as one process's sort(...)[:m]: never a padding index
        mine = torch.sort(values, stable=True)
        take = min(m, len(values))
        candidates = torch.full((2, m), float("inf"), dtype=torch.float64, device=self.device)
        candidates[1] = float(self.n_rows)   # padding sorts after every real row
        candidates[0, :take] = mine.values[:take].double().to(self.device)
        candidates[1, :take] = (mine.indices[:take] + self.start).double().to(self.device)
        gathered = [torch.empty_like(candidates) for _ in range(self.size)]
        dist.all_gather(gathered, candidates, group=self.group)
        vals, idx = torch.cat(gathered, dim=1)
        return best_by_value(vals, idx, m, largest=False)[1].long().to(values.device)

    # -- whole matrix -----------------------------------------------------------------------------------------------

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        width = max(self.counts)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]), device=self.device)
        padded[: len(x)] = x
        return padded

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole matrix on every rank (blocks concatenated in rank order)."""
        if not self.distributed:
            return x
        padded = self._padded(x)
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:c] for g, c in zip(gathered, self.counts)]).to(x.device)

    def gather_to_main(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole matrix on rank 0 (None elsewhere): rank 0 needs memory for all N rows."""
        if not self.distributed:
            return x
        padded = self._padded(x)
        gathered = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, gathered, dst=self.global_rank(0), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([g[:c] for g, c in zip(gathered, self.counts)]).to(x.device)

    def broadcast_from_main(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place (every rank passes a tensor of the same shape and dtype)."""
        if self.distributed:
            staged = x.to(self.device)
            dist.broadcast(staged, src=self.global_rank(0), group=self.group)
            x.copy_(staged)
        return x
