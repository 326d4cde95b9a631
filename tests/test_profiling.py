"""laic.profiling beside the caller's own torch.profiler, its files written more than once, and its table's text."""
import copy
import json
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

import laic.profiling as profiling
from laic import LAIC
from laic.profiling import FitProfiler, step, table


def recorded_profiler() -> FitProfiler:
    """A CPU recording (traced, as the CPU always is) of one step that multiplies two matrices."""
    profiler = FitProfiler(torch.device("cpu"))
    with profiler.recording(), step("multiply", "other"):
        torch.randn(64, 64) @ torch.randn(64, 64)
    return profiler


def as_model(profiler: FitProfiler):
    """What profiling.write reads of a fitted model."""
    return types.SimpleNamespace(profile_=profiler.summary(), profiler_=profiler)


def test_a_recording_inside_the_callers_profiler_leaves_the_callers_trace_whole(tmp_path):
    # A second torch.profiler cancelled the caller's: its profile came back with no events at all.
    profiler = FitProfiler(torch.device("cpu"))
    with torch.profiler.profile() as outer:
        with profiler.recording(), step("multiply", "other"):
            torch.randn(64, 64) @ torch.randn(64, 64)
        torch.randn(8, 8) @ torch.randn(8, 8)            # the caller's own work after laic's
    names = [e.name for e in outer.events()]
    assert names.count("aten::matmul") == 2                # laic's step and the caller's own
    assert "laic:multiply" in names                        # laic's steps are marked in the caller's trace
    (record,) = profiler.steps
    assert record["name"] == "multiply" and record["seconds"] > 0 and profiler.seconds >= record["seconds"]
    # The CPU's memory figures come from a trace of laic's own, which it did not start: not measured, not 0.
    assert record["peak_extra_bytes"] is None and profiler.summary()["peak_extra_bytes"] is None
    assert not profiler.has_trace
    assert profiling.write(tmp_path, as_model(profiler)) == ["profile.json"]
    assert json.loads((tmp_path / "profile.json").read_text())["inside_another_profiler"] is True
    with pytest.raises(ValueError, match="inside another torch.profiler"):
        profiler.export_trace(tmp_path / "trace.json")
    assert "multiply" in table(profiler.summary())
    # Outside it again, laic traces as before.
    assert recorded_profiler().has_trace


@pytest.mark.filterwarnings("ignore:the nouns agree with the images")   # random nouns: the profile is the point
def test_a_profiled_fit_inside_the_callers_profiler_keeps_its_steps_and_the_callers_events():
    x = F.normalize(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    nouns = F.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    with torch.profiler.profile() as outer:
        model = LAIC(n_clusters=3, random_state=0, profile=True, stage1_steps=3, n_threads=1).fit(x, nouns)
    marks = {e.name[len("laic:"):] for e in outer.events()
             if e.name.startswith("laic:") and not e.name.startswith("laic::")}   # not the kernels' ops
    assert {s["name"] for s in model.profile_["steps"]} == marks and "stage 1 (heads)" in marks
    assert len(outer.events()) > 1000                     # the fit's own ops too, not only the marks
    assert not model.profiler_.has_trace


def test_a_profile_is_written_again_and_again(tmp_path):
    # The second write raised torch's "Trace is already saved." and left profile.json without trace.json.
    profiler = recorded_profiler()
    model = as_model(profiler)
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder in folders:
        assert sorted(profiling.write(folder, model)) == ["profile.json", "trace.json"]
    traces = [(folder / "trace.json").read_text() for folder in folders]
    assert traces[0] == traces[1] == traces[2]
    events = json.loads(traces[0])["traceEvents"]
    assert any(e.get("name") == "laic:multiply" for e in events)
    # A model holding the profiler still copies and pickles (the profiler's copies hold no trace).
    assert copy.deepcopy(profiler).summary() == profiler.summary()
    assert not pickle.loads(pickle.dumps(profiler)).has_trace and profiler.has_trace


def test_a_trace_that_fails_to_export_leaves_no_profile_behind(tmp_path, monkeypatch):
    profiler = recorded_profiler()

    def fail(path):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(profiler, "export_trace", fail)
    with pytest.raises(RuntimeError, match="the disk is full"):
        profiling.write(tmp_path, as_model(profiler))
    assert list(tmp_path.iterdir()) == []


def test_the_table_aligns_long_step_names_and_says_mib():
    long = "K search: null agreement (random nouns)"          # 39 characters, --k auto's longest
    summary = {"device": "cpu", "seconds": 1.5, "peak_extra_bytes": 3 * 2**20, "steps": [
        {"name": long, "kind": "graphs", "seconds": 0.25, "peak_extra_bytes": 5 * 2**20},
        {"name": "noun filtering", "kind": "k-means", "seconds": 0.5, "peak_extra_bytes": 2**20}]}
    header, *rows, total = table(summary).splitlines()
    assert "MiB" in header and "MB" not in header.replace("MiB", "")
    # Every column starts (kind) or ends (the numbers) where the header's does.
    kind_at = header.index("kind")
    assert [row.index(kind) for row, kind in zip(rows, ("graphs", "k-means"))] == [kind_at, kind_at]
    assert rows[0].startswith(long + " ")
    for row, seconds, mib in zip(rows, ("0.25", "0.50"), ("5.0", "1.0")):
        assert row.endswith(mib) and len(row) == len(header)
        assert row[:header.index("seconds") + len("seconds")].endswith(seconds)
    assert total.startswith("whole fit (cpu)") and total.endswith("3.0") and len(total) == len(header)
    assert total[:header.index("seconds") + len("seconds")].endswith("1.50")
    # Short names keep the old width (34 characters), so that the usual tables look as they did.
    assert table({**summary, "steps": summary["steps"][1:]}).splitlines()[0].index("kind") == 35
