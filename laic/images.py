"""Image files: discovery in a folder, and parallel decoding that skips unreadable files instead of crashing.

Used by laic.embed (encoding a folder) and by stage 2 (fine-tuning on the same images).
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import pathlib
import re
import stat
import sys
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from laic_kernels import checks

from .interrupts import ctrl_c_held, stop_if_interrupted
from .io import MachineError
from .runtime import first_line

PathLike = Union[str, os.PathLike]

# Photo and scan formats PIL reads without plugins; matched case-insensitively (.jfif: JPEGs as browsers save them;
# .avif: as phones save them; JPEG 2000, QOI, PSD and PCX too; icons are left out). A PIL built without a format's
# library (AVIF, JPEG 2000) cannot read those files: they are skipped and reported as unreadable, not left out unseen.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".avifs", ".jp2", ".j2k",
                              ".jpx", ".jpf", ".j2c", ".qoi", ".psd", ".pcx"})

# Photos PIL cannot decode without plug-ins: a phone's HEIC, cameras' raw files. Left out, with a word (a phone's
# folder may be half HEIC, and they were left out without one).
UNDECODED_PHOTO_EXTENSIONS = frozenset({".heic", ".heif", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2",
                                        ".raf"})


# Folders that operating systems and NAS boxes make among a user's files, holding no image of theirs: a file
# system's lost+found (a disk's top folder would be refused as unreadable), Synology's @eaDir (five thumbnails of
# every photo: near-copies that would fill each other's neighbour lists) and recycle bins (#recycle; QNAP's @Recycle;
# Windows' $RECYCLE.BIN), Windows' System Volume Information, macOS zip archives' __MACOSX (resource forks).
# Matched in any case (Windows writes $Recycle.Bin as often as $RECYCLE.BIN).
SYSTEM_FOLDERS = frozenset({"lost+found", "@eadir", "#recycle", "@recycle", "$recycle.bin",
                            "system volume information", "__macosx"})


def list_images(folder: PathLike, arg: str = "image folder") -> List[pathlib.Path]:
    """All image files under ``folder`` (recursive, following symlinks, common extensions, hidden files and folders
    and the systems' own folders (SYSTEM_FOLDERS: thumbnails, recycle bins) left out), as absolute paths sorted by
    their path relative to ``folder``, so the order is the same on every machine; a file reached under two names
    (links) is listed once, under the first. ``arg``: how errors name the folder (a command's --images)."""
    root = pathlib.Path(folder).expanduser()
    if not root.exists():
        raise ValueError(f"{arg} {str(root)!r} does not exist; pass the folder that holds your images")
    if not root.is_dir():
        raise ValueError(f"{arg} {str(root)!r} is not a folder; pass the folder that holds your images")
    root = pathlib.Path(os.path.abspath(root))  # absolute, symlinks kept: paths come back as the user knows them
    found, visited, unreadable, identity, undecoded = [], set(), [], {}, []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop, or a folder linked twice: read each folder once
            dirnames[:] = []
            continue
        visited.add(real)
        # Hidden folders hold caches and tool metadata (.git, our own .features.shards), never the user's images;
        # nor do the systems' own folders (SYSTEM_FOLDERS). Sorted (by the names' bytes, as the files below):
        # os.walk descends in this order, so a folder linked twice is always listed under the same name, whatever
        # the locale.
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".") and d.lower() not in SYSTEM_FOLDERS),
                             key=os.fsencode)
        for name in filenames:
            path = pathlib.Path(dirpath, name)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in UNDECODED_PHOTO_EXTENSIONS:
                undecoded.append(path)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                kind = _file_kind(path)
                if isinstance(kind, tuple):
                    found.append(path)
                    identity[path] = kind
                elif isinstance(kind, OSError) and not any(e.filename == dirpath for e in unreadable):
                    # A folder that may be listed but not entered (r-- without x): each of its files fails stat,
                    # and os.path.isfile said "not a file" of all of them, so they were left out without a word.
                    unreadable.append(OSError(kind.errno, kind.strerror, dirpath))
    if unreadable:   # its images would be left out without a word
        raise ValueError(f"{arg} {str(root)!r}: cannot read {len(unreadable)} folder(s) in it, e.g. "
                         f"{unreadable[0].filename!r} ({unreadable[0].strerror or unreadable[0]}); make them readable, "
                         "or move them out of it")
    # laic's file lists (images.txt, files.txt) hold one path a line: a name with a line break would be two.
    broken = [p for p in found if "\n" in str(p) or "\r" in str(p)]
    if broken and _first_time_left_out(root, broken):
        from .runtime import warn_at_caller

        warn_at_caller(f"left out {len(broken)} image(s) whose names hold a line break (laic lists files one a "
                       f"line); rename them to include them: {', '.join(repr(str(p)) for p in broken[:3])}")
    if undecoded and _first_time_left_out(root, undecoded):
        from .runtime import warn_at_caller

        undecoded.sort(key=lambda p: os.fsencode(str(p)))
        warn_at_caller(f"left out {len(undecoded)} photo(s) in a format PIL cannot decode here (HEIC, camera raw): "
                       f"{', '.join(repr(str(p)) for p in undecoded[:3])}{', ...' if len(undecoded) > 3 else ''}; "
                       "convert them to JPEG or PNG to include them")
    left_out = set(broken)
    found = [p for p in found if p not in left_out]
    if not found:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"{arg} {str(root)!r} holds no image files (looked for {kinds}, recursively); "
                         f"point it at the folder that holds your images")
    # By the names' bytes: the same folder lists in the same order under every locale (a str's order is the locale's
    # decoding's), so that a cache of its features is the same cache wherever it is read.
    found = sorted(found, key=lambda p: os.fsencode(p.relative_to(root)))
    return _each_file_once(root, found, identity)


