"""Where and how laic computes: the one device resolver and the CPU thread setting, shared by the API and the CLI;
and where the real evaluation features live (``data_dir``), for the tests and benchmarks.

CPU threads. torch starts one intra-op thread per core, and its OpenMP threads spin while they wait for each other.
On a machine busy with other work a descheduled thread stalls every parallel op, and a fit took 5-20x longer with
torch's default than with one thread. Two remedies: laic picks the count itself (:func:`default_threads`): the cores
that other processes leave free, at most torch's setting; and the `laic` command sets OMP_WAIT_POLICY=passive
before torch loads, so that waiting threads sleep even where the load changes during a run. An explicit count
(``LAIC(n_threads=...)``, ``--threads``) always wins.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import pathlib
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Union

import torch

from laic_kernels import checks

from .interrupts import ctrl_c_held

DeviceLike = Union[str, torch.device, None]


def resolve_device(device: DeviceLike = "auto", arg: str = "device") -> torch.device:
    """``"auto"`` (or None): CUDA when available, else the CPU; otherwise the named torch device, which must exist
    here. Errors name ``arg`` (an API argument or a CLI option)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{arg}={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'auto'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg}={str(device)!r} but CUDA is not available here; use 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"{arg}={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0; use 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}', or 'auto'")
    if resolved.type == "meta":
        raise ValueError(f"{arg}='meta' holds shapes but no values: nothing can be clustered there; use 'cpu', "
                         "'cuda' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):
        # torch.device names every type torch knows ('mps', 'xla', ...), built into this torch or not: one it
        # cannot allocate on failed later, with a traceback (a demo after its header, an embedding after loading).
        try:
            torch.empty(0, device=resolved)
        except (RuntimeError, AssertionError, ImportError) as exc:
            # torch's first sentence (its message for 'mps' goes on for 1,800 characters, listing backends).
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0][:200]
            raise ValueError(f"{arg}={str(device)!r}: this torch cannot compute there ({reason}); use 'cpu', "
                             "'cuda' or 'auto'") from None
    return resolved


def fitting_device(device: DeviceLike = "auto", arg: str = "device") -> torch.device:
    """:func:`resolve_device` for a fit: the CPU or a CUDA GPU, where laic's kernels run (embedding may run on other
    devices, laic.embed; fitting not). Errors name ``arg``."""
    try:    # said before resolve_device's check that this torch can compute there (it may: then so it says)
        kind = None if device is None or device == "auto" else torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None     # not a device: resolve_device says so
    if kind not in (None, "cpu", "cuda", "meta"):
        raise ValueError(f"{arg}={str(device)!r}: laic's kernels run on the CPU and on CUDA GPUs only; use 'cpu', "
                         "'cuda' or 'auto'")
    return resolve_device(device, arg)


def checked_threads(n, arg: str = "n_threads") -> int:
    """A thread count ``n`` (a whole number from 1 to the CPUs this process may use) as an int; errors name ``arg``."""
    if not checks.is_int(n) or n < 1:
        raise ValueError(f"{arg} must be a whole number >= 1{' (or None)' * (not arg.startswith('-'))}, got {n!r}")
    cpus = usable_cpus()
    if n > cpus:
        # Threads beyond the CPUs only wait on each other (one ad hoc `laic fit` of the demo data with --threads 500
        # on 2 cores: 29 s against 1.7 s), and split the float sums otherwise than any count that fits, so the
        # clustering differed too.
        raise ValueError(f"{arg}={n} is more than the {cpus} CPUs this process may use; pass at most {cpus}")
    return int(n)


