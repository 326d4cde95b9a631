"""File I/O. Writes are atomic: a file is either absent or complete, never half-written, even if the process is killed.

Everything is written to a temporary file in the target's folder, flushed to disk, then renamed over the target
(rename within one filesystem is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import pathlib
import secrets
import shutil
import signal
import tempfile
import threading
import time
import weakref
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class MachineError(OSError):
    """The machine's state, for a user to act on, in laic's words (laic.cli prints it as one line, status 1)."""


class WriteError(MachineError):
    """A file could not be written (a full disk, a read-only or foreign folder): its message names the file and the
    system's reason, for a user to act on (laic.cli prints it as one line)."""


# OSErrors that are the machine's state, not a bug: a full disk or quota, a read-only file system, a file or folder
# this user may not read or write.
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def is_machine_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's state for a user to act on (laic.cli prints it as one line, status 1)."""
    return isinstance(exc, MachineError) or (isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS)


def sync_folder(folder: PathLike) -> None:
    """Make the names in ``folder`` durable (fsync of the folder itself): a file's fsync keeps its bytes, not the
    rename that put it under its name, so a power cut after a write said done could bring back the file as it was
    before, or a published run under its hidden staging name (which the next publish deletes as a killed one's).
    Best effort: a file system that cannot sync a folder (some network ones: EINVAL) leaves it to its own timing;
    an I/O error (the disk's) is a warning, not an error, since the write itself stands until a power cut."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC_FOLDERS:
            from .runtime import warn_at_caller

            warn_at_caller(f"{folder}: the disk did not confirm what was just written there ({exc.strerror}); a "
                           "power cut may undo it: check the disk")
    finally:
        os.close(fd)


# A folder's fsync that the file system does not offer (some network and FUSE ones), as opposed to a failure.
_CANNOT_SYNC_FOLDERS = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EROFS, errno.EBADF)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; on normal exit it replaces ``path``, on error it is removed. An
    ``OSError`` of the write is a :class:`WriteError` naming ``path``."""
    path = pathlib.Path(path).expanduser()
    if path.is_symlink():
        try:
            path = path.resolve(strict=False)   # written through the link, as open() would: the link stays
        except (RuntimeError, OSError) as exc:   # a loop of links
            raise ValueError(f"{path}: a symbolic link that leads nowhere ({exc}); pass another path") from None
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; pass the name of a file to write (e.g. {path / 'model'})")
    if path.exists() and not path.is_file():
        # A rename would put a regular file in place of a device (/dev/null), a pipe or a socket.
        raise ValueError(f"{path}: exists and is not a regular file (a device, pipe or socket); pass the name of a "
                         "file to write")
    ancestor = next((p for p in path.parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise ValueError(f"{path}: {ancestor} is a file, not a folder; pass a path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; the result should read like any other file
        os.replace(tmp, path)
        sync_folder(path.parent)
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: pathlib.Path) -> None:
    """The temporary files of earlier writes of ``path`` that a kill (SIGKILL: no clean-up runs) left beside it
    (a cache's features.npy can be gigabytes, left there for good before)."""
    _remove_stale(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), STALE_STAGING_SECONDS, os.unlink)


def _remove_stale(leftovers, older_than: float, remove) -> None:
    """``remove`` each of ``leftovers`` last changed longer than ``older_than`` seconds ago (0: all); one that
    cannot be removed (gone meanwhile, not ours) stays."""
    now = time.time()
    for leftover in leftovers:
        try:
            if older_than <= 0 or now - leftover.stat().st_mtime > older_than:
                remove(leftover)
        except OSError:
            continue


def write_error(path: pathlib.Path, exc: BaseException) -> WriteError:
    """What a failed write of ``path`` says: the system's reason, and the room left on that disk."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    free = ""
    # A missing folder is not about room: the free space of some folder above it would mislead.
    if getattr(exc, "errno", None) not in (errno.ENOENT, errno.ENOTDIR):
        try:
            folder = next(p for p in (path.parent, *path.parents) if p.exists())
            free = f"; {_size(shutil.disk_usage(folder).free)} free there"
        except (OSError, StopIteration):   # the reason matters more than the room left
            pass
    error = WriteError(f"cannot write {path}: {reason}{free}")
    error.errno = getattr(exc, "errno", None)
    return error


def staged_write_error(exc: WriteError, staging: pathlib.Path, out: pathlib.Path) -> WriteError:
    """``exc``, a write into the staging folder of ``out`` that failed, named as the file of ``out`` it was to become
    (the staging folder is gone with the failure), and saying that ``out`` is as it was."""
    error = WriteError(f"{str(exc).replace(str(staging), str(out))} ({out} is as it was)")
    error.errno = exc.errno
    return error


def _size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "GB":
            break
    return f"{n_bytes:.1f} {unit}"


# The most a staging name adds to the name it stands beside (".NAME.unpublished-0123abcd", mkstemp's
# ".NAME.abcd1234.tmp"): a name the file system takes may leave it no room.
STAGING_NAME_EXTRA = 24


def check_name_length(path: PathLike, arg: str) -> None:
    """``path``'s last name leaves room for laic's staging names, and the whole path fits the file system's limit:
    checked first, since a name past the limit fails every look at the path (is it a link? a folder?) with a
    traceback, and one just under it failed after the whole fit, when the run was staged beside it."""
    given = pathlib.Path(path).expanduser()
    folder = next((p for p in given.absolute().parents if _is_folder(p)), pathlib.Path("/"))
    try:
        name_max, path_max = os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):   # no such limits to read (not POSIX)
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in given.parts), default=0)
    if len(os.fsencode(given.name)) + STAGING_NAME_EXTRA > name_max or longest > name_max:
        raise ValueError(f"{arg} {path}: a name of that path is too long for this file system (at most "
                         f"{name_max} bytes, and laic stages a file or folder beside it under its name plus "
                         f"{STAGING_NAME_EXTRA}); choose a shorter name")
    if len(os.fsencode(str(given.absolute()))) + STAGING_NAME_EXTRA >= path_max:
        raise ValueError(f"{arg} {path}: the path is too long for this file system (at most {path_max} bytes); "
                         "choose a shorter one")


def _is_folder(path: pathlib.Path) -> bool:
    """``path.is_dir()``, False where even asking fails (a name past the file system's limit: ENAMETOOLONG)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def check_can_create(path: PathLike, arg: str) -> None:
    """Before anything long: ``path`` (a file or folder to be written) can be created, i.e. its names fit the file
    system (:func:`check_name_length`) and the nearest existing folder on its way is a folder this process may write
    in (tried, not only read from its permissions)."""
    check_name_length(path, arg)
    given = pathlib.Path(path).expanduser()
    # A link to nothing on the way (the path, or a folder it goes in, e.g. a cache folder's features.npy): creating
    # it would fail (File exists), wherever its target would be.
    dangling = next((p for p in (given, *given.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise ValueError(f"{arg} {path}: {dangling} is a link to {os.readlink(dangling)}, which does not exist; create "
                         "what it points to first, or choose another place")
    parent = given.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{arg} {path}: {parent} is a file, not a folder; choose another place")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {path}: cannot write in {parent} (read-only, or not yours); choose a place you can "
                         "write to")
    # The permission bits do not tell everything (root passes os.access in /proc, /sys and read-only mounts):
    # create and remove an empty folder there, as the write itself will. Signals wait (a Ctrl-C between the two
    # left it for good, and a run folder holding it could not be replaced); one a SIGKILL leaves is named as
    # hidden_dir_beside's are, which a run folder's replacement takes for no one's (run_dir._disposable).
    try:
        held = HeldSignals()
        with held:
            held.hold()
            os.rmdir(hidden_dir_beside(parent / "laic", "probe"))
    except OSError as exc:
        raise ValueError(f"{arg} {path}: cannot create anything in {parent} ({exc.strerror or exc}); choose a place "
                         "you can write to") from None


NPY_MAGIC = b"\x93NUMPY"  # how every file numpy.save writes begins
ZIP_MAGIC = b"PK\x03\x04"  # numpy.savez's archives


def _is_torch_save(path: pathlib.Path) -> bool:
    """Whether the zip archive at ``path`` is torch.save's (its pickle is ``ARCHIVE/data.pkl``; numpy.savez's
    entries are ``NAME.npy``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_npy(path: PathLike, arg: str, mmap: bool = False) -> np.ndarray:
    """A numeric .npy array (no pickles); a missing file, another kind of file (text, .npz, pickled objects) or a
    damaged one is an error that names ``arg`` (e.g. a CLI option) and says what the file is instead. ``mmap``: a
    read-only memory map of the file (rows are read when used)."""
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{arg} {path}: is a folder; pass the .npy file in it")
    if not p.is_file():
        raise FileNotFoundError(f"{arg} {path}: no such file")
    with open(p, "rb") as f:
        start = f.read(len(NPY_MAGIC))
    if start.startswith(ZIP_MAGIC):
        if _is_torch_save(p):   # also a zip archive
            raise ValueError(f"{arg} {path}: is a torch.save file, not a .npy array; convert it with "
                             "numpy.save(NEW.npy, torch.load(FILE).numpy())")
        raise ValueError(f"{arg} {path}: is a .npz archive (numpy.savez), not a .npy array; save one array with "
                         "numpy.save")
    if start != NPY_MAGIC:
        raise ValueError(f"{arg} {path}: is not a .npy file (numpy.save's header is missing; a text or CSV file "
                         "renamed to .npy?); save the array with numpy.save")
    try:
        array = np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        # (memory-mapped, numpy says "Array can't be memory-mapped: Python objects in dtype." instead)
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            # Not float32 alone: labels as float32 merge ids above 2**24 (16777216 and 16777217 become one).
            raise ValueError(f"{arg} {path}: holds Python objects, not numbers; save a numeric array: features as "
                             "numpy.save(path, np.asarray(x, dtype=np.float32)), labels as dtype=np.int64 (or class "
                             "names as dtype=str)") from None
        raise ValueError(f"{arg} {path}: a damaged .npy file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{arg} {path}: a damaged .npy file ({exc})") from None
    return array


def as_labels(name: str, x, *, non_negative: bool = False) -> np.ndarray:
    """``x`` (array, list or tensor) as a non-empty 1-D int64 array of labels; integer-valued floats are accepted.
    ``non_negative``: cluster ids, which index arrays, must also be >= 0. Errors name ``name``."""
    a = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional array of labels, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty; pass one label per image")
    if not np.issubdtype(a.dtype, np.integer):
        # Real numbers only: a complex id's imaginary part was dropped with a numpy warning.
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")
        with np.errstate(invalid="ignore"):
            fractional = ~(np.isfinite(a) & (a == np.round(a)))
        if fractional.any():
            row = int(np.argmax(fractional))
            raise ValueError(f"{name} must hold integer labels (whole, finite numbers), but row {row} is "
                             f"{a[row].item()!r} (dtype {a.dtype})")
    # int64 holds the ids (a uint64 id of 2**64 - 1 wrapped to -1, an unclustered image; a float 1e19 to -2**63).
    # Compared as Python ints and floats: numpy 1 compares uint64 with an int through float64.
    beyond = False
    if np.issubdtype(a.dtype, np.unsignedinteger):
        beyond = int(a.max()) > np.iinfo(np.int64).max
    elif np.issubdtype(a.dtype, np.floating):
        beyond = float(a.max()) >= 2.0 ** 63 or float(a.min()) < -2.0 ** 63
    if beyond:
        raise ValueError(f"{name} holds ids beyond int64's range (up to {a.max()}); number the labels 0, 1, 2, ...")
    a = a.astype(np.int64, copy=False)
    if non_negative and a.min() < 0:
        raise ValueError(f"{name} must hold cluster ids >= 0, got {a.min()}")
    return a


def as_truth(name: str, x) -> np.ndarray:
    """:func:`as_labels` of ground-truth classes: ids >= 0 (a -1 often marks an unlabelled image, which would
    otherwise be scored as one more class). Class names and booleans are numbered as :func:`truth_and_names` does
    (ground truth is only compared for equality; scikit-learn's metrics take them alike)."""
    return truth_and_names(name, x)[0]


def truth_and_names(name: str, x) -> Tuple[np.ndarray, Optional[List[str]]]:
    """Ground-truth class ids (:func:`as_labels`, >= 0), and the classes' names where ``x`` holds names (strings,
    or booleans): then the ids number the sorted names (None for ids)."""
    a = x if hasattr(x, "cpu") else np.asarray(x)
    if hasattr(a, "cpu") and str(a.dtype) == "torch.bool":    # a tensor of booleans: named as numpy's are, below
        a = a.cpu().numpy()
    names = None
    if isinstance(a, np.ndarray) and a.dtype == object and a.ndim == 1 and len(a):
        # Names or booleans as Python objects (a pandas Series of strings, .to_numpy(); h5py's variable-length
        # strings, bytes): as a str, bytes or bool array.
        for kind, types in ((str, str), (bytes, bytes), (bool, (bool, np.bool_))):
            if all(isinstance(v, types) for v in a):
                a = a.astype(kind)
                break
    if isinstance(a, np.ndarray) and a.dtype.kind in "USb" and a.ndim == 1:
        values, a = np.unique(a, return_inverse=True)
        # (byte strings, e.g. read from HDF5, named by their text: str() gave "b'cat'")
        names = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v) for v in values]
        a = a.reshape(-1)
    a = as_labels(name, a)
    negative = int((a < 0).sum())
    if negative:
        raise ValueError(f"{name} holds {negative} negative label(s) (e.g. -1 for unlabelled images); ground truth "
                         "must be class ids >= 0: score the labelled images only (drop those rows from both)")
    return a, names


def read_labels(path: PathLike, arg: str, *, non_negative: bool = False, truth: bool = False) -> np.ndarray:
    """:func:`as_labels` (``truth``: :func:`as_truth`) of a .npy file; errors name ``arg`` and the path."""
    labels = read_npy(path, arg)
    try:
        return as_truth(arg, labels) if truth else as_labels(arg, labels, non_negative=non_negative)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_utf8(path: PathLike, what: str) -> str:
    """A UTF-8 text file (a byte-order mark, as Windows editors write, left out); anything else is refused, naming
    ``what`` and the file."""
    data = pathlib.Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}); save it as UTF-8") from None


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def text_bytes(text: str) -> bytes:
    """UTF-8; a file name that is not UTF-8 (held by Python as surrogate escapes) as its own bytes, so that
    read_lines gives it back as it was."""
    return text.encode("utf-8", errors="surrogateescape")


def lines_text(lines: Iterable[str]) -> str:
    """The text of a file of one item a line (each line ended, the last too), as laic writes nouns.txt, files.txt
    and its other lists."""
    return "".join(line + "\n" for line in lines)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text_bytes(text))