def _each_file_once(root: pathlib.Path, found: List[pathlib.Path],
                    identity: Dict[pathlib.Path, tuple]) -> List[pathlib.Path]:
    """``found`` with each file once, under its first name (a link to a file listed already, or a hard link, is left
    out, as a folder linked twice is read once): the same image twice was two rows, each the other's nearest
    neighbour. Said once per folder, with an example."""
    first_name, kept, repeats = {}, [], []
    for path in found:
        key = identity[path]
        if key and key in first_name:   # () : a link whose target cannot be looked at, kept as it is
            repeats.append((path, first_name[key]))
            continue
        first_name.setdefault(key, path)
        kept.append(path)
    if repeats and _first_time_left_out(root, [p for p, _ in repeats]):
        from .runtime import warn_at_caller

        link, target = repeats[0]
        warn_at_caller(f"left out {len(repeats)} image file(s) that are links to a file listed already, e.g. "
                       f"{str(link)!r} (the same file as {str(target)!r}): each image is clustered once; copy a file "
                       "to have it twice")
    return kept


# The folders and names already reported: `laic fit --images` lists the folder, then embedding lists it again, and
# the same names were reported twice. A folder's listing changed since is reported again.
_REPORTED_LEFT_OUT: set = set()


def _first_time_left_out(root: pathlib.Path, broken: List[pathlib.Path]) -> bool:
    """Whether to say that ``broken`` (files of ``root``) were left out: once a process, and under a process group
    by process 0 alone (every process lists the same folder, their listings compared: each said it)."""
    from .distributed.world import is_main

    if not is_main():
        return False
    key = (str(root), tuple(map(str, broken)))
    first = key not in _REPORTED_LEFT_OUT
    _REPORTED_LEFT_OUT.add(key)
    return first


def _file_kind(path: pathlib.Path):
    """A regular file's identity, ``(st_dev, st_ino)`` (a link followed), None for anything else (a folder, a link
    to nothing or in a loop: left out, like other files), or the OSError where its folder may not be entered
    (permission). A link whose target lies in a folder that may not be entered counts as a file of unknown identity,
    ``()``: reading it then reports it unreadable, with the reason, and its own folder is fine."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        try:
            return () if stat.S_ISLNK(os.lstat(path).st_mode) else exc
        except OSError:
            return exc


def files_stat(paths: Sequence[PathLike]) -> np.ndarray:
    """Each file's size in bytes and modification time in ns, int64 ``[len(paths), 2]``; ``(-1, -1)`` for one that
    cannot be read by ``os.stat`` (missing). What :func:`files_digest` hashes, and what an embedding cache keeps of
    each file, so that an update (``laic embed --update``) tells the files changed since from the others."""
    stat_rows = np.full((len(paths), 2), -1, np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        stat_rows[i] = st.st_size, st.st_mtime_ns
    return stat_rows


def files_digest(paths: Sequence[PathLike], stat_rows: Optional[np.ndarray] = None) -> str:
    """The files by name, size and modification time (a missing one as missing): a file rewritten under its name
    changes it. Identifies the images an embedding cache or a stage-2 checkpoint was made from. ``stat_rows``: the
    paths' :func:`files_stat`, when it is at hand (read here otherwise)."""
    import hashlib

    if stat_rows is None:
        stat_rows = files_stat(paths)
    h = hashlib.blake2b(digest_size=16)
    for p, (size, mtime_ns) in zip(paths, stat_rows.tolist()):
        # os.fsencode: a file name that is not UTF-8 is hashed as its bytes (str.encode would refuse it).
        h.update(os.fsencode(p) + (f"\t{size}\t{mtime_ns}\n".encode() if size >= 0 else b"\tmissing\n"))
    return h.hexdigest()


