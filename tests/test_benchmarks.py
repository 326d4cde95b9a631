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
