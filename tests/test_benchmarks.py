"""The benchmark harness (benchmarks/common.py): what it measures, not how fast anything is."""
import pathlib
import re
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from common import measure  # noqa: E402


def test_measure_repeats_short_runs_to_fill_the_budget_and_times_long_runs_as_asked():
    calls = []

    def short():
        calls.append(1)
        time.sleep(0.002)

    # Generous bounds: a loaded machine may stretch a 2 ms sleep many times over.
    result = measure(short, torch.device("cpu"), reps=1, warmup=1, short_run_ms=150, budget_ms=300, max_reps=40)
    # One sample of a 2 ms run said little: as many runs as fit in the budget (sleep may take longer: fewer).
    assert 2 <= result["reps"] <= 40 and len(calls) == result["reps"] + 1
    assert result["ms"] >= 2.0

    def long():
        time.sleep(0.025)

    once = measure(long, torch.device("cpu"), reps=1, warmup=0, short_run_ms=20, budget_ms=30, max_reps=100)
    assert once["reps"] == 1
    assert measure(short, torch.device("cpu"), reps=3, warmup=0)["reps"] == 3   # no budget: exactly as asked


def test_scale_tables_show_every_fits_steps(capsys):
    # The columns came from the first fit alone: a step only a later fit ran (relation features, where the data
    # gives them a share) was dropped from its row while its time still counted in the whole fit's.
    import argparse

    import scale

    def result(n, steps):
        return {"n": n, "backend": "laic", "n_nouns": 5, "seconds": sum(s for _, s in steps), "peak_extra_bytes": 0,
                "steps": [{"name": name, "seconds": s, "peak_extra_bytes": 0} for name, s in steps]}

    args = argparse.Namespace(k=3, dim=8, threads=1, fit_from=10**9)
    scale.print_tables([result(100, [("a", 1.0)]), result(200, [("a", 2.0), ("b", 3.0)])], args, torch.device("cpu"))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| N | backend | a | b | whole fit s | fit peak extra MiB |"
    assert table[2:] == ["| 100 | laic | 1.0 / 0 | - | 1.0 | 0 |", "| 200 | laic | 2.0 / 0 | 3.0 / 0 | 5.0 | 0 |"]


def test_scale_times_the_k_search_with_its_candidates_in_one_column(capsys):
    # LAIC(n_clusters="auto") at a tiny N: every candidate is a profile step of its own; the table sums them.
    import scale

    argv = ["--sizes", "60", "--k", "3", "--dim", "8", "--nouns", "6", "--warmup", "0", "--threads", "1", "--auto-k",
            "--k-range", "2", "5"]
    assert scale.main(argv) == 0
    out = capsys.readouterr().out
    header, row = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")][:2]
    assert "K search: candidates" in header and not [c for c in header if c.startswith("K search: K = ")]
    cell = dict(zip(header, row))["K search: candidates"]
    candidates = re.findall(r"^  step done: K search: K = \d+: ([\d.]+) s$", out, flags=re.M)
    assert len(candidates) == 4   # a range no wider than the search's budget: every K from 2 to 5
    assert float(cell.split(" / ")[0]) == pytest.approx(sum(map(float, candidates)), abs=0.05 * len(candidates))
    chosen = re.search(r"the search chose K = (\d+) \(data made with 3 directions\) of 4 candidates", out)
    assert chosen and 2 <= int(chosen.group(1)) <= 5


@pytest.mark.parametrize("argv, said", [
    (["--k-range", "2", "5"], "--k-range only applies with --auto-k"),
    (["--auto-k", "--k-range", "5", "2"], "--k-range must be LO HI with 2 <= LO <= HI < the smallest of --sizes"),
    (["--auto-k", "--k-range", "2", "60"], "--k-range must be LO HI with 2 <= LO <= HI < the smallest of --sizes (60)"),
])
def test_scale_refuses_a_k_range_it_cannot_search(argv, said, capsys):
    import scale

    with pytest.raises(SystemExit):
        scale.parse_args(["--sizes", "60", "--k", "3"] + argv)
    assert said in capsys.readouterr().err