# What a broken, truncated or non-image file raises while PIL decodes it. A programming error (TypeError, ...) is not
# in this list on purpose: it must surface, not turn every image into a "skipped" one.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def open_rgb(path: PathLike):
    """Decode ``path`` fully (not lazily, so truncation is found here) into an RGB PIL image, turned upright by its
    EXIF orientation (a phone photo stored sideways is shown upright by every viewer: so it is embedded and drawn)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            _check_proportions(image.size)
            image.load()
            # PIL reads 16-bit PGM/PPM as 32-bit mode I, its values rescaled to 0..65535; a 16-bit greyscale PNG is
            # mode I;16 from Pillow 10.3 on and I before it (no PNG holds 32-bit greyscale: stretched to its range).
            sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PPM", "PNG"))
            return _eight_bit(_upright(image), sixteen_bit).convert("RGB")
    except RuntimeError as exc:
        # Pillow's AVIF decoder (libavif) says a damaged or unsupported file with a RuntimeError ("Failed to decode
        # image: ..."): one such photo stopped laic embed, fit --images and predict --images with a traceback.
        raise OSError(f"cannot decode: {first_line(exc)}") from exc


# The longest side an image may have, in lengths of its shortest. A model's preprocessing scales the shortest side
# to its input size before cropping: a strip of 1 x 20,000 pixels (141 bytes) became 224 x 4.5 million, 4.8 GB, past
# PIL's pixel limit, which looks at the file only (a MemoryError then stopped the whole run). A panorama is ~12:1.
MAX_SIDE_RATIO = 100


def _check_proportions(size) -> None:
    width, height = size
    if max(width, height) > MAX_SIDE_RATIO * max(1, min(width, height)):
        raise ValueError(f"{width} x {height} pixels: one side over {MAX_SIDE_RATIO} times the other (scaled to a "
                         "model's input, such a strip takes gigabytes); crop it")


# EXIF orientation -> the transposition that shows the image upright (the TIFF/EXIF standard's 8 orientations).
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}


def _upright(image):
    """``image`` turned by its EXIF orientation. Not ImageOps.exif_transpose: it also rewrites the EXIF block, and a
    camera's mistyped tag (text in an integer tag) raised struct.error there, which stopped the whole run. EXIF that
    cannot be read at all (any error: it is the file's metadata, not its pixels) counts as upright."""
    from PIL import Image

    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- a damaged EXIF block, whatever PIL raises for it, leaves the pixels readable
        orientation = 1
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(getattr(Image.Transpose, method)) if method else image


def _eight_bit(image, sixteen_bit: bool):
    """16-bit and 32-bit greyscale (PIL modes I;16*, I, F) in 8 bits: convert("RGB") would clip them to white.
    16-bit values (``sixteen_bit``) are scaled by their range (65535 -> 255); 32-bit ones, which have no fixed
    range, by the image's (one value throughout: mid-grey)."""
    import numpy as np
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    if sixteen_bit:
        # round(v * 255 / 65535) = round(v / 257) in integers: a uint32 copy, not five float64 ones (a 6000 x 6000
        # TIFF took 1 GB more than its 8-bit twin).
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    # One float64 copy, worked in place (six copies before: a 6000 x 6000 float TIFF took 1.4 GB in a loader worker);
    # the same operations in the same order, so the same bytes.
    values = np.array(image, dtype=np.float64)
    finite = np.isfinite(values)
    low, high = ((float(values.min(where=finite, initial=np.inf)), float(values.max(where=finite, initial=-np.inf)))
                 if finite.any() else (0.0, 0.0))
    del finite
    np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
    if high > low:
        values -= low
        values /= high - low
        values *= 255.0
    else:
        values.fill(128.0)
    np.round(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))


