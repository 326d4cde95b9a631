"""laic.distributed on CPU with gloo: 2 and 3 processes started by the test (laic.distributed.spawn), each run bounded
by a deadline. Every multi-process check runs inside one spawn per world size (starting Python + torch per rank is
the slow part), and the parent compares what the ranks returned with the single-process functions."""
import errno
import os
import re
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import laic.distributed as ld
from laic import LAIC
import laic.stage0 as stage0_module
from laic.distributed.rows import RowBlocks
from laic.io import WriteError, is_machine_error
from laic.operands import best_by_value
from laic.metrics import adjusted_rand_index
from laic.kmeans import _lloyd
from laic.relations import noun_usage
from laic.stage0 import build_semantic_space, fused_features, spherical_kmeans
from laic_kernels import knn_graph, use_backend
from laic_kernels.backends import triton_interpreting

SPAWN_TIMEOUT_S = 90


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch):
    # A collective stuck on a dead rank fails after this long instead of the default 10 minutes.
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "60")


def blobs(n, d, k, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return centres[torch.arange(n) % k] + noise * torch.randn(n, d, generator=g)


def knn_inputs():
    g = torch.Generator().manual_seed(3)
    random_rows = torch.randn(53, 8, generator=g)
    # Rows of +-0.5 in 4 dimensions are unit rows already and their products are multiples of 0.25: exact in float32
    # whatever the order of the sums (BLAS's blocking and thread count change it), so ties are true ties on every
    # path. Eight distinct rows, each four times: every similarity ties with three others, and more.
    signs = torch.tensor([[1, 1, 1, 1], [1, -1, 1, 1], [1, 1, -1, 1], [1, 1, 1, -1], [-1, -1, 1, 1],
                          [1, -1, -1, 1], [1, -1, 1, -1], [-1, 1, 1, -1]], dtype=torch.float32)
    duplicated = 0.5 * signs[torch.arange(32) % 8]
    return random_rows, duplicated


def stage0_inputs():
    """Image blobs round 4 directions and nouns near them plus distractors (as tests/test_stage1.py's)."""
    g = torch.Generator().manual_seed(11)
    centres = torch.nn.functional.normalize(torch.randn(4, 24, generator=g), dim=1)
    images = centres[torch.arange(96) % 4] + 0.9 * torch.randn(96, 24, generator=g) / 24 ** 0.5
    nouns = torch.cat([centres.repeat_interleave(3, 0) + 0.3 * torch.randn(12, 24, generator=g) / 24 ** 0.5,
                       torch.randn(10, 24, generator=g)])
    return images, nouns


def stage0_summary(space):
    return {name: getattr(space, name) for name in ("mean", "text_mean", "noun_index", "images", "texts",
                                                     "image_neighbours", "text_neighbours", "neighbours",
                                                     "neighbour_mask", "agreement", "raw_agreement",
                                                     "null_agreement", "neighbour_agreement",
                                                     "partition_agreement")}


def uneven_labels(n):
    """Integer labels with some values missing and one repeated often (the joint cells of two partitions)."""
    values = torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(3)) * 3
    values[::4] = 7
    return values


def split(x, counts):
    starts = np.cumsum([0] + list(counts))
    return [x[a:b] for a, b in zip(starts[:-1], starts[1:])]


def separation(x, centres):
    """Smallest gap, over the rows, between the similarity to the nearest centre and to the second nearest."""
    top2 = (torch.nn.functional.normalize(x, dim=1) @ centres.t()).topk(2, dim=1).values
    return float((top2[:, 0] - top2[:, 1]).min())


# ---------------------------------------------------------------------------------------------------------------
# What each rank runs


