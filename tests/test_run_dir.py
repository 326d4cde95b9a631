"""laic.run_dir: a RUN_DIR published, read and reported while another process publishes into it, or a stop comes."""
import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from laic import io, report, run_dir


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img_{i:03d}.png")
        Image.new("RGB", (8, 8), (i * 13 % 256, 40, 90)).save(paths[-1])
    return paths


def _run(out, k, seed, paths, overwrite=False):
    rng = np.random.default_rng(seed)
    labels = np.arange(len(paths)) % k
    names = [[f"noun{seed}_{c}"] for c in range(k)]
    run_dir.write_run_dir(out, labels, rng.normal(size=(len(paths), 8)).astype(np.float32), paths, names,
                          overwrite=overwrite)
    return labels, names


def _before_the_move(monkeypatch, arrive):
    """``arrive()`` runs just after publish_run's own check of RUN_DIR (the second: write_run_dir checks first),
    before its move: another process's doing in between."""
    real_check, checks = run_dir.check_out_dir, []

    def check_then_arrive(folder, overwrite, arg="--out", inputs=()):
        real_check(folder, overwrite, arg, inputs)
        checks.append(folder)
        if len(checks) == 2:
            monkeypatch.setattr(run_dir, "check_out_dir", real_check)
            arrive()

    monkeypatch.setattr(run_dir, "check_out_dir", check_then_arrive)


def test_a_run_published_between_the_check_and_the_move_is_kept(tmp_path, monkeypatch):
    # publish_run checked RUN_DIR, then set aside and deleted whatever was there by the move: a second fit into the
    # same absent RUN_DIR (without --overwrite) that published in between lost its run without a word.
    paths = _images(tmp_path / "images", 6)
    out = tmp_path / "run"
    _before_the_move(monkeypatch, lambda: _run(out, 2, 1, paths))   # the other fit's run
    with pytest.raises(ValueError, match=r"run_dir .*run: holds files now; .* \(.*run changed while the run was "
                                         r"made\); the finished run is in .*\.run\.unpublished-\w+/run"):
        _run(out, 3, 2, paths)
    assert run_dir.read_run(out).names[0] == ["noun1_0"]           # the other fit's run, whole
    [kept] = io.hidden_dirs_beside(out, "unpublished")
    assert run_dir.read_run(kept / "run").names[0] == ["noun2_0"]  # this one's, kept beside it
    # An empty RUN_DIR is still taken, and an earlier run replaced with overwrite.
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "empty", 3, 3, paths)
    _run(out, 3, 4, paths, overwrite=True)
    assert run_dir.read_run(out).names[0] == ["noun4_0"] and run_dir.read_run(tmp_path / "empty").n_clusters == 3


def _a_run_refitted_after_the_first_call(tmp_path, monkeypatch, module, name):
    """A 4-cluster RUN_DIR (12 images) that another process's fit replaces by a 3-cluster run (names "noun2_*") as
    soon as the first call of ``module.name`` is done: a refit publishing in the middle of the work."""
    paths = _images(tmp_path / "images", 12)
    out = tmp_path / "run"
    _run(out, 4, 1, paths)
    real, calls = getattr(module, name), []

    def then_refit(*args, **kwargs):
        result = real(*args, **kwargs)
        if not calls:
            calls.append(True)
            _run(out, 3, 2, paths, overwrite=True)
        return result

    monkeypatch.setattr(module, name, then_refit)
    return out


def test_a_run_replaced_while_it_is_read_is_read_again_whole(tmp_path, monkeypatch):
    # read_run reads labels.npy, run.json, the features and clusters.json one after the other: a fit publishing into
    # RUN_DIR meanwhile paired one run's labels with the other's cluster names.
    out = _a_run_refitted_after_the_first_call(tmp_path, monkeypatch, run_dir, "_cluster_names")
    run = run_dir.read_run(out)
    expected_labels, expected_names = np.arange(12) % 3, [[f"noun2_{c}"] for c in range(3)]
    np.testing.assert_array_equal(run.labels, expected_labels)
    assert run.n_clusters == 3 and run.names == expected_names


