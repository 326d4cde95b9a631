"""`LAIC.fit` wall time by CPU-thread setting, on a machine kept busy on purpose.

    python benchmarks/threads.py                          # food101-10class-test, 1 busy core, 5 rounds
    python benchmarks/threads.py --set dtd-test --busy 0 --rounds 3

Each trial is a fresh Python process (so OMP_* variables take effect) that loads a real feature set, fits 100 rows
of it to warm up (into at most 10 clusters), then times one ``LAIC(...).fit`` on the CPU; a trial that fails stops the
run with the trial's error output. ``--busy N`` starts N processes that spin for the whole measurement (an explicit
load, on top of whatever else the machine runs). Settings are interleaved round by round so
that changes in the background load hit all of them alike (each round in a rotated order); each trial's time and
thread count, then the medians (and min / max), are printed, with the time of each setting relative to one thread.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from laic.runtime import data_dir  # noqa: E402

# name -> (LAIC n_threads as Python source, extra environment)
SETTINGS = {
    "1 thread": ("1", {}),
    "torch default": ("'torch'", {}),
    "torch default, OMP_WAIT_POLICY=passive": ("'torch'", {"OMP_WAIT_POLICY": "passive"}),
    "laic default (API, torch loaded first)": ("None", {}),
    "laic default (as `laic fit`: passive)": ("None", {"OMP_WAIT_POLICY": "PASSIVE"}),
}

TRIAL = r"""
import json, sys, time
import numpy as np, torch
from laic import LAIC
import laic.runtime
root, name, n_threads = sys.argv[1], sys.argv[2], {n_threads}
used, set_threads = [], laic.runtime.torch_threads
def recording(n, *args):  # the count the fit ran with
    used.append(n)
    return set_threads(n, *args)
laic.runtime.torch_threads = recording
feats = np.load(f"{{root}}/{{name}}/features.npy").astype(np.float32)
k = len(np.unique(np.load(f"{{root}}/{{name}}/labels.npy")))  # K only: labels never reach the fit
nouns = np.load(f"{{root}}/vocab/embeddings.npy").astype(np.float32)
options = {{}} if n_threads is None else {{"n_threads": n_threads}}
if n_threads == "torch":  # what laic did before it chose threads: leave torch's setting alone
    options = {{"n_threads": torch.get_num_threads()}}
# warm-up: imports, first calls (K at most 10: LAIC refuses more clusters than rows, and the set's K may be 1000)
LAIC(n_clusters=min(k, 10), random_state=1, **options).fit(feats[:100], nouns)
used.clear()
start = time.perf_counter()
LAIC(n_clusters=k, random_state=0, **options).fit(feats, nouns)
print(json.dumps({{"seconds": time.perf_counter() - start, "threads": used[0]}}))
"""


def spin() -> None:
    while True:
        pass


def trial(root: pathlib.Path, name: str, n_threads: str, env: dict) -> dict:
    # Thread settings inherited from the caller would hide torch's own defaults.
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    environment.update(PYTHONPATH=str(HERE.parent), **env)
    out = subprocess.run([sys.executable, "-c", TRIAL.format(n_threads=n_threads), str(root), name],
                         env=environment, capture_output=True, text=True)
    if out.returncode != 0:   # its error output is the only reason there is
        raise SystemExit(f"threads: a trial failed (n_threads={n_threads}, environment {env}), exit status "
                         f"{out.returncode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, default=None, help="feature folder (default: laic.runtime."
                        "data_dir(), i.e. $LAIC_DATA or ../shared/data/clip-vit-b32)")
    parser.add_argument("--set", default="food101-10class-test")
    parser.add_argument("--busy", type=int, default=1, help="processes that keep a core busy (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="trials of each setting (default 5, at least 1)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the settings to time, the first the others are compared with (default all)")
    args = parser.parse_args(argv)
    # (no round or no setting left no time to take a median of, or to rotate the settings by)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.settings:
        parser.error("--settings: name at least one setting")
    root = args.data or data_dir()
    if root is None or not (root / args.set / "features.npy").is_file():
        print("threads: skipped, no real CLIP features (set LAIC_DATA or pass --data)")
        return 0
    import torch

    print(f"# LAIC.fit on {args.set}, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch default {torch.get_num_threads()} threads, {args.busy} busy-loop process(es), load average "
          f"before {os.getloadavg()[0]:.1f}")
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    times = {s: [] for s in args.settings}
    try:
        for r in range(args.rounds):
            # Each round starts one setting later, so that no setting always follows the same one.
            order = args.settings[r % len(args.settings):] + args.settings[:r % len(args.settings)]
            shown = []
            for s in order:
                result = trial(root, args.set, *SETTINGS[s])
                times[s].append(result["seconds"])
                shown.append(f"{s} {result['seconds']:.2f} s ({result['threads']} threads)")
            print(f"round {r + 1}: " + ", ".join(shown), flush=True)
    finally:
        for p in spinners:
            p.terminate()
    base = statistics.median(times[args.settings[0]])
    print(f"\n| setting | median s | min - max s | / {args.settings[0]} |\n|---|---|---|---|")
    for s in args.settings:
        m = statistics.median(times[s])
        print(f"| {s} | {m:.2f} | {min(times[s]):.2f} - {max(times[s]):.2f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