def rank_checks(size):
    """Everything the 2- and 3-process tests compare, computed on this rank."""
    world = ld.current()
    assert world.size == size and dist.get_backend() == "gloo"
    random_rows, duplicated = knn_inputs()
    out = {"rank": world.rank, "main": ld.is_main()}
    shard = world.row_shard(random_rows.shape[0])
    out["knn"] = ld.knn_graph(random_rows[shard], 6, world.group, block_rows=5)
    # Uneven blocks, one of them empty (a rank may hold no rows).
    uneven = [30, 0, 23] if size == 3 else [40, 13]
    out["knn_uneven"] = ld.knn_graph(split(random_rows, uneven)[world.rank], 4, world.group, block_rows=7)
    # Neighbours on the same rank and on others (rows stored class by class put most on the same rank), over
    # uneven blocks: one column at a time, never every (row, neighbour) pair's row gathered at once.
    neighbours = torch.randint(0, sum(uneven), (sum(uneven), 5), generator=torch.Generator().manual_seed(8))
    blocks = split(torch.arange(sum(uneven)), uneven)[world.rank]
    out["neighbour_mean"] = ld.neighbour_mean(split(random_rows[:sum(uneven)], uneven)[world.rank],
                                              neighbours[blocks], world.group, block_rows=7)
    out["neighbour_mean_peak"] = _neighbour_mean_peak(world)
    # Indices beyond the matrix, or lists of another row count, were left out of the sums without a word.
    out["neighbour_mean_refusals"] = [failure_seen(lambda: ld.neighbour_mean(
        split(random_rows[:sum(uneven)], uneven)[world.rank], bad, world.group))
        for bad in (neighbours[blocks] + sum(uneven), neighbours[blocks][:1] if len(blocks) > 1 else neighbours[:2])]
    mine = split(uneven_labels(sum(uneven)), uneven)[world.rank]
    out["value_counts"] = RowBlocks(len(mine), world.group).value_counts(mine)
    # The m smallest of a vector with ties over uneven blocks (one empty on 3 ranks), m up to beyond its length.
    tied = split(uneven_labels(sum(uneven)).float(), uneven)[world.rank]
    out["smallest"] = {m: RowBlocks(len(tied), world.group).smallest(tied, m) for m in (1, 7, 53, 60)}
    # A fit computing on CUDA inside this gloo group would hand CUDA tensors to gloo's sends: refused up front.
    from laic.distributed.fit import check_compute_device
    out["device_check"] = (failure_seen(lambda: check_compute_device(torch.device("cuda"), world.group)),
                           failure_seen(lambda: check_compute_device(torch.device("cpu"), world.group)))
    # The kernel's tie rule (equal similarities by lower index); one key block per rank: the interpreter is slow.
    # The ranks' tensors are on the CPU (gloo), where the kernel runs only under the interpreter.
    out["knn_ties"] = None
    if triton_interpreting():
        with use_backend("triton"):
            out["knn_ties"] = ld.knn_graph(duplicated[world.row_shard(32)], 7, world.group)

    x = blobs(90, 16, 5, 0.45, seed=4)
    km = spherical_kmeans(x[world.row_shard(90)], 5, n_init=3, seed=7, group=world.group)
    out["kmeans"] = (km.labels, km.centres, km.objective, km.n_iter)
    out["kmeans_sampled"] = sampled_kmeans(x[world.row_shard(90)], world.group)
    # A centre no row is nearest to: the empty cluster is re-seeded with the globally farthest rows.
    blocks = RowBlocks(len(x[world.row_shard(90)]), world.group, width=16)
    unit_shard = torch.nn.functional.normalize(x[world.row_shard(90)], dim=1)
    out["lloyd_empty"] = _lloyd(unit_shard, empty_cluster_start(x), 20, blocks)

    images, nouns = stage0_inputs()
    space = build_semantic_space(images[world.row_shard(len(images))], nouns, 4, seed=2, n_neighbours=6,
                                 group=world.group)
    fused = fused_features(space, 4)
    anchor = spherical_kmeans(fused, 4, n_init=3, seed=2, group=world.group)
    out["stage0"] = {"space": stage0_summary(space), "anchor": anchor.labels,
                     "usage": noun_usage(space.images, space.nouns, 0.05, space.rows)}
    # Another machine's LAPACK may answer a QR otherwise (here: the same span, other signs on ranks > 0): every rank
    # must still take rank 0's bases (the real nouns' and the null's random ones), or the ranks' coordinates, and so
    # the text graph, the null's graph and the fused space, would not match.
    real_basis = stage0_module.noun_span_basis
    if world.rank > 0:
        stage0_module.noun_span_basis = lambda v: -real_basis(v)
    try:
        negated = build_semantic_space(images[world.row_shard(len(images))], nouns, 4, seed=2, n_neighbours=6,
                                       group=world.group)
        out["noun_basis"] = negated.noun_basis
        out["negated_bases"] = stage0_summary(negated)
    finally:
        stage0_module.noun_span_basis = real_basis

    bad = random_rows[shard].clone()
    if world.rank == 1:
        bad[0, 0] = float("nan")
    try:
        ld.knn_graph(bad, 6, world.group)
        out["bad_input"] = None
    except ValueError as exc:
        out["bad_input"] = str(exc)
    # A setting each process chooses alone, bad on the last rank only: it raised there alone, and the others waited
    # in the fit's first collective until the timeout.
    out["bad_setting"] = {}
    for name, bad_value in (("n_threads", 10**6), ("profile", "yes"), ("device", "tpu")):
        try:
            LAIC(n_clusters=4, stage1_steps=0, **({name: bad_value} if world.rank == size - 1 else {})).fit(
                images[world.row_shard(len(images))], nouns)
            out["bad_setting"][name] = None
        except ValueError as exc:
            out["bad_setting"][name] = str(exc)
    # Refinements that run in one process only: refused with the input checks, naming the option set (after
    # stages 0 and 1 before, naming both whichever was set).
    try:
        LAIC(n_clusters=4, stage1_steps=0, semantic_centres=True).fit(images[world.row_shard(len(images))], nouns)
        out["one_process_only"] = None
    except ValueError as exc:
        out["one_process_only"] = str(exc)
    # Rank 0 alone fits all rows, inside one_process() (outside it, it waited for the others until the timeout).
    if world.rank == 0:
        with ld.one_process():
            out["alone"] = LAIC(n_clusters=4, stage1_steps=5, random_state=0).fit(images, nouns).labels_
    out["failures"] = collective_failures(world.group, world.rank, size)
    return out


