"""`laic embed` under torchrun: each process embeds its share of the shards into one cache, which is the cache one
process writes (gloo, 2 and 3 CPU processes spawned by the test); commands that do not share their work refuse."""
import json
import time

import numpy as np
import pytest
import torch

import laic.distributed as ld
from laic.cli import main
from tiny_clip import register_tiny_clip

SPAWN_TIMEOUT_S = 240


def embed_args(folder, out):
    return ["embed", str(folder), "--model", register_tiny_clip(), "--pretrained", "random", "--seed", "3", "--out",
            str(out), "--device", "cpu", "--workers", "0", "--quiet", "--shard-size", "4", "--batch-size", "3"]


def embed_on_rank(folder, out, last_rank_args=()):
    torch.set_num_threads(1)
    world = ld.current()
    return main(embed_args(folder, out) + list(last_rank_args) * (world.rank == world.size - 1))


def embed_on_rank_with_stderr(folder, out, last_rank_args):
    """(exit status, stderr) of embed_on_rank."""
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = embed_on_rank(folder, out, last_rank_args)
    return status, stderr.getvalue()


def embed_last_rank_elsewhere(folder, elsewhere, out):
    """embed_on_rank_with_stderr with the last rank given another image folder."""
    world = ld.current()
    return embed_on_rank_with_stderr(elsewhere if world.rank == world.size - 1 else folder, out, [])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(29):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    (folder / "img_013_broken.png").write_bytes(b"not an image")
    return folder


