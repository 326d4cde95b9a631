"""The cluster gallery: an HTML page with an overview PNG (cluster sizes; confusion matrix against labels), a 2-D map
of the clusters (map.png) and a card per cluster (its names, its size, and with ground truth its majority class and
purity); when the run names its images, each card also shows a PNG of the cluster's most typical images.

RUN_DIR is read through ``laic.run_dir.read_run`` (its module doc describes the folder): the embeddings come from
``features`` (`laic report --features`) when given, else RUN_DIR/features.npy, else run.json's "features"; the image
paths from RUN_DIR/images.txt, else from the file list that `laic embed` keeps beside its features (features.json
"files").
A cluster's most typical images are its members closest (cosine) to its centre, the normalised mean of their
embeddings. The map projects the unit embeddings on their first two principal axes. Output (default RUN_DIR/report/):
index.html, overview.png, map.png, cluster_000.png ... (with images); the page links the PNGs beside it by relative
paths, so the folder can be moved or zipped as a whole. With the image paths it also writes assignments.csv, every
image's cluster: columns path, cluster and names (the cluster's names, "; " between them), and with ground truth
class (its class's name), one row per image in the run's order, for a spreadsheet or a script.
"""
from __future__ import annotations

import csv
import html
import logging
import math
import os
import pathlib
import re
import shutil
import urllib.parse
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from laic_kernels import checks

from . import io
from .profiling import progress_bar, progress_shown
from .run_dir import (ASSIGNMENTS, is_report_file, lies_inside, not_report_files, read_run_and_identity,
                      with_images_moved)
from .runtime import warn_at_caller

PathLike = Union[str, os.PathLike]
THUMB_PX = 96  # each image is drawn in a square of this many pixels
DPI = 100  # the PNGs' pixels per inch: figures sized in pixels are sized in inches as pixels / DPI
MAP_POINTS = 20000  # the map draws at most this many images (an even sample), so it stays quick and readable
# The confusion matrix drawn in at most this many cells a side (the overview is at most 1600 x 1800 pixels): beyond,
# blocks of cells, each its largest share (drawn cell by cell, 10,000 classes x clusters held 5 GB in matplotlib: an
# ad hoc measurement, 12-06).
CONFUSION_CELLS = 2000


# ---------------------------------------------------------------------------------------------------------------------
# What the gallery shows