def failure_seen(call):
    """(exception type, message, type of its __cause__ or None) that ``call()`` raised on this rank, or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), None if exc.__cause__ is None else type(exc.__cause__).__name__
    return None


def raises(exc):
    def step():
        raise exc
    return step


def check_on_every_rank(group, step):
    return ld.stop_all_on_failure(group, step, "the input check")


def collective_failures(group, rank, size):
    """The collective failure helpers with a step that fails on some ranks: what each rank saw."""
    last = size - 1
    return {
        # from_main: the step runs on rank 0 only.
        "main_oserror": failure_seen(lambda: ld.from_main(group, raises(OSError("disk full")), "the step on rank 0")),
        "main_valueerror": failure_seen(lambda: ld.from_main(group, raises(ValueError("bad header")),
                                                             "reading the header")),
        # stop_all_on_failure: bad input on the last rank only (a ValueError, or a missing file as the command line counts it),
        # and a failure that is not bad input (it used to stay on its rank and leave the others waiting in their
        # next collective).
        "check_valueerror": failure_seen(lambda: check_on_every_rank(group, raises(ValueError("NaN in row 3"))
                                                                     if rank == last else lambda: None)),
        "check_missing_file": failure_seen(lambda: check_on_every_rank(
            group, raises(FileNotFoundError("x.npy: no such file")) if rank == last else lambda: None)),
        "check_oserror": failure_seen(lambda: check_on_every_rank(group, raises(OSError("unreadable"))
                                                                  if rank == last else lambda: None)),
        # The machine's state (a file this user may not read, a full disk): one line with status 1, as in one
        # process (a RankFailed's traceback, and a WriteError's status 2, before).
        "check_permission": failure_seen(lambda: check_on_every_rank(group, raises(PermissionError(
            errno.EACCES, "Permission denied", "secret.npy")) if rank == last else lambda: None)),
        "main_write_error": failure_seen(lambda: ld.from_main(group, raises(WriteError("cannot write out/model")),
                                                              "writing the run")),
        # Every rank refusing alike: the message as one process words it.
        "every_rank_alike": failure_seen(lambda: check_on_every_rank(group,
                                                                     raises(ValueError("--out r: holds a run")))),
        "every_rank_alike_other": failure_seen(lambda: check_on_every_rank(group, raises(KeyError("x")))),
        # Each rank's own rows: every distinct message is shown (the first rank's alone undercounted the bad rows).
        "each_rank_its_rows": failure_seen(lambda: check_on_every_rank(
            group, raises(ValueError(f"NaN in row {10 * rank}")) if rank > 0 else lambda: None)),
        # A step that is itself collective: its error, alike on every rank, is raised as it is.
        "nested": failure_seen(lambda: ld.stop_all_on_failure(group, lambda: check_on_every_rank(
            group, raises(OSError("unreadable")) if rank == last else lambda: None), "the outer step")),
    }


def sampled_kmeans(x, group):
    """Seeding from a sample of 60 of the 90 rows (SEED_SAMPLE_ROWS 0: 20 K = 60): (labels, whether the whole matrix
    was gathered anywhere)."""
    import laic.kmeans as kmeans
    gathered, real_gather, seed_rows = [], RowBlocks.gather_to_main, kmeans.SEED_SAMPLE_ROWS
    RowBlocks.gather_to_main = lambda self, t: gathered.append(len(t)) or real_gather(self, t)
    kmeans.SEED_SAMPLE_ROWS = 0
    try:
        return spherical_kmeans(x, 3, n_init=3, seed=7, group=group).labels, bool(gathered)
    finally:
        RowBlocks.gather_to_main, kmeans.SEED_SAMPLE_ROWS = real_gather, seed_rows


def rank_crashes():
    """Rank 1 fails while rank 0 waits for it in a collective."""
    if ld.current().rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))
    return "unreachable"


# ---------------------------------------------------------------------------------------------------------------
# Single process


def test_row_shards_cover_every_row_once():
    for n in (0, 1, 5, 53, 100):
        for size in (1, 2, 3, 7):
            shards = [ld.row_shard(n, r, size) for r in range(size)]
            covered = torch.cat([torch.arange(n)[s] for s in shards])
            assert torch.equal(covered, torch.arange(n))
            assert max(ld.row_counts(n, size)) - min(ld.row_counts(n, size)) <= 1


def test_single_process_world_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = ld.init()
    assert (world.rank, world.size, world.group) == (0, 1, None)
    assert world.is_main() and ld.is_main() and not dist.is_initialized()
    x = blobs(20, 4, 2, 0.3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(ld.knn_graph(x, 3), knn_graph(x, 3)))


def test_row_shards_split_the_rows_and_refuse_what_is_no_split():
    # -1 took the last block, -5 rows a slice of all but two, 0 processes a ZeroDivisionError.
    for n in (0, 1, 7, 10):
        for size in (1, 3, 4):
            shards = [ld.row_shard(n, rank, size) for rank in range(size)]
            assert [i for s in shards for i in range(n)[s]] == list(range(n))
            assert max(map(len, (range(n)[s] for s in shards))) - min(map(len, (range(n)[s] for s in shards))) <= 1
    for args, said in (((10, -1, 2), "rank must be between 0 and 1"), ((10, 2, 2), "rank must be between 0 and 1"),
                       ((-5, 0, 2), "n_rows must be between 0"), ((10, 0, 0), "size must be between 1"),
                       ((10.0, 0, 2), "n_rows must be an int")):
        with pytest.raises(ValueError, match=said):
            ld.row_shard(*args)


def _rank_1_ends_without_reporting():
    if ld.current().rank == 1:
        os._exit(0)
    return "reported"


def test_spawn_finds_a_rank_that_ended_without_reporting_and_refuses_an_endless_timeout():
    # A rank ending with status 0 before reporting was waited for until the deadline (120 s by default), then called
    # a timeout; timeout_s=nan never passed its deadline, and 0 or less gave up at once.
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 died with exit code 0 before reporting"):
        ld.spawn(_rank_1_ends_without_reporting, 2, timeout_s=300, backend="gloo")
    assert time.monotonic() - start < 120
    for bad in (float("nan"), 0, -5, float("inf"), "60"):
        with pytest.raises(ValueError, match="timeout_s must be a positive finite number of seconds"):
            ld.spawn(_rank_1_ends_without_reporting, 2, timeout_s=bad)


def _worlds_around_the_callers_own_destroy():
    import torch.distributed as dist

    before = ld.current()
    dist.destroy_process_group()   # the caller's own call, not laic's shutdown
    after = ld.current()
    return (before.size, before.rank), (after.size, after.rank, after.row_shard(6), ld.is_main(), after.group)


def test_a_group_the_caller_destroys_itself_leaves_each_process_alone():
    # The world stayed rank r of 2 after dist.destroy_process_group(): rank 1 of a later embed_images embedded its
    # share of the images alone and broke (a NameError), rank 0 waited for shards nobody wrote.
    results = ld.spawn(_worlds_around_the_callers_own_destroy, 2, timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [before for before, _ in results] == [(2, 0), (2, 1)]
    assert [after for _, after in results] == [(1, 0, slice(0, 6), True, None)] * 2


def _collectives_default_group_after_an_optimiser_is_made():
    import inspect

    import torch.distributed.nn.functional as functional

    # (stage 1's Adam did until 12-07; stage 2's optimiser or the caller's may): it imported that module, if none had
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return inspect.signature(functional.broadcast).parameters["group"].default is None


def test_torchs_collectives_hold_no_process_group_for_good():
    # torch.distributed.nn.functional's collectives take group=group.WORLD as a default, evaluated at its import,
    # which stage 1's first Adam made after the group existed: the live group was held for good, shutdown() could
    # not free it, and its gloo threads outlived the interpreter (SIGABRT at exit in 5 of 40 runs of the README's
    # recipe). laic.distributed imports it first, before any group, so the defaults hold none.
    results = ld.spawn(_collectives_default_group_after_an_optimiser_is_made, 2, timeout_s=SPAWN_TIMEOUT_S,
                       backend="gloo")
    assert results == [True, True]


def test_gather_labels_of_an_unfitted_model_says_so():
    with pytest.raises(ValueError, match="not fitted"):   # an AttributeError on labels_ before
        ld.gather_labels(LAIC())


def test_world_without_master_address_says_how_to_start(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        ld.init()


@pytest.mark.parametrize("rank, local_rank, said", [("2", "0", "RANK=2 must lie in [0, WORLD_SIZE=2)"),
                                                    ("-1", "0", "RANK=-1 must lie in [0, WORLD_SIZE=2)"),
                                                    ("1", "-1", "LOCAL_RANK=-1 must be >= 0")])
def test_a_rank_outside_the_world_is_refused_at_once(monkeypatch, rank, local_rank, said):
    # It waited LAIC_DIST_TIMEOUT_S (600 s) for peers that never come, then printed a C++ stack.
    for name, value in (("WORLD_SIZE", "2"), ("RANK", rank), ("LOCAL_RANK", local_rank), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999"), ("LAIC_DIST_TIMEOUT_S", "5")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(said)):
        ld.init(backend="gloo")
    assert not dist.is_initialized()


@pytest.mark.parametrize("value", ["0", "-5", "0.0001", "inf", "nan", "abc", "1e12"])
def test_a_timeout_that_cannot_be_waited_is_refused(monkeypatch, value):
    # 0 and -5 timed every collective out at once ("one of them stopped or did not answer"), and so did 0.0001 (0 ms
    # to torch), inf raised an OverflowError, nan "cannot convert float NaN to integer".
    from laic.distributed import world

    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=f"LAIC_DIST_TIMEOUT_S='{value}' must be a number of seconds of at least "
                                         "0.001 \\(a millisecond\\) and at most 86400 \\(a day\\)"):
        world.timeout_setting()
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "0.5")
    assert world.timeout_setting().total_seconds() == 0.5


def test_leaving_a_broken_group_quietly_still_forgets_the_world(monkeypatch):
    """A rank ends with leave_quietly whatever the group's state: a destroy that fails (another rank died) is
    swallowed, and the rank's world is reset as after a clean shutdown."""
    import laic.distributed.world as world_module

    def broken():
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(world_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(world_module.dist, "destroy_process_group", broken)
    monkeypatch.setattr(world_module, "_world", world_module.World(rank=1, size=2))
    with pytest.raises(RuntimeError, match="connection reset"):
        ld.shutdown()
    assert (world_module._world.rank, world_module._world.size) == (0, 1)
    monkeypatch.setattr(world_module, "_world", world_module.World(rank=1, size=2))
    ld.leave_quietly()
    assert (world_module._world.rank, world_module._world.size) == (0, 1)


def test_best_by_value_orders_ties_by_lower_index():
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 4, (6, 40), generator=g).float()     # many ties
    indices = torch.stack([torch.randperm(40, generator=g) for _ in range(6)])
    for largest in (True, False):
        got_v, got_i = best_by_value(values, indices, 9, largest=largest)
        for row in range(6):
            key = -values[row] if largest else values[row]
            order = np.lexsort((indices[row].numpy(), key.numpy()))[:9]   # by value, then by index
            assert torch.equal(got_i[row], indices[row][order])
            assert torch.equal(got_v[row], values[row][order])