def test_scale_warm_up_keeps_the_largest_fits_remainder_by_16(monkeypatch):
    # Triton compiles a kernel again when an int argument's divisibility by 16 changes: a warm-up at 69,632 rows
    # (divisible) left the 1,281,167-row fit (remainder 15) to compile inside its timing.
    import argparse

    import scale

    seen = []
    monkeypatch.setattr(scale, "clustered_features", lambda n, *a: seen.append(n) or (None, None))
    monkeypatch.setattr(scale, "fit", lambda *a: None)
    monkeypatch.setattr(scale, "nouns_for", lambda *a: None)
    for warmup, sizes in ((69_632, [1_281_167]), (100, [300, 1000]), (64, [64])):
        scale.warm_up(argparse.Namespace(warmup=warmup, sizes=sizes, k=3, dim=8, seed=0), torch.device("cpu"))
        assert seen[-1] % 16 == max(sizes) % 16 and min([warmup] + sizes) <= seen[-1] < min([warmup] + sizes) + 16


def test_scale_reads_the_shared_vocabulary_where_laic_data_says(monkeypatch, tmp_path):
    # It read shared/ beside the checkout whatever $LAIC_DATA said, which the tests and quality.py follow.
    import argparse

    import scale

    fake_quality_data(tmp_path, [])
    monkeypatch.setenv("LAIC_DATA", str(tmp_path))
    nouns = scale.nouns_for(argparse.Namespace(nouns=None), None, torch.device("cpu"))
    np.testing.assert_array_equal(nouns.numpy(), np.load(tmp_path / "vocab" / "embeddings.npy"))
    monkeypatch.setenv("LAIC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="no shared vocabulary at .*nowhere"):
        scale.nouns_for(argparse.Namespace(nouns=None), None, torch.device("cpu"))


def test_quality_refuses_options_its_table_would_ignore(capsys):
    import quality

    for argv, said in ((["--auto-k", "--sklearn"], "--sklearn applies to the main table only, not to --auto-k"),
                       (["--ablation", "--half", "--missing-nouns", "3"],
                        "--half, --missing-nouns apply to the main table only, not to --ablation"),
                       (["--ablation", "--variants", "bogus"], "--variants: unknown ['bogus']"),
                       (["--variants", "default"], "--variants applies with --ablation only"),
                       (["--near-copies", "0.3", "1"], "COSINE between 0 and 1, got [0.3, 1.0]"),
                       (["--near-copies", "0", "0.9"], "SHARE must be > 0")):
        with pytest.raises(SystemExit) as stop:
            quality.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv


def test_noun_sample_draws_distinct_nouns_with_their_names_and_refuses_a_bad_size():
    import quality

    nouns = np.arange(40, dtype=np.float32).reshape(20, 2)
    names = [f"n{i}" for i in range(20)]
    parser = quality.argument_parser()
    rows, kept = quality.noun_sample(nouns, names, 7, 3, parser)
    picked = [int(name[1:]) for name in kept]
    assert len(set(picked)) == 7 and picked == sorted(picked)
    np.testing.assert_array_equal(rows, nouns[picked])              # each row with its own name
    assert quality.noun_sample(nouns, names, 7, 3, parser)[1] == kept != quality.noun_sample(nouns, names, 7, 4,
                                                                                              parser)[1]
    for n in (0, 21):
        with pytest.raises(SystemExit):
            quality.noun_sample(nouns, names, n, 0, parser)


def test_near_copies_sit_at_the_asked_cosine_to_their_source_and_carry_its_label():
    import quality

    rng = np.random.default_rng(5)
    features = rng.standard_normal((201, 64)) * 3   # (not unit rows: the copies are of the unit rows)
    labels = rng.integers(0, 7, 201)
    with_copies, with_labels = quality.with_near_copies(features, labels, 0.5, 0.97, seed=1)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert with_copies.shape == (301, 64) and with_copies.dtype == np.float32   # round(100.5): 100 copies
    np.testing.assert_allclose(with_copies[:201], unit, atol=1e-6)
    np.testing.assert_array_equal(with_labels[:201], labels)
    copies = with_copies[201:]
    np.testing.assert_allclose(np.linalg.norm(copies, axis=1), 1, atol=1e-5)
    cosines = copies @ unit.T
    sources = cosines.argmax(1)   # (at cosine 0.97 a copy's nearest row is its source: the others lie near 0)
    np.testing.assert_array_equal(with_labels[201:], labels[sources])
    assert abs(cosines.max(1).mean() - 0.97) < 0.005


def test_throughput_refuses_zero_reps(capsys):
    import throughput

    with pytest.raises(SystemExit) as stop:   # every row said "failed: no median for empty data"
        throughput.main(["--reps", "0", "--ops", "sinkhorn", "--device", "cpu"])
    assert stop.value.code == 2 and "--reps must be at least 1, got 0" in capsys.readouterr().err


def test_benchmark_options_no_run_could_take_are_refused_by_name(capsys):
    import scale
    import throughput

    for main, argv, said in (
            (throughput.main, ["--device", "bogus"], "--device='bogus' is not a torch device"),   # tracebacks before
            (throughput.main, ["--ops"], "--ops needs at least one op"),                         # ran every op
            (scale.main, ["--k", "0"], "--k must be at least 2, got 0"),                         # a traceback
            (scale.main, ["--sizes", "30", "--k", "20"], "--sizes must each be at least 2 * --k = 40, got 30"),
            (scale.main, ["--nproc", "1"], "--nproc must be 0 (one process only) or at least 2, got 1"),   # ignored
            (scale.main, ["--sizes", "400", "--k", "100", "--warmup", "10"], "--warmup must be 0 (none) or at least")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv


def test_scale_ranks_are_compared_with_the_fit_of_their_own_backend(monkeypatch, tmp_path, capsys):
    # With --reference the ranks (which run under the automatic backend) were compared with, and in the JSON attached
    # to, the last fit at N: the reference backend's.
    import json

    import scale

    def one_fit(images, nouns, args, device, backend):
        return {"backend": backend or "auto", "seconds": 7.0 if backend else 3.0, "wall_seconds": 0.0,
                "peak_extra_bytes": 0, "steps": []}

    monkeypatch.setattr(scale, "one_fit", one_fit)
    monkeypatch.setattr(scale, "table", lambda summary: "")
    monkeypatch.setattr(scale.distributed, "spawn", lambda fn, nproc, *a, **kw: [
        {"backend": "auto", "seconds": 2.0, "peak_extra_bytes": 0, "rows": 25} for _ in range(nproc)])
    out = tmp_path / "s.json"
    assert scale.main(["--sizes", "50", "--k", "3", "--dim", "8", "--nouns", "6", "--reference", "--nproc", "2",
                       "--json", str(out)]) == 0
    assert "| one process | 50 | 3.0 |" in capsys.readouterr().out
    assert [("ranks" in r, r["backend"]) for r in json.loads(out.read_text())] == [(True, "auto"),
                                                                                   (False, "reference")]


def test_quality_refuses_options_only_another_table_reads(tmp_path, capsys):
    # --raw (the ablation's JSON), --verbose (the K search's scores) and --half-dtype (--half's operands) were
    # ignored without a word outside their tables: the run exited 0 and wrote no --raw file.

    import quality

    nothing = ["--data", str(tmp_path / "none")]   # accepted options: the run goes on to say it has no data
    for argv, said in ((["--raw", str(tmp_path / "r.json")], "--raw applies with --ablation only"),
                       (["--auto-k", "--raw", str(tmp_path / "r.json")], "--raw applies with --ablation only"),
                       (["--verbose"], "--verbose applies with --auto-k only"),
                       (["--ablation", "--verbose"], "--verbose applies with --auto-k only"),
                       (["--half-dtype", "float16"], "--half-dtype applies with --half only"),
                       (["--half-dtype", "bfloat16"], "--half-dtype applies with --half only")):
        with pytest.raises(SystemExit) as stop:
            quality.main(argv + nothing)
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv
    for argv in (["--ablation", "--raw", str(tmp_path / "r.json")], ["--auto-k", "--verbose"],
                 ["--half", "--half-dtype", "float16"]):
        assert quality.main(argv + nothing) == 0 and "skipped, no real CLIP features" in capsys.readouterr().out


def fake_quality_data(root, sets):
    """A feature folder as quality.py reads it: per (name, K) of ``sets`` a set of two rows a class; six nouns."""
    rng = np.random.default_rng(0)
    for name, k in sets:
        (root / name).mkdir(parents=True)
        np.save(root / name / "features.npy", rng.standard_normal((2 * k, 8)).astype(np.float32))
        np.save(root / name / "labels.npy", np.arange(2 * k) % k)
    (root / "vocab").mkdir()
    np.save(root / "vocab" / "embeddings.npy", rng.standard_normal((6, 8)).astype(np.float32))
    (root / "vocab" / "nouns.txt").write_text("\n".join(f"noun{i}" for i in range(6)))


class FakeLAIC:
    """LAIC's surface as quality.py reads it, with labels in no time (round robin; "auto" picks K = 2)."""

    def __init__(self, n_clusters, **options):
        self.n_clusters = n_clusters

    def fit(self, features, nouns, noun_names=None):
        self.n_clusters_ = 2 if self.n_clusters == "auto" else self.n_clusters
        self.labels_ = np.arange(len(features)) % self.n_clusters_
        self.k_scores_ = [(self.n_clusters_, 0.0)]
        return self


def test_quality_says_the_threads_and_n_init_its_fits_ran_with(monkeypatch, tmp_path, capsys):
    # Without --threads LAIC runs at its default (the cores free, at most torch's count) while the baselines run at
    # torch's count, yet the lines said "(same threads)" and a flat "N threads"; and the summary said
    # KMeans(n_init=10) where K > 100 ran n_init=3.
    import quality

    fake_quality_data(tmp_path, [("few", 2), ("many", 101)])
    round_robin = lambda f, k, s: np.arange(len(f)) % k   # noqa: E731
    monkeypatch.setattr(quality, "LAIC", FakeLAIC)
    monkeypatch.setattr(quality, "run_kmeans", round_robin)
    monkeypatch.setattr(quality, "run_sklearn", round_robin)
    monkeypatch.setattr(quality, "FIT_THREADS", None)   # restored after --threads set it
    threads = torch.get_num_threads()
    try:
        data = ["--data", str(tmp_path), "--seeds", "0"]
        assert quality.main(data + ["--sklearn"]) == 0
        out = capsys.readouterr().out
        assert f"LAIC at up to {threads} threads" in out and f"k-means and scikit-learn at {threads}" in out
        assert (f"KMeans(n_init=10 (K = 2), 3 (K = 101))'s (LAIC at up to {threads} threads, scikit-learn at "
                f"{threads})") in out and "same threads" not in out
        assert quality.main(data + ["--auto-k"]) == 0
        assert f"up to {threads} threads" in capsys.readouterr().out
        assert quality.main(data + ["--sklearn", "--threads", "1", "--sets", "few"]) == 0
        out = capsys.readouterr().out
        assert "device cpu, 1 threads" in out and "KMeans(n_init=10)'s (same threads)" in out and "up to" not in out
    finally:
        torch.set_num_threads(threads)


def test_threads_refuses_no_rounds_and_no_settings(tmp_path, capsys):
    # --rounds 0 ended in StatisticsError (no median of no times), an empty --settings in ZeroDivisionError.

    import threads

    for argv, said in ((["--rounds", "0"], "--rounds must be at least 1, got 0"),
                       (["--settings"], "--settings: name at least one setting")):
        with pytest.raises(SystemExit) as stop:
            threads.main(argv + ["--data", str(tmp_path), "--busy", "0"])
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv


def test_threads_trial_warms_up_on_a_set_of_more_clusters_than_its_rows(tmp_path):
    # The warm-up fitted the set's K on 100 rows, which LAIC refuses for K > 100 (the ImageNet set's 1000): every
    # trial there failed.
    import threads

    fake_quality_data(tmp_path, [("many", 101)])
    result = threads.trial(tmp_path, "many", "1", {})
    assert result["threads"] == 1 and result["seconds"] > 0


def test_threads_failed_trial_says_why(monkeypatch):
    # A failed trial raised a CalledProcessError without the child's error output, the only reason given.
    import subprocess


    import threads

    monkeypatch.setattr(threads.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="ValueError: n_clusters must be between 2 and 100"))
    with pytest.raises(SystemExit, match="(?s)a trial failed.*exit status 1.*ValueError: n_clusters must be"):
        threads.trial(pathlib.Path("data"), "set", "1", {})