def unit_rows(features: np.ndarray) -> np.ndarray:
    """The rows scaled to norm 1 (float64), whatever their scale: each is first divided by its largest magnitude
    (np.linalg.norm of a float64 row of 1e300 overflowed, one of 1e-300 underflowed, and every row became 0)."""
    x = np.asarray(features, dtype=np.float64)
    largest = np.abs(x).max(axis=1, keepdims=True)
    x = x / np.where(largest > 0, largest, 1.0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def typical_members(features: np.ndarray, labels: np.ndarray, cluster: int, n: int) -> np.ndarray:
    """Indices of the ``n`` members of ``cluster`` closest (cosine) to its centre, closest first (ties: lower index)."""
    members = np.flatnonzero(labels == cluster)
    if len(members) == 0:
        return members
    unit = unit_rows(features[members])
    centre = unit.mean(0)
    centre /= max(np.linalg.norm(centre), 1e-12)
    order = np.lexsort((members, -(unit @ centre)))
    return members[order[:n]]


def cluster_table(labels: np.ndarray, n_clusters: int, names: Sequence[Sequence[str]],
                  labels_true: Optional[np.ndarray] = None, class_names: Optional[Sequence[str]] = None) -> List[dict]:
    """Per cluster: id, size, names, and with ground truth the majority class and the purity (its share)."""
    sizes = np.bincount(labels, minlength=n_clusters)
    rows = []
    for c in range(n_clusters):
        row = {"cluster": c, "size": int(sizes[c]), "names": list(names[c])}
        if labels_true is not None and sizes[c] > 0:
            counts = np.bincount(labels_true[labels == c])
            major = int(counts.argmax())
            row.update(majority=major, majority_name=_class_name(major, class_names),
                       purity=float(counts[major] / sizes[c]))
        rows.append(row)
    return rows


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else f"class {label}"


def _title(row: dict, max_names: int = 5) -> str:
    """"Cluster 3: dog, puppy" (its first nouns), or "Cluster 3" where it has none (a fit without text)."""
    names = ", ".join(row["names"][:max_names])
    return f"Cluster {row['cluster']}: {names}" if names else f"Cluster {row['cluster']}"


def _subtitle(row: dict) -> str:
    text = f"{row['size']} images"
    if "purity" in row:
        text += f" · majority {row['majority_name']} · purity {100 * row['purity']:.0f}%"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Drawing (matplotlib, Agg: no display needed)


def _matplotlib():
    # Without a writable config folder (HOME read-only or not a folder, as in some batch jobs) matplotlib makes a
    # temporary one and says so on stderr as it is imported, and that it builds its font cache there: lines that
    # --quiet printed and no user of the report can act on (the report is the same). Its logger is quiet meanwhile.
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import matplotlib
        import matplotlib.figure
    finally:
        logger.setLevel(level)
    return matplotlib


def _figure(**options):
    """A figure of the report's own, drawn as PNG (Agg) when saved: pyplot and the program's backend are left
    alone (``matplotlib.use("Agg")`` switched a notebook's or an application's backend for good, and their own
    figures then no longer showed)."""
    return _matplotlib().figure.Figure(**options)


def _colours(colormap: str, values) -> np.ndarray:
    """RGBA colours of ``values`` (in [0, 1], or ints for a listed colormap) in matplotlib's ``colormap``."""
    return _matplotlib().colormaps[colormap](values)


def _plain(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib would read $...$ as maths


def _thumbnail(path: pathlib.Path) -> np.ndarray:
    """The image as a square RGB array of THUMB_PX, or a grey square when it cannot be read."""
    from PIL import Image, ImageOps

    from .images import DECODE_ERRORS, open_rgb

    try:
        image = open_rgb(path)
    except DECODE_ERRORS + (Image.DecompressionBombError,):
        return np.full((THUMB_PX, THUMB_PX, 3), 200, dtype=np.uint8)
    return np.asarray(ImageOps.fit(image, (THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC))


def mosaic(thumbnails: Sequence[np.ndarray], cols: int, gap: int = 4) -> np.ndarray:
    """Square RGB thumbnails laid out row by row, ``cols`` per row, on a white background with ``gap`` px between."""
    rows = math.ceil(len(thumbnails) / cols)
    step = THUMB_PX + gap
    grid = np.full((rows * step - gap, cols * step - gap, 3), 255, dtype=np.uint8)
    for i, thumb in enumerate(thumbnails):
        r, c = divmod(i, cols)
        grid[r * step:r * step + THUMB_PX, c * step:c * step + THUMB_PX] = thumb
    return grid


def draw_cluster(path: pathlib.Path, image_paths: Sequence[pathlib.Path], row: dict) -> None:
    # One mosaic in one axes: a matplotlib axes per thumbnail costs ~30 ms each.
    n = max(1, len(image_paths))
    cols = min(n, max(4, math.ceil(math.sqrt(n))))
    grid = mosaic([_thumbnail(p) for p in image_paths], cols)
    height, width = grid.shape[:2]
    # Inches of DPI pixels each, as the figure is saved: one pixel of the mosaic a pixel of the PNG (at 72 a pixel,
    # the thumbnails came out 133 px wide, resampled).
    fig = _figure(figsize=(max(width, 4 * THUMB_PX) / DPI, height / DPI + 0.8))
    ax = fig.add_axes((0, 0, 1, height / (height + 0.8 * DPI)))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(_plain(f"{_title(row)}\n{_subtitle(row)}"), fontsize=10, y=0.99, va="top")
    _save_figure(fig, path)


def draw_overview(path: pathlib.Path, table: List[dict], labels: np.ndarray, labels_true: Optional[np.ndarray],
                  class_names: Optional[Sequence[str]]) -> None:
    """Cluster sizes (bars coloured by purity when labels are given); with labels, the class × cluster confusion
    matrix (each class's shares), clusters ordered by their Hungarian-matched class so a good clustering shows a
    bright diagonal."""
    k = len(table)
    width = min(16.0, max(6.0, 0.12 * k))
    if labels_true is None:
        fig = _figure(figsize=(width, 4.5))
        axes = fig.subplots(1, 1, squeeze=False)
    elif k <= 20:  # side by side
        fig = _figure(figsize=(2 * width, 5))
        axes = fig.subplots(1, 2, squeeze=False)
    else:  # stacked, the matrix as tall as the classes need
        matrix_height = min(14.0, max(4.0, 0.1 * (int(labels_true.max()) + 1)))
        fig = _figure(figsize=(width, 4 + matrix_height))
        axes = fig.subplots(2, 1, squeeze=False, gridspec_kw={"height_ratios": [4, matrix_height]}).reshape(1, 2)
    ax = axes[0, 0]
    sizes = [row["size"] for row in table]
    if labels_true is not None:
        colours = _colours("viridis", [row.get("purity", 0.0) for row in table])
        ax.bar(range(k), sizes, color=colours)
        ax.set_title("Cluster sizes (colour: purity, yellow = pure)")
    else:
        ax.bar(range(k), sizes, color="tab:blue")
        ax.set_title("Cluster sizes")
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    if k <= 40:
        ax.set_xticks(range(k))
    if labels_true is not None:
        _draw_confusion(axes[0, 1], fig, labels, labels_true, class_names, k)
    fig.tight_layout()
    _save_figure(fig, path)


def _draw_confusion(ax, fig, labels, labels_true, class_names, k: int) -> None:
    from scipy.optimize import linear_sum_assignment

    n_classes = int(labels_true.max()) + 1
    table = np.zeros((n_classes, k), dtype=np.int64)
    np.add.at(table, (labels_true, labels), 1)
    matched_rows, matched_cols = linear_sum_assignment(table, maximize=True)
    order = list(matched_cols[np.argsort(matched_rows)])
    matched = set(order)   # (a set per cluster took 12 s at K = 20,000, timed ad hoc)
    order += [c for c in range(k) if c not in matched]
    # Shares of each class, so small classes are as visible as large ones.
    shares = (table[:, order] / np.maximum(table.sum(1, keepdims=True), 1)).astype(np.float32)
    image = ax.imshow(max_pooled(shares, CONFUSION_CELLS), aspect="auto", cmap="magma", interpolation="nearest",
                      vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the class")
    ax.set_title("Confusion: class × cluster (clusters in matched order)")
    ax.set_xlabel("cluster")
    ax.set_ylabel("class")
    if k <= 40:
        ax.set_xticks(range(k), [str(c) for c in order])
    else:  # too many to name; positions are not cluster ids here, so show none
        ax.set_xticks([])
        ax.set_xlabel("clusters, in matched order")
    if n_classes <= 40:
        ax.set_yticks(range(n_classes), [_plain(_class_name(c, class_names)) for c in range(n_classes)])
    else:  # positions (0, 10, ...) are not class ids either, where the cards name the ids
        ax.set_yticks([])
        ax.set_ylabel("classes, in id order")


def max_pooled(cells: np.ndarray, most: int) -> np.ndarray:
    """``cells`` in blocks of as few cells as leave at most ``most`` a side, each block its largest value (the
    blocks of a last row or column may be short); as it is where both sides are at most ``most``."""
    for axis in (0, 1):
        step = -(-cells.shape[axis] // most)
        if step > 1:
            blocks = -(-cells.shape[axis] // step)
            padding = [(0, 0), (0, 0)]
            padding[axis] = (0, blocks * step - cells.shape[axis])
            padded = np.pad(cells, padding, constant_values=-np.inf)
            shape = (blocks, step, cells.shape[1]) if axis == 0 else (cells.shape[0], blocks, step)
            cells = padded.reshape(shape).max(axis=axis + 1)
    return cells


def map_coordinates(features: np.ndarray) -> np.ndarray:
    """``[N, 2]``: the unit rows of ``features`` on their first two principal axes (zeros when N < 2)."""
    unit = unit_rows(features)
    centred = unit - unit.mean(0)
    if len(centred) < 2:
        return np.zeros((len(centred), 2))
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ axes[:2].T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))  # D = 1: a flat second axis


def draw_map(path: pathlib.Path, features: np.ndarray, labels: np.ndarray, table: List[dict]) -> None:
    """Each image as a dot coloured by its cluster, each cluster's id at the mean position of its members."""
    keep = np.linspace(0, len(labels) - 1, min(len(labels), MAP_POINTS)).astype(np.int64)
    coords, members = map_coordinates(features[keep]), labels[keep]
    fig = _figure(figsize=(8, 7))
    ax = fig.subplots()
    colours = _colours("tab20", members % 20)
    ax.scatter(coords[:, 0], coords[:, 1], s=6 if len(keep) > 2000 else 14, c=colours, linewidths=0, alpha=0.7)
    for row in table:
        inside = members == row["cluster"]
        if inside.any():
            x, y = coords[inside].mean(0)
            ax.annotate(str(row["cluster"]), (x, y), ha="center", va="center", fontsize=8, weight="bold",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_title("Clusters on the first two principal axes of the embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: pathlib.Path) -> None:
    with io.atomic_path(path) as tmp:   # (a figure of its own: nothing to close, pyplot never held it)
        fig.savefig(tmp, format="png", dpi=DPI)


# ---------------------------------------------------------------------------------------------------------------------
# The page


def cluster_png_name(cluster: int) -> str:
    return f"cluster_{cluster:03d}.png"


def write_assignments(path: pathlib.Path, image_paths: Sequence[str], labels: np.ndarray,
                      names: Sequence[Sequence[str]], truth: Optional[np.ndarray] = None,
                      class_names: Optional[Sequence[str]] = None) -> None:
    """assignments.csv (:func:`assignments_writer`), written atomically."""
    io.replace_together({path: assignments_writer(image_paths, labels, names, truth, class_names)})


def assignments_writer(image_paths: Sequence[str], labels: np.ndarray, names: Sequence[Sequence[str]],
                       truth: Optional[np.ndarray] = None, class_names: Optional[Sequence[str]] = None):
    """What writes assignments.csv at the path it is given (for laic.io.replace_together; `laic predict --out
    X.csv` writes the same): each image's path, cluster (-1: an image that could not be read, without names) and
    the cluster's names (and with ``truth`` its class's name), in row order (see the module docstring). Cells hold
    the names as they are, as Python's csv module and pandas write them: a name that begins with "=", "+", "-" or
    "@" (a class name from the user's labels) is a formula to a spreadsheet that opens the file, so open files of
    untrusted names as text."""
    def write(tmp: pathlib.Path) -> None:
        # surrogateescape: a file name that is not UTF-8 (read from images.txt as such) is written back as its bytes.
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "cluster", "names"] + (["class"] if truth is not None else []))
            joined = ["; ".join(n) for n in names]
            for i, (image, cluster) in enumerate(zip(image_paths, labels.tolist())):
                writer.writerow([image, cluster, joined[cluster] if cluster >= 0 else ""]
                                + ([_class_name(int(truth[i]), class_names)] if truth is not None else []))
    return write


# How errors name the report's folder: the one given, or the default (a read-only run was "out_dir (--out)", not given).
GIVEN_OUT, DEFAULT_OUT = "out_dir (--out)", "the report folder (RUN_DIR/report; another with out_dir, --out)"


def check_report_dir(out: pathlib.Path, arg: str = GIVEN_OUT, run_path: Optional[str] = None,
                     overwrite: bool = True) -> None:
    """The report's folder may be absent, empty or an earlier report (redrawn in place); anything else is left
    alone: the report would mix its files into another folder's. An earlier report of another run than
    ``run_path`` (the run folder's absolute path) is replaced only with ``overwrite`` (its run may be gone, its
    assignments.csv edited since). ``arg``: how errors name it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{arg} {out}: exists and is not a folder; choose a folder for the report")
    io.check_can_create(out / "index.html", arg)
    if not out.exists():
        return
    foreign = not_report_files(out)
    if not foreign and (out / "index.html").is_file() and not _is_laic_page(out / "index.html"):
        foreign = ["index.html, a page laic did not write"]   # (a folder told by file names alone: a site's page)
    if foreign:
        raise ValueError(f"{arg} {out}: is not empty and is not a laic report (it holds "
                         f"{', '.join(foreign[:5])}); choose a new or empty folder")
    other = _run_of_report(out / "index.html") if run_path is not None and not overwrite else None
    if other is not None and not _same_folder(other, run_path):
        raise ValueError(f"{arg} {out}: holds the report of another run ({other}); pass --overwrite (overwrite=True) "
                         "to replace it, or choose another folder")


# In every page's head, to tell an earlier report from a page of the same name (reports before 12-06 are known by
# their title).
PAGE_MARK = '<meta name="generator" content="laic report">'


# The run a page was drawn from, after PAGE_MARK: its folder's absolute path, its bytes percent-encoded (the page
# stays UTF-8 for a name that is not, and reads back as it was); pages before 12-07 have none.
RUN_MARK = '<meta name="laic-run" content="{}">'
_RUN_MARKED = re.compile(re.escape(RUN_MARK).replace(re.escape("{}"), '([^"]*)'))


def _run_mark(run_path: str) -> str:
    return RUN_MARK.format(urllib.parse.quote(os.fsencode(run_path), safe="/"))


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths name one folder (through links, or a folder reached by two mounts)."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them is gone
        return os.path.realpath(a) == os.path.realpath(b)


def _run_of_report(page: pathlib.Path) -> Optional[str]:
    """The run folder the page at ``page`` names (None: no page, or one that names none)."""
    try:
        with open(page, "rb") as f:
            head = f.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return None
    found = _RUN_MARKED.search(head.split("</head>")[0])
    return None if found is None else os.fsdecode(urllib.parse.unquote_to_bytes(found.group(1)))


def _is_laic_page(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return PAGE_MARK in head or "<title>laic clusters" in head


def check_outside_the_images(out: pathlib.Path, run, run_dir: Optional[PathLike] = None) -> None:
    """The report's PNGs must not land among the run's images: a later `laic embed` or `laic fit --images` of that
    folder would take them for images (as `laic fit` refuses its RUN_DIR there). ``run_dir``: given when ``out`` is
    its default report folder, which a run put among its images (write_run_dir, `laic fit --features`) has there."""
    # The folder every image lies under (photos/ of photos/cat/..., photos/dog/...): embedding it lists them all.
    # Not the file system's root or the home folder, which hold images scattered anywhere.
    common = pathlib.Path(os.path.commonpath([os.path.abspath(path.parent) for path in run.image_paths])) \
        if run.image_paths else None
    if common is not None and (common == pathlib.Path(common.anchor) or common == pathlib.Path.home()):
        common = None
    inside = sorted(str(folder) for folder in (run.image_folder, common)
                    if folder is not None and lies_inside(out, folder))
    if inside:
        where, fix = (f"out_dir (--out) {out}:", "choose a folder outside it") if run_dir is None else \
            (f"RUN_DIR {run_dir}: its report folder {out}", "pass out_dir (--out) a folder outside it")
        raise ValueError(f"{where} lies inside {inside[0]}, which holds the run's images: its PNGs would be read "
                         f"as images by a later embedding of that folder; {fix}")


def write_report(run_dir: PathLike, *, labels_true=None, class_names: Optional[Sequence[str]] = None,
                 out_dir: Optional[PathLike] = None, per_cluster: int = 16,
                 features: Optional[PathLike] = None, overwrite: bool = False,
                 images_moved: Optional[Tuple[PathLike, PathLike]] = None) -> pathlib.Path:
    """Draw the gallery of RUN_DIR into ``out_dir`` (default RUN_DIR/report; either way not inside the folder of the
    run's images) and return the path of index.html. An earlier report there is replaced: of another run only with
    ``overwrite`` (`laic report --overwrite`). ``images_moved``: (FROM, TO), the run's images under the folder FROM
    looked for under TO, where they were moved since the fit (laic.run_dir.with_images_moved)."""
    if not checks.is_int(per_cluster) or not 1 <= per_cluster <= 1024:
        raise ValueError(f"per_cluster (--per-cluster) must be an int between 1 and 1024, got {per_cluster!r}")
    per_cluster = int(per_cluster)
    if class_names is not None:
        if isinstance(class_names, (str, bytes)):   # ten one-letter names of "abcdefghij"
            raise ValueError("class_names (--classes) must be a list of names, one per class id, got a string")
        if labels_true is None:   # ignored without a word: a short or wrong file went unnoticed
            raise ValueError("class_names (--classes) name the ground truth's classes: pass the ground truth "
                             "(labels_true, --labels) with them, or leave them out")
    if images_moved is not None and not (isinstance(images_moved, (list, tuple)) and len(images_moved) == 2):
        raise ValueError(f"images_moved (--images-moved FROM TO) must be two folders, (FROM, TO), got {images_moved!r}")
    # The run first (it writes nothing): a file given as RUN_DIR was reported as a bad --out, RUN_DIR/report.
    run, run_identity = read_run_and_identity(run_dir, features=features)
    if images_moved is not None:
        run = with_images_moved(run, *images_moved)
    out = pathlib.Path(out_dir).expanduser() if out_dir is not None else pathlib.Path(run_dir).expanduser() / "report"
    arg = GIVEN_OUT if out_dir is not None else DEFAULT_OUT
    # The run, as the page names it (links resolved: `runs/latest` names the run it points to now). RUN_DIR/report
    # is the run's own, whatever the run folder is called now.
    run_path = os.path.abspath(pathlib.Path(run_dir).expanduser())   # (links kept: the title)
    run_real = os.path.realpath(run_path)
    mine = None if os.path.realpath(out) == os.path.join(run_real, "report") else run_real
    check_report_dir(out, arg, mine, overwrite)
    check_outside_the_images(out, run, run_dir if out_dir is None else None)
    truth = None
    if labels_true is not None:
        truth, class_names = _classes_present(labels_true, class_names, len(run.labels))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Drawn whole in a hidden folder inside ``out`` (a link, a mount point and a read-only parent stay as they are),
    # then moved in file by file, the page last: an interrupted redraw never leaves an earlier report's page beside
    # new pictures, and a redraw with fewer clusters leaves no stale pictures behind.
    # A drawing killed before it could clean up; not a younger one, which may be another report's, drawing now
    # (two `laic report` of one run: the first deleted the second's folder, and its page linked missing pictures).
    io.remove_hidden_dirs_beside(out / "index.html", "drawing")
    staging = io.hidden_dir_beside(out / "index.html", "drawing")
    replaced = False
    try:
        try:
            # Absolute: `laic report .` named the page after "" (links kept: a run reached through `latest` is
            # "latest").
            _draw(staging, run, pathlib.Path(run_path).name, run_real, truth, class_names, per_cluster)
        except io.WriteError as exc:
            raise io.staged_write_error(exc, staging, out) from None
        # A report inside RUN_DIR (the default) goes in only if RUN_DIR is still the run it describes: a fit that
        # replaced RUN_DIR meanwhile took the drawing folder away, the rest of the drawing went into a new one
        # inside the new run, and the old run's partial report was moved into the new run (status 0).
        replaced = lies_inside(out, pathlib.Path(run_dir).expanduser()) and \
            io.folder_identity(pathlib.Path(run_dir).expanduser()) != run_identity
        if replaced:
            raise ValueError(f"{run_dir} was replaced while its report was drawn (a fit publishing there?); draw "
                             "the report again")
        check_report_dir(out, arg, mine, overwrite)   # again: something may have arrived there while drawing
        _move_report_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if (created or replaced) and out.is_dir() and not any(out.iterdir()):
            out.rmdir()   # a first drawing that failed leaves no empty folder behind
    return out / "index.html"


def _classes_present(labels_true, class_names: Optional[Sequence[str]], n_images: int):
    """(the ground truth as indices of the classes present, those classes' names) from labels_true (class ids or
    names) and class_names (one per class id, or None)."""
    truth, given_names = io.truth_and_names("labels_true (--labels)", labels_true)
    if given_names is not None:
        if class_names is not None:
            raise ValueError("the ground truth (labels_true, --labels) holds class names already: leave out "
                             "class_names (--classes), or pass class ids with it")
        class_names = given_names   # the ids number the sorted names
    if len(truth) != n_images:
        raise ValueError(f"the ground truth (labels_true, --labels) has {len(truth)} labels but the run has "
                         f"{n_images} images; they must describe the same images in the same order")
    if class_names is not None and truth.max() >= len(class_names):
        raise ValueError(f"the class names (class_names, --classes) name {len(class_names)} classes but the "
                         f"ground truth holds class id {truth.max()}; one name per class id, in id order")
    # Class ids as they come (gaps, WordNet offsets): tables are sized by the classes present, named by the
    # original ids.
    values, truth = np.unique(truth, return_inverse=True)
    return truth, [_class_name(int(v), class_names) for v in values]


def _move_report_in(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Replace the report files of ``out`` by those drawn in ``staging``: the earlier page goes first, the new one
    comes last; other (hidden) files stay. Ctrl-C and SIGTERM wait for the moves' end (laic.io.HeldSignals): one
    between them left the earlier pictures beside new ones with no page, and "no file was left half-written"."""
    with io.HeldSignals() as held:
        held.hold()
        (out / "index.html").unlink(missing_ok=True)
        for entry in out.iterdir():
            if is_report_file(entry.name) and not (staging / entry.name).exists():
                entry.unlink()
        for entry in sorted(staging.iterdir(), key=lambda e: e.name == "index.html"):
            os.replace(entry, out / entry.name)
        io.sync_folder(out)


def _draw(out: pathlib.Path, run, title: str, run_real: str, truth: Optional[np.ndarray], class_names,
          per_cluster: int) -> None:
    """The report of ``run`` (read from the folder ``run_real``, links resolved) into ``out``, titled ``title``."""
    from .metrics import evaluate

    table = cluster_table(run.labels, run.n_clusters, run.names, truth, class_names)
    draw_overview(out / "overview.png", table, run.labels, truth, class_names)
    draw_map(out / "map.png", run.features, run.labels, table)
    with_images = run.image_paths is not None
    shown, missing = 0, []
    drawn = [row for row in table if row["size"] and with_images]
    # A picture a cluster: minutes at K = 1000, so a bar where progress is shown (`laic report`; laic.profiling).
    with progress_bar(len(drawn), progress_shown() and bool(drawn), "cluster", "drawing clusters") as bar:
        for row in drawn:
            typical = typical_members(run.features, run.labels, row["cluster"], per_cluster)
            paths = [run.image_paths[i] for i in typical]
            draw_cluster(out / cluster_png_name(row["cluster"]), paths, row)
            shown += len(paths)
            missing += [p for p in paths if not os.path.isfile(p)]
            bar.update(1)
    if missing:   # drawn as grey squares, as unreadable images are
        warn_at_caller(f"{len(missing)} of the {shown} images pictured are missing (e.g. {str(missing[0])!r}): moved "
                       "or deleted since the fit? They are grey squares in the report; where their folder was moved, "
                       "pass --images-moved FROM TO (images_moved=(FROM, TO) in Python)")
    if with_images:
        write_assignments(out / ASSIGNMENTS, [io.path_text(p) for p in run.image_paths], run.labels, run.names, truth,
                          class_names)
    scores = evaluate(truth, run.labels) if truth is not None else None
    page = _page(title, run_real, table, scores, len(run.labels), with_images, (len(missing), shown),
                 _k_search_said(run.k_search, run.n_clusters))
    io.write_text(out / "index.html", page)


def _k_search_said(k_search: Optional[dict], k: int) -> Optional[str]:
    """How the run's K was chosen, in words, where a K search chose it (run.json's "k_search": its range and the
    doubts the fit warned of); None for a K given."""
    if not k_search:
        return None
    searched = k_search.get("range")
    over = (f" over {searched[0]} to {searched[1]}" if isinstance(searched, list) and len(searched) == 2 else "")
    doubts = [d for d in k_search.get("doubts") or [] if isinstance(d, str)]
    return (f"K = {k} was chosen by a K search{over} (its curve is run.json's k_search)"
            + (f"; the search doubted it: {'; '.join(doubts)}" if doubts else ""))


def _page(title: str, run_real: str, table: List[dict], scores: Optional[dict], n_images: int, with_images: bool,
          missing: Tuple[int, int] = (0, 0), k_chosen: Optional[str] = None) -> str:
    """The report's HTML, titled by the run folder's name (of its absolute path: `laic report .` named it "", and a
    link is kept: a run reached through `latest` is "latest"), naming the run folder ``run_real`` (RUN_MARK);
    ``missing``: (images pictured whose files are gone, images pictured); ``k_chosen``: how a K search chose K (a
    report of a searched K said nothing of it, nor of the search's doubts)."""
    def e(text: str) -> str:
        # A name that is not UTF-8 (a folder's bytes, kept as surrogates) is shown with U+FFFD: the page says utf-8.
        return html.escape(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


    parts = ["<!doctype html>",
             f"<html lang=\"en\"><head><meta charset=\"utf-8\">{PAGE_MARK}"
             f"{_run_mark(run_real)}<title>laic clusters: {e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;background:#fafafa}"
             ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:1em}"
             ".card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em}"
             ".card img{width:100%}.card h2{font-size:1em;margin:.2em 0}.meta{color:#555;font-size:.9em}"
             "img.overview{max-width:100%}</style></head><body>",
             f"<h1>laic clusters: {e(title)}</h1>",
             f"<p>{n_images} images in {sum(r['size'] > 0 for r in table)} non-empty clusters, largest first. " + (
                 "Each picture shows a cluster's most typical images (closest to its centre); every image's cluster "
                 f'is in <a href="{ASSIGNMENTS}">{ASSIGNMENTS}</a>.</p>' if with_images else
                 "The run names no image files (images.txt, or the `laic embed` folder of its features), so the "
                 "clusters are shown without pictures.</p>")]
    if k_chosen:
        parts.append(f"<p>{e(k_chosen)}.</p>")
    if missing[0]:
        parts.append(f"<p><b>{missing[0]} of the {missing[1]} images pictured are missing</b> (moved or deleted since "
                     "the fit): grey squares.</p>")
    if scores is not None:
        parts.append("<p><b>Against the given labels:</b> " + ", ".join(
            f"{name.upper()} {100 * value:.1f}%" for name, value in scores.items()) + "</p>")
    parts.append('<img class="overview" src="overview.png" alt="cluster sizes and confusion matrix">')
    parts.append('<img class="overview" src="map.png" alt="the clusters on a 2-D map of the embeddings">')
    parts.append('<div class="grid">')
    for row in sorted(table, key=lambda r: (-r["size"], r["cluster"])):
        if row["size"] == 0:
            continue
        parts.append(f'<div class="card" id="cluster-{row["cluster"]}"><h2>{e(_title(row))}</h2>'
                     f'<div class="meta">{e(_subtitle(row))}</div>'
                     + (f'<img src="{cluster_png_name(row["cluster"])}" alt="{e(_title(row))}">' if with_images else "")
                     + "</div>")
    parts.append("</div>")
    empty = [str(r["cluster"]) for r in table if r["size"] == 0]
    if empty:
        parts.append(f"<p>Empty clusters: {', '.join(empty)}.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