def test_a_report_drawn_while_its_run_is_replaced_is_refused_and_leaves_the_new_run_alone(tmp_path, monkeypatch):
    # The drawing folder lies inside RUN_DIR/report: a fit replacing RUN_DIR took it away, the rest of the drawing
    # went into a new folder inside the new run, and the old run's partial report was moved in there (status 0).
    out = _a_run_refitted_after_the_first_call(tmp_path, monkeypatch, report, "draw_cluster")   # its 1st picture
    with pytest.raises(ValueError, match=r"run was replaced while its report was drawn .*; draw the report again"):
        report.write_report(out)
    assert not (out / "report").exists()            # nothing of the old run's report in the new run
    assert run_dir.read_run(out).names[0] == ["noun2_0"]


def test_a_report_whose_run_is_replaced_just_after_it_is_read_is_refused(tmp_path, monkeypatch):
    # The check compared the drawing folder, made after the run was read: a refit landing in between went unseen,
    # and a 4-cluster report of the old run was moved into the new 3-cluster run (status 0).
    out = _a_run_refitted_after_the_first_call(tmp_path, monkeypatch, report, "read_run_and_identity")
    with pytest.raises(ValueError, match=r"run was replaced while its report was drawn"):
        report.write_report(out)
    assert not (out / "report").exists()
    # A report drawn elsewhere (--out) describes the run it read, whatever happens to RUN_DIR.
    assert report.write_report(out, out_dir=tmp_path / "elsewhere").is_file()


def test_a_published_run_does_not_replace_a_link_out_to_an_empty_folder_it_cannot_rename_over(tmp_path):
    # A rename cannot put a folder in place of a link: --out LINK (to an empty folder) failed after the whole fit.
    paths = _images(tmp_path / "images", 6)
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target")
    _run(tmp_path / "out", 2, 1, paths)
    assert run_dir.read_run(tmp_path / "out").names[0] == ["noun1_0"]


def test_a_file_that_arrives_at_run_dir_before_the_move_is_kept(tmp_path, monkeypatch):
    paths = _images(tmp_path / "images", 6)
    out = tmp_path / "run"
    _before_the_move(monkeypatch, lambda: out.write_text("someone's notes"))
    with pytest.raises(ValueError, match=r"run: holds files now"):
        _run(out, 2, 1, paths)
    assert out.read_text() == "someone's notes"


