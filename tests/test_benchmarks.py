"""The benchmark harness (benchmarks/common.py): what it measures, not how fast anything is."""
import pathlib
import sys
import time

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


def test_quality_refuses_options_its_table_would_ignore(capsys):
    import pytest

    import quality

    for argv, said in ((["--auto-k", "--sklearn"], "--sklearn applies to the main table only, not to --auto-k"),
                       (["--ablation", "--half", "--missing-nouns", "3"],
                        "--half, --missing-nouns apply to the main table only, not to --ablation"),
                       (["--ablation", "--variants", "bogus"], "--variants: unknown ['bogus']"),
                       (["--variants", "default"], "--variants applies with --ablation only")):
        with pytest.raises(SystemExit) as stop:
            quality.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err, argv


def test_throughput_refuses_zero_reps(capsys):
    import pytest

    import throughput

    with pytest.raises(SystemExit) as stop:   # every row said "failed: no median for empty data"
        throughput.main(["--reps", "0", "--ops", "sinkhorn", "--device", "cpu"])
    assert stop.value.code == 2 and "--reps must be at least 1, got 0" in capsys.readouterr().err
