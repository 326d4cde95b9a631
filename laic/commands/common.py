"""What several commands share: their common flags, reading NAME=VALUE options, and printing clusters. Only commands
import this module; the library never does."""
from __future__ import annotations

import argparse
import ast
import inspect
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_threads_argument(parser: argparse.ArgumentParser, default: Optional[int] = None) -> None:
    what = "torch's choice" if default is None else str(default)
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"CPU threads for torch (default: {what}; 1 is often faster for small inputs)")


def parse_options(pairs: List[str], estimator, flag: str = "--set",
                  reserved: Optional[Dict[str, str]] = None) -> Dict:
    """``NAME=VALUE`` strings as keyword arguments of ``estimator`` (a class or dataclass); VALUE is read as a Python
    literal when it is one (50, 0.1, True, None, [1, 2]) and kept as a string otherwise. ``reserved`` maps the
    names that have their own flag to that flag."""
    params = inspect.signature(estimator).parameters
    if reserved is None:
        reserved = {"n_clusters": "--k", "random_state": "--seed", "device": "--device", "k_range": "--k-range"}
    example = f"{flag} {next(p for p in params if p not in reserved and p != 'self')}=..."
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE, e.g. {example}")
        if name in reserved:
            raise ValueError(f"{flag} {name}: set it with its own flag ({reserved[name]})")
        if name not in params:
            known = ", ".join(p for p in params if p not in reserved and p != "self")
            raise ValueError(f"{flag} {name}: {estimator.__name__} has no option {name!r}; its options are: {known}")
        try:
            options[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[name] = text.strip()
    return options


def print_clusters(clusters: Sequence[Dict], max_names: int = 5, max_rows: int = 40) -> None:
    """The clusters (as in clusters.json) as a table; with many clusters, the first ``max_rows``."""
    print(f"{'cluster':>7}  {'size':>6}  names")
    for c in clusters[:max_rows]:
        print(f"{c['cluster']:>7}  {c['size']:>6}  {', '.join(c['names'][:max_names])}")
    if len(clusters) > max_rows:
        print(f"{'...':>7}  {len(clusters) - max_rows} more in clusters.json")


def fit_settings(args: argparse.Namespace) -> Tuple[Dict, pathlib.Path, str]:
    """`laic fit`'s LAIC options, RUN_DIR and device, checked before anything long starts."""
    from ..model import LAIC
    from ..run_dir import check_out_dir
    from ..runtime import resolve_device

    options = parse_options(args.options, LAIC)
    out = pathlib.Path(args.out).expanduser()
    check_out_dir(out, args.overwrite)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    return options, out, str(resolve_device(args.device, "--device"))


def print_fit(model, out: pathlib.Path, seconds: float) -> None:
    """What `laic fit` prints once the run is written."""
    import numpy as np

    from ..run_dir import RUN_FILES, cluster_summary

    print(f"fitted in {seconds:.1f} s")
    print_clusters(cluster_summary(np.asarray(model.labels_), model.cluster_names_, model.n_clusters_))
    print(f"wrote {out}/ ({', '.join(f for f in RUN_FILES if (out / f).exists())})")