# ---------------------------------------------------------------------------------------------------------------
# 2 and 3 processes


def gathered(results, name, part=None):
    pieces = [r[name] if part is None else r[name][part] for r in results]
    return torch.cat(pieces)


def empty_cluster_start(x):
    """One unit row of each blob of ``x`` (its rows 0..4), and a zero centre that no row is nearest to."""
    return torch.cat([torch.nn.functional.normalize(x[:5], dim=1), torch.zeros(1, x.shape[1])])


def _neighbour_mean_peak(world, n_local=600, dim=64, k=10):
    """(peak extra bytes of neighbour_mean, this rank's [n_local, dim] float32 bytes) where every row's neighbours
    lie in its own rank's block."""
    from laic.profiling import FitProfiler, step

    g = torch.Generator().manual_seed(world.rank)
    features = torch.randn(n_local, dim, generator=g)
    neighbours = torch.randint(n_local, (n_local, k), generator=g) + world.rank * n_local
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording(), step("neighbour mean", "other"):
        ld.neighbour_mean(features, neighbours, world.group)
    return profiler.steps[0]["peak_extra_bytes"], n_local * dim * 4


@pytest.fixture(scope="module", params=[2, 3], ids=lambda size: f"{size}-ranks")
def ranks(request):
    """What :func:`rank_checks` returned on each rank: one spawn per world size for all the tests below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAIC_DIST_TIMEOUT_S", "60")
        results = ld.spawn(rank_checks, request.param, request.param, timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [r["rank"] for r in results] == list(range(request.param))
    return results


def test_neighbour_mean_over_ranks_is_the_mean_of_the_neighbour_rows(ranks):
    random_rows, _ = knn_inputs()
    n = sum(len(r["neighbour_mean"]) for r in ranks)
    neighbours = torch.randint(0, n, (n, 5), generator=torch.Generator().manual_seed(8))
    got = torch.cat([r["neighbour_mean"] for r in ranks])
    torch.testing.assert_close(got, random_rows[:n][neighbours].mean(1), rtol=1e-6, atol=1e-6)
    for r in ranks:
        beyond, rows = r["neighbour_mean_refusals"]
        assert beyond is not None and "not a row index of the whole matrix" in beyond[1], beyond
        assert rows is not None and "neighbours must be [N, k] with this rank's N" in rows[1], rows
    # Memory: [N/G, D] buffers, not every row's k neighbour rows gathered at once ([N/G, k, D]: 11x its block).
    for r in ranks:
        peak, block = r["neighbour_mean_peak"]
        assert 0 < peak <= 4 * block, (peak, block)


def test_is_main_on_rank_zero_only(ranks):
    assert [r["main"] for r in ranks] == [True] + [False] * (len(ranks) - 1)


def test_knn_graph_equals_the_single_process_graph(ranks):
    # The same products of the same unit rows, so the same lists; BLAS may round a small key block's products
    # differently from the full product's in the last bit, hence the values' tolerance (1 ulp is ~6e-8 here).
    # The data keeps consecutive similarities of each row far apart compared with that rounding (checked here).
    random_rows, _ = knn_inputs()
    unit = torch.nn.functional.normalize(random_rows, dim=1)
    top = (unit @ unit.t()).fill_diagonal_(-2.0).topk(7, dim=1).values
    assert float((top[:, :-1] - top[:, 1:]).min()) > 1e-6
    for name, k in (("knn", 6), ("knn_uneven", 4)):
        values, indices = knn_graph(random_rows, k)
        torch.testing.assert_close(gathered(ranks, name, 0), values, rtol=0, atol=2e-7)
        assert torch.equal(gathered(ranks, name, 1), indices)


def test_knn_graph_breaks_ties_as_the_kernel_does(ranks):
    """Bit-equal to the Triton kernel, whose rule (equal similarities by lower index) a float64 brute force
    confirms."""
    if not triton_interpreting():
        pytest.skip("runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1 (conftest sets it where there "
                    "is no CUDA)")
    _, duplicated = knn_inputs()
    with use_backend("triton"):
        values, indices = knn_graph(duplicated, 7)
    assert torch.equal(gathered(ranks, "knn_ties", 0), values)
    assert torch.equal(gathered(ranks, "knn_ties", 1), indices)
    unit = torch.nn.functional.normalize(duplicated.double(), dim=1)
    sims = (unit @ unit.t()).fill_diagonal_(-np.inf).numpy()
    for row in range(32):
        order = np.lexsort((np.arange(32), -sims[row]))[:7]
        assert indices[row].tolist() == order.tolist()


def test_kmeans_equals_the_single_process_kmeans(ranks):
    # Same seeds (rank 0 seeds on all rows with the same generator). The all-reduced sums are added in another order
    # than one process adds them, so centres may differ in the last bits; labels can then differ only for a row
    # within that rounding of two centres, and the data keeps every row well clear of that (checked here).
    x = blobs(90, 16, 5, 0.45, seed=4)
    single = spherical_kmeans(x, 5, n_init=3, seed=7)
    assert separation(x, single.centres) > 1e-4
    labels, centres, objective, n_iter = zip(*[r["kmeans"] for r in ranks])
    assert torch.equal(torch.cat(labels), single.labels)
    for c in centres:
        torch.testing.assert_close(c, single.centres, rtol=0, atol=1e-6)
    assert all(abs(o - single.objective) <= 1e-5 * abs(single.objective) for o in objective)
    assert set(n_iter) == {single.n_iter}


def test_kmeans_seeded_from_a_sample_gathers_only_the_sample(ranks, monkeypatch):
    # Beyond the sample size every rank draws the same sample, rank 0 receives only those rows, and the result is
    # one process's (restarts on the sample, the best run on all rows).
    import laic.kmeans as kmeans
    monkeypatch.setattr(kmeans, "SEED_SAMPLE_ROWS", 0)
    single = spherical_kmeans(blobs(90, 16, 5, 0.45, seed=4), 3, n_init=3, seed=7)
    assert torch.equal(torch.cat([r["kmeans_sampled"][0] for r in ranks]), single.labels)
    assert not any(r["kmeans_sampled"][1] for r in ranks)


def failures(ranks, name):
    """What every rank saw for one of :func:`collective_failures`'s steps; the error's type and message must be the
    same on every rank (each takes the same ``except`` branch), the rank's own exception its ``__cause__``."""
    seen = [r["failures"][name] for r in ranks]
    assert all(s is not None for s in seen), name
    assert len({(kind, message) for kind, message, _ in seen}) == 1, seen
    return seen[0][0], seen[0][1], [cause for _, _, cause in seen]


