"""The run folder (RUN_DIR): what ``laic fit`` writes, and what ``laic predict``, ``laic evaluate`` and ``laic report``
read. This module alone knows its layout:

  model          the fitted LAIC estimator, with its stage-2 part when it has one (laic.LAIC.load(RUN_DIR/model))
  labels.npy     int64 [N], the cluster of each image (required by every reader)
  clusters.json  {"k": K, "n_images": N, "clusters": [{"cluster": c, "size": n_c, "names": [noun, ...]}, ...]}
  run.json       the inputs and settings of the run ({"features": F.npy or a `laic embed` folder, ...})
  features.npy   float32 [N, D] image embeddings, row i for image i (runs on images: the fine-tuned embeddings)
  images.txt     one image path per line, row i for image i; relative paths are relative to RUN_DIR
  report/        what `laic report` draws into it (never part of the run: a refit replaces it)

``laic fit`` publishes a run whole: it writes into a hidden staging folder beside RUN_DIR and renames it into place, so
RUN_DIR only ever holds a complete run (a failure or a kill leaves at most a hidden folder). Stage 2 keeps its
per-epoch checkpoint beside RUN_DIR too (:func:`checkpoint_dir`), since RUN_DIR itself appears only at the end.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np

from laic_kernels import checks

from . import io
from .embed_cache import features_fingerprint, features_layout, fingerprint_matches, in_byte_order, read_features

PathLike = Union[str, os.PathLike]
MODEL_FILE = "model"
PROFILE_FILES = ("profile.json", "trace.json")   # laic fit --profile (laic.profiling)
RUN_FILES = (MODEL_FILE, "labels.npy", "clusters.json", "run.json", "features.npy", "images.txt") + PROFILE_FILES
REPORT_DIR = "report"
ASSIGNMENTS = "assignments.csv"   # in REPORT_DIR (laic.report)
CHECKPOINT_SUFFIX = ".stage2-checkpoint"
# Written by laic before this layout: a run holding it was fitted by an older laic and must be refitted.
OLD_STAGE2_FILE = "stage2.pt"


@dataclass
class Run:
    labels: np.ndarray                         # int64 [N]
    features: np.ndarray                       # float32 [N, D]
    image_paths: Optional[List[pathlib.Path]]  # [N], None when the run names no images
    names: List[List[str]]                     # [K]
    n_clusters: int
    image_folder: Optional[pathlib.Path] = None   # the folder `laic fit --images` read them from (run.json)
    k_search: Optional[Dict] = None               # run.json's "k_search" of a fit that searched K (--k auto)


# ---------------------------------------------------------------------------------------------------------- writing

def cluster_summary(labels: np.ndarray, names: Sequence[Sequence[str]], k: int) -> List[Dict]:
    sizes = np.bincount(labels, minlength=k)
    return [{"cluster": c, "size": int(sizes[c]), "names": list(names[c])} for c in range(k)]


def write_clustering(folder: PathLike, labels: np.ndarray, names: Sequence[Sequence[str]], k: int,
                     features: Optional[np.ndarray] = None, image_paths: Optional[Sequence[PathLike]] = None) -> None:
    """labels.npy and clusters.json, and features.npy / images.txt when given (each file atomically)."""
    folder = pathlib.Path(folder)
    io.save_npy(folder / "labels.npy", labels)
    io.write_json(folder / "clusters.json", {"k": k, "n_images": int(len(labels)),
                                             "clusters": cluster_summary(labels, names, k)})
    if features is not None:
        io.save_npy(folder / "features.npy", np.asarray(features, dtype=np.float32))
    if image_paths is not None:
        io.write_text(folder / "images.txt", io.lines_text(map(io.path_text, image_paths)))


def write_run(folder: PathLike, model, run_info: Dict, features: Optional[np.ndarray] = None,
              image_paths: Optional[Sequence[PathLike]] = None) -> None:
    """A whole run of a fitted LAIC ``model``: the model, its clustering and ``run_info`` (run.json)."""
    folder = pathlib.Path(folder)
    model.save(folder / MODEL_FILE)
    labels = np.asarray(model.labels_, dtype=np.int64)
    write_clustering(folder, labels, model.cluster_names_, model.n_clusters_, features, image_paths)
    io.write_json(folder / "run.json", run_info)


def write_run_dir(run_dir: PathLike, labels, features, image_paths: Sequence[PathLike],
                  cluster_names: Optional[Sequence[Sequence[str]]] = None, n_clusters: Optional[int] = None,
                  overwrite: bool = False) -> None:
    """Any clustering (e.g. an API user's own) as a RUN_DIR that ``laic report`` can draw: labels.npy,
    clusters.json, features.npy (float32) and images.txt (the paths made absolute). ``n_clusters`` defaults to
    ``len(cluster_names)`` or ``max(labels) + 1``. Published whole, as ``laic fit`` publishes a run: ``run_dir`` may
    be absent or empty, or (with ``overwrite``) hold an earlier run; a folder of other files is refused."""
    out = pathlib.Path(run_dir).expanduser()
    labels = io.as_labels("labels", labels, non_negative=True)
    features = _run_features(features)
    # Absolute: images.txt's relative paths are read relative to RUN_DIR, not to where this ran.
    paths = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in image_paths]
    if len(features) != len(labels) or len(paths) != len(labels):
        raise ValueError(f"labels ({len(labels)}), features {features.shape} and image_paths ({len(paths)}) must "
                         "describe the same N images: labels [N], features [N, D], N paths")
    broken = next((i for i, p in enumerate(paths) if "\n" in p or "\r" in p), None)
    if broken is not None:
        raise ValueError(f"image_paths[{broken}] ({paths[broken]!r}) holds a line break, which images.txt (one path "
                         "a line) cannot hold; rename that file")
    k = n_clusters or (len(cluster_names) if cluster_names is not None else int(labels.max()) + 1)
    if labels.max() >= k:
        raise ValueError(f"labels go up to {labels.max()} but n_clusters is {k}; pass n_clusters > max(labels)")
    names = [list(n) for n in cluster_names] if cluster_names is not None else [[] for _ in range(k)]
    if len(names) != k:
        raise ValueError(f"cluster_names has {len(names)} entries but there are {k} clusters; pass one list per "
                         "cluster")
    check_out_dir(out, overwrite, "run_dir")
    publish_run(out, lambda folder: write_clustering(folder, labels, names, k, features, paths), overwrite, "run_dir")


def _run_features(features) -> np.ndarray:
    """``features`` as features.npy holds them, float32, checked as LAIC.fit checks its images (finite, no zero
    rows: the report failed on them later): the values as given, or, for float64 rows beyond float32's range, the
    rows each scaled exactly by a power of two (their directions, all the report uses)."""
    from .inputs import as_tensor

    if hasattr(features, "detach"):   # a torch tensor (any float dtype, any device)
        checked = as_tensor("features", features, ndim=2)
        as_given = features.detach().float().cpu().numpy()
    else:   # an array, or a list of rows (whole numbers too)
        values = np.asarray(features)
        checked = as_tensor("features", values.astype(np.float64) if values.dtype.kind in "biu" else values, ndim=2)
        with np.errstate(over="ignore", under="ignore"):
            as_given = values.astype(np.float32)
    fits = np.isfinite(as_given).all() and as_given.any(axis=1).all()
    return as_given if fits else checked.cpu().numpy()


# ------------------------------------------------------------------------------------------------------- publishing

def check_out_dir(out: pathlib.Path, overwrite: bool, arg: str = "--out",
                  inputs: Sequence[Tuple[str, Optional[PathLike]]] = ()) -> None:
    """Before a fit: RUN_DIR may be absent or empty; an earlier run (with or without its report) only with
    ``overwrite``; anything else is left alone. The run is published by renaming a finished folder into place beside
    RUN_DIR, so RUN_DIR must not be the current folder (or above it) and the folder it goes in must be writable;
    ``inputs`` (``(argument, path)`` of the fit's inputs) must not lie inside it, where replacing the run would
    delete them. Checked here, before anything long starts, not after the fit."""
    _check_publishable(out, arg)
    if os.path.ismount(out):
        raise ValueError(f"{arg} {out}: is a mount point; a run is published by renaming a finished folder into "
                         f"place, so name a folder inside it (e.g. {arg} {out / 'run'})")
    if not out.exists():
        if (stranded := stranded_run(out)) is not None:
            raise ValueError(f"{arg} {out}: {stranding(out, stranded)}")
        return
    if not out.is_dir():
        raise ValueError(f"{arg} {out}: exists and is not a folder; choose another RUN_DIR")
    for name, path in inputs:
        if path is not None and lies_inside(pathlib.Path(path).expanduser(), out):
            raise ValueError(f"{name} {path}: lies inside {arg} {out}, which a fit replaces whole; keep the inputs "
                             "elsewhere or choose another RUN_DIR")
    entries = {e.name for e in out.iterdir()}
    if not entries:
        _check_replaceable(out, arg)
        return
    # Every run laic writes holds clusters.json and labels.npy; a folder of other .npy files (e.g. features.npy and
    # labels.npy of a data set), or another tool's clusters.json among its files, is not a run.
    if (out / "clusters.json").is_file() and (out / "labels.npy").exists():
        # Replacing a run deletes it whole: a user's own files in it too (labels `laic predict` wrote there, drafts
        # in its report folder; a run holding one was called "not a laic run" before, with no word of them).
        others = _not_written_by_laic(out, entries)
        if others:
            how = "" if overwrite else f" (and pass {'--overwrite' if arg.startswith('--') else 'overwrite=True'})"
            raise ValueError(f"{arg} {out}: holds an earlier run and files laic did not write ({', '.join(others[:5])})"
                             f"; move them out of it{how}, or choose another RUN_DIR")
        if overwrite:
            _check_replaceable(out, arg)
            return
        how = "--overwrite" if arg.startswith("--") else "overwrite=True"   # a command's option, or an argument
        raise ValueError(f"{arg} {out}: holds an earlier run; pass {how} to replace it, or choose another RUN_DIR")
    raise ValueError(f"{arg} {out}: is not empty and is not a laic run (it holds {', '.join(sorted(entries)[:5])}); "
                     f"choose another RUN_DIR")


def is_report_file(name: str) -> bool:
    """Whether ``name`` is one of the files `laic report` writes (laic.report)."""
    return name in ("index.html", "overview.png", "map.png", ASSIGNMENTS) or \
        re.fullmatch(r"cluster_\d{3,}\.png", name) is not None


def not_report_files(folder: pathlib.Path) -> List[str]:
    """The entries of a report folder that laic did not write, sorted. Hidden ones are taken for no one's content (a
    desktop's .DS_Store, or the temporary file of a write that was killed): replacing a run deletes them with it."""
    return sorted(e.name for e in folder.iterdir()
                  if not ((is_report_file(e.name) and e.is_file()) or e.name.startswith(".")))


def _disposable(path: pathlib.Path) -> bool:
    """An entry no one wrote as content: a desktop's .DS_Store, macOS's ``._NAME`` metadata files (beside every file
    on SMB shares and exFAT disks), the temporary file of a laic write that was killed (laic.io.atomic_path's
    ``.NAME.XXXXXXXX.tmp``: `laic predict --out RUN_DIR/new.npy` stopped) or a killed drawing's staging folder
    (laic.io.hidden_dir_beside's ``.NAME.WHAT-XXXXXXXX``: `laic report`). Other hidden files in a run folder (a
    .gitignore, notes) are a user's."""
    name = path.name
    if path.is_dir() and not path.is_symlink():
        return re.fullmatch(r"\..+\.\w+-[0-9a-f]{8}", name) is not None
    return path.is_file() and (name == ".DS_Store" or name.startswith("._")
                               or re.fullmatch(r"\..+\.\w{8}\.tmp", name) is not None)


def _write_probe(path: pathlib.Path) -> bool:
    """The empty folder laic.io.check_can_create makes and removes at once, left by a kill between the two
    (``.laic.probe-XXXXXXXX``; ``.laic-probe-XXXXXXXX`` before 12-06): `laic report RUN_DIR` probes RUN_DIR.
    Only that name, and only empty: a user's own hidden folder (a dated backup) is never taken for it."""
    if not re.fullmatch(r"\.laic\.probe-[0-9a-f]{8}|\.laic-probe-\w{8}", path.name):
        return False
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _not_written_by_laic(out: pathlib.Path, entries) -> List[str]:
    """Of a run folder's ``entries``, those that are not what laic writes there, sorted: other names (but
    :func:`_disposable` files), a folder in a file's place, a report folder holding other files (as
    RUN_DIR/report/...)."""
    known = set(RUN_FILES) | {REPORT_DIR, OLD_STAGE2_FILE}
    others = [name for name in sorted(entries) if not _write_probe(out / name)
              and (name != REPORT_DIR and (out / name).is_dir() or name not in known and not _disposable(out / name))]
    report = out / REPORT_DIR
    if REPORT_DIR in entries and not report.is_symlink():   # a link is removed alone, never what it points to
        if not report.is_dir():
            return others + [REPORT_DIR]
        # (stricter than not_report_files, which a redraw in place reads: replacing the run deletes what is here)
        others += [f"{REPORT_DIR}/{e.name}" for e in sorted(report.iterdir())
                   if not ((is_report_file(e.name) and e.is_file()) or _disposable(e))]
    return others


def _check_replaceable(out: pathlib.Path, arg: str) -> None:
    """An existing RUN_DIR is set aside into another folder and deleted when the run is published: moving a folder
    to another one and emptying it need write permission on it, and on each folder in it (found only after the fit
    before: "cannot move the finished run into RUN_DIR (Permission denied)")."""
    for folder, _, _ in os.walk(out):    # (links to folders are not followed: deleting removes the link alone)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{arg} {out}: cannot be replaced: {folder} is read-only (or not yours); make it "
                             f"writable (chmod -R u+w {out}) or choose another RUN_DIR")


def stranded_run(out: pathlib.Path) -> Optional[pathlib.Path]:
    """The earlier run that a publish with --overwrite had set aside when it was killed, before the new run took
    its place (:func:`publish_run`: two renames, where the system swaps no two folders in one step), if there is
    one beside ``out``: the latest set aside, where several are."""
    found = []
    for folder in io.hidden_dirs_beside(out, "old"):
        try:   # when it was set aside: the folder's time (the run's own changes with what is written into it)
            set_aside = folder.stat().st_mtime
        except OSError:   # gone meanwhile
            continue
        if (folder / "run").exists():
            found.append((set_aside, folder / "run"))
    return max(found, key=lambda pair: pair[0])[1] if found else None


def stranding(out: pathlib.Path, stranded: pathlib.Path) -> str:
    return (f"is missing, and {stranded} holds the run that an --overwrite was replacing when it was stopped; move "
            f"it back (mv {stranded} {out}) or delete {stranded.parent}")


def lies_inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_publishable(out: pathlib.Path, arg: str) -> None:
    """``out`` can be created (or replaced) by a rename: it is not the current folder or one above it, and the
    nearest existing folder on its way is a writable folder."""
    here = pathlib.Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise ValueError(f"{arg} {out}: is the current folder or one above it; a run is published by moving a "
                         f"finished folder into place, so name a new folder (e.g. {arg} run)")
    io.check_can_create(out, arg)


def publish_run(out: pathlib.Path, write_files: Callable[[pathlib.Path], None], overwrite: bool,
                arg: str = "--out", published: Callable[[], None] = lambda: None,
                kept_aside: Callable[[], None] = lambda: None) -> None:
    """Write the run into a staging folder beside ``out`` with ``write_files(folder)``, then move it into place, so
    that ``out`` only ever holds a complete run: a failure (or a kill) while writing leaves at most a hidden staging
    folder.

    ``out`` is checked again (:func:`check_out_dir`) just before the move: files put there while the fit ran (or
    another fit's run) are never replaced but with ``overwrite`` (an earlier run). If that check or the move fails,
    the finished run stays in a folder beside ``out``, which the error names (Ctrl-C there discards it).
    ``published()`` runs as soon as ``out`` holds the run, before the earlier run it replaced is deleted;
    ``kept_aside()`` once the finished run is safe in the folder beside ``out`` instead (before the error).
    Staging folders of ``out`` that a killed process left (``kill -9`` while writing) go first, once older than
    ``io.STALE_STAGING_SECONDS`` (a younger one may be another process's, writing now), and so do earlier runs set
    aside beside an ``out`` that is there (a publish killed after its move, before it deleted them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    io.remove_hidden_dirs_beside(out, "partial")
    if out.exists():   # an earlier run set aside beside a RUN_DIR that is there: a publish killed after its move
        io.remove_hidden_dirs_beside(out, "old")
    staging = io.hidden_dir_beside(out, "partial")
    earlier, held = None, io.HeldSignals()
    try:
        with held:
            try:
                try:
                    write_files(staging)
                except io.WriteError as exc:
                    raise io.staged_write_error(exc, staging, out) from None
                try:
                    check_out_dir(out, overwrite, arg)
                    # Ctrl-C and SIGTERM wait from the move until published() has run: a stop just after the move
                    # said RUN_DIR was untouched (it held the new run), and left the earlier run set aside.
                    held.hold()
                    earlier = io.replace_folder(staging, out, replace_files=overwrite)
                except Exception as exc:
                    kept = io.hidden_dir_beside(out, "unpublished")
                    os.replace(staging, kept / "run")
                    io.sync_folder(kept)
                    where = f"the finished run is in {kept / 'run'}: move it where you want it"
                    try:
                        kept_aside()
                    except Exception as failed:   # (its own failure must not hide where the run is)
                        where += f" ({type(failed).__name__} after it: {failed})"
                    if isinstance(exc, FileExistsError):   # arrived after check_out_dir looked (another fit's run)
                        how = "--overwrite" if arg.startswith("--") else "overwrite=True"
                        exc = ValueError(f"{arg} {out}: holds files now; name another folder, or pass {how} to "
                                         "replace an earlier run")
                    if isinstance(exc, ValueError):
                        raise ValueError(f"{exc} ({out} changed while the run was made); {where}") from None
                    raise io.WriteError(f"cannot move the finished run into {out} ({exc}); {where}") from exc
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
            published()   # before the earlier run is deleted: a stop during that deletion finds the new run in place
    finally:
        if earlier is not None:
            io.delete_folder(earlier, out)


def checkpoint_dir(out: pathlib.Path) -> pathlib.Path:
    """Where stage 2 keeps its per-epoch checkpoint: beside RUN_DIR, since RUN_DIR itself is published whole."""
    return out.parent / (out.name + CHECKPOINT_SUFFIX)


# ---------------------------------------------------------------------------------------------------------- reading

def model_path(run_dir: PathLike, arg: str = "--model") -> pathlib.Path:
    """The model file of a RUN_DIR (or the model file itself)."""
    p = pathlib.Path(run_dir).expanduser()
    if p.is_dir() and (p / MODEL_FILE).exists():
        return p / MODEL_FILE
    if p.is_file():   # RUN_DIR/model, or a file of LAIC.save's under any name (LAIC.load checks it)
        return p
    if not p.exists() and (stranded := stranded_run(p)) is not None:
        raise FileNotFoundError(f"{arg} {run_dir}: {stranding(p, stranded)}")
    raise FileNotFoundError(f"{arg} {run_dir}: no fitted model there (expected RUN_DIR/model, written by "
                            f"`laic fit --out RUN_DIR`){unfinished_stage2(p)}")


def unfinished_stage2(out: pathlib.Path) -> str:
    """``"; how to finish it"`` where a `laic fit --images --out OUT` stopped in stage 2 and its checkpoint waits
    beside OUT (the readers of a run said only that OUT held none), else nothing."""
    if not any(checkpoint_dir(out).glob("*.pt")):
        return ""
    return (f"; {checkpoint_dir(out)} holds the checkpoint of a `laic fit --images` into it that stopped in stage 2: "
            "rerun that fit with --resume to finish the run")


def recorded_encoder(model: PathLike) -> Optional[Dict]:
    """The image encoder (model and weights digest) that run.json records beside a model (a RUN_DIR or its model
    file); None where there is no run.json (a model saved by LAIC.save alone)."""
    p = pathlib.Path(model).expanduser()
    info = (p if p.is_dir() else p.parent) / "run.json"
    return _run_info(info).get("encoder") if info.is_file() else None


def read_labels(run_dir: PathLike, arg: str = "RUN_DIR") -> np.ndarray:
    path = pathlib.Path(run_dir).expanduser() / "labels.npy"
    if not path.parent.exists() and (stranded := stranded_run(path.parent)) is not None:
        raise FileNotFoundError(f"{arg} {run_dir}: {stranding(path.parent, stranded)}")
    if not path.is_file():
        given = pathlib.Path(run_dir).expanduser()
        # (`laic evaluate --run` alone has --pred, for a labels file, not the run's model file; `laic report` takes
        # a folder only)
        alone = ", or pass the file itself as --pred" if arg == "--run" and given.suffix == ".npy" else ""
        hint = f"; {arg} takes the run's folder ({given.parent}){alone}" if given.is_file() else ""
        raise FileNotFoundError(f"{arg} {run_dir}: no labels.npy there; pass a folder written by `laic fit` or "
                                f"laic.run_dir.write_run_dir{hint}{unfinished_stage2(given)}")
    return io.read_labels(path, "labels.npy", non_negative=True)


# How many times read_run reads a RUN_DIR that a fit replaced while it read, before it gives up.
READ_ATTEMPTS = 3


def read_run(run_dir: PathLike, features: Optional[PathLike] = None) -> Run:
    """Load a RUN_DIR (see the module doc). The embeddings come from ``features`` when given (refused unless they are
    the run's own: its features.npy, or those run.json records a fingerprint of), else RUN_DIR's features.npy, else
    run.json's "features"; the image paths from images.txt (made absolute), else from the file list `laic embed`
    keeps beside its features (None when neither exists).

    Its files are read one after the other: a fit publishing into RUN_DIR meanwhile (``laic fit --overwrite``)
    paired one run's labels with the other's cluster names. The folder is read again where it was replaced."""
    return read_run_and_identity(run_dir, features)[0]


def with_images_moved(run: Run, moved_from: PathLike, moved_to: PathLike) -> Run:
    """``run`` with its images under the folder ``moved_from`` (as the run names them) looked for under ``moved_to``
    instead, each at the same path below it: the images moved since the fit (`laic report --images-moved FROM TO`).
    Refused where no image of the run lies under FROM, or none of a sample of those is found under TO."""
    arg = "images_moved (--images-moved FROM TO)"
    if run.image_paths is None:
        raise ValueError(f"{arg}: the run names no images (it was fitted on features alone); leave it out")
    old, new = (pathlib.Path(p).expanduser().absolute() for p in (moved_from, moved_to))
    if not new.is_dir():
        raise FileNotFoundError(f"{arg}: TO {moved_to} is not a folder; pass the folder the images are in now")

    def moved(path: pathlib.Path) -> pathlib.Path:
        parts = path.absolute().parts
        return new.joinpath(*parts[len(old.parts):]) if parts[:len(old.parts)] == old.parts else path

    paths = [moved(p) for p in run.image_paths]
    under = [i for i, (before, now) in enumerate(zip(run.image_paths, paths)) if now is not before]
    if not under:
        common = os.path.commonpath([str(p.absolute()) for p in run.image_paths])
        raise ValueError(f"{arg}: none of the run's images lies under FROM {moved_from} (they all lie under "
                         f"{common}); pass the folder they were in at the fit")
    sample = under[::max(1, len(under) // 1000)]   # (a stat per image: seconds at ImageNet's 1.28M)
    if not any(paths[i].is_file() for i in sample):
        raise FileNotFoundError(f"{arg}: the run's images are not under TO {moved_to} (e.g. "
                                f"{run.image_paths[under[0]]} is not at {paths[under[0]]}); pass the folder that "
                                f"holds now what {moved_from} held")
    return replace(run, image_paths=paths,
                   image_folder=moved(run.image_folder) if run.image_folder is not None else None)


def read_run_and_identity(run_dir: PathLike, features: Optional[PathLike] = None) -> Tuple[Run, Tuple[int, int]]:
    """:func:`read_run`, and the identity (laic.io.folder_identity) of the RUN_DIR it read: a caller that writes into
    RUN_DIR later (laic report) checks it is still that folder."""
    run_dir = pathlib.Path(run_dir).expanduser()
    for _ in range(READ_ATTEMPTS):
        before = io.folder_identity(run_dir)
        try:
            run = _read_run_once(run_dir, features)
        except (OSError, ValueError):
            if io.folder_identity(run_dir) == before:
                raise
            continue
        if io.folder_identity(run_dir) == before:
            return run, before
    raise ValueError(f"RUN_DIR {run_dir}: replaced {READ_ATTEMPTS} times while it was read (a fit publishing "
                     "there?); read it again once that is done")


def _read_run_once(run_dir: pathlib.Path, features: Optional[PathLike]) -> Run:
    labels = read_labels(run_dir)
    info = _run_info(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    source = features
    if source is not None:
        _check_fitted_on(source, info.get("features_fingerprint"), info.get("features"))
        if (run_dir / "features.npy").is_file():
            _check_the_runs_own(source, run_dir / "features.npy")
    if source is None and (run_dir / "features.npy").is_file():
        source = run_dir / "features.npy"
    if source is None and info.get("features"):
        source = _existing(io.text_path(info["features"]), run_dir)
        if source is not None:
            _check_unchanged(source, info.get("features_fingerprint"))
    if source is None and info.get("features"):
        raise FileNotFoundError(f"RUN_DIR {run_dir}: the features it was fitted on ({info['features']}, as run.json "
                                "records them) are not there any more; pass them with --features F.npy|DIR")
    if source is None:
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no image features found (features.npy, or run.json's "
                                "\"features\"); pass --features F.npy|DIR")
    feats, sidecar = read_features(source, "--features" if features is not None else
                                   "RUN_DIR's" if source == run_dir / "features.npy" else "run.json's \"features\"")
    if len(feats) != len(labels):
        raise ValueError(f"the features ({source}) have {len(feats)} rows but labels.npy has {len(labels)}; they "
                         "must describe the same images")
    paths = None
    if (run_dir / "images.txt").is_file():
        paths = [_resolve(io.text_path(ln), run_dir) for ln in io.read_lines(run_dir / "images.txt")]
    elif sidecar and sidecar.get("files"):
        paths = [pathlib.Path(io.text_path(p)) for p in sidecar["files"]]
    if paths is not None and len(paths) != len(labels):
        raise ValueError(f"the image list has {len(paths)} paths but labels.npy has {len(labels)}; one path per image")
    k, names = _cluster_names(run_dir, int(labels.max()) + 1)
    images = _resolve(io.text_path(info["images"]), run_dir) if info.get("images") else None
    k_search = info.get("k_search") if isinstance(info.get("k_search"), dict) else None
    return Run(labels, feats, paths, names, k, images, k_search)


def _check_unchanged(source: pathlib.Path, recorded: Optional[Dict]) -> None:
    """The features file run.json names must still be the one the run was fitted on (a file rewritten since, with
    other rows of the same shape, would be drawn under the run's labels without a word). Runs written before
    run.json recorded a fingerprint are not checked."""
    if recorded is not None and not fingerprint_matches(source, recorded, "run.json's \"features\""):
        raise ValueError(f"the features run.json names ({source}) have changed since the fit (other rows, shape or "
                         "dtype); put back the features the run was fitted on (or pass them, moved elsewhere, with "
                         "--features F.npy|DIR), or fit again")


def _check_fitted_on(source: PathLike, recorded: Optional[Dict], fitted_on: Optional[str]) -> None:
    """Features given for a run must be the ones it was fitted on (a file of another set with as many rows would
    put its images under the run's labels), where run.json records their fingerprint."""
    if recorded is not None and not fingerprint_matches(source, recorded):
        raise ValueError(f"--features {source} are not the features this run was fitted on (run.json records "
                         f"{fitted_on or 'another file'}: {_shape_and_dtype(recorded)}; {_unlike(source, recorded)})"
                         "; pass those")


def _check_the_runs_own(source: PathLike, own: pathlib.Path) -> None:
    """A run that holds its features (features.npy: `laic fit --images`, write_run_dir) records no fingerprint of
    them in run.json; features given for it must be those same ones (another set with as many rows, even of another
    width, had its typical images and map drawn under the run's labels)."""
    held = features_fingerprint(own, "RUN_DIR's")
    if features_fingerprint(source) != held:
        raise ValueError(f"--features {source}: are not the features this run holds ({own}: {_shape_and_dtype(held)}; "
                         f"{_unlike(source, held)}); leave --features out, and the run's own are drawn")


def _shape_and_dtype(fingerprint: Dict) -> str:
    return f"{' x '.join(str(n) for n in fingerprint['shape'])} {fingerprint['dtype']}"


def _unlike(source: PathLike, recorded: Dict) -> str:
    """How the features at ``source`` differ from those ``recorded``, for a refusal: their shape or dtype (the same
    values in float32 for a float16 fit's were refused as "other rows"; byte order aside), else their values."""
    shape, dtype = features_layout(source)
    if (shape, dtype) != (recorded["shape"], str(in_byte_order(np.dtype(recorded["dtype"])))):
        return f"these are {_shape_and_dtype({'shape': shape, 'dtype': dtype})}"
    return "these hold other values"


def _run_info(path: pathlib.Path) -> Dict:
    """run.json, its shape checked where the readers rely on it: a damaged one is a line that names it, not a
    traceback from deep in the report (a list, or a number for a path)."""
    info = io.read_json(path)
    if not isinstance(info, dict):
        _damaged(path, "not a JSON object")
    for key in ("features", "images"):
        if info.get(key) is not None and not isinstance(info[key], str):
            _damaged(path, f'its "{key}" is not a path')
    recorded = info.get("features_fingerprint")
    shape = recorded.get("shape") if isinstance(recorded, dict) else None
    if recorded is not None and not (isinstance(shape, list) and len(shape) == 2 and all(map(checks.is_int, shape))
                                     and isinstance(recorded.get("dtype"), str)):
        _damaged(path, 'its "features_fingerprint" is not {"shape": [N, D], "dtype": ..., "sha256": ...}')
    return info


def _cluster_names(run_dir: pathlib.Path, k: int):
    """(K, names per cluster) from clusters.json, at least ``k`` clusters; no names without it. Its shape is checked
    as run.json's is (a missing "cluster", one beyond K, or a list for the file were tracebacks)."""
    path = run_dir / "clusters.json"
    if not path.is_file():
        return k, [[] for _ in range(k)]
    info = io.read_json(path)
    if not isinstance(info, dict):
        _damaged(path, "not a JSON object")
    if "k" in info and not (checks.is_int(info["k"]) and info["k"] >= 1):
        _damaged(path, f'its "k" is {info["k"]!r}, not a number of clusters')
    k = max(k, info.get("k", k))
    entries = info.get("clusters", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        _damaged(path, 'its "clusters" is not a list of {"cluster": c, "names": [...]}')
    names: List[List[str]] = [[] for _ in range(k)]
    for entry in entries:
        cluster, its_names = entry.get("cluster"), entry.get("names", [])
        if "cluster" not in entry:
            _damaged(path, 'an entry of its "clusters" has no "cluster"')
        if not (checks.is_int(cluster) and 0 <= cluster < k):
            _damaged(path, f'a "cluster" is {cluster!r}, not a cluster id from 0 to {k - 1}')
        if not (isinstance(its_names, list) and all(isinstance(name, str) for name in its_names)):
            _damaged(path, f'the "names" of cluster {cluster} are not a list of nouns')
        names[cluster] = list(its_names)
    return k, names


def _damaged(path: pathlib.Path, why: str) -> NoReturn:
    raise ValueError(f"{path}: damaged, not what laic writes there ({why}); fit the run again (or write it again "
                     "with laic.run_dir.write_run_dir)")


def _resolve(path: str, base: pathlib.Path) -> pathlib.Path:
    """A path of the run (images.txt, run.json's "images"), relative ones to RUN_DIR, made absolute: assignments.csv
    then lists the same paths from whichever folder `laic report` ran in. Not os.path.abspath, which drops a folder
    before a ".." that a link may stand for."""
    p = pathlib.Path(path).expanduser()
    return p if p.is_absolute() else (base / p).absolute()


def _existing(path: str, run_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """A path run.json records: absolute since `laic fit` records it so; a run written before then holds it relative
    to where the fit ran. Try it as it is, then relative to RUN_DIR."""
    for candidate in (pathlib.Path(path).expanduser(), run_dir / path):
        if candidate.exists():
            return candidate
    return None