def embed_in_one_thread(folder, out):
    """`laic embed` in this process, with one thread as each spawned process has (the caller's count restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(embed_args(folder, out)) == 0
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "cache"
    embed_in_one_thread(images, out)
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_distributed_embed_writes_the_single_process_cache(size, images, single, tmp_path, monkeypatch):
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    out = tmp_path / "cache"
    assert ld.spawn(embed_on_rank, size, images, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo") == [0] * size
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(single / "features.npy"), rtol=0, atol=1e-6)
    ours, theirs = (json.loads((d / "features.json").read_text()) for d in (out, single))
    assert ours["files"] == theirs["files"] and ours["skipped"] == theirs["skipped"]
    assert len(ours["files"]) == 29 and ours["skipped"][0].endswith("img_013_broken.png")
    assert (out / "files.txt").read_text() == (single / "files.txt").read_text()
    assert not (out / ".features.shards").exists()
    if size == 2:  # run again: every rank finds the finished cache and reads it
        assert ld.spawn(embed_on_rank, size, images, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo") == [0] * size


def stop_after_four_batches(folder, out, monkeypatch):
    """A single-process `embed_images` of ``folder`` into ``out`` interrupted after four batches of 3 (two shards of
    4 finished), as `laic embed_args` embeds them."""
    import laic.embed as E

    calls, real = {"n": 0}, E.encode_batch

    def fail_after_four_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "encode_batch", fail_after_four_batches)
    with pytest.raises(KeyboardInterrupt):
        E.embed_images(folder, register_tiny_clip(), "random", seed=3, cache_dir=out, device="cpu", num_workers=0,
                       progress=False, shard_size=4, batch_size=3)
    monkeypatch.undo()


def test_distributed_embed_resumes_the_shards_of_an_interrupted_run(images, single, tmp_path, monkeypatch):
    # An interrupted single-process run left some shards: the processes compute only the others.
    out = tmp_path / "cache"
    stop_after_four_batches(images, out, monkeypatch)
    done = sorted(p.name for p in (out / ".features.shards").glob("shard_*.npz"))
    assert len(done) == 2  # two shards of two batches each
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    assert ld.spawn(embed_on_rank, 2, images, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo") == [0, 0]
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(single / "features.npy"), rtol=0, atol=1e-6)


def update_on_rank(folder, out):
    torch.set_num_threads(1)
    return main(embed_args(folder, out) + ["--update"])


def test_an_update_under_torchrun_keeps_the_earlier_rows_on_every_process(images, single, tmp_path, monkeypatch):
    import shutil

    folder, out, held = tmp_path / "images", tmp_path / "cache", tmp_path / "held"
    shutil.copytree(images, folder)
    held.mkdir()
    added = sorted(folder.glob("img_*.png"))[::7]      # in several shards of 4, dealt to both processes
    for path in added:
        path.rename(held / path.name)                  # (a rename keeps the file's time)
    embed_in_one_thread(folder, out)
    # The earlier rows marked (negated): an update keeps them as they are, where embedding them again would not.
    np.save(out / "features.npy", -np.load(out / "features.npy"))
    for path in added:
        (held / path.name).rename(path)
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    assert ld.spawn(update_on_rank, 2, folder, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo") == [0, 0]
    ours, theirs = (json.loads((d / "features.json").read_text()) for d in (out, single))
    names = [f.rsplit("/", 1)[1] for f in ours["files"]]
    assert names == [f.rsplit("/", 1)[1] for f in theirs["files"]] and ours["skipped"][0].endswith("_broken.png")
    sign = np.array([1.0 if name in {p.name for p in added} else -1.0 for name in names], np.float32)[:, None]
    np.testing.assert_allclose(np.load(out / "features.npy"), sign * np.load(single / "features.npy"), rtol=0,
                               atol=1e-6)
    assert not (out / ".features.shards").exists()

def test_commands_that_do_not_share_their_work_refuse_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["predict", "--model", str(tmp_path / "run"), "--features", str(tmp_path / "f.npy"), "--out",
                 str(tmp_path / "p.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not run under torchrun" in err and "laic predict" in err, err


# (RANK, LOCAL_RANK): the first process of a second machine (RANK 2, LOCAL_RANK 0) says it for its machine, whose
# other processes stay silent (it was silent too when the check went by RANK alone); no LOCAL_RANK: by RANK.
@pytest.mark.parametrize("rank, local_rank, says_it", [("1", None, False), ("2", "0", True), ("3", "1", False)])
def test_commands_that_do_not_share_their_work_are_refused_by_process_zero_alone(tmp_path, monkeypatch, capsys,
                                                                                 rank, local_rank, says_it):
    # Every torchrun process refuses alike: the same line once a machine, not once per process.
    monkeypatch.setenv("WORLD_SIZE", "4" if local_rank else "2")
    monkeypatch.setenv("RANK", rank)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    if says_it:
        assert len(err.strip().splitlines()) == 1 and "`laic report` does not run under torchrun" in err, err
    else:
        assert err == ""


def test_a_missing_image_folder_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    results = ld.spawn(embed_on_rank_with_stderr, 2, tmp_path / "no_such_folder", tmp_path / "cache", [],
                       timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [status for status, _ in results] == [2, 2]
    assert "no_such_folder" in results[0][1] and len(results[0][1].strip().splitlines()) == 1, results[0][1]
    assert results[1][1] == ""


def test_images_one_process_cannot_find_stop_every_process_at_once(images, tmp_path, monkeypatch):
    # The last rank names a folder the others do not: it stopped alone, and rank 0 waited for it in the next
    # collective until the timeout (here 120 s) before this check.
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    start = time.monotonic()
    results = ld.spawn(embed_last_rank_elsewhere, 2, images, tmp_path / "elsewhere", tmp_path / "cache",
                       timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [status for status, _ in results] == [2, 2]
    assert "failed on rank 1 of 2" in results[0][1] and "elsewhere" in results[0][1], results[0][1]
    assert time.monotonic() - start < 100


def test_ranks_with_other_weights_are_refused_before_anything_is_embedded(images, tmp_path, monkeypatch):
    # Another seed draws other random weights on the last rank (as another weights file would): its rows would have
    # gone into the cache under rank 0's identity.
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    out = tmp_path / "cache"
    results = ld.spawn(embed_on_rank_with_stderr, 2, images, out, ["--seed", "4"], timeout_s=SPAWN_TIMEOUT_S,
                       backend="gloo")
    assert [status for status, _ in results] == [2, 2]
    assert "the model's weights differs between rank 0 and rank 1" in results[0][1], results[0][1]
    assert "error" not in results[1][1]   # rank 0 alone prints the refusal
    assert not (out / "features.npy").exists()


def test_a_model_name_one_process_does_not_know_stops_every_process_at_once(images, tmp_path, monkeypatch):
    # --model checked by the command (so that the error names the flag) as a step every process takes: the last
    # rank refusing alone must not leave rank 0 waiting in its next collective, nor be said by nobody.
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    start = time.monotonic()
    results = ld.spawn(embed_on_rank_with_stderr, 2, images, tmp_path / "cache", ["--model", "ViT-B-33"],
                       timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [status for status, _ in results] == [2, 2]
    assert results[0][1].startswith("laic embed: error: checking --model failed on rank 1 of 2: ValueError: --model "
                                    "'ViT-B-33' is not an open_clip model"), results[0][1]
    assert results[1][1] == "" and time.monotonic() - start < 100


def test_a_cache_folder_that_is_not_shared_is_refused(images, tmp_path, monkeypatch):
    """Under torchrun every process writes its shards into the cache folder: one that another machine does not
    reach (here: another path on the last rank) would leave process 0 without them."""
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    out, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    argv = embed_args(images, out)
    results = ld.spawn(embed_on_rank_with_stderr, 2, images, out, ["--out", str(elsewhere)],
                       timeout_s=SPAWN_TIMEOUT_S, backend="gloo")
    assert [status for status, _ in results] == [2, 2], argv
    assert "process 1 does not see what process 0 wrote there" in results[0][1], results[0][1]
    assert not (out / "features.npy").exists()
    # Nothing computed, nothing left: the run process 0 had recorded was refused next as an interrupted one ("0 of 1
    # shards done") by a run of another seed, and `laic fit --features` called it interrupted.
    assert not (out / ".features.shards").exists()


def test_an_update_under_torchrun_takes_over_an_interrupted_run_of_files_changed_since(images, single, tmp_path,
                                                                                     monkeypatch):
    # Process 0 takes the interrupted run's rows over (laic.embed_cache.EarlierRows); every process keeps them.
    import shutil

    folder, out, held = tmp_path / "images", tmp_path / "cache", tmp_path / "held"
    shutil.copytree(images, folder)
    held.mkdir()
    added = sorted(folder.glob("img_*.png"))[3::7]
    for path in added:
        path.rename(held / path.name)
    stop_after_four_batches(folder, out, monkeypatch)
    run = json.loads((out / ".features.shards" / "run.json").read_text())
    taken = []
    for shard in sorted((out / ".features.shards").glob("shard_*.npz")):    # its rows marked (negated)
        with np.load(shard) as part:
            parts = {key: part[key] for key in part.files}
        parts["features"] = -parts["features"]
        np.savez(shard, **parts)
        taken += [run["inputs"][i].rsplit("/", 1)[1] for i in parts["kept"]]
    assert len(taken) == 8
    for path in added:
        (held / path.name).rename(path)
    monkeypatch.setenv("LAIC_DIST_TIMEOUT_S", "120")
    assert ld.spawn(update_on_rank, 2, folder, out, timeout_s=SPAWN_TIMEOUT_S, backend="gloo") == [0, 0]
    ours, theirs = (json.loads((d / "features.json").read_text()) for d in (out, single))
    names = [f.rsplit("/", 1)[1] for f in ours["files"]]
    assert names == [f.rsplit("/", 1)[1] for f in theirs["files"]]
    sign = np.array([-1.0 if name in taken else 1.0 for name in names], np.float32)[:, None]
    np.testing.assert_allclose(np.load(out / "features.npy"), sign * np.load(single / "features.npy"), rtol=0,
                               atol=1e-6)
    assert not (out / ".features.shards").exists() and not (out / ".features.earlier").exists()