def read_lines(path: PathLike) -> list:
    """The non-blank lines of a text file written by :func:`write_text` (file names that are not UTF-8 included):
    split at line feeds only (read as bytes: no universal newlines), since a file name may hold any other character
    that ``str.splitlines`` splits at (U+2028, U+0085, form feeds, carriage returns: a name with one became two
    paths, and the run's report refused its image list)."""
    text = pathlib.Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    # A file edited or copied on Windows ends its lines with CR LF: the CR is dropped (laic writes no name holding
    # one: list_images leaves such names out, write_run_dir refuses them), or every path ended in "\r".
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def path_text(path: PathLike) -> str:
    """A path as laic's files record it (run.json, images.txt, a cache's file lists): the path's bytes read as UTF-8,
    bytes that are not UTF-8 kept as surrogate escapes. ``str(path)`` is the locale's decoding of those bytes: a run
    written under a Latin-1 locale (PYTHONUTF8=0) named "laté" in UTF-8, which is another file under any other locale.
    The same string as ``str(path)`` under a UTF-8 locale."""
    return os.fsencode(path).decode("utf-8", "surrogateescape")


def text_path(text: str) -> str:
    """The path that :func:`path_text` recorded, as this process names it (the same bytes on disk)."""
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def read_json(path: PathLike) -> Any:
    """The JSON at ``path``; a damaged file is a ValueError that names it (json's own message names no file)."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged, not the JSON laic wrote there ({exc})") from None


def json_bytes(obj: Any) -> bytes:
    """``obj`` as laic's JSON files hold it."""
    return text_bytes(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def npy_writer(array: np.ndarray) -> Callable[[pathlib.Path], None]:
    """What writes ``array`` as a .npy file at the path it is given (no pickles), for :func:`replace_together`."""
    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:    # (np.save given a name would add ".npy" to a temporary's)
            np.save(f, np.asarray(array), allow_pickle=False)
    return write


def bytes_writer(data: bytes) -> Callable[[pathlib.Path], None]:
    return lambda tmp: tmp.write_bytes(data)


def save_npy(path: PathLike, array: np.ndarray) -> None:
    save_npys({path: array})


def save_npys(arrays: dict) -> None:
    """Several ``{path: array}`` that belong together (labels and their probabilities), replaced together (see
    :func:`replace_together`): one at a time, the new labels could sit beside the old probabilities."""
    replace_together({path: npy_writer(array) for path, array in arrays.items()})


def replace_together(writes: dict, before_moves: Optional[Callable[[], None]] = None) -> None:
    """Files that belong together, ``{path: write}`` (``write(tmp)`` writes the file at the temporary path it is
    given): all written to temporary files first, then, with Ctrl-C and SIGTERM held back until the moves are
    done, ``before_moves()`` and the moves into place, in the order given (a sidecar that marks the others complete
    goes last). A stop while they are written (the slow part: gigabytes for a cache's array) leaves every earlier
    file as it was; one during the moves waits for their end. A failing move (the disk, not a signal) can still
    leave some moved."""
    held = HeldSignals()
    with held, contextlib.ExitStack() as moves:     # the moves (on leaving `moves`) come before the release
        # Entered in reverse: an ExitStack leaves its contexts last in, first out.
        temporaries = {path: moves.enter_context(atomic_path(path)) for path in reversed(list(writes))}
        if before_moves is not None:
            moves.enter_context(_on_success(before_moves))
        for path, write in writes.items():
            write(temporaries[path])
        if len(writes) > 1 or before_moves is not None:   # one file's move is atomic by itself
            held.hold()


@contextlib.contextmanager
def _on_success(action: Callable[[], None]) -> Iterator[None]:
    """Calls ``action`` when the block ends without an exception."""
    yield
    action()


class HeldSignals:
    """From ``hold()`` to the end of the ``with`` block, SIGINT and SIGTERM wait: their handlers are swapped for
    one that notes them, and a noted one is raised again, to the handler it was meant for, at the end. (Blocking
    them with pthread_sigmask does not do: the kernel hands them to another of the process's threads, and Python
    runs its handler in the main thread all the same.) Outside the main thread, where Python takes no handler,
    nothing is held."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._previous, self._noted = {}, []

    def hold(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            handler = signal.getsignal(sig)
            if handler not in (signal.SIG_IGN, None):
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self._noted.append(signum))

    def __enter__(self) -> "HeldSignals":
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(self._noted):
            signal.raise_signal(sig)


def hidden_dir_beside(out: pathlib.Path, what: str) -> pathlib.Path:
    """A new empty folder ``.NAME.WHAT-<random>`` beside ``out``, with the usual permissions (mkdtemp's are
    owner-only, and what is written there is moved to ``out``)."""
    for _ in range(100):
        path = out.parent / f".{out.name}.{what}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder beside {out}")


# A staging folder untouched for this long was left by a process killed while writing into it (a run or a report is
# written in seconds to minutes); a younger one may be another process's, writing now.
STALE_STAGING_SECONDS = 3600


def remove_hidden_dirs_beside(out: pathlib.Path, what: str, older_than: float = STALE_STAGING_SECONDS) -> None:
    """Remove the folders :func:`hidden_dir_beside` made for ``out`` and ``what`` that a killed process left: those
    last changed longer than ``older_than`` seconds ago (0: all). One that cannot be removed (gone meanwhile, not
    ours) stays."""
    _remove_stale(hidden_dirs_beside(out, what), older_than, shutil.rmtree)


def hidden_dirs_beside(out: pathlib.Path, what: str) -> list:
    """The folders :func:`hidden_dir_beside` made for ``out`` and ``what`` that are there now, in name order."""
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.{what}-*"))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None


def exchange(first: PathLike, second: PathLike) -> bool:
    """Swap two existing paths in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``): a reader of either
    name finds one of the two, never nothing. False, and nothing moved, where the system or the file system cannot
    (no such call: another OS, a C library before glibc 2.28, a kernel before 3.15; a file system without it)."""
    global _renameat2
    if _renameat2 is None:
        try:
            call = ctypes.CDLL(None, use_errno=True).renameat2
            call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            call.restype = ctypes.c_int
        except (OSError, AttributeError):
            call = False
        _renameat2 = call
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def replace_folder(staging: pathlib.Path, out: pathlib.Path, replace_files: bool = True) -> Optional[pathlib.Path]:
    """Move the folder ``staging`` to ``out``; an existing ``out`` that holds files (one the caller checked may be
    replaced: ``replace_files``) is set aside first, and put back if the move fails or is interrupted. Returns the
    folder it was set aside in, for the caller to delete (:func:`delete_folder`, seconds for a large one) once it
    has noted that ``out`` holds the new folder; None where there was none (or, swapped in one step, where the
    earlier folder could not be moved on from ``staging``'s name: the caller removes ``staging`` as a leftover).
    Without ``replace_files``, an ``out``
    that holds files is a FileExistsError, whenever they arrived: the caller's check and the move are two steps, and
    another process's run published between them was set aside and deleted."""
    # A link (to an empty folder) is set aside as before: a rename cannot put a folder in place of a link.
    sync_folder(staging)   # its files' names, before it comes into place (their bytes: atomic_path)
    if not out.exists() or not (replace_files or os.path.islink(out)):
        try:
            os.replace(staging, out)   # takes an absent or empty ``out`` in one step, never one that holds files
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):   # (ENOTDIR: a file arrived there)
                raise FileExistsError(exc.errno, "holds files now", str(out)) from None
            raise
        sync_folder(out.parent)
        return None
    # An empty folder, or an earlier one the caller may replace. Where the system swaps two folders in one step,
    # swapped: ``out`` holds one folder or the other at every instant (a reader between two renames found none), and
    # the earlier one then goes to old/run. Elsewhere set aside first (as old/run, where
    # laic.run_dir.stranded_run looks for a run set aside by a kill between the renames).
    old = hidden_dir_beside(out, "old")
    swapped = False
    try:
        swapped = not os.path.islink(out) and exchange(staging, out)
        if not swapped:
            os.replace(out, old / "run")
            os.replace(staging, out)
        sync_folder(out.parent)
    except BaseException:
        if not out.exists() and (old / "run").exists():
            # Put the earlier folder back: ``out`` never goes missing (but if killed between the renames: see
            # laic.run_dir.stranded_run).
            os.replace(old / "run", out)
        if not (old / "run").exists():
            old.rmdir()   # nothing set aside (the first rename failed), or put back
        raise
    if swapped:
        try:
            os.replace(staging, old / "run")
        except OSError:
            # ``out`` holds the new folder all the same; the earlier one stays under the name ``staging`` had,
            # which the caller removes as it removes a staging folder left over.
            old.rmdir()
            return None
    # Not deleted in place (by the caller): a half-deleted old/run is what stranded_run would offer to move back.
    return old


