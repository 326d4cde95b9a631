"""The exact kNN graph over row blocks held by different ranks.

Each rank owns a block of query rows and keeps, per row, a running top-k of ``(similarity, global index)``. It first
takes the top-k within its own block (``laic.operands.top_similar`` with ``exclude_self``: ``similarity_topk``, with
half-precision candidates chosen by float32 similarity on GPUs), then the other ranks' rows come
round a ring, ``block_rows`` at a time: at each step every rank sends the key block it holds to the next rank and
receives one from the previous rank (``batch_isend_irecv``, NCCL or gloo), and works on the block it has while the
next one is in flight. Every key block goes through ``top_similar`` with its global row offset added to the
indices, and the candidates merge into the running list by the kernel's rule: larger similarity first, equal
similarities by lower index. Beyond its own rows a rank holds the ``[n_local, k]`` lists and two key blocks of
``block_rows x D``: O(N/G * k + block_rows * D).

Equality with the single-process ``laic.operands.knn`` (``laic_kernels.knn_graph`` in float32 operands; with
half-precision operands both choose in float32 among half-precision candidates, and the ring, which takes
``k + RESCORE_MARGIN`` of them from every key block, misses a float32 neighbour no more often than one process):
every similarity is the same product of the same unit
rows (one row block against another, which on the platforms tested gives the same bits as the full product, except
for blocks of a few rows: a rank holding 1 to 3 rows got similarities within 1e-7 of them, as BLAS takes other paths
for such thin products), so the neighbour lists are the same wherever no two candidates tie (or lie within that).
Ties are broken by lower index, as the Triton kernel does; the CPU reference (``torch.topk``) breaks them in an
unspecified order, so there the lists can differ among tied neighbours (the sorted similarities are still equal).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from laic_kernels import checks
from laic_kernels.knn_graph import unit_rows

from .failure import stop_all_on_failure
from ..operands import best_by_value, knn as single_process_knn_graph, search_operands, top_similar
from .rows import RowBlocks

# Key rows per message: 4096 rows of D = 512 float32 is 8 MiB, large enough to keep the links busy.
DEFAULT_BLOCK_ROWS = 4096


def _check_local(features, block_rows) -> None:
    checks.tensor("features", features, ndim=2)
    checks.finite("features", features)
    checks.int_in_range("block_rows", block_rows, 1, 1 << 40)


def _check_global(blocks: RowBlocks, k) -> None:
    if len(set(blocks.widths)) > 1:
        raise ValueError(f"features must have the same number of columns D on every rank, got {blocks.widths} "
                         "(by rank)")
    if blocks.n_rows < 2:
        raise ValueError(f"features must have at least 2 rows over all ranks to have neighbours, got {blocks.n_rows}")
    checks.int_in_range("k", k, 1, blocks.n_rows - 1, " (k <= N - 1 with N the rows of all ranks together)")


def knn_graph(features: torch.Tensor, k: int, group: Optional[dist.ProcessGroup] = None, *,
              block_rows: int = DEFAULT_BLOCK_ROWS) -> Tuple[torch.Tensor, torch.Tensor]:
    """``laic_kernels.knn_graph`` of the matrix whose row blocks the ranks of ``group`` hold, for this rank's rows.

    Args:
        features: ``[n_local, D]`` this rank's rows (rank 0 holds the first rows, then rank 1's, ...); any size,
            empty included, on this rank's device.
        k: neighbours per row, ``1 <= k <= N - 1`` with ``N`` the rows of all ranks.
        group: the process group (``laic.distributed.current().group``); None: a single process, plain
            ``knn_graph``.
        block_rows: key rows per message round the ring.

    Returns:
        ``(values[n_local, k] float32, indices[n_local, k] int64)``, indices into the whole matrix. A bad input on any
        rank raises the same ``ValueError`` on every rank.
    """
    stop_all_on_failure(group, lambda: _check_local(features, block_rows), "knn_graph's input check")
    if group is None or dist.get_world_size(group) == 1:
        return single_process_knn_graph(features, k)
    blocks = RowBlocks(features.shape[0], group, width=features.shape[1])
    stop_all_on_failure(group, lambda: _check_global(blocks, k), "knn_graph's input check")
    unit = unit_rows(features).contiguous()
    n_local = unit.shape[0]
    # A rank without rows still passes key blocks on; its lists are [0, k].
    values = torch.empty(n_local, 0 if n_local else k, dtype=torch.float32, device=unit.device)
    indices = torch.empty(n_local, 0 if n_local else k, dtype=torch.int64, device=unit.device)
    if n_local >= 2:
        values, indices = top_similar(unit, unit, min(k, n_local - 1), exclude_self=True)
        indices = indices + blocks.start
    query_operands = search_operands(unit)   # cast once for all the key blocks
    for keys, offset in _ring(unit, blocks, block_rows):
        if n_local == 0:
            continue
        new_values, new_indices = top_similar(unit, keys, min(k, keys.shape[0]), query_operands=query_operands)
        values, indices = best_by_value(torch.cat([values, new_values], 1),
                                        torch.cat([indices, new_indices + offset], 1), k, largest=True)
    return values, indices


def _ring(unit: torch.Tensor, blocks: RowBlocks, block_rows: int) -> Iterator[Tuple[torch.Tensor, int]]:
    """Every other rank's rows, as ``(keys, global index of keys[0])`` blocks of at most ``block_rows``, passed round
    the ring: chunk ``c`` of every rank's block makes ``size - 1`` hops before chunk ``c + 1`` starts."""
    size, rank = blocks.size, blocks.rank
    send_to, receive_from = blocks.global_rank((rank + 1) % size), blocks.global_rank((rank - 1) % size)

    def chunk(owner: int, c: int) -> Tuple[int, int]:
        start = min(blocks.counts[owner], c * block_rows)
        return blocks.starts[owner] + start, min(blocks.counts[owner], start + block_rows) - start

    for c in range(math.ceil(max(blocks.counts) / block_rows)):
        held_start, held_rows = chunk(rank, c)
        held = unit[held_start - blocks.start:][:held_rows]
        for step in range(1, size):
            owner = (rank - step) % size
            incoming_start, incoming_rows = chunk(owner, c)
            incoming = unit.new_empty(incoming_rows, unit.shape[1])
            ops = []
            if len(held):
                ops.append(dist.P2POp(dist.isend, held, send_to, blocks.group))
            if incoming_rows:
                ops.append(dist.P2POp(dist.irecv, incoming, receive_from, blocks.group))
            requests = dist.batch_isend_irecv(ops) if ops else []
            if step > 1 and len(held):
                yield held, held_start   # computed on while the next block is in flight
            for request in requests:
                request.wait()
            held, held_start = incoming, incoming_start
        if len(held) and size > 1:
            yield held, held_start


