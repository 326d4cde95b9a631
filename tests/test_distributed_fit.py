"""Stage 1, LAIC.fit and `laic fit` on 2 and 3 CPU processes (gloo), against one process. As in
test_distributed.py, each world size runs everything in one spawn (starting Python and torch per rank is the slow
part) and the parent compares; every run is bounded by a deadline."""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import laic.distributed as ld
import laic.relations as relations
import laic.stage1 as stage1
from laic import LAIC, select_k
from laic.cli import main
from laic.commands.demo import save_data
from laic.demo_data import make_semantic_dataset
from laic.distributed.rows import RowBlocks
from laic.distributed.spawn import free_port
from laic.stage0 import (build_semantic_space, first_copies, first_copy_index, fused_features, noun_centres,
                         spherical_kmeans)
from laic.stage1 import Stage1Config, confident_centres, head_probabilities, stage1_decision, train_heads
from laic_kernels import checks

from frames import Frame
from host_reads import counting_host_reads

# The 3-rank module fixture runs every rank check in 3 processes on CI's 2 cores: 50 s on an idle 2-core machine,
# over 120 s once (12-07) with another job beside the test run. A hang still ends here, later.
SPAWN_TIMEOUT_S = 360
STAGE1 = Stage1Config(target_steps=12, batch_size=16, min_epochs=1)
ROWS_SPACE = ("images", "texts", "image_neighbours", "text_neighbours", "neighbours", "neighbour_mask")


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch):
    # A collective stuck on a dead rank fails after this long instead of the default 10 minutes.
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "60")


def one_process_space():
    """Stage 0 in one process on image blobs round 4 directions and nouns near them (as test_distributed.py's), and
    its anchor partition."""
    g = torch.Generator().manual_seed(11)
    centres = torch.nn.functional.normalize(torch.randn(4, 24, generator=g), dim=1)
    images = centres[torch.arange(96) % 4] + 0.9 * torch.randn(96, 24, generator=g) / 24 ** 0.5
    nouns = torch.cat([centres.repeat_interleave(3, 0) + 0.3 * torch.randn(12, 24, generator=g) / 24 ** 0.5,
                       torch.randn(10, 24, generator=g)])
    space = build_semantic_space(images, nouns, 4, seed=2, n_neighbours=6)
    fused = fused_features(space, 4)
    return space, fused, spherical_kmeans(fused, 4, n_init=3, seed=2).labels


def shard_space(space, world):
    """This rank's rows of a one-process space: stage 1 then starts from exactly the same inputs."""
    rows = world.row_shard(space.images.shape[0])
    fields = {f.name: getattr(space, f.name) for f in dataclasses.fields(space)}
    fields.update({name: fields[name][rows] for name in ROWS_SPACE})
    fields["rows"] = RowBlocks(rows.stop - rows.start, world.group)
    return type(space)(**fields), rows


def tied_probabilities(n=90, k=5):
    """Probabilities with many equal confidences (values on a coarse grid): the per-cluster selection's ties."""
    g = torch.Generator().manual_seed(5)
    probs = torch.randint(1, 4, (n, k), generator=g).float()
    return probs / probs.sum(1, keepdim=True), torch.randn(n, 8, generator=g)


# A fit on a process group against one process: stage 0's later sums are all-reduced (another addition order), so
# nearly tied text-space neighbours can swap and the agreement move by ~1e-3 (see test_distributed.py's stage-0
# test). The blobs are far apart compared with that but for one row near a boundary of the fused space (its top two
# probabilities 0.06 apart; a 1e-6 perturbation of the features moves it in one process too): the partitions are
# the same up to that row.
MOVED_ROWS_ALLOWED = 1


