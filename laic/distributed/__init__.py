"""Scale-out over processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

  world    the process group from the torchrun environment, ``is_main()``, each rank's row shard
           (``one_process()``: laic on one rank's data alone inside a group)
  rows     collectives over a matrix whose row blocks are spread over the ranks
  knn      the exact kNN graph of such a matrix, key blocks passed round a ring
  spawn    start a small group of local processes (tests, CPU runs without torchrun)
  batch    stage 1's training batch spread over the ranks (BatchNorm statistics, the whole batch, gradients)
  fit      ``LAIC.fit`` on a process group: each rank's rows in, ``gather_labels`` out
  check    ``torchrun ... -m laic.distributed.check``: the distributed results against one process's
  failure  a step that fails on one rank stops every rank with one message (``stop_all_on_failure``; ``from_main``
           for a step on rank 0 alone)

Spherical k-means takes a process group directly: ``laic.stage0.spherical_kmeans(shard, k, group=...)``.
"""
from .failure import (CollectiveError, CollectiveMachineError, RankFailed, from_main, same_on_all_ranks,
                      stop_all_on_failure)
from .fit import gather_labels
from .knn import knn_graph, neighbour_mean
from .rows import RowBlocks
from .spawn import spawn
from .world import World, current, init, is_main, leave_quietly, one_process, row_counts, row_shard, shutdown

__all__ = ["World", "CollectiveError", "CollectiveMachineError", "RankFailed", "RowBlocks", "current", "from_main",
           "gather_labels", "init", "is_main", "knn_graph", "leave_quietly", "neighbour_mean", "one_process",
           "row_counts", "row_shard", "same_on_all_ranks", "shutdown", "spawn", "stop_all_on_failure"]
