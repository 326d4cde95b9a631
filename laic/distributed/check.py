"""Check the distributed kNN graph and k-means against a single process, on whatever the ranks run on:

    torchrun --nproc-per-node 2 -m laic.distributed.check --rows 20000 --dim 512 --neighbours 10 --clusters 100
    python -m laic.distributed.check --processes 2 --rows 2000   # no torchrun; gloo, or NCCL with a GPU a process

Every rank builds the same seeded data (or loads ``--features FILE.npy``) and works on its own row block; rank 0 also
runs the single-process functions on all rows, then prints how far the results agree and both wall times (each
after one untimed call; medians would need repeats: these are single runs). Exit status 1 when the kNN indices or
the k-means labels differ.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..commands.common import int_at_least
from ..embed_cache import read_features
from ..operands import knn
from ..stage0 import spherical_kmeans
from . import spawn
from .knn import knn_graph as distributed_knn_graph
from .rows import RowBlocks
from .world import current, init, shutdown


def _data(args) -> torch.Tensor:
    if args.features:
        return _features(args)
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.nn.functional.normalize(torch.randn(args.clusters, args.dim, generator=g), dim=1)
    noise = 0.5 * torch.randn(args.rows, args.dim, generator=g)
    return centres[torch.randint(args.clusters, (args.rows,), generator=g)] + noise


def _timed(fn, all_ranks: bool = True):
    """``fn()`` and its wall time; ``all_ranks``: every rank runs it, timed from the slowest rank's start to the
    slowest rank's end."""
    def settle():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if all_ranks and dist.is_initialized():
            dist.barrier()
    settle()
    start = time.perf_counter()
    result = fn()
    settle()
    return result, time.perf_counter() - start


def _features(args) -> torch.Tensor:
    return torch.from_numpy(read_features(args.features)[0]).float()


def run(args, data: Optional[torch.Tensor] = None) -> int:
    """The check on this process's rank; ``data``: the rows, where this process has read them already."""
    world = current()
    x = (data if data is not None else _data(args)).to(world.device)
    shard = x[world.row_shard(x.shape[0])]
    blocks = RowBlocks(shard.shape[0], world.group)

    def knn_of_shards():
        return distributed_knn_graph(shard, args.neighbours, world.group)

    def kmeans_of_shards():
        return spherical_kmeans(shard, args.clusters, n_init=args.n_init, seed=args.seed, group=world.group)

    def knn_of_all():
        return knn(x, args.neighbours)

    def kmeans_of_all():
        return spherical_kmeans(x, args.clusters, n_init=args.n_init, seed=args.seed)

    # Untimed first calls of both: the first call pays one-time costs (allocator, thread pools, Triton's compiles on
    # CUDA), which timed the distributed run (first) against a warm single process (0.28 s against 0.02 s at 1 rank).
    knn_of_shards(), kmeans_of_shards()
    if world.is_main():
        knn_of_all(), kmeans_of_all()
    (values, indices), knn_s = _timed(knn_of_shards)
    km, km_s = _timed(kmeans_of_shards)
    values, indices, labels = blocks.all_gather(values), blocks.all_gather(indices), blocks.all_gather(km.labels)
    if not world.is_main():
        return 0
    (ref_values, ref_indices), ref_knn_s = _timed(knn_of_all, all_ranks=False)
    ref, ref_km_s = _timed(kmeans_of_all, all_ranks=False)
    same_lists = float((indices == ref_indices).all(1).float().mean())
    same_labels = float((labels == ref.labels).float().mean())
    print(f"{world.size} ranks on {world.device}, N={x.shape[0]} D={x.shape[1]} k={args.neighbours} "
          f"K={args.clusters}")
    print(f"  kNN graph: rows with identical lists {same_lists:.6f}, max |value difference| "
          f"{float((values - ref_values).abs().max()):.3g}; {knn_s:.3f} s ({ref_knn_s:.3f} s in one process)")
    print(f"  k-means: identical labels {same_labels:.6f}, max |centre difference| "
          f"{float((km.centres - ref.centres).abs().max()):.3g}, objective {km.objective:.6f} "
          f"({ref.objective:.6f}); {km_s:.3f} s ({ref_km_s:.3f} s in one process)")
    return 0 if same_lists == 1.0 and same_labels == 1.0 else 1


def _check_sizes(args) -> Optional[torch.Tensor]:
    """The data's N (generated, or --features read and checked) against --neighbours, --clusters, the processes
    (each needs a row) and the seed; returns the --features rows read (None for generated data), so that a process
    that runs a rank itself does not read them again."""
    from ..runtime import MAX_SEED
    from .world import _env_int

    features = _features(args) if args.features else None
    n, what = (features.shape[0], "the rows of --features") if features is not None else (args.rows, "--rows")
    if args.neighbours >= n or args.clusters > n:
        raise ValueError(f"--neighbours must be below {what} and --clusters at most {what}, got {args.neighbours}, "
                         f"{args.clusters} and {n}")
    processes = args.processes or _env_int("WORLD_SIZE", 1)
    if processes > n:
        raise ValueError(f"{processes} processes need a row each, but {what} is {n}")
    if args.seed > MAX_SEED:
        raise ValueError(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    return features


def _spawned(args) -> int:
    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laic.distributed.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int_at_least(2), default=4000, help="rows N of the generated data")
    parser.add_argument("--dim", type=int_at_least(1), default=128, help="columns D of the generated data")
    parser.add_argument("--neighbours", type=int_at_least(1), default=10, help="neighbours k per row")
    parser.add_argument("--clusters", type=int_at_least(1), default=20,
                        help="k-means clusters (also the generated centres)")
    parser.add_argument("--n-init", type=int_at_least(1), default=3, help="k-means restarts")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--features", help="an [N, D] .npy file instead of generated data")
    parser.add_argument("--processes", type=int_at_least(0), default=0,
                        help="start this many local processes (without torchrun); 0: use the torchrun environment")
    args = parser.parse_args(argv)
    try:   # here, as usage errors (status 2): inside the ranks they were tracebacks with status 1, "results differ"
        data = _check_sizes(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.processes:   # (the spawned ranks read --features themselves: not pickled to each)
        return max(spawn(_spawned, args.processes, args, timeout_s=3600))
    init()
    try:
        return run(args, data)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