def test_a_failure_on_rank_zero_reaches_every_rank(ranks):
    n = len(ranks)
    kind, message, causes = failures(ranks, "main_oserror")
    assert (kind, message) == ("RankFailed", f"the step on rank 0 failed on rank 0 of {n}: OSError: disk full; all {n} "
                                             "ranks stopped")
    assert causes == ["OSError"] + [None] * (n - 1)
    # Bad input stays a ValueError: a CollectiveError, which the command line prints from rank 0 only.
    kind, message, causes = failures(ranks, "main_valueerror")
    assert kind == "CollectiveError" and issubclass(ld.CollectiveError, ValueError)
    assert message == f"reading the header failed on rank 0 of {n}: ValueError: bad header; all {n} ranks stopped"
    assert causes == ["ValueError"] + [None] * (n - 1)


def test_a_failed_check_on_one_rank_reaches_every_rank(ranks):
    n, last = len(ranks), len(ranks) - 1
    kind, message, causes = failures(ranks, "check_valueerror")
    assert (kind, message) == ("CollectiveError", f"the input check failed on rank {last} of {n}: ValueError: NaN in "
                                                  f"row 3; all {n} ranks stopped")
    assert causes == [None] * last + ["ValueError"]
    kind, message, causes = failures(ranks, "check_missing_file")
    assert kind == "CollectiveError" and f"rank {last} of {n}: FileNotFoundError: x.npy: no such file" in message
    kind, message, causes = failures(ranks, "check_oserror")
    assert (kind, message) == ("RankFailed", f"the input check failed on rank {last} of {n}: OSError: unreadable; "
                                             f"all {n} ranks stopped")
    assert causes == [None] * last + ["OSError"]