class _SharedSetting:
    """A process-wide setting that blocks of any thread change: the caller's value is saved by the first block in
    and given back by the last one out. Each block saving and restoring its own "before" went wrong when blocks of
    two threads overlapped: the one that ended first gave the caller's value back while the other still ran, or the
    other read the first's value as its own "before" and left it for good (a caller's 2 threads became 1 for every
    thread and fit started afterwards; float32 products stayed float32 after the fit). A forked child (a DataLoader
    worker forked inside a fit) keeps the blocks it was forked in, so that leaving them gives the caller's value
    back as in the parent, but gets a lock of its own: another thread of the parent may have held it, and no thread
    of the child would ever release it."""

    def __init__(self, save: Callable[[], Callable[[], None]]):
        self._save = save   # reads the caller's value; returns what gives it back
        self.lock, self.inside, self._give_back = threading.Lock(), 0, None
        os.register_at_fork(after_in_child=self._fresh_lock)

    def _fresh_lock(self) -> None:
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def block(self, enter: Callable[[], Callable[[], None]]) -> Iterator[None]:
        """Run the block with ``enter()``'s setting (it returns what undoes it: run when an inner block ends
        inside an outer one, where the outer's value comes back; the last out gives the caller's back). The count
        and the setting change together: a Ctrl-C waits for both (laic.interrupts.ctrl_c_held), where one landing
        between them (a notebook's interrupt) left the setting changed for good, or the count never coming back
        to 0."""
        entered = False
        try:
            with ctrl_c_held(), self.lock:
                if self.inside == 0:
                    self._give_back = self._save()
                undo = enter()
                self.inside += 1
                entered = True
            yield
        finally:
            if entered:
                with ctrl_c_held(), self.lock:
                    self.inside -= 1
                    if self.inside == 0:
                        self._give_back()
                        self._give_back = None
                    else:
                        undo()


def _saved_threads() -> Callable[[], None]:
    count = torch.get_num_threads()
    return lambda: torch.set_num_threads(count)


# torch.set_num_threads also sets the count every new thread starts with: the blocks share one state.
_THREADS = _SharedSetting(_saved_threads)


@contextlib.contextmanager
def torch_threads(n: Optional[int], arg: str = "n_threads") -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: leave torch's setting), then restore the setting: the
    count before it in this thread, or where it is the last block (of any thread) to end, the caller's count from
    before the first began."""
    if n is None:
        yield
        return
    n = checked_threads(n, arg)

    def enter() -> Callable[[], None]:
        undo = _saved_threads()
        torch.set_num_threads(n)
        return undo

    token = _explicit_threads.set(n)
    try:
        with _THREADS.block(enter):
            yield
    finally:
        _explicit_threads.reset(token)


# The largest seed (LAIC's random_state, the CLI's --seed): torch's CPU generator (Mersenne Twister) takes 32 bits
# of a seed, so beyond them two seeds would be one.
MAX_SEED = 2**32 - 1


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# The count of the innermost explicit torch_threads block: laic's own default never overrides it (`laic fit
# --threads 2` runs LAIC.fit, whose n_threads=None must keep the 2).
_explicit_threads: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("laic_threads", default=None)
IDLE_SAMPLE_SECONDS = 0.05
# A reading of the CPU counters at most this old still describes the load now: idle_cores then measures the time
# since it instead of waiting a sample's time. Short fits run back to back (a benchmark, K selection, a notebook)
# so read the load for nothing, where a small fit spent an eighth of its time waiting (50 of 400 ms on 500 images);
# a longer window would be slow to see another process that started just before the fit (its share of the window
# is what counts), and a fit long enough to leave no recent reading hardly notices the 50 ms.
RECENT_READING_SECONDS = 2.0


@dataclass(frozen=True)
class _CpuReading:
    """The machine's CPU time counters (/proc/stat, in clock ticks) and this process's own CPU time, at ``when``."""
    when: float
    idle_ticks: int
    total_ticks: int
    own_ticks: float

    @classmethod
    def now(cls) -> "_CpuReading":
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        own = os.times()
        # idle + iowait; user .. steal (guest time is inside user)
        return cls(time.monotonic(), fields[3] + fields[4], sum(fields[:8]),
                   (own.user + own.system) * os.sysconf("SC_CLK_TCK"))

    def cores_left_since(self, earlier: "_CpuReading") -> Optional[float]:
        """How many cores other processes left free between ``earlier`` and this reading: the idle ones and those
        this process used itself (its threads were busy with laic's, or its caller's, own work)."""
        total = self.total_ticks - earlier.total_ticks
        if total <= 0:
            return None
        free = self.idle_ticks - earlier.idle_ticks + self.own_ticks - earlier.own_ticks
        cores = os.cpu_count() or 1
        return min(float(cores), max(0.0, cores * free / total))


# The last readings (at most two: when the last default-threads fit began and when it ended), newest last.
_readings: List[_CpuReading] = []
_reading_lock = threading.Lock()


def _forget_readings() -> None:
    """In a forked child: its own CPU time starts again from zero, and a lock held at the fork stays held."""
    global _reading_lock
    _readings.clear()
    _reading_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readings)


def _remember(reading: _CpuReading) -> None:
    _readings.append(reading)
    del _readings[:-2]


def note_cpu_reading() -> None:
    """Keep a reading of the CPU counters now (a fit that chose its own threads calls it when it ends), so that the
    next fit's :func:`idle_cores` can measure the gap between the two without waiting."""
    try:
        with _reading_lock:     # read under the lock too: the kept readings stay in time order
            _remember(_CpuReading.now())
    except (OSError, ValueError, IndexError):
        return