# The FolderLocks held in this process: a forked child (a DataLoader worker) closes its copies, which kept the lock
# after this process was killed, until the child ended too; the child's copies then hold nothing.
_HELD_FOLDER_LOCKS: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


def _close_folder_locks_in_child() -> None:
    for lock in list(_HELD_FOLDER_LOCKS):
        with contextlib.suppress(OSError):
            os.close(lock._fd)
        lock._fd, lock._held, lock._made_parents = None, None, []
    _HELD_FOLDER_LOCKS.clear()


os.register_at_fork(after_in_child=_close_folder_locks_in_child)


class FolderLock:
    """One process at a time in ``folder`` (made where missing), until :meth:`release` or the process's end, however
    it ends (the kernel's lock, on the folder itself). Where the file system takes no such lock (some network ones),
    the run goes on without it (:attr:`held` says which). With ``remove_empty``, a folder still empty at release is
    removed; with ``remove_if_made``, only one that :meth:`take` made (a user's own empty --out stays)."""

    def __init__(self, folder: pathlib.Path, busy: str, remove_empty: bool = True, remove_if_made: bool = False):
        self.folder, self.busy = pathlib.Path(folder), busy   # busy: the error where another process holds the folder
        self.remove_empty, self.remove_if_made = remove_empty, remove_if_made
        self._fd: Optional[int] = None
        self._held: Optional[Tuple[int, int]] = None
        self._made_parents: List[pathlib.Path] = []
        self._made = False

    @property
    def held(self) -> bool:
        """Whether this process holds the folder now (False before :meth:`take`, after :meth:`release`, in a forked
        child, and where the file system takes no lock)."""
        return self._fd is not None

    def take(self) -> bool:
        """Take the lock (a ValueError saying ``busy`` where another process holds it); True, for chaining."""
        self._made_parents = [p for p in reversed(self.folder.parents) if not p.exists()]
        self._made = not self.folder.exists()
        for _ in range(100):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):   # a file, or a link to nothing, under the folder's name
                raise ValueError(f"{self.folder} is there and is not a folder; remove it, or choose another place"
                                 ) from None
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(self.busy) from None
            except OSError:
                os.close(fd)
                return True
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == folder_identity(self.folder):
                break
            # The holder released and removed the folder between this open and this lock: the lock is on a folder
            # no longer there, and the next writer would make a new one, unlocked. Again, on the folder there now.
            os.close(fd)
        else:
            raise ValueError(self.busy)
        self._fd, self._held = fd, (st.st_dev, st.st_ino)
        _HELD_FOLDER_LOCKS.add(self)
        return True

    def release(self) -> None:
        """Let other processes in; with ``remove_empty`` the folder goes where it is empty (nothing was written into
        it, by this process or one killed earlier), and so do the empty parents :meth:`take` made; with
        ``remove_if_made``, where :meth:`take` made it."""
        removable = self.remove_empty or (self.remove_if_made and self._made)
        if removable and self._held is not None and folder_identity(self.folder) == self._held:
            with contextlib.suppress(OSError):
                self.folder.rmdir()   # only where empty
                for parent in reversed(self._made_parents):
                    parent.rmdir()
        self._held, self._made_parents, self._made = None, [], False
        if self._fd is not None:
            _HELD_FOLDER_LOCKS.discard(self)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held_elsewhere(folder: PathLike) -> bool:
        """Whether a process holds ``folder`` now (another one, or this one through another FolderLock); False where
        that cannot be told (no such folder, or no such lock on its file system). Takes nothing."""
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def folder_identity(path: PathLike) -> Optional[Tuple[int, int]]:
    """What tells one folder from another put in its place under the same name (its device and inode), or None
    where there is none: a reader compares it before and after reading a folder that a publish may replace."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def delete_folder(folder: pathlib.Path, out: pathlib.Path) -> None:
    """Delete ``folder`` (``out`` itself, or a folder beside it set aside for ``out``), renamed first to
    ``.NAME.deleting-*``: a stop during the deletion (seconds for a large run) leaves that hidden folder, which the
    next delete_folder for ``out`` removes, never a half-deleted folder under its meaningful name. Renamed before
    those an earlier stop left are removed (seconds too): a stop there left the earlier run set aside by
    :func:`replace_folder` whole, which laic.run_dir.stranded_run then offered back in place of a deleted RUN_DIR."""
    deleting = hidden_dir_beside(out, "deleting")
    os.replace(folder, deleting / "folder")
    shutil.rmtree(deleting, ignore_errors=True)                # what can go goes, whatever a file refuses
    remove_hidden_dirs_beside(out, "deleting", older_than=0)   # those an earlier stop left


def torch_file_damage(path: PathLike) -> Optional[str]:
    """Why the torch.save file at ``path`` is damaged (an entry that fails its checksum, or a truncated archive), or
    None: torch's reader checks no checksum, so a flipped bit in a weight loads as other weights. A file that is not
    a zip archive at all gives None too (torch.load then fails and says so)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC != 0:         # a writer told not to compute checksums (torch's option) leaves 0
                    with archive.open(entry) as data:
                        while data.read(1 << 24):     # zipfile checks the checksum at the end of each entry
                            pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError,
            zlib.error) as exc:   # an altered header reads as another compression, an encrypted entry, ...
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                return f"truncated or altered: {str(exc) or type(exc).__name__}"
    except OSError as exc:
        if exc.errno != errno.EINVAL:   # unreadable (no permission, an I/O error): not damage
            raise
        return f"truncated or altered: {exc}"
    return None


