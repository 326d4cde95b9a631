"""Draw a run's clusters: an HTML page of their sizes and names, a 2-D map, and PNGs of their typical images.

The page shows each cluster's size and names, a 2-D map of the clusters, and a PNG per cluster of its most typical
images, and assignments.csv beside it listing every image's path, cluster and the cluster's names (with --labels
also its class) in the run's row order, when the run names its images.

RUN_DIR is a folder written by `laic fit` (labels.npy, clusters.json, run.json naming the features) or by
laic.run_dir.write_run_dir (adds features.npy and images.txt). The images are found through images.txt, or through the
file list `laic embed` keeps beside the features; a run on bare features gets the page without pictures. With --labels
(ground truth, for evaluation only) each cluster also shows its majority class and purity, and the overview a
confusion matrix. When it draws pictures, a bar on stderr shows its progress (--quiet: none).

Examples:
  laic report runs/cifar10 --labels labels.npy --classes classes.txt
  laic report runs/photos --images-moved /home/me/photos /mnt/backup/photos   # the photos moved since the fit
"""
from __future__ import annotations

import argparse
import pathlib

from .common import file_stamp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (see above)")
    parser.add_argument("--labels", metavar="TRUE.npy",
                        help="ground-truth labels [N] (class ids >= 0, class names or booleans), for purity and confusion")
    parser.add_argument("--classes", metavar="CLASSES.txt", help="class names, one per line in label order")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write the page, PNGs and assignments.csv (default RUN_DIR/report): a new or "
                             "empty folder, or an earlier laic report of this run (replaced; another run's with "
                             "--overwrite); never inside the folder of the run's images")
    parser.add_argument("--features", metavar="F.npy|DIR",
                        help="image features, when RUN_DIR neither holds them nor finds those run.json names (moved "
                             "since the fit); another set than the run's is refused")
    parser.add_argument("--images-moved", nargs=2, metavar=("FROM", "TO"),
                        help="the run's images were moved since the fit from the folder FROM to TO: each image "
                             "under FROM is looked for at the same path under TO")
    parser.add_argument("--per-cluster", type=int, default=16, help="images shown per cluster (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report of another run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# A bar on stderr as the clusters' pictures are drawn (laic.cli), unless --quiet.
PROGRESS = True


def _index(args) -> pathlib.Path:
    out = args.out if args.out is not None else pathlib.Path(args.run_dir) / "report"
    return pathlib.Path(out).expanduser() / "index.html"


def interrupted(args) -> str:
    """What Ctrl-C left (for laic.cli): the page is moved in last, with the stop held until the moves end."""
    if hasattr(args, "index_before") and file_stamp(_index(args)) not in (None, args.index_before):
        return f"interrupted after the report was written: {_index(args)} is complete"
    return "interrupted; no file was left half-written, and an earlier report is as it was"


def run(args: argparse.Namespace) -> int:
    args.index_before = file_stamp(_index(args))    # first: a stop in the imports after it is told from a write
    from ..io import read_npy, read_utf8
    from ..report import ASSIGNMENTS, write_report

    truth = read_npy(args.labels, "--labels") if args.labels else None   # ids or class names (write_report checks)
    class_names = None
    if args.classes:
        path = pathlib.Path(args.classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--classes {args.classes}: no such file")
        class_names = [line.strip() for line in read_utf8(path, "--classes").splitlines()]
        while class_names and not class_names[-1]:
            class_names.pop()
        if "" in class_names:   # dropped, it would shift every later name onto the next class
            raise ValueError(f"--classes {args.classes}: line {class_names.index('') + 1} is blank; one class name "
                             "per line, in class id order")
    index = write_report(args.run_dir, labels_true=truth, class_names=class_names, out_dir=args.out,
                         per_cluster=args.per_cluster, features=args.features, overwrite=args.overwrite,
                         images_moved=args.images_moved)
    beside = "the PNGs and assignments.csv, every image's cluster," if (index.parent / ASSIGNMENTS).is_file() \
        else "the PNGs"
    print(f"wrote {index} (open it in a browser; {beside} are beside it)")
    return 0