class ImageDataset(Dataset):
    """``dataset[i]`` is ``(transform(image_i), i)``, or ``(None, i)`` when file i cannot be decoded; pair it with
    :func:`collate_readable`, which drops the unreadable items from the batch and reports their indices."""

    def __init__(self, paths: Sequence[PathLike], transform: Callable):
        self.paths = [pathlib.Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def path_of(self, index: int) -> pathlib.Path:
        """The file item ``index`` reads (what :class:`WorkerLoader` names when a worker dies reading it)."""
        return self.paths[index]

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int]:
        from PIL import Image

        try:
            image = open_rgb(self.paths[index])
        except DECODE_ERRORS + (Image.DecompressionBombError,):
            return None, index
        # Outside the try: a custom preprocess's own error is a bug to see, not an unreadable file (it was counted as
        # one, and reported "readable now", which the image always was).
        return self.transform(image), index


def collate_readable(items) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[int]]:
    """``(images [B', C, H, W] or None when none was readable, indices [B'] of those images, unreadable indices)``."""
    good = [(x, i) for x, i in items if x is not None]
    bad = [i for x, i in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, bad


def make_loader(dataset: ImageDataset, *, num_workers: int = 2, pin_memory: bool = False,
                **loader_kwargs) -> DataLoader:
    """A DataLoader that decodes in ``num_workers`` processes and skips unreadable files (see collate_readable).
    Without a sampler in ``loader_kwargs`` it keeps dataset order (shuffle=False), so results line up with paths.
    A generator of its own: a DataLoader draws its workers' base seed from torch's global stream otherwise (with
    no workers too), and laic leaves the caller's stream alone."""
    # (numpy's ints too: np.int64(1) was refused as "must be an int")
    checks.int_in_range("num_workers", num_workers, 0, 1024, " (0 decodes in the main process)")
    loader_kwargs.setdefault("generator", torch.Generator())
    return WorkerLoader(dataset, num_workers=int(num_workers), pin_memory=pin_memory, collate_fn=collate_readable,
                        worker_init_fn=start_worker, **loader_kwargs)


class WorkerDied(MachineError):
    """A worker process reading images died: killed by the system for want of memory (a very large image), or
    crashed by a file the image library cannot take. The message names the file it was reading."""


class WorkerLoader(DataLoader):
    """torch's DataLoader, whose iterator starts its worker processes whole or stops those it started. torch starts
    them one by one in the iterator's constructor, and an exception there left them running for good, about 80 MB
    each (their watchdog only asks whether the parent lives): a Ctrl-C during a fork (which takes a while from a
    large process: a notebook's "interrupt"), 13 workers after 54 interrupted embeddings in one process (a
    helper's hunt), or a fork that fails for want of memory. A Ctrl-C waits for the constructor's end
    (:func:`laic.interrupts.ctrl_c_held`); after any other failure the workers started are stopped.

    Made within :func:`worker_deaths_named`, of a dataset that names its items' files (``dataset.path_of(item)``),
    its workers note what they read, for the block to name."""

    def __init__(self, dataset, *args, num_workers: int = 0, **kwargs):
        if num_workers > 0 and hasattr(dataset, "path_of") and _WATCHING:
            dataset = _WatchedReads(dataset, num_workers)
            _WATCHING[-1].append(dataset)
        super().__init__(dataset, *args, num_workers=num_workers, **kwargs)

    def __iter__(self):
        before = set(multiprocessing.active_children())
        try:
            with ctrl_c_held():
                return super().__iter__()
        except BaseException:
            started = set(multiprocessing.active_children()) - before
            for worker in started:
                worker.terminate()
            for worker in started:
                worker.join(timeout=10)
            raise


class _WatchedReads(Dataset):
    """``dataset``, each of whose items is noted while a worker process reads it: each worker's pid and item in
    memory it shares with the main process (item -1 between items), so that a worker's death names its file."""

    def __init__(self, dataset, num_workers: int):
        self.dataset = dataset
        self.slots = multiprocessing.RawArray("q", [-1] * (2 * num_workers))   # (pid, item) of each worker

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return self.dataset[item]
        slot = 2 * worker.id
        self.slots[slot], self.slots[slot + 1] = os.getpid(), item
        try:
            return self.dataset[item]
        finally:
            self.slots[slot + 1] = -1

    def read_by(self, pids: Sequence[int]) -> List[pathlib.Path]:
        """The files the workers of ``pids`` are reading."""
        pairs = zip(self.slots[0::2], self.slots[1::2])
        return [pathlib.Path(self.dataset.path_of(item)) for pid, item in pairs if pid in pids and item >= 0]

    def knows(self, pids: Sequence[int]) -> bool:
        """Whether any of ``pids`` is one of these workers (one that has read an item)."""
        return any(pid in pids for pid in self.slots[0::2])

    def pids(self) -> List[int]:
        """The workers that have read an item."""
        return [pid for pid in self.slots[0::2] if pid > 0]


# The watched datasets of the loaders made in each open worker_deaths_named() block, innermost last. Held by the
# block: a loader made in a generator (laic.embed's) is gone, its workers too, before the error reaches the block.
_WATCHING: List[List[_WatchedReads]] = []


@contextlib.contextmanager
def worker_deaths_named() -> Iterator[None]:
    """Within, a DataLoader worker's death is a :class:`WorkerDied` naming the file it was reading (when its loader
    is a :class:`WorkerLoader` made in the block, of a dataset that names its files). torch said only "DataLoader
    worker (pid 123) is killed by signal: Killed.", under a traceback, and a folder of 100,000 images left the user
    to find the one. Around the whole loop that reads a loader: torch raises that RuntimeError from its SIGCHLD
    handler, wherever the main process is when the worker dies (encoding a batch, writing a shard), not only in
    ``next()``; and a worker killed while it handed a batch over is first a ConnectionResetError (or EOFError) of
    that handover (1 run in 10 on a busy machine), told from a lost peer by the worker's exit."""
    watched: List[_WatchedReads] = []
    _WATCHING.append(watched)
    try:
        yield
    except RuntimeError as exc:
        pids = _dead_worker_pids(str(exc))
        if pids is None:
            raise
        stop_if_interrupted()   # a Ctrl-C or SIGTERM that reached the workers first: the stop, not a death
        raise WorkerDied(_death_message(first_line(exc), *_what_they_read(pids))) from exc
    except (ConnectionError, EOFError) as exc:
        stop_if_interrupted()
        try:
            dead = _dead_workers([pid for block in _WATCHING for reads in block for pid in reads.pids()])
        except RuntimeError as late:   # torch's SIGCHLD handler meanwhile: its words
            pids = _dead_worker_pids(str(late))
            if pids is None:
                raise
            dead = {pid: first_line(late) for pid in pids}
        if not dead:
            raise
        raise WorkerDied(_death_message("; ".join(set(dead.values())), *_what_they_read(list(dead)))) from exc
    finally:
        _WATCHING.remove(watched)


def _what_they_read(pids: Sequence[int]) -> Tuple[List[pathlib.Path], bool]:
    """The files the workers of ``pids`` were reading (of the loaders of every open block: one made in an outer block
    too), and whether they were known and reading none."""
    every = [reads for block in _WATCHING for reads in block]
    files = [path for reads in every for path in reads.read_by(pids)]
    return files, not files and any(reads.knows(pids) for reads in every)


def _dead_workers(pids: Sequence[int], wait_s: float = 2.0) -> Dict[int, str]:
    """Of these child processes, those that have ended (within ``wait_s``: the kill that broke a handover may not
    have ended the process yet), each with torch's words for it; not reaped (WNOWAIT): torch's own bookkeeping
    still sees them."""
    import signal
    import time

    deadline = time.monotonic() + wait_s
    while True:
        dead = {}
        for pid in set(pids):
            try:
                ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:   # reaped: a worker of a loader that ended, not this one's
                continue
            if ended is not None and ended.si_pid == pid:
                how = (f"exited unexpectedly with exit code {ended.si_status}" if ended.si_code == os.CLD_EXITED
                       else f"is killed by signal: {signal.strsignal(ended.si_status)}")
                dead[pid] = f"DataLoader worker (pid {pid}) {how}"
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def worker_death_said(exc: BaseException) -> Optional[str]:
    """For a command's one line: torch's RuntimeError for a dead worker that surfaced outside a
    :func:`worker_deaths_named` block (its SIGCHLD handler fired while the error was on its way out, in a
    ``finally``), said as the WorkerDied it interrupted where there is one, else in general words; None for any other
    error."""
    if not isinstance(exc, RuntimeError) or _dead_worker_pids(str(exc)) is None:
        return None
    seen = exc.__context__
    while seen is not None and not isinstance(seen, WorkerDied):
        seen = seen.__context__
    return str(seen) if seen is not None else _death_message(first_line(exc), [], False)


# torch's words for a dead worker: "DataLoader worker (pid 123) is killed by signal: Killed.", "... (pid 123) exited
# unexpectedly with exit code 1. Details are lost ...", "DataLoader worker (pid(s) 123, 456) exited unexpectedly".
_DEAD_WORKERS = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([0-9, ]+)\)")