def _check_neighbour_lists(features: torch.Tensor, neighbours: torch.Tensor, group, n_rows: int) -> None:
    distributed = group is not None and dist.get_world_size(group) > 1
    if neighbours.dim() != 2 or (distributed and neighbours.shape[0] != features.shape[0]):
        # (in one process the lists may be any rows' (a block of them): the result has a row per list)
        raise ValueError(f"neighbours must be [N, k] with this rank's N = {features.shape[0]} rows of features, got "
                         f"shape {tuple(neighbours.shape)}")
    if checks.values_are_checked() or neighbours.numel() == 0:
        return
    low, high = int(neighbours.min()), int(neighbours.max())
    if low < 0 or high >= n_rows:
        raise ValueError(f"neighbours holds {low if low < 0 else high}, not a row index of the whole matrix "
                         f"(0 to {n_rows - 1})")


def neighbour_mean(features: torch.Tensor, neighbours: torch.Tensor, group: Optional[dist.ProcessGroup] = None, *,
                   block_rows: int = DEFAULT_BLOCK_ROWS) -> torch.Tensor:
    """``full[neighbours].mean(1)`` for this rank's rows: the mean of each row's neighbours (global indices into the
    matrix whose row blocks the ranks hold), the other ranks' rows passed round the ring as in :func:`knn_graph`.
    The sums are added in another order than one process adds them: the result can differ in the last bits.
    On a group ``neighbours`` holds one row per row of ``features`` (in one process, any number of rows); each index
    must be a row of the whole matrix (checked, on every rank alike: out of range they were left out of the sums
    without a word on a group, an IndexError in one process)."""
    n_rows = RowBlocks(features.shape[0], group).n_rows   # (collective: before a check that may fail on one rank)
    stop_all_on_failure(group, lambda: _check_neighbour_lists(features, neighbours, group, n_rows),
                        "neighbour_mean's check")
    if group is None or dist.get_world_size(group) == 1:
        # One neighbour column at a time summed into one [N, D] buffer, not all [N, k, D] neighbour rows gathered
        # and averaged: the same additions in the same order and k times less memory; on the CPU 10x faster at
        # 2000 x 10 x 512, 1.6x at 100k rows on one thread, 0.9x there on two (`python benchmarks/throughput.py
        # --ops neighbour_mean`, RESULTS.md; the fit calls it on row blocks).
        total = torch.zeros(neighbours.shape[0], features.shape[1], device=features.device,
                            dtype=torch.promote_types(features.dtype, torch.float32))
        for column in neighbours.unbind(1):
            total += features.index_select(0, column)
        return (total / neighbours.shape[1]).to(features.dtype)
    blocks = RowBlocks(features.shape[0], group, width=features.shape[1])
    sums = torch.zeros(features.shape[0], features.shape[1], dtype=torch.float32, device=features.device)
    own = [(features.contiguous(), blocks.start)]
    for keys, offset in itertools.chain(own, _ring(features.contiguous(), blocks, block_rows)):
        # One neighbour column at a time, as in one process: every (row, column) pair held by ``keys`` gathered at
        # once was [N/G, k, D] where the neighbours lie on the rank (rows stored class by class: 218 MiB a rank
        # for a 20 MiB block at 10,000 x 512, k = 10).
        for column in (neighbours - offset).unbind(1):
            row = ((column >= 0) & (column < keys.shape[0])).nonzero(as_tuple=True)[0]
            sums.index_add_(0, row, keys.index_select(0, column.index_select(0, row)).float())
    return (sums / neighbours.shape[1]).to(features.dtype)