def saved_format(path: pathlib.Path) -> Optional[str]:
    """The ``format`` entry of the dict that ``torch.save`` wrote at ``path`` (laic's files name their kind there:
    "laic-model", "laic-stage2-model", ...), read with its tensors mapped, not read; None for any other file."""
    import torch

    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # anything torch cannot read as plain values is none of laic's files
        return None
    return saved.get("format") if isinstance(saved, dict) else None


def _stop_behind(exc: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt or SystemExit (a stop; laic.interrupts raises SIGTERM's as a KeyboardInterrupt) in the
    chain of exceptions ``exc`` was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def torch_save(path: PathLike, obj: Any, *, replaces: Optional[str] = None, what: str = "") -> None:
    """``obj`` to ``path`` with ``torch.save``, atomically. With ``replaces`` (a ``format`` entry), a file already
    at ``path`` (or where a link there leads: the write goes through it) is replaced only when it is of that format,
    a ``what`` saved again; any other file is refused, naming ``overwrite`` (``save("features.npy")`` replaced a
    user's array without a word)."""
    import torch

    target = pathlib.Path(path).expanduser()
    if replaces is not None and target.is_file() and saved_format(target) != replaces:
        raise ValueError(f"{target}: exists and is not {what}; pass overwrite=True to replace it, or save under "
                         "another name")
    with atomic_path(path) as tmp:
        try:
            # Through a file object: given a path, torch names the archive's root folder after the file (here the
            # random temporary name), so two identical saves differed in their bytes.
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as exc:
            # A Ctrl-C or SIGTERM raised in the middle of torch's write to the file comes out of its C++ writer as
            # this error, the stop in its context: said as the stop it is (it was said as a full disk, status 1).
            stop = _stop_behind(exc)
            if stop is not None:
                raise stop from None
            # torch's writer words a short write (a full disk) as "enforce fail at inline_container.cc ...
            # unexpected pos"; its other errors are not about the file.
            if "inline_container" not in str(exc):
                raise
            # Said as a user can act on it (torch's wording names its own source file).
            short = OSError(None, "the write stopped short (is the disk full, or over quota?)")
            raise write_error(pathlib.Path(path), short) from None