def _dead_worker_pids(message: str) -> Optional[List[int]]:
    """The pids torch's message names, or None for another error (one about a worker of another process, under
    torchrun, starts with that process's words: laic.distributed.failure says it)."""
    found = _DEAD_WORKERS.match(message)
    return None if found is None else [int(pid) for pid in found.group(1).replace(",", " ").split()]


def _death_message(torch_words: str, files: List[pathlib.Path], idle: bool) -> str:
    """``idle``: the worker was known, and reading no image."""
    said = torch_words.split(". ")[0].rstrip(".")
    fewer = ("rerun with fewer worker processes, which need less memory together (num_workers; `laic embed "
             "--workers`, `laic fit --stage2 num_workers=`)")
    if said.endswith("Bus error"):   # torch's next words: "... workers are out of shared memory ..."
        return (f"a worker process reading images died ({said}): out of shared memory (/dev/shm); raise its limit "
                f"(a container's --shm-size), or {fewer}")
    if idle:
        return (f"a worker process reading images died ({said}) between two images: the machine may be short of "
                f"memory; free some, or {fewer}")
    if not files:
        return (f"a worker process reading images died ({said}): the machine may be short of memory, or an image "
                f"crashes the image library; {fewer}")
    named = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return (f"a worker process reading images died ({said}) while it was reading {named}: the machine may be short "
            f"of memory, or that image needs more than is free (a very large one) or crashes the image library; "
            f"{fewer}. If it dies on the same image again, move that image out of the folder (a changed folder is "
            f"embedded anew)")