def test_the_machines_state_on_one_rank_is_a_machine_error_on_every_rank(ranks):
    n, last = len(ranks), len(ranks) - 1
    kind, message, causes = failures(ranks, "check_permission")
    assert (kind, message) == ("CollectiveMachineError", f"the input check failed on rank {last} of {n}: "
                               f"PermissionError: [Errno 13] Permission denied: 'secret.npy'; all {n} ranks stopped")
    assert issubclass(ld.CollectiveMachineError, OSError) and is_machine_error(ld.CollectiveMachineError("x"))
    assert causes == [None] * last + ["PermissionError"]
    kind, message, _ = failures(ranks, "main_write_error")
    assert (kind, message) == ("CollectiveMachineError", f"writing the run failed on rank 0 of {n}: WriteError: "
                                                         f"cannot write out/model; all {n} ranks stopped")


def test_a_failure_alike_on_every_rank_keeps_its_own_message(ranks):
    kind, message, causes = failures(ranks, "every_rank_alike")
    assert (kind, message, causes) == ("CollectiveError", "--out r: holds a run", ["ValueError"] * len(ranks))
    kind, message, causes = failures(ranks, "every_rank_alike_other")   # neither input nor machine: itself
    assert (kind, message, causes) == ("KeyError", "'x'", [None] * len(ranks))


def test_every_failing_ranks_own_message_is_shown(ranks):
    n = len(ranks)
    kind, message, _ = failures(ranks, "each_rank_its_rows")
    said = "; ".join(f"on rank {r}{f' of {n}' * (r == 1)}: ValueError: NaN in row {10 * r}" for r in range(1, n))
    assert (kind, message) == ("CollectiveError", f"the input check failed {said}; all {n} ranks stopped")


