"""Stages 0 and 1 (LAIC.fit) at growing N: wall time and peak extra memory per step, and their growth exponents.

    python benchmarks/scale.py                                        # CPU: N = 10k..100k, K = 100, shared nouns
    python benchmarks/scale.py --sizes 1281167 --k 1000 --nouns 82115 --device cuda     # ImageNet-1K size, on GPU
    python benchmarks/scale.py --sizes 2000 4000 --k 10 --reference  # also the pure-PyTorch kernels, side by side
    python benchmarks/scale.py --sizes 20000 --nproc 2               # also 2 gloo processes: peak memory per rank
    python benchmarks/scale.py --sizes 5000 10000 --k 50 --auto-k    # K chosen by LAIC's search: its time and memory

Images are generated: ``--k`` random unit directions in D = ``--dim`` dimensions, each image one of them plus
Gaussian noise, L2-normalised (clustered unit features, as CLIP embeddings are). Nouns are the shared 1403-noun CLIP
vocabulary (``../shared/data/clip-vit-b32/vocab``) by default, or ``--nouns M`` generated ones (half near the
image directions, half random). Every fit is profiled as ``LAIC(profile=True)`` does (``laic.profiling``): per step
its wall time and the most memory torch held beyond what it held when the step began; the whole fit's peak is beyond
its inputs. On the CPU the memory figures come from torch.profiler, which slows the fit down, by several times in the
steps of many small ops such as k-means++ seeding (``laic.profiling``). The fits run
under ``LAIC_KERNELS_BACKEND`` where it is set (automatic selection otherwise); ``--reference`` runs each fit again
with the reference backend forced; each row is labelled with the backend its fit ran under. Prints markdown tables,
then the fitted exponent ``b`` of ``time ~ N^b`` and ``peak ~ N^b`` over the sizes from ``--fit-from`` on.

``--nproc G`` also fits each N on G local processes (gloo, ``laic.distributed.spawn``; every rank makes the same data
and keeps its block of rows) and prints each rank's wall time and peak extra memory beside the single process's fit
under the ranks' backend (automatic or ``LAIC_KERNELS_BACKEND``, never the ``--reference`` fit); ``--json`` keeps the
ranks' summaries under that fit's entry, as "ranks".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
from functools import partial

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from laic import LAIC  # noqa: E402
from laic import distributed  # noqa: E402
from laic.profiling import FitProfiler, table  # noqa: E402
from laic.runtime import data_dir  # noqa: E402
from laic_kernels import forced_backend, use_backend  # noqa: E402
from laic_kernels import chunks  # noqa: E402
from laic_kernels.triton import tuning  # noqa: E402

MB = 2 ** 20   # printed as MiB
# The problem kinds whose tile plan print_new_plans has printed.
_PRINTED_PLANS: set = set()
# The CUDA warm-up fit: the tuning probe's rows and a few more, so that its probes have every larger fit's shapes.
CUDA_WARMUP_ROWS = tuning.PROBE_ROWS + 4096


def clustered_features(n: int, k: int, dim: int, seed: int, device: torch.device, noise: float = 0.05):
    """``n`` unit rows around ``k`` random unit directions (made on ``device``, in blocks), and the directions."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g, device=device), dim=1)
    labels = torch.randint(k, (n,), generator=g, device=device)
    out = torch.empty(n, dim, device=device)
    for start in range(0, n, 1 << 16):
        block = labels[start:start + (1 << 16)]
        noise_rows = torch.randn(len(block), dim, generator=g, device=device)
        out[start:start + len(block)] = F.normalize(centres[block] + noise * noise_rows, dim=1)
    return out, centres