def start_worker(worker_id: int) -> None:
    """The ``worker_init_fn`` of laic's DataLoaders: :func:`stop_quietly_on_sigterm`, and PIL's notices of images it
    decodes all the same left unsaid (:func:`quiet_pil_notices`)."""
    stop_quietly_on_sigterm(worker_id)
    quiet_pil_notices()


def quiet_pil_notices() -> None:
    """Ignore PIL's warnings about images it decodes all the same: a size within twice its pixel limit (beyond, it
    refuses: the image is skipped with the reason), a palette's transparency given as bytes. From the loader's
    worker processes they reached the terminal as Python's two-line warnings naming PIL's source line, not the image,
    once in each worker of each stage-2 epoch, --quiet or not. In a worker (a process of laic's own) for its whole
    life: a ``catch_warnings`` around each image reset Python's record of the warnings shown, and every other
    warning was then shown once an image instead of once."""
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)


def stop_quietly_on_sigterm(worker_id: int) -> None:
    """In a DataLoader worker (:func:`start_worker`): SIGTERM ends it at once with status 0. A scheduler's SIGTERM (or
    `timeout`'s) reaches the whole process group; a worker it killed made the main process print torch's ~20-line
    "DataLoader worker ... is killed by signal: Terminated" beside laic's one line. The main process, stopped by the
    same signal, says what it kept; a worker stopped alone is still found dead by the loader ("exited
    unexpectedly"). And the worker's multiprocessing resource-sharer thread, which hands the main process the
    batches' shared memory, reports through ``sys.excepthook`` a peer that a stop took away mid-handover (a
    ConnectionResetError's traceback beside the line, 1 of 26 group-stopped stage-2 fits): not news in a worker."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    report = sys.excepthook

    def quiet_about_a_lost_peer(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            report(kind, value, traceback)

    sys.excepthook = quiet_about_a_lost_peer