def test_failures_beyond_the_shown_messages_are_named_by_rank(monkeypatch):
    import laic.distributed.failure as failure

    monkeypatch.setattr(failure, "SHOWN_MESSAGES", 3)
    reports = [("input", "ValueError: a"), None, ("input", "ValueError: b"), ("input", "ValueError: a"),
               ("other", "OSError: c"), ("input", "ValueError: d"), ("input", "ValueError: e")]
    assert failure._failures_message("x", reports) == (
        "x failed on ranks 0, 3 of 7: ValueError: a; on rank 2: ValueError: b; on rank 4: OSError: c; and on ranks "
        "5, 6; all 7 ranks stopped")


def test_lloyd_reseeds_an_empty_cluster_with_the_globally_farthest_rows(ranks):
    x = blobs(90, 16, 5, 0.45, seed=4)
    unit_x, start = torch.nn.functional.normalize(x, dim=1), empty_cluster_start(x)
    assert int((unit_x @ start.t()).argmax(1).eq(5).sum()) == 0     # cluster 5 starts empty
    expected = _lloyd(unit_x, start, 20, RowBlocks(90))
    assert torch.equal(torch.cat([r["lloyd_empty"][0] for r in ranks]), expected[0])
    for r in ranks:
        torch.testing.assert_close(r["lloyd_empty"][1], expected[1], rtol=0, atol=1e-6)
        assert r["lloyd_empty"][3] == expected[3]


def test_smallest_over_uneven_blocks_is_one_processes_stable_sort(ranks):
    expected = torch.sort(uneven_labels(53).float(), stable=True).indices
    for r in ranks:
        for m, found in r["smallest"].items():
            assert torch.equal(found, expected[:m]), m


def test_a_fit_computing_where_the_group_does_not_communicate_is_refused(ranks):
    for r in ranks:
        refused, accepted = r["device_check"]
        assert refused[0] == "ValueError" and "communicate through gloo, which takes cpu tensors" in refused[1]
        assert "device='cpu'" in refused[1] and accepted is None


def test_value_counts_over_uneven_blocks_are_the_whole_vectors(ranks):
    expected = torch.unique(uneven_labels(53), return_counts=True)   # 53 rows: [40, 13] or [30, 0, 23]
    for r in ranks:
        distinct, counts = r["value_counts"]
        assert torch.equal(distinct, expected[0]) and torch.equal(counts, expected[1])


def test_stage0_equals_the_single_process_stage0(ranks):
    # The means are summed in float64 and rounded once (stage0.row_mean), so they are those of one process to the
    # bit, and so are the unit rows and the text counterparts. Later sums are all-reduced in another order than one
    # process adds them, and the distributed graphs multiply other blocks: the text counterparts of nearby images are
    # nearly identical (their similarities differ by ~1e-7), so the order of such near-ties in the text-space lists
    # rests on that rounding: those lists are checked as exact top-k lists up to rounding (the similarities they
    # list), the image-space lists exactly, and the agreements and the fused k-means partition up to what a few
    # swapped near-ties can change.
    images, nouns = stage0_inputs()
    single = build_semantic_space(images, nouns, 4, seed=2, n_neighbours=6)
    expected = stage0_summary(single)
    spaces = [r["stage0"]["space"] for r in ranks]
    for name in ("mean", "text_mean", "noun_index"):
        for space in spaces:
            assert torch.equal(space[name], expected[name]), name
    for name in ("images", "texts"):
        assert torch.equal(torch.cat([space[name] for space in spaces]), expected[name]), name
    for name in ("image_neighbours",):
        torch.testing.assert_close(torch.cat([space[name] for space in spaces]), expected[name], rtol=0, atol=1e-6)
    texts = expected["texts"]
    sims = texts @ texts.t()
    listed = sims.gather(1, torch.cat([space["text_neighbours"] for space in spaces]))
    torch.testing.assert_close(listed, sims.gather(1, expected["text_neighbours"]), rtol=0, atol=1e-6)
    mask = torch.cat([space["neighbour_mask"] for space in spaces])
    assert bool(mask.any(1).all())
    assert abs(int(mask.sum()) - int(expected["neighbour_mask"].sum())) <= 0.05 * mask.numel()
    for name in ("agreement", "raw_agreement", "null_agreement", "neighbour_agreement", "partition_agreement"):
        assert all(abs(space[name] - expected[name]) < 0.02 for space in spaces), name
    assert expected["agreement"] > 0.05  # the nouns do carry information here: the text side is in play
    anchor = spherical_kmeans(fused_features(single, 4), 4, n_init=3, seed=2).labels
    assert adjusted_rand_index(anchor.numpy(), torch.cat([r["stage0"]["anchor"] for r in ranks]).numpy()) >= 0.99
    # The nouns' usage (which weights the relation map) is that of all rows on every rank.
    usage = noun_usage(single.images, single.nouns, 0.05)
    for r in ranks:
        torch.testing.assert_close(r["stage0"]["usage"], usage, rtol=1e-5, atol=1e-9)