def idle_cores(seconds: float = IDLE_SAMPLE_SECONDS) -> Optional[float]:
    """How many cores other processes leave free (from /proc/stat; None where it cannot be read): since the newest
    kept reading between ``seconds`` and ``RECENT_READING_SECONDS`` old (:func:`note_cpu_reading`, or the last
    call's), else over the next ``seconds``. This process's own CPU time counts as free: it is the caller's work,
    which waits while laic's threads run (a second thread of the caller running beside the fit would be counted
    free too)."""
    try:
        with _reading_lock:
            now = _CpuReading.now()
            recent = [r for r in _readings if seconds <= now.when - r.when <= RECENT_READING_SECONDS]
            if recent:
                earlier = recent[-1]
            else:
                time.sleep(seconds)
                earlier, now = now, _CpuReading.now()
            _remember(now)
    except (OSError, ValueError, IndexError):
        return None
    return now.cores_left_since(earlier)


def default_threads() -> int:
    """laic's CPU thread count when none is given: the cores other processes leave free (:func:`idle_cores`,
    rounded, at least 1), at most torch's current setting (so OMP_NUM_THREADS or torch.set_num_threads still cap
    it); torch's setting where the load cannot be read. Measured on a shared 2-core machine (benchmarks/threads.py):
    more threads than idle cores lose, and waiting threads that sleep (OMP_WAIT_POLICY=passive) avoid the collapse
    but still pay for waking up."""
    current = min(torch.get_num_threads(), usable_cpus())   # torch's count may exceed a container's CPUs
    idle = idle_cores() if current > 1 else None
    if idle is None:
        return current
    return max(1, min(current, int(round(idle))))


@contextlib.contextmanager
def cpu_threads(n: Optional[int], arg: str = "n_threads") -> Iterator[None]:
    """Run the block with ``n`` CPU threads; None: the count of an enclosing explicit :func:`torch_threads` block,
    else :func:`default_threads`."""
    if n is None and _explicit_threads.get() is not None:
        yield
        return
    with torch_threads(n if n is not None else default_threads(), arg):
        try:
            yield
        finally:
            if n is None:
                note_cpu_reading()