def nouns_for(args, centres: torch.Tensor, device: torch.device):
    if args.nouns is None:
        vocab = data_dir() / "vocab"   # ($LAIC_DATA, as the tests and quality.py find the shared data)
        if not (vocab / "embeddings.npy").is_file():
            raise SystemExit(f"scale: no shared vocabulary at {vocab}; pass --nouns M to generate M nouns")
        return torch.from_numpy(np.load(vocab / "embeddings.npy").astype(np.float32)).to(device)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    m = args.nouns
    near = centres[torch.randint(len(centres), (m // 2,), generator=g, device=device)]
    near = near + 0.3 * torch.randn(near.shape, generator=g, device=device)
    far = torch.randn(m - m // 2, centres.shape[1], generator=g, device=device)
    return F.normalize(torch.cat([near, far]), dim=1)


def fit(images, nouns, args, device) -> LAIC:
    """The fit every run of this script times: LAIC's defaults at ``--k`` clusters (with ``--auto-k`` K chosen by
    LAIC's search over ``--k-range``) and ``--seed``, at ``--threads`` (without it LAIC picks the cores free, at most
    torch's count: on a busy machine fewer than the table's header said)."""
    auto = getattr(args, "auto_k", False)
    k_range = tuple(args.k_range) if auto and args.k_range else None
    return LAIC(n_clusters="auto" if auto else args.k, k_range=k_range, random_state=args.seed, device=str(device),
                n_threads=args.threads).fit(images, nouns)


# The K search's candidates are a profile step each ("K search: K = 64"): one column for them all in the tables.
CANDIDATE_PREFIX = "K search: K = "
CANDIDATES_COLUMN = "K search: candidates"


def merged_candidates(steps) -> list:
    """``steps`` with the K search's candidates summed into one step (seconds added, the largest peak), where the
    first of them was."""
    candidates = [s for s in steps if s["name"].startswith(CANDIDATE_PREFIX)]
    if not candidates:
        return list(steps)
    peaks = [s["peak_extra_bytes"] for s in candidates]
    merged = {"name": CANDIDATES_COLUMN, "seconds": sum(s["seconds"] for s in candidates),
              "peak_extra_bytes": None if None in peaks else max(peaks)}
    first = steps.index(candidates[0])
    rest = [s for s in steps if not s["name"].startswith(CANDIDATE_PREFIX)]
    return rest[:first] + [merged] + rest[first:]


def device_name(device: torch.device) -> str:
    """The device and the versions that decide its speed, for the tables' headers."""
    if device.type != "cuda":
        return f"{device} (torch {torch.__version__})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:   # the tables still print (and --json is still written)
        triton_version = "not installed"
    return (f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"triton {triton_version})")


def absolute_peaks(summary: dict) -> str:
    """On CUDA, the device memory at its highest during the fit, inputs included (the 40 GB target's figure):
    allocated (what was allocated when the fit began plus the profiler's peak beyond it: each step resets torch's
    peak counters, so they alone would give the last step's) and reserved by torch's allocator, in GiB and GB."""
    if "base_bytes" not in summary:
        return ""
    allocated = summary["base_bytes"] + summary["peak_extra_bytes"]
    reserved = summary["peak_reserved_bytes"]
    return (f"; device memory at most {allocated / 2**30:.1f} GiB ({allocated / 1e9:.1f} GB) allocated, "
            f"{reserved / 2**30:.1f} GiB ({reserved / 1e9:.1f} GB) reserved")


def one_fit(images, nouns, args, device, backend, trace_name="trace-n{n}-{backend}.json"):
    """One LAIC.fit under laic.profiling (what LAIC(profile=True) does; torch.profiler on CUDA only with
    --trace-dir), with ``backend`` forced (None: none forced here, so that LAIC_KERNELS_BACKEND applies). Its
    summary's ``backend`` is the one the fit ran under ("auto": automatic selection). ``trace_name``: the trace's
    file in --trace-dir ({n}: the rows fitted, {backend}: ran_under)."""
    profiler = FitProfiler(device, trace=args.trace_dir is not None, on_step=partial(print_step, device))
    # use_backend(None) would force automatic selection over the environment variable the rows were labelled with.
    with (use_backend(backend) if backend is not None else contextlib.nullcontext()):
        ran_under = forced_backend() or "auto"
        start = time.perf_counter()
        with profiler.recording():
            model = fit(images, nouns, args, device)
        seconds = time.perf_counter() - start
    summary = profiler.summary()
    summary["backend"] = ran_under
    summary["wall_seconds"] = seconds   # with the profiler's post-processing; "seconds" is the fit's own
    # Stage 1's optimiser steps (one loss recorded a step): at large N its time is steps x a step's small ops, so
    # the time a step tells whether the steps are launch-bound on a GPU.
    summary["stage1_steps"] = len(model.history_.get("loss", []))
    if getattr(args, "auto_k", False):
        summary["chosen_k"] = int(model.n_clusters_)
        summary["k_candidates"] = len(model.k_scores_)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_trace(args.trace_dir / trace_name.format(n=images.shape[0], backend=ran_under))
    return summary


def print_step(device, record) -> None:
    """One line per step as it ends, so that a fit stopped by a time limit still leaves its finished steps' figures
    (the peak too on CUDA; on the CPU it is read from the profiler's events after the fit), and the tile plans
    chosen in it."""
    peak = f", peak extra {record['peak_extra_bytes'] / MB:.0f} MiB" if device.type == "cuda" else ""
    print(f"  step done: {record['name']}: {record['seconds']:.2f} s{peak}", flush=True)
    print_new_plans()


def warm_up(args, device) -> None:
    """One untimed fit at ``--warmup`` rows, so that the timed fits measure running rather than Triton compiling its
    kernels (a fresh GPU machine has no kernel cache: the first fit compiles each kernel once, seconds each) and
    the kernels timing their tile plans (``laic_kernels.triton.tuning``). The warm-up's tuning threshold is scaled
    down by its rows against the largest fit's, so that it tunes the calls that fit will; with at least
    ``PROBE_ROWS`` rows (the CUDA default) their probes have the same shapes, and the timed fits find their plans
    chosen and compiled. (A warm-up capped by a smaller ``--sizes`` leaves larger fits to tune inside their
    timing.)"""
    n = min([args.warmup] + args.sizes)
    # Triton compiles a kernel again for an int argument whose divisibility by 16 differs: the warm-up's N keeps
    # the largest fit's remainder (1,281,167 leaves 15), or the timed fit compiled its kernels inside its timing.
    n += (max(args.sizes) - n) % 16
    images, centres = clustered_features(n, args.k, args.dim, args.seed, device)
    start = time.perf_counter()
    # Every call that the largest fit tunes is at most max(sizes) / n times larger here (most grow as N or N^2).
    threshold, tuning.TUNE_MIN_MACS = tuning.TUNE_MIN_MACS, tuning.TUNE_MIN_MACS * n // max(args.sizes)
    try:
        fit(images, nouns_for(args, centres, device), args, device)
    finally:
        tuning.TUNE_MIN_MACS = threshold
    print(f"warm-up fit at N = {n} (compiles the kernels, tunes their plans; not in the tables): "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    print_new_plans()


def print_new_plans() -> None:
    """The tile plans the kernels timed and chose (CUDA) since the last call, a line each, as soon as they are known
    (a fit cut by a time limit still leaves those of its finished steps)."""
    for kind, plan in tuning.chosen().items():
        if kind not in _PRINTED_PLANS:
            _PRINTED_PLANS.add(kind)
            print(f"tile plan {plan}: {', '.join(map(str, kind))}", flush=True)


def set_chunk(megabytes) -> None:
    if megabytes:
        chunks.MAX_CHUNK_ELEMENTS = megabytes * 2 ** 20 // 4


def rank_fit(n, args, device):
    """One rank's fit of its block of the rows (run by laic.distributed.spawn): its profile summary."""
    # --threads per process, else the machine's cores shared out (more threads than cores spin against each other).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.nproc))
    set_chunk(args.chunk_mb)
    images, centres = clustered_features(n, args.k, args.dim, args.seed, device)
    nouns = nouns_for(args, centres, device)
    world = distributed.current()
    images = images[world.row_shard(n)].clone()   # the other rows are not this rank's
    # Named by the whole fit's N and the rank (by its own rows, ranks of equal shares wrote one file, and a rank at
    # N = 2n over the single process's trace at n).
    summary = one_fit(images, nouns, args, device, None,
                      trace_name=f"trace-n{n}-rank{world.rank}of{world.size}-{{backend}}.json")
    summary["rows"] = int(images.shape[0])
    return summary


def ranks_peer(results, n, ranks) -> dict:
    """The single-process fit at ``n`` that the ranks are compared with: the one under their backend (with
    --reference the last fit at ``n`` was the reference backend's, while the ranks run under the automatic or the
    LAIC_KERNELS_BACKEND one)."""
    return next(r for r in results if r["n"] == n and r["backend"] == ranks[0]["backend"])


def print_ranks(n, single, ranks) -> None:
    print(f"\n# N = {n} on {len(ranks)} processes (gloo) beside one process, backend {single['backend']}: seconds / "
          "peak extra MiB")
    print("| process | rows | fit s | peak extra MiB | peak / one process's |")
    print("|---|---|---|---|---|")
    print(f"| one process | {n} | {single['seconds']:.1f} | {single['peak_extra_bytes'] / MB:.0f} | 1.00 |")
    for rank, r in enumerate(ranks):
        print(f"| rank {rank} | {r['rows']} | {r['seconds']:.1f} | {r['peak_extra_bytes'] / MB:.0f} | "
              f"{r['peak_extra_bytes'] / max(single['peak_extra_bytes'], 1):.2f} |", flush=True)
    for rank, r in enumerate(ranks):
        print(f"\nrank {rank}:\n{table(r)}", flush=True)


def growth_exponent(sizes, values) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-9)), 1)[0])


def threads_said(args) -> str:
    return f"{args.threads} threads" if args.threads else \
        f"up to {torch.get_num_threads()} threads (LAIC's default: the cores free at each fit)"


def print_tables(results, args, device) -> None:
    backends = sorted({r["backend"] for r in results})
    results = [dict(r, steps=merged_candidates(r["steps"])) for r in results]
    # Every fit's steps, in order (a step such as "relation features" runs only where the data gives it a share).
    step_names = list(dict.fromkeys(s["name"] for r in results for s in r["steps"]))
    clusters = f"K = {args.k}" if not getattr(args, "auto_k", False) else \
        f"K chosen by the search{' over ' + ':'.join(map(str, args.k_range)) if args.k_range else ''} (data made " \
        f"with {args.k} directions)"
    print(f"\n# LAIC.fit at growing N: {clusters}, D = {args.dim}, M = {results[0]['n_nouns']} nouns, device "
          f"{device_name(device)}, {threads_said(args)}; seconds / peak extra MiB per step (beyond the "
          "inputs already on the device)")
    header = ["N", "backend"] + step_names + ["whole fit s", "fit peak extra MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        by_name = {s["name"]: s for s in r["steps"]}
        cells = [f"{by_name[n]['seconds']:.1f} / {_mib(by_name[n]['peak_extra_bytes'])}" if n in by_name else "-"
                 for n in step_names]
        print("| " + " | ".join([str(r["n"]), r["backend"]] + cells
                                + [f"{r['seconds']:.1f}", f"{r['peak_extra_bytes'] / MB:.0f}"]) + " |")
    for backend in backends:
        rows = [r for r in results if r["backend"] == backend and r["n"] >= args.fit_from]
        if len(rows) < 2:
            continue
        sizes = [r["n"] for r in rows]
        t = growth_exponent(sizes, [r["seconds"] for r in rows])
        m = growth_exponent(sizes, [r["peak_extra_bytes"] for r in rows])
        print(f"\ngrowth from N = {min(sizes)} to {max(sizes)} ({backend}): time ~ N^{t:.2f}, peak memory ~ N^{m:.2f}")
    for r in results:
        if "chosen_k" in r:
            print(f"N = {r['n']} ({r['backend']}): the search chose K = {r['chosen_k']} (data made with {args.k} "
                  f"directions) of {r['k_candidates']} candidates")
    for r in results:
        stage1 = next((s for s in r["steps"] if s["name"] == "stage 1 (heads)"), None)
        if stage1 is not None and r.get("stage1_steps"):
            print(f"N = {r['n']} ({r['backend']}): stage 1 ran {r['stage1_steps']} steps, "
                  f"{1e3 * stage1['seconds'] / r['stage1_steps']:.2f} ms a step")


def _mib(nbytes) -> str:
    return "?" if nbytes is None else f"{nbytes / MB:.0f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 25_000, 50_000, 100_000])
    parser.add_argument("--k", type=int, default=100, help="clusters K (default 100)")
    parser.add_argument("--auto-k", action="store_true",
                        help="fit LAIC(n_clusters='auto'): K chosen by its search (the data still made with --k "
                             "directions); the candidates' steps are one column")
    parser.add_argument("--k-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="with --auto-k, the range searched (default LAIC's: 2 to N // 4, at most 2048)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nouns", type=int, default=None, metavar="M",
                        help="generate M nouns (default: the shared 1403-noun vocabulary)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reference", action="store_true",
                        help="also fit with LAIC_KERNELS_BACKEND=reference (the pure-PyTorch ops)")
    parser.add_argument("--fit-from", type=int, default=25_000, help="fit the growth exponents from this N on")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help=f"first fit N rows untimed, to compile the kernels and tune their plans (default "
                             f"{CUDA_WARMUP_ROWS} on CUDA, the tuning probe's rows and a few more; 0: none)")
    parser.add_argument("--trace-dir", type=pathlib.Path, default=None, help="write a Chrome trace per fit here")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the raw results here")
    parser.add_argument("--nproc", type=int, default=0, metavar="G",
                        help="also fit on G local processes (gloo) and print each one's peak memory beside the "
                             "single process's fit under the same backend")
    parser.add_argument("--chunk-mb", type=int, default=None, metavar="MB",
                        help="the reference kernels' similarity chunk (default 256 MB): smaller shows, at small N, "
                             "the memory that grows with N (what --nproc divides)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The options, refused by name where no fit could take them (--k 0 was a traceback from inside the data
    generator; --nproc 1 was ignored without a word)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error(f"--k must be at least 2, got {args.k}")
    if min(args.sizes) < 2 * args.k:
        parser.error(f"--sizes must each be at least 2 * --k = {2 * args.k}, got {min(args.sizes)}")
    if args.warmup is not None and 0 < args.warmup < 2 * args.k:
        parser.error(f"--warmup must be 0 (none) or at least 2 * --k = {2 * args.k}, got {args.warmup}")
    if args.k_range is not None and not args.auto_k:
        parser.error("--k-range only applies with --auto-k")
    if args.k_range is not None and not 2 <= args.k_range[0] <= args.k_range[1] < min(args.sizes):
        parser.error(f"--k-range must be LO HI with 2 <= LO <= HI < the smallest of --sizes ({min(args.sizes)}), "
                     f"got {args.k_range[0]} {args.k_range[1]}")
    if args.nproc == 1 or args.nproc < 0:
        parser.error(f"--nproc must be 0 (one process only) or at least 2, got {args.nproc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_chunk(args.chunk_mb)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = [None, "reference"] if args.reference else [None]
    if args.warmup is None:
        args.warmup = CUDA_WARMUP_ROWS if device.type == "cuda" else 0
    if args.warmup > 0:
        warm_up(args, device)
    results = []
    for n in args.sizes:
        images, centres = clustered_features(n, args.k, args.dim, args.seed, device)
        nouns = nouns_for(args, centres, device)
        for backend in backends:
            summary = one_fit(images, nouns, args, device, backend)
            summary.update(n=n, n_nouns=int(nouns.shape[0]))
            results.append(summary)
            print(f"N = {n}, {summary['backend']}: fit {summary['seconds']:.1f} s (with profiling "
                  f"{summary['wall_seconds']:.1f} s), peak extra {summary['peak_extra_bytes'] / MB:.0f} MiB"
                  f"{absolute_peaks(summary)}\n"
                  f"{table(summary)}", flush=True)
        del images, nouns
        if args.nproc > 1:
            ranks = distributed.spawn(rank_fit, args.nproc, n, args, torch.device("cpu"), timeout_s=24 * 3600,
                                      backend="gloo")
            single = ranks_peer(results, n, ranks)
            single["ranks"] = ranks
            print_ranks(n, single, ranks)
        if args.json is not None:   # after every size: a run cut by a time limit keeps its finished fits
            args.json.write_text(json.dumps(results, indent=1))
    print_tables(results, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