def test_every_rank_takes_rank_zeros_noun_basis(ranks):
    images, nouns = stage0_inputs()
    single = build_semantic_space(images, nouns, 4, seed=2, n_neighbours=6).noun_basis
    assert single is not None      # 22 nouns in D = 24: the fused space is in their span's coordinates
    for r in ranks:
        torch.testing.assert_close(r["noun_basis"], single, rtol=0, atol=1e-6)
        # The graphs and agreements built on the coordinates are those of the run whose ranks agreed anyway.
        for name in ("text_neighbours", "neighbours", "null_agreement", "partition_agreement", "agreement"):
            assert torch.equal(torch.as_tensor(r["negated_bases"][name]), torch.as_tensor(r["stage0"]["space"][name])), name


def test_bad_input_on_one_rank_is_rejected_on_every_rank(ranks):
    messages = {r["bad_input"] for r in ranks}
    assert len(messages) == 1
    message = messages.pop()
    assert message is not None and "NaN" in message and "rank 1" in message


def test_a_bad_setting_of_one_process_is_rejected_on_every_rank(ranks):
    last = len(ranks) - 1
    for name in ("n_threads", "profile", "device"):
        messages = {r["bad_setting"][name] for r in ranks}
        assert len(messages) == 1, (name, messages)
        message = messages.pop()
        assert message.startswith(f"checking LAIC's settings of each process failed on rank {last} of "
                                  f"{len(ranks)}: ValueError: {name}"), message


def test_one_process_fits_a_ranks_rows_alone_inside_a_group(ranks):
    images, nouns = stage0_inputs()
    alone = LAIC(n_clusters=4, stage1_steps=5, random_state=0).fit(images, nouns).labels_
    np.testing.assert_array_equal(ranks[0]["alone"], alone)
    assert all("alone" not in r for r in ranks[1:])


def test_refinements_of_one_process_are_refused_before_the_fit(ranks):
    assert {r["one_process_only"] for r in ranks} == {
        "semantic_centres=True runs in one process only; fit outside a process group, or leave it at its default there"}


def test_a_failing_rank_stops_all_ranks_with_its_error():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*deliberate failure on rank 1"):
        ld.spawn(rank_crashes, 2, timeout_s=SPAWN_TIMEOUT_S, backend="gloo")


def test_python_dash_m_laic_is_the_laic_command():
    # `torchrun -m laic ...` and machines without the console script on PATH go through laic/__main__.py.
    repo = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "laic", "evaluate"], capture_output=True, text=True, timeout=120,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 2
    assert done.stderr.startswith("usage: laic evaluate") and "--labels" in done.stderr


def test_the_check_command_agrees_with_one_process_and_says_so(capfd, tmp_path):
    # `python -m laic.distributed.check`: 2 gloo processes against rank 0's single-process graph and k-means.
    from laic.distributed import check

    assert check.main(["--processes", "2", "--rows", "301", "--dim", "16", "--clusters", "5", "--neighbours", "4"]) == 0
    out = capfd.readouterr().out   # printed by rank 0's process
    assert "2 ranks on cpu, N=301 D=16 k=4 K=5" in out
    assert "rows with identical lists 1.000000" in out and "identical labels 1.000000" in out
    five = tmp_path / "five.npy"
    np.save(five, np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32))
    for bad, said in ((["--clusters", "0"], "argument --clusters: must be at least 1, got 0"),   # a traceback before
                      (["--processes", "-1"], "argument --processes: must be at least 0, got -1"),
                      (["--rows", "10", "--clusters", "20"], "--clusters at most --rows"),
                      # tracebacks from the ranks, with status 1 ("results differ"), before:
                      (["--features", str(tmp_path / "none.npy")], "--features"),
                      (["--features", str(five)], "--neighbours must be below the rows of --features"),
                      (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
                      (["--rows", "2", "--neighbours", "1", "--clusters", "1", "--processes", "3"],
                       "3 processes need a row each, but --rows is 2")):
        with pytest.raises(SystemExit) as stop:
            check.main(["--processes", "2", *bad])
        assert stop.value.code == 2 and said in capfd.readouterr().err


def test_a_collective_error_raised_alike_on_every_rank_is_not_wrapped_again(ranks):
    n, last = len(ranks), len(ranks) - 1
    kind, message, _ = failures(ranks, "nested")
    assert (kind, message) == ("RankFailed", f"the input check failed on rank {last} of {n}: OSError: unreadable; "
                                             f"all {n} ranks stopped")


@pytest.mark.parametrize("n, k", [(37, 5), (9, 1), (4, 0)])
def test_single_process_neighbour_mean_is_the_mean_of_the_neighbour_rows(n, k):
    """One process sums the neighbour columns one at a time: the mean of the gathered rows, computed the plain way
    (float32 rows, and float64 rows kept in float64); no neighbour at all gives NaN rows, as an empty mean does."""
    gen = torch.Generator().manual_seed(n + k)
    for dtype in (torch.float32, torch.float64):
        features = torch.randn(n, 13, generator=gen, dtype=torch.float64).to(dtype)
        neighbours = torch.randint(0, n, (n, k), generator=gen)
        got = ld.neighbour_mean(features, neighbours)
        assert got.dtype == dtype and got.shape == (n, 13)
        if k:   # a raw IndexError before
            with pytest.raises(ValueError, match=f"neighbours holds {n}, not a row index of the whole matrix"):
                ld.neighbour_mean(features, neighbours + n - neighbours.max())
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got, features[neighbours].mean(1), equal_nan=True, rtol=tolerance, atol=tolerance)