@contextlib.contextmanager
def own_grad_and_precision() -> Iterator[None]:
    """Run the block with the library's own autograd and precision settings, whatever the caller's: gradients on
    and inference mode off (the fits' training steps call backward: inside the caller's ``torch.no_grad()`` or
    ``torch.inference_mode()`` they failed), autocast off on the CPU and CUDA (the library picks each operand's
    precision itself and trains in float32: under the caller's bf16 autocast a fit failed, or without stage 1 gave
    another partition). Parts that want autocast (stage 2's ``amp``) turn it on again inside. And float32 matrix
    products in float32 (:func:`float32_matmuls_in_float32`). And tensors made without a device on the CPU
    (:func:`library_tensors_on_the_cpu`)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
            torch.autocast("cuda", enabled=False), float32_matmuls_in_float32(), library_tensors_on_the_cpu():
        yield


@contextlib.contextmanager
def library_tensors_on_the_cpu() -> Iterator[None]:
    """Under a caller's ``torch.set_default_device("cuda")`` every tensor the library makes without naming a device
    (draws from its CPU generators, index ranges it moves where they are used, a DataLoader's seed) was made on that
    device: a fit or an embedding failed (a CPU generator met a CUDA draw, or a copy went the wrong way). The
    library names the device of each tensor it wants elsewhere. No mode at all under the default (a device mode
    costs a Python call per torch call). Also a decorator, for the entry points outside a fit (embedding)."""
    with torch.device("cpu") if torch.get_default_device().type != "cpu" else contextlib.nullcontext():
        yield


# The float32 product settings are process-wide, like the thread count: one state for every thread's blocks.
_PRECISION = _SharedSetting(lambda: _set_float32_matmuls())


@contextlib.contextmanager
def float32_matmuls_in_float32() -> Iterator[None]:
    """Run the block with float32 matrix products computed in float32 (torch's default), whatever the caller set:
    under ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32`` they ran in TF32 on CUDA, and under
    ``"medium"`` in bfloat16 on CPUs with bf16 instructions; a fit then gave other labels and a model other
    probabilities (by up to 0.67 on cifar10-500). The library picks half precision itself where it wants it
    (laic.operands). The caller's settings are restored when the last such block (of any thread) ends, as they were
    set (torch's per-backend settings where it has them: its one global setting, restored, would read as another
    API's and refuse to be read back). Process-wide, like the settings themselves: another thread's products in the
    meantime run in float32 too."""
    with _PRECISION.block(lambda: lambda: None):   # the first in sets float32; an inner block has nothing to undo
        yield


def _set_float32_matmuls() -> Callable[[], None]:
    """Set float32 matrix products to float32 on every backend; returns what puts the settings back. A caller's
    ``torch.set_float32_matmul_precision`` (or ``allow_tf32``) is set back to "highest" too: the per-backend values
    alone then disagreed with it, and whatever read the old API inside the fit (TunableOp, torch.compile, a user's
    callback reading ``allow_tf32``) raised torch's "mix of the legacy and new APIs". Given back in that order: the
    old API's value first, then the per-backend values it does not say (a CPU setting left as it was)."""
    settings = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:   # the caller set the per-backend values only, unlike each other: not one setting
        legacy = None
    saved = [s.fp32_precision for s in settings]
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    for s in settings:
        s.fp32_precision = "ieee"

    def restore() -> None:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for s, value in zip(settings, saved):
            s.fp32_precision = value

    return restore


DATA_ENV = "LAIC_DATA"


def data_dir() -> pathlib.Path:
    """The folder of real CLIP ViT-B/32 features that tests and benchmarks read (see its README): $LAIC_DATA, else
    ``shared/data/clip-vit-b32`` beside the checkout. It may not exist: callers skip, and say so."""
    configured = os.environ.get(DATA_ENV)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-vit-b32"



_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# The command line is laic's own caller: a warning points at its command (laic.cli then words it as one line).
_COMMAND_LINE = (os.path.join(_PACKAGE_DIR, "commands") + os.sep, os.path.join(_PACKAGE_DIR, "cli.py"))


def _inside_the_library(frame) -> bool:
    # contextlib's frames too: a library function decorated with a context manager (library_tensors_on_the_cpu) is
    # called through one (by module name: an install of compiled files only names no source file).
    filename = frame.f_code.co_filename
    return (filename.startswith(_PACKAGE_DIR) and not filename.startswith(_COMMAND_LINE)) or \
        frame.f_globals.get("__name__") == "contextlib"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the reason a one-line error
    quotes (torch's, open_clip's and PIL's messages run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def warn_at_caller(message: str, category=UserWarning) -> None:
    """``warnings.warn`` pointing at the caller of the library (the user's line, or the laic command that called
    it), however deep inside laic it is issued (a fixed stacklevel breaks whenever a helper is put in between)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _inside_the_library(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