def rows_moved(first: np.ndarray, second: np.ndarray) -> int:
    """Rows whose cluster differs between two labelings once their cluster ids are matched (the matching that keeps
    the most rows together: scipy's assignment on the contingency table)."""
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((first.max() + 1, second.max() + 1), dtype=np.int64)
    np.add.at(table, (first, second), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(len(first) - table[rows, cols].sum())


def demo_data():
    return make_semantic_dataset(n_classes=4, n_per_class=30, dim=32, seed=1)


def fit_demo(features, data):
    return LAIC(n_clusters=4, random_state=1, device="cpu").fit(features, data.noun_features, data.noun_names)


def cli_fit_args(inputs, out, features="features.npy"):
    return ["fit", "--features", str(inputs / features), "--vocab", str(inputs / "vocab"), "--k", "4", "--out",
            str(out), "--seed", "1", "--device", "cpu", "--threads", "1"]


# ---------------------------------------------------------------------------------------------------------------
# What each rank runs


def rank_checks(inputs):
    torch.set_num_threads(1)   # the ranks share the machine's cores: more threads would spin against each other
    world = ld.current()
    out = {"rank": world.rank}
    space, fused, anchor = one_process_space()
    mine, rows = shard_space(space, world)
    result = train_heads(mine, anchor[rows], 4, seed=3, config=STAGE1)
    out["stage1"] = {"image_head": result.image_head.state_dict(), "text_head": result.text_head.state_dict(),
                     "probabilities": result.probabilities, "labels": result.labels, "centres": result.centres,
                     "history": result.history}
    out["decision"] = stage1_decision(fused[rows], anchor[rows], result.labels, 4, mine.rows)
    out["stage1_reads"] = {}
    for batch_size in (48, 16):    # one epoch of 96 rows: 2 steps, then 6
        config = Stage1Config(target_steps=96 // batch_size, batch_size=batch_size, min_epochs=1, max_epochs=1)
        with checks.values_checked(), counting_host_reads() as counts:
            steps = len(train_heads(mine, anchor[rows], 4, seed=3, config=config).history["loss"])
        out["stage1_reads"][steps] = counts
    probs, features = tied_probabilities()
    tied = world.row_shard(len(probs))
    out["tied_centres"] = confident_centres(features[tied], probs[tied], 0.5, RowBlocks(len(probs[tied]),
                                                                                         world.group))

    data = demo_data()
    model = fit_demo(data.features[world.row_shard(len(data.features))], data)
    out["fit"] = {name: getattr(model, name) for name in ("centres_", "fused_centres_", "agreement_",
                                                          "cluster_names_", "stage1_report_", "n_clusters_",
                                                          "relation_map_", "usage_share_", "attended_nouns_")}
    # A final assignment that drains cluster 0: rank 0 alone warns, about the clusters of all ranks' rows.
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        patch.setattr(LAIC, "_fused_probabilities", never_cluster_0)
        drained = LAIC(n_clusters=4, random_state=0, stage1_steps=0).fit(
            data.features[world.row_shard(len(data.features))], data.noun_features)
    out["drained"] = (drained.cluster_sizes_, [str(w.message) for w in said if "hold no image" in str(w.message)])
    # Where warnings are errors, rank 0's warning stops every rank (before: rank 0 alone raised, and the others went
    # on into their next collective).
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hold no image")
        patch.setattr(LAIC, "_fused_probabilities", never_cluster_0)
        try:
            LAIC(n_clusters=4, random_state=0, stage1_steps=0).fit(
                data.features[world.row_shard(len(data.features))], data.noun_features)
            out["drained_as_error"] = None
        except Exception as exc:      # noqa: BLE001 (which exception is what the parent checks)
            out["drained_as_error"] = f"{type(exc).__name__}: {exc}"
    with pytest.raises(ValueError, match="gather_labels") as refused:   # labels_ holds this rank's rows only
        model.save(inputs / f"never-{world.size}-{world.rank}")
    out["save_refused"] = str(refused.value)
    # Outside the fit's group one rank's block passed for all N labels, and save wrote it.
    with ld.one_process(), pytest.raises(ValueError, match="call gather_labels on every rank of that group"):
        ld.gather_labels(model)
    out["fit"]["labels"] = ld.gather_labels(model)
    # Again: the same on every rank, at once (rank 0 alone returned; the others waited in a gather that never came).
    out["fit"]["labels_again"] = ld.gather_labels(model)
    # K searched on all ranks' rows (refused on a process group before 12-05).
    auto = LAIC(n_clusters="auto", random_state=0, stage1_steps=0).fit(
        data.features[world.row_shard(len(data.features))], data.noun_features)
    out["auto_k"] = (auto.n_clusters_, auto.k_scores_)
    # Copies of images across the ranks' blocks: the first copy in rank order, as one process finds it.
    doubled = torch.from_numpy(np.concatenate([data.features[:30], data.features[10:20], data.features[:5]]))
    block = doubled[world.row_shard(len(doubled))]
    out["first_copies"] = first_copies(block, RowBlocks(len(block), world.group))
    # The agreements among the distinct images where some repeat: their own graphs over the ranks' blocks.
    copied = _with_copies(data.features)
    space = build_semantic_space(torch.from_numpy(copied[world.row_shard(len(copied))]),
                                 torch.from_numpy(data.noun_features), 4, seed=0, group=world.group)
    out["agreements_with_copies"] = (space.raw_agreement, space.null_agreement)
    # The K search's reference with the data's copies, whose first copies lie on other ranks' blocks.
    null = select_k.null_reference(space, 0)
    out["reference_with_copies"] = null.features
    # Each point's nearest counted image, and the criterion that leaves it out, over the ranks' blocks.
    out["nearest_with_copies"] = select_k.nearest_images(space.images, space.image_neighbours, space.distinct,
                                                         space.rows).index
    out["scores_with_copies"] = [select_k.score_k(space, null, k, 0, space.distinct) for k in (3, 6)]
    # A semantic centre for every image (fewer than 3 images a cluster): all ranks' rows, on every rank.
    out["centres_of_every_row"] = noun_centres(block, len(doubled) // 3 + 1, group=world.group)
    # The reference's axes are rank 0's: an eigensolver that flips an axis on one rank changes nothing.
    space = build_semantic_space(torch.from_numpy(data.features[world.row_shard(len(data.features))]),
                                 torch.from_numpy(data.noun_features), 4, seed=0, group=world.group)
    plain = select_k.null_reference(space, 0).features
    with pytest.MonkeyPatch.context() as patch:
        if world.rank == 1:
            eigh = torch.linalg.eigh
            patch.setattr(torch.linalg, "eigh", lambda a: (lambda values, axes: (values, -axes))(*eigh(a)))
        out["reference_despite_a_flip"] = bool(torch.equal(select_k.null_reference(space, 0).features, plain))
    # The relation map is rank 0's on every rank: an eigensolver rounding otherwise on one rank changes nothing.
    with pytest.MonkeyPatch.context() as patch:
        if world.rank == 1:
            eigh = torch.linalg.eigh
            patch.setattr(torch.linalg, "eigh", lambda a: (lambda values, axes: (values * (1 + 1e-6), axes))(*eigh(a)))
        out["relation_map"] = relations.made_relations(space.images, space.nouns, "auto", 0.05, 4, space.rows)[0]
    # A doubtful choice (the top of a range below the data's 4 groups) is warned about once, by rank 0.
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        LAIC(n_clusters="auto", k_range=(2, 3), random_state=0, stage1_steps=0).fit(
            data.features[world.row_shard(len(data.features))], data.noun_features)
    out["auto_k_doubts"] = [str(w.message) for w in said if "end of the range" in str(w.message)]

    # A NaN in one rank's rows only: every rank stops with the same error, which rank 0 alone prints.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        out["cli_bad_rc"] = main(cli_fit_args(inputs, inputs / f"bad-run-{world.size}", "bad.npy"))
    out["cli_bad_stderr"] = stderr.getvalue()

    # Switches that run in one process only: refused before the fit, once, not after stages 0 and 1 on every rank.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        out["cli_one_process_rc"] = main(cli_fit_args(inputs, inputs / f"sic-run-{world.size}") +
                                         ["--pseudo-labels", "semantic"])
    out["cli_one_process_stderr"] = stderr.getvalue()
    # Argument errors every process reaches alike: printed by process 0 alone (once a process before).
    out["cli_bad_args"] = {}
    # More threads than CPUs: checked with the other settings (each process said it before).
    for case, extra in (("k range", ["--k", "auto", "--k-range", "300:200"]), ("no features", None),
                        ("threads", ["--threads", "100000"])):
        argv = cli_fit_args(inputs, inputs / f"args-run-{world.size}")
        if extra is None:
            at = argv.index("--features")
            del argv[at:at + 2]
        else:
            argv += extra
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            out["cli_bad_args"][case] = (main(argv), stderr.getvalue())
    # argparse's own usage errors, and a bad collective timeout in the environment every process shares.
    for case, extra, environment in (("usage", ["--seed", "abc"], {}),
                                     ("timeout", [], {"LAIC_DIST_TIMEOUT_S": "abc"})):
        stderr, saved = io.StringIO(), {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    status = main(cli_fit_args(inputs, inputs / f"args-run-{world.size}") + extra)
                except SystemExit as exc:   # argparse's exit
                    status = exc.code
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        out["cli_bad_args"][case] = (status, stderr.getvalue())

    # Processes handed other arguments, another file under the same name, or fewer rows than there are processes.
    last = world.rank == world.size - 1
    out["cli_other_seed"] = cli_run(cli_fit_args(inputs, inputs / f"seed-run-{world.size}") +
                                    ["--seed", "2"] * last)
    # The same relative path names another file on the last rank (as on another machine).
    argv = cli_fit_args(inputs, inputs / f"file-run-{world.size}")
    argv[argv.index("--features") + 1] = "features.npy"
    here = os.getcwd()
    os.chdir(inputs / "elsewhere" if last else inputs)
    try:
        out["cli_other_file"] = cli_run(argv)
    finally:
        os.chdir(here)
    out["cli_one_row"] = cli_run(cli_fit_args(inputs, inputs / f"row-run-{world.size}", "one_row.npy"))
    argv = cli_fit_args(inputs, inputs / f"vocab-run-{world.size}")
    argv[argv.index("--vocab") + 1] = str(inputs / ("other_vocab" if last else "vocab"))
    out["cli_other_vocab"] = cli_run(argv)
    # Another path to the same rows on the last rank (each machine's own copy): fitted.
    argv = cli_fit_args(inputs, inputs / f"auto-run-{world.size}")
    argv[argv.index("--k") + 1] = "auto"
    out["cli_auto"] = cli_run(argv)
    out["cli_copy"] = cli_run(cli_fit_args(inputs, inputs / f"copy-run-{world.size}",
                                           "copy/features.npy" if last else "features.npy"))
    # The API: a rank with another setting, or other noun names.
    features = data.features[world.row_shard(len(data.features))]
    other_names = [name + "s" * last for name in data.noun_names]
    # The same text split into other names on the last rank: one string with the names joined by line breaks was
    # compared, and these passed as the same names.
    first, second = data.noun_names[:2]
    split_otherwise = ([first, f"{second}\nx"] if last else [f"{first}\n{second}", "x"]) + data.noun_names[2:]
    # The last rank's vocabulary with a row repeated (dropped as a repeat, it is rank 0's): refused, not a wait in
    # mismatched collectives until the timeout (that rank alone took the repeat warning's step).
    repeated = (np.concatenate([data.noun_features, data.noun_features[:1]]) if last else data.noun_features,
                data.noun_names + [data.noun_names[0] + " again"] * last)
    # Frames whose column names differ on the last rank, or are of mixed kinds there: every rank refuses at once.
    columns = [f"c{j}" for j in range(features.shape[1])]
    other_columns = Frame(features, columns[::-1] if last else columns)
    mixed_columns = Frame(features, [0] + columns[1:] if last else columns)
    for case, model, (nouns, names), rows in (
            ("api_other_columns", LAIC(n_clusters=4), (data.noun_features, data.noun_names), other_columns),
            ("api_mixed_columns", LAIC(n_clusters=4), (data.noun_features, data.noun_names), mixed_columns)):
        try:
            model.fit(rows, nouns, names)
            out[case] = None
        except ValueError as exc:
            out[case] = str(exc)
    for case, model, (nouns, names) in (
            ("api_other_lr", LAIC(n_clusters=4, lr=0.1 if last else 1e-3), (data.noun_features, data.noun_names)),
            ("api_other_names", LAIC(n_clusters=4), (data.noun_features, other_names)),
            ("api_names_split_otherwise", LAIC(n_clusters=4), (data.noun_features, split_otherwise)),
            ("api_repeated_noun", LAIC(n_clusters=4), repeated),
            ("api_bad_setting", LAIC(n_clusters=4, text_tau=0.0 if last else 0.05),
             (data.noun_features, data.noun_names))):
        try:
            model.fit(features, nouns, names)
            out[case] = None
        except ValueError as exc:
            out[case] = str(exc)
    return out


def _with_copies(features):
    """The features with 60 copies of 12 of their rows, spread over every rank's block."""
    copies = features[np.arange(60) % 12 * 7]
    return np.insert(features, np.arange(0, len(features), len(features) // 60)[:60], copies, axis=0)


def never_cluster_0(self, *args):
    """LAIC._fused_probabilities with cluster 0's share moved to cluster 1: the final assignment drains cluster 0."""
    probs = LAIC_FUSED_PROBABILITIES(self, *args).clone()
    probs[:, 1] += probs[:, 0]
    probs[:, 0] = 0
    return probs


LAIC_FUSED_PROBABILITIES = LAIC._fused_probabilities


def cli_run(argv):
    """(exit status, stderr) of `laic ARGV` in this process."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, stderr.getvalue()


def rank_fails_in_stage1(inputs, out):
    """`laic fit` where rank 1 raises in the middle of stage 1 while rank 0 waits for it in a collective."""
    torch.set_num_threads(1)
    if ld.current().rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError("deliberate failure in stage 1 on rank 1")
        stage1.consistency_loss = broken
    return main(cli_fit_args(inputs, out))


# ---------------------------------------------------------------------------------------------------------------
# The parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo data as `laic fit` files, and bad.npy: the same with a NaN in a row of the first and the last rank's
    blocks."""
    folder = tmp_path_factory.mktemp("inputs")
    data = demo_data()
    save_data(data, folder)
    bad = data.features.copy()
    bad[[1, -1], 0] = np.nan
    np.save(folder / "bad.npy", bad)
    (folder / "elsewhere").mkdir()
    np.save(folder / "elsewhere" / "features.npy",
            data.features[np.random.default_rng(0).permutation(len(data.features))])
    np.save(folder / "one_row.npy", data.features[:1])
    shutil.copytree(folder / "vocab", folder / "other_vocab")     # one noun renamed: another vocabulary
    names = (folder / "vocab" / "nouns.txt").read_text().splitlines()
    (folder / "other_vocab" / "nouns.txt").write_text("\n".join(["another " + names[0]] + names[1:]) + "\n")
    (folder / "copy").mkdir()
    np.save(folder / "copy" / "features.npy", data.features)
    return folder


@pytest.fixture(scope="module", params=[2, 3], ids=lambda size: f"{size}-ranks")
def ranks(request, inputs):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAIC_DIST_TIMEOUT_S", "60")
        results = ld.spawn(rank_checks, request.param, inputs, timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [r["rank"] for r in results] == list(range(request.param))
    return results


@pytest.fixture(scope="module")
def one_process():
    space, fused, anchor = one_process_space()
    result = train_heads(space, anchor, 4, seed=3, config=STAGE1)
    return space, result, stage1_decision(fused, anchor, result.labels, 4)


def test_stage1_on_row_blocks_trains_the_heads_one_process_trains(ranks, one_process):
    """The ranks draw one process's batches and reduce the whole batch's gradients, so every step is one
    process's up to float reduction order: BatchNorm statistics and gradients are sums over ranks, added in another
    order (about 1 ulp apart per step), which Adam carries on over the 12 steps (here at most ~1e-7 on the weights).
    One exception: the first layer's bias has no gradient in exact arithmetic (BatchNorm removes the batch mean),
    so its gradient is pure rounding noise, which Adam normalises into steps of up to ``lr``; that bias and the
    running mean that follows it are compared through what the heads compute (the probabilities) instead."""
    space, single, _ = one_process
    noise_only = {"net.0.bias", "net.1.running_mean"}
    for r in ranks:
        for head in ("image_head", "text_head"):
            expected = getattr(single, head).state_dict()
            for name, value in r["stage1"][head].items():
                if name not in noise_only:
                    torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=f"{head}.{name}")
        torch.testing.assert_close(r["stage1"]["centres"], single.centres, rtol=0, atol=1e-5)
        assert r["stage1"]["history"]["loss"] == pytest.approx(single.history["loss"], rel=1e-5)
    # The heads are replicated: every rank holds the same weights, bit for bit.
    for r in ranks[1:]:
        for head in ("image_head", "text_head"):
            for name, value in r["stage1"][head].items():
                assert torch.equal(value, ranks[0]["stage1"][head][name]), f"{head}.{name}"
    probs = torch.cat([r["stage1"]["probabilities"] for r in ranks])
    torch.testing.assert_close(probs, single.probabilities, rtol=0, atol=1e-3)
    assert torch.equal(torch.cat([r["stage1"]["labels"] for r in ranks]), single.labels)
    # The ranks' heads, run in one process, give the ranks' probabilities (the returned heads are plain heads).
    image_head = stage1.ClusterHead.from_state(ranks[0]["stage1"]["image_head"], 24, 4)
    mine = head_probabilities(image_head.eval(), space.images)
    single_image = head_probabilities(single.image_head, space.images)
    torch.testing.assert_close(mine, single_image, rtol=0, atol=1e-3)


def test_stage1_on_row_blocks_reads_nothing_back_per_step(ranks):
    """The reads of a whole train_heads call on a process group (a device sync each on CUDA) do not grow with the
    steps of an epoch: which batch rows a rank holds is found once an epoch, not once a step."""
    for r in ranks:
        assert sorted(r["stage1_reads"]) == [2, 6]
        assert r["stage1_reads"][2] == r["stage1_reads"][6]


def test_stage1_decision_is_about_all_rows(ranks, one_process):
    _, _, expected = one_process
    for r in ranks:
        assert r["decision"].keys() == expected.keys()
        for name, value in r["decision"].items():
            assert value == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_confident_centres_break_ties_by_lower_row_across_ranks(ranks):
    # Exact selection (the same rows as one process); the sums over ranks differ from one process's in rounding.
    probs, features = tied_probabilities()
    expected = confident_centres(features, probs, 0.5)
    for r in ranks:
        torch.testing.assert_close(r["tied_centres"], expected, rtol=0, atol=1e-6)


def test_fit_on_a_process_group_equals_one_process(ranks):
    data = demo_data()
    single = fit_demo(data.features, data)
    labels = ranks[0]["fit"]["labels"]
    assert all(r["fit"]["labels"] is None for r in ranks[1:])   # gathered on rank 0 only
    assert np.array_equal(ranks[0]["fit"]["labels_again"], labels)
    assert all(r["fit"]["labels_again"] is None for r in ranks[1:])
    assert rows_moved(single.labels_, labels) <= MOVED_ROWS_ALLOWED
    assert ranks[0]["fit"]["stage1_report_"]["kept"] == single.stage1_report_["kept"]
    assert all("fitted on a process group" in r["save_refused"] for r in ranks)
    # K searched on a process group: one process's curve (its sums in another order) and choice, on every rank.
    auto = LAIC(n_clusters="auto", random_state=0, stage1_steps=0).fit(data.features, data.noun_features)
    for r in ranks:
        k, scores = r["auto_k"]
        assert k == auto.n_clusters_ and [c for c, _ in scores] == [c for c, _ in auto.k_scores_]
        np.testing.assert_allclose([s for _, s in scores], [s for _, s in auto.k_scores_], rtol=0, atol=1e-4)
    assert all(r["reference_despite_a_flip"] for r in ranks)
    assert all(torch.equal(r["relation_map"], ranks[0]["relation_map"]) for r in ranks)
    doubled = torch.from_numpy(np.concatenate([data.features[:30], data.features[10:20], data.features[:5]]))
    expected = first_copies(doubled)
    assert int(expected.sum()) == 30
    assert torch.equal(torch.cat([r["first_copies"] for r in ranks]), expected)
    assert all(torch.equal(r["centres_of_every_row"], noun_centres(doubled, len(doubled) // 3 + 1)) for r in ranks)
    alone = build_semantic_space(torch.from_numpy(_with_copies(data.features)), torch.from_numpy(data.noun_features),
                                 4, seed=0)
    for r in ranks:
        np.testing.assert_allclose(r["agreements_with_copies"], (alone.raw_agreement, alone.null_agreement),
                                   rtol=0, atol=1e-6)
    reference = select_k.null_reference(alone, 0).features
    copy_of = first_copy_index(alone.images)
    assert bool((copy_of != torch.arange(len(copy_of))).any())   # (some rows repeat earlier ones)
    assert torch.equal(reference, reference[copy_of])            # a copy's reference row is its first copy's
    torch.testing.assert_close(torch.cat([r["reference_with_copies"] for r in ranks]), reference, rtol=0, atol=1e-5)
    nearest = select_k.nearest_images(alone.images, alone.image_neighbours, alone.distinct, alone.rows).index
    assert torch.equal(torch.cat([r["nearest_with_copies"] for r in ranks]), nearest)
    assert bool(alone.distinct[nearest].all())                 # (each a counted image, never a copy)
    scores = [select_k.score_k(alone, select_k.null_reference(alone, 0), k, 0, alone.distinct) for k in (3, 6)]
    for r in ranks:
        np.testing.assert_allclose(r["scores_with_copies"], scores, rtol=0, atol=1e-5)
    assert len(ranks[0]["auto_k_doubts"]) == 1 and "K = 3, the upper end" in ranks[0]["auto_k_doubts"][0]
    assert all(r["auto_k_doubts"] == [] for r in ranks[1:])
    for r in ranks:   # what predict and save use is the same on every rank
        for name in ("agreement_", "cluster_names_", "stage1_report_", "n_clusters_"):
            assert r["fit"][name] == ranks[0]["fit"][name], name
        for name in ("centres_", "fused_centres_", "relation_map_"):
            assert torch.equal(r["fit"][name], ranks[0]["fit"][name]), name
    # The relation map weights the nouns by the usage of all ranks' images: as one process weights them.
    assert single.relation_share_ > 0 and single.usage_share_ > 0
    for r in ranks:
        assert r["fit"]["usage_share_"] == pytest.approx(single.usage_share_, rel=1e-5)
        assert r["fit"]["attended_nouns_"] == pytest.approx(single.attended_nouns_, rel=1e-5)
        torch.testing.assert_close(r["fit"]["relation_map_"], single.relation_map_, rtol=0, atol=1e-4)


def test_clusters_drained_on_a_process_group_are_warned_once(ranks):
    """cluster_sizes_ counts every rank's rows; the empty-cluster warning did not run on a process group at all."""
    sizes = {tuple(r["drained"][0]) for r in ranks}
    assert len(sizes) == 1 and next(iter(sizes))[0] == 0
    assert [len(r["drained"][1]) for r in ranks] == [1] + [0] * (len(ranks) - 1)
    assert ranks[0]["drained"][1][0].startswith("1 of the 4 clusters hold no image: stage 0's k-means used all 4")
    for r in ranks:
        assert r["drained_as_error"].startswith("RankFailed: a warning failed on rank 0 of"), r["drained_as_error"]
        assert "UserWarning: 1 of the 4 clusters hold no image" in r["drained_as_error"]


def test_bad_rows_on_one_rank_stop_every_rank_with_one_message(ranks, inputs):
    assert {r["cli_bad_rc"] for r in ranks} == {2}
    last = len(ranks) - 1
    said, n = ranks[0]["cli_bad_stderr"], len(demo_data().features)
    # Each rank's rows: both bad rows are named (rank 0's message alone said "1 of 750 row(s)", rows 1).
    assert f"reading the inputs failed on rank 0 of {len(ranks)}: ValueError: --features " in said
    assert "1 of rows 0 to " in said and f" (this process's share of {n}) contain NaN or infinite values: rows 1;" in said
    assert f"; on rank {last}: ValueError: --features " in said and f"contain NaN or infinite values: rows {n - 1};" in said
    assert ranks[0]["cli_bad_stderr"].count("laic fit: error:") == 1
    assert all(r["cli_bad_stderr"] == "" for r in ranks[1:])
    assert not (inputs / f"bad-run-{len(ranks)}").exists()


def test_one_process_switches_are_refused_on_every_rank_with_one_message(ranks, inputs):
    assert {r["cli_one_process_rc"] for r in ranks} == {2}
    assert ranks[0]["cli_one_process_stderr"].count("laic fit: error: --pseudo-labels runs in one process only") == 1
    assert all(r["cli_one_process_stderr"] == "" for r in ranks[1:])
    assert not (inputs / f"sic-run-{len(ranks)}").exists()


def test_argument_errors_every_process_reaches_are_printed_once(ranks):
    for case, says in (("k range", "laic fit: error: --k-range 300:200 is empty"),
                       ("no features", "laic fit: error: pass the images: --features"),
                       ("threads", "laic fit: error: --threads=100000 is more than the "),
                       ("usage", "usage: "),   # argparse's (every process printed its usage and error)
                       ("timeout", "laic fit: error: LAIC_DIST_TIMEOUT_S='abc' must be a number")):
        assert {r["cli_bad_args"][case][0] for r in ranks} == {2}, case
        assert ranks[0]["cli_bad_args"][case][1].startswith(says), ranks[0]["cli_bad_args"][case][1]
        assert ranks[0]["cli_bad_args"][case][1].count("laic fit: error:") == 1
        assert all(r["cli_bad_args"][case][1] == "" for r in ranks[1:]), case


def test_processes_given_other_arguments_are_refused_before_the_fit(ranks, inputs):
    last = len(ranks) - 1
    for case, says in (("cli_other_seed", f"--seed differs between rank 0 and rank {last}"),
                       ("cli_other_file", f"--features (the file's contents) differs between rank 0 and rank {last}"),
                       ("cli_other_vocab", f"--vocab (its nouns and embeddings) differs between rank 0 and rank "
                                           f"{last}"),
                       ("cli_one_row", "holds 1 image(s); laic needs at least 3")):
        assert {r[case][0] for r in ranks} == {2}, case
        assert ranks[0][case][1].count("laic fit: error:") == 1 and says in ranks[0][case][1], ranks[0][case][1]
        assert all(r[case][1] == "" for r in ranks[1:]), case
    assert not any((inputs / f"{name}-run-{len(ranks)}").exists() for name in ("seed", "file", "row", "vocab"))
    # Paths may differ between machines; what they name is compared.
    assert [r["cli_copy"][0] for r in ranks] == [0] * len(ranks), ranks[0]["cli_copy"][1]
    # --k auto under torchrun (refused before 12-05): the search of one process, recorded by process 0.
    assert [r["cli_auto"][0] for r in ranks] == [0] * len(ranks), ranks[0]["cli_auto"][1]
    data = demo_data()
    single = LAIC(n_clusters="auto", random_state=1, device="cpu", n_threads=1).fit(data.features, data.noun_features,
                                                                                   data.noun_names)
    searched = json.loads((inputs / f"auto-run-{len(ranks)}" / "run.json").read_text())
    assert searched["k"] == single.n_clusters_ and searched["processes"] == len(ranks)
    np.testing.assert_allclose([s for _, s in searched["k_search"]["scores"]], [s for _, s in single.k_scores_],
                               rtol=0, atol=1e-4)
    assert (inputs / f"copy-run-{len(ranks)}" / "labels.npy").is_file()


def test_ranks_given_other_settings_or_noun_names_are_refused(ranks):
    last = len(ranks) - 1
    # A setting refused on one rank alone: every rank at once (the others waited in a collective until its timeout).
    for case, says, rank in (("api_other_lr", "lr differs", f"rank {last}"),
                             ("api_other_names", "noun_names differs", f"rank {last}"),
                             ("api_names_split_otherwise", "noun_names differs", f"rank {last}"),
                             ("api_repeated_noun", "noun_features must be the same on every rank", f"ranks [{last}]"),
                             ("api_bad_setting", "text_tau must be a positive finite number", f"rank {last}"),
                             ("api_other_columns", "image_features' column names differs", f"rank {last}"),
                             ("api_mixed_columns", "image_features's column names are of mixed kinds", f"rank {last}")):
        for r in ranks:
            assert r[case] is not None and says in r[case] and rank in r[case], (case, r[case])


def test_a_rank_failing_mid_fit_stops_every_rank_and_writes_nothing(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "60")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*deliberate failure in stage 1 on rank 1"):
        ld.spawn(rank_fails_in_stage1, 2, inputs, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert list(tmp_path.iterdir()) == []   # no run, no staging folder


def test_fit_under_torchrun_writes_the_one_process_run(inputs, tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(repo), "LAIC_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "laic", *cli_fit_args(inputs, out)],
                          capture_output=True, text=True, timeout=180, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "2 processes" in done.stdout   # rank 0 alone prints and writes
    single = fit_demo(demo_data().features, demo_data())
    labels = np.load(out / "labels.npy")
    assert len(labels) == len(single.labels_)
    assert rows_moved(single.labels_, labels) <= MOVED_ROWS_ALLOWED
    model = LAIC.load(out / "model")
    assert np.array_equal(model.labels_, labels)
    features = demo_data().features
    assert rows_moved(model.predict(features), single.predict(features)) <= MOVED_ROWS_ALLOWED

    # Rank 0's stdout failing (a full disk behind `> file`): said, status 1, as in one process (each rank ends with
    # os._exit, past the one-process check of stdout: it said nothing and ended 0).
    with open("/dev/full", "w") as full:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "-m", "laic", *cli_fit_args(inputs, tmp_path / "full"), "--quiet"]
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=180, cwd=repo, env=env)
    assert done.returncode == 1 and "laic fit: error: writing to standard output: [Errno 28]" in done.stderr
    assert (tmp_path / "full" / "labels.npy").is_file()