def test_a_stop_just_after_the_move_waits_until_the_run_is_said_published(tmp_path, monkeypatch,
                                                                          ctrl_c_as_a_terminal_gives_it):
    # A Ctrl-C that arrived as the rename returned said RUN_DIR was untouched (it held the new run), and left the
    # earlier run set aside beside it; following the advice (--resume) was then refused.
    import signal

    paths = _images(tmp_path / "images", 6)
    out = tmp_path / "run"
    _run(out, 2, 1, paths)
    _run(tmp_path / "new", 3, 2, paths)
    real_replace = io.replace_folder

    def ctrl_c_as_the_move_returns(*args, **kwargs):
        earlier = real_replace(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return earlier

    monkeypatch.setattr(io, "replace_folder", ctrl_c_as_the_move_returns)
    said = []
    with pytest.raises(KeyboardInterrupt):
        run_dir.publish_run(out, lambda folder: shutil.copytree(tmp_path / "new", folder, dirs_exist_ok=True),
                            overwrite=True, published=lambda: said.append(run_dir.read_run(out).n_clusters))
    assert said == [3]                                   # the new run was said published before the stop
    assert run_dir.read_run(out).names[0] == ["noun2_0"]
    assert io.hidden_dirs_beside(out, "old") == [] and io.hidden_dirs_beside(out, "deleting") == []


def _as_under_latin1(monkeypatch):
    """os.fsencode / os.fsdecode as a process under a Latin-1 locale (PYTHONUTF8=0) has them: "é" is the byte 0xe9.
    Only laic's own conversions change; the file system calls below still take this process's names."""
    monkeypatch.setattr(io.os, "fsencode", lambda p: io.os.fspath(p).encode("latin-1", "surrogateescape"))
    monkeypatch.setattr(io.os, "fsdecode", lambda b: b.decode("latin-1", "surrogateescape"))


def test_paths_are_recorded_as_their_bytes_and_read_back_under_another_locale(tmp_path, monkeypatch):
    # A run written under a Latin-1 locale recorded "laté.png" as UTF-8 text: under a UTF-8 locale that names the bytes
    # "lat\xc3\xa9.png", another file, so the report found no image. The bytes themselves are recorded now.
    folder = tmp_path / "imgs"
    real = _images(folder, 1)[0].rename(folder / io.os.fsdecode(b"lat\xe9.png"))   # the name's one byte 0xe9
    with monkeypatch.context() as m:
        _as_under_latin1(m)
        as_named_there = str(folder / "lat\u00e9.png")
        assert io.os.fsencode(as_named_there) == bytes(folder) + b"/lat\xe9.png"
        _run(tmp_path / "run", 1, 0, [as_named_there])
        recorded = io.path_text(as_named_there)
    paths = run_dir.read_run(tmp_path / "run").image_paths
    assert paths == [real] and paths[0].is_file()
    assert io.text_path(recorded) == str(real)
    assert io.path_text(real) == str(real)   # under a UTF-8 locale: str(path) itself


def test_a_checkpoint_and_a_model_file_name_the_same_files_under_another_locale(tmp_path, monkeypatch):
    # Stage 2's checkpoint digest of the image list hashed the locale's str ("laté" as UTF-8 under Latin-1: refused
    # on resume under UTF-8), and a model file recorded its encoder's weights file as a str ("is gone" under UTF-8).
    import laic.clip as clip
    from laic.stage2.checkpoint import paths_digest

    weights = tmp_path / io.os.fsdecode(b"w\xe9ights.bin")
    weights.write_bytes(b"")
    images = [str(tmp_path / io.os.fsdecode(b"lat\xe9.png")), str(tmp_path / "plain.png")]
    digest = paths_digest(images)
    assert digest == hashlib.sha1("\n".join(images).encode("utf-8", "surrogateescape")).hexdigest()   # as before
    monkeypatch.setattr(clip, "weights_digest", lambda model: "digest")
    monkeypatch.setattr(clip, "clip_model", lambda model: model)
    monkeypatch.setattr(clip, "module_classes", lambda model: ["Linear"])
    with monkeypatch.context() as m:
        _as_under_latin1(m)
        there = [p.replace("\udce9", "\u00e9") for p in images]          # the same bytes, as Latin-1 names them
        assert [io.os.fsencode(p) for p in there] == [io.os.fsencode(p) for p in images]
        assert paths_digest(there) == digest
        record = clip.clip_record(None, "m", str(weights).replace("\udce9", "\u00e9"), 0)
    with pytest.raises(Exception) as raised:   # the file is found, then fails to load as weights
        clip.load_recorded_clip(record)
    assert "is gone" not in str(raised.value), raised.value


def test_the_readers_of_a_run_a_stage_2_fit_has_not_finished_say_how_to_finish_it(tmp_path):
    # `laic predict --model R`, `laic report R` and `laic evaluate --run R` said only that R held no model or labels,
    # where R.stage2-checkpoint waited for `laic fit --images ... --resume`.
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"no fitted model there \(expected RUN_DIR/model, written by `laic "
                                                r"fit --out RUN_DIR`\)$"):
        run_dir.model_path(out)
    run_dir.checkpoint_dir(out).mkdir()
    (run_dir.checkpoint_dir(out) / "stage2_checkpoint.pt").write_bytes(b"")
    finish = (rf"; {run_dir.checkpoint_dir(out)} holds the checkpoint of a `laic fit --images` into it that stopped "
              r"in stage 2: rerun that fit with --resume to finish the run$")
    with pytest.raises(FileNotFoundError, match=r"no fitted model there .*" + finish):
        run_dir.model_path(out)
    with pytest.raises(FileNotFoundError, match=r"no labels.npy there; .*" + finish):
        run_dir.read_labels(out)


def test_a_failing_kept_aside_hook_does_not_hide_where_the_run_is(tmp_path):
    # kept_aside (laic fit --images deletes its stage-2 checkpoint there) raised, and its error replaced the one
    # naming the finished run set aside (a review, 12-08).
    out = tmp_path / "run"
    out.mkdir()
    (out / "theirs.txt").write_text("arrived while the run was made\n")
    called = []

    def hook():
        called.append(True)
        raise PermissionError("no right to delete the checkpoint")

    with pytest.raises(ValueError, match=r"the finished run is in .*\.run\.unpublished-\w+/run: move it where you want "
                                         r"it \(PermissionError after it: no right to delete the checkpoint\)"):
        run_dir.publish_run(out, lambda folder: (folder / "labels.txt").write_text("1\n"), False, kept_aside=hook)
    [kept] = io.hidden_dirs_beside(out, "unpublished")
    assert called and (kept / "run" / "labels.txt").read_text() == "1\n" and (out / "theirs.txt").is_file()
