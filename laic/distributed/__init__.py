"""Scale-out over processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

  world    the process group from the torchrun environment, ``is_main()``, each rank's row shard
  rows     collectives over a matrix whose row blocks are spread over the ranks; collective input errors
  knn      the exact kNN graph of such a matrix, key blocks passed round a ring
  spawn    start a small group of local processes (tests, CPU runs without torchrun)
  check    ``torchrun ... -m laic.distributed.check``: the distributed results against one process's
  failure  a step that fails on one rank stops every rank with one message (``stop_all_on_failure``)

Spherical k-means takes a process group directly: ``laic.stage0.spherical_kmeans(shard, k, group=...)``.
"""
from .failure import RankFailed, from_main, same_on_all_ranks, stop_all_on_failure
from .knn import knn_graph, neighbour_mean
from .rows import RowBlocks, agree
from .spawn import spawn
from .world import World, current, init, is_main, row_counts, row_shard, shutdown

__all__ = ["World", "RowBlocks", "agree", "current", "init", "is_main", "knn_graph", "neighbour_mean", "row_counts", "row_shard",
           "shutdown", "spawn", "RankFailed", "from_main", "same_on_all_ranks", "stop_all_on_failure"]
