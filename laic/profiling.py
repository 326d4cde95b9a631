"""Profiling of a fit, wall time and peak extra memory per step (``LAIC(profile=True)`` -> ``profile_``), and its
progress as it runs.

The pipeline marks its steps with :func:`step` (recorded only while a :class:`FitProfiler` is active), each with a
kind: ``k-means``, ``counterparts``, ``graphs``, ``stage-1``, ``stage-2`` (one step per fine-tuning epoch) or
``other``. The same marks are a long fit's progress: each step's end is logged at INFO on the ``laic.progress``
logger (``laic fit`` shows these lines on stderr, ``--quiet`` hides them; from Python they reach the handlers of
Python's logging once the caller lets INFO through, e.g. ``logging.basicConfig(level=logging.INFO)``, and then
stage 2's passes over the images and the report's drawing show progress bars too: :func:`progress_shown`,
:func:`progress_bar`).
:func:`fit_recording` is how the estimator records: ``LAIC.fit`` opens one recording, and ``LAIC.fit_images``
(``laic.stage2.fit_images``) opens one around its whole run, inside which ``LAIC.fit`` records into the open one
instead of nesting its own, so that ``profile_`` covers stages 0 to 2. While a profiler traces (:class:`FitProfiler`'s
``trace``), ``torch.profiler`` records the whole recording, so that a Chrome trace can be written afterwards
(:meth:`FitProfiler.export_trace`, as often as asked). Inside the caller's own ``torch.profiler`` (or any other
profiler torch is running) laic starts none, since a second one would cancel the caller's: the steps are timed and
marked (``laic:`` + the step's name, in the caller's trace) but laic writes no trace of its own, and on the CPU, whose
memory figures come from laic's trace, their peaks are not measured (None).

Peak memory of a step is the most memory torch held at once during it beyond what it held when the step began
(``peak_extra_bytes``): on CUDA from ``torch.cuda.max_memory_allocated``; on the CPU, where torch keeps no such
counter, from the allocation events of ``torch.profiler(profile_memory=True)`` (exact, but the profiler slows
many-small-op steps such as k-means++ seeding down, and its post-processing after the fit is not in any step: at
N = 2000, K = 1999 on one CPU thread a profiled fit took 24 s against 5.3 s unprofiled, its steps 6.5 to 8 s; a
review, 12-06).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

KINDS = ("k-means", "counterparts", "graphs", "stage-1", "stage-2", "other")
_MARK = "laic:"
progress_log = logging.getLogger("laic.progress")

_active: contextvars.ContextVar[Optional["FitProfiler"]] = contextvars.ContextVar("laic_profiler", default=None)


_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("laic_profile_prefix", default="")
_fitting: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("laic_fitting_model", default=None)


@contextlib.contextmanager
def step(name: str, kind: str, announce: bool = True) -> Iterator[None]:
    """Mark one step of the fit: recorded while a :class:`FitProfiler` is active, and its end logged on
    ``laic.progress`` (with its wall time) where that logger shows INFO; ``announce=False`` for a step that logs a
    fuller line of its own (a stage-2 epoch)."""
    name = _prefix.get() + name
    shown = announce and progress_shown()
    if shown:
        _wait_for_the_gpu()   # not the work queued before the step
    start = time.perf_counter()
    profiler = _active.get()
    with (profiler._step(name, kind) if profiler is not None else contextlib.nullcontext()):
        yield
    if shown:
        _wait_for_the_gpu()
        progress_log.info("%s: %.1f s", name, time.perf_counter() - start)


def progress_shown() -> bool:
    """Whether the steps' ends are shown (``laic.progress`` logs INFO): where a long loop may show a progress bar
    of its own (stage 2's passes over the images, the report's drawing)."""
    return progress_log.isEnabledFor(logging.INFO)


# Seconds between a bar's updates where stderr is not a terminal (a batch job's log file): tqdm's 0.1 s there wrote
# 36,000 updates an hour into the log.
LOGGED_BAR_INTERVAL_S = 60.0


def progress_bar(total: int, enabled: bool, unit: str, desc: str):
    """A tqdm bar on stderr (a no-op object when not ``enabled``): laic's one kind of bar; in a log file, an update
    a minute."""
    import sys

    from tqdm.auto import tqdm

    # A notebook's stderr is no terminal, but it shows the bar live (tqdm.auto draws a widget there).
    notebook = "ipykernel" in sys.modules
    live = _is_terminal(sys.stderr) or notebook
    interval = {} if live else {"mininterval": LOGGED_BAR_INTERVAL_S}
    stream = {} if notebook else {"file": _LossyStream(sys.stderr)}
    return tqdm(total=total, disable=not enabled or sys.stderr is None, unit=unit, desc=desc, dynamic_ncols=True,
                **interval, **stream)


class _LossyStream:
    """``stream`` until a write to it fails, then nothing: a closed or full stderr, or its reader gone (``laic report
    ... 2>&1 | head``), made the bar's write raise, and the command failed without a word (on a closed stderr),
    after a whole stage-2 fine-tune or with its report drawn."""

    def __init__(self, stream):
        self._stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> int:
        if self._stream is not None:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):   # (ValueError: a closed file object)
                self._stream = None
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._stream = None

    def fileno(self) -> int:   # tqdm sizes the bar to the terminal from it
        if self._stream is None:
            raise OSError("no stream")
        return self._stream.fileno()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no isatty, or closed
        return False


def _wait_for_the_gpu() -> None:
    """A step's CUDA kernels may still run when its Python returns: its time is theirs once they are done. Only
    where its end is shown: steps hold whole loops, so this is a handful of syncs a fit, never one in a hot loop.
    The fit's own device (``cuda:1`` is not the current device); outside a fit, the current one."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    model = _fitting.get()
    device = model.torch_device() if model is not None else torch.device("cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def named_part(prefix: str) -> Iterator[None]:
    """The steps inside are recorded as ``prefix`` + their name (the K search's stage 0 beside the fit's own)."""
    token = _prefix.set(_prefix.get() + prefix)
    try:
        yield
    finally:
        _prefix.reset(token)


@contextlib.contextmanager
def fit_recording(model, trace: bool = True) -> Iterator[None]:
    """Record the enclosed work into ``model.profile_`` (the summary) and ``model.profiler_`` (this
    :class:`FitProfiler`, for its trace) when ``model.profile`` is set; a no-op otherwise.

    Inside a recording that is already open (``laic.stage2.fit_images`` opens one around stages 0 to 2) it opens none:
    the steps go to the open one, and whoever opened it stores the result, so one fit gives one profile. ``trace``
    is :class:`FitProfiler`'s (False: no ``torch.profiler`` on CUDA)."""
    token = _fitting.set(model)   # whose device the steps' progress waits for
    try:
        if not getattr(model, "profile", False) or _active.get() is not None:
            yield
            return
        profiler = FitProfiler(model.torch_device(), trace=trace)
        with profiler.recording():
            yield
        model.profile_, model.profiler_ = profiler.summary(), profiler
    finally:
        _fitting.reset(token)


def another_profiler_active() -> bool:
    """Whether torch is profiling already (the caller's ``torch.profiler.profile``, ``torch.autograd.profiler``'s
    ``profile``, ``emit_nvtx``, ...): torch keeps one profiler at a time, and starting a second cancels the first.
    torch has no public test of it; the C++ side's flag counts a profiler started without Python's too."""
    return bool(torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled())


class FitProfiler:
    """Records the steps run inside :meth:`recording` on ``device``; :meth:`summary` is what ``profile_`` holds.
    ``trace=False`` skips torch.profiler on CUDA (its overhead and its post-processing grow with the number of
    kernel launches, e.g. stage 1's steps at N = 1.28M, or every training step of stage 2's epochs, whose trace
    would grow with the run); the CPU needs it for the memory figures, so it traces there whatever ``trace`` says.
    Inside another profiler it traces nowhere (``inside_another_profiler``; see the module's docstring). Copies and
    pickles of a profiler leave its trace out (torch's cannot be pickled)."""

    def __init__(self, device: torch.device, trace: bool = True, on_step: Optional[Callable[[Dict], None]] = None):
        self.device = torch.device(device)
        self.trace = trace or self.device.type != "cuda"
        self.on_step = on_step       # called with each step's record as it ends (a long fit's progress)
        self.steps: List[Dict] = []
        self.peak_extra_bytes = 0    # of the whole recording, beyond what torch held when it began
        self.seconds = 0.0           # wall time of the whole recording
        self.inside_another_profiler = False   # the last recording ran inside the caller's profiler: no trace
        self._torch_profiler = None
        self._trace_file: Optional[str] = None   # where the trace was exported last (torch saves it once)
        self._trace_left_out = False   # a copy of a profiler that held a trace
        self._cuda_base = 0          # CUDA: the bytes allocated when the recording began (the inputs, ...)
        self.peak_reserved_bytes = 0  # CUDA: the most torch's allocator held reserved while recording
        self._open_steps: List[Tuple[Dict, int]] = []   # CUDA: the steps open now, each with its starting bytes

    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_torch_profiler=None, _trace_file=None, _trace_left_out=self.has_trace or self._trace_left_out)
        return state

    @contextlib.contextmanager
    def recording(self) -> Iterator["FitProfiler"]:
        # A second torch.profiler would cancel the caller's (its profile came back empty): laic's marks go into it.
        self.inside_another_profiler = another_profiler_active()
        self._torch_profiler = self._trace_file = None   # an earlier recording's trace is not this one's
        # ... nor its steps and peaks (a second recording listed the first's steps, and on the CPU failed to find
        # their marks in its own trace)
        self.steps, self.seconds, self.peak_extra_bytes, self.peak_reserved_bytes = [], 0.0, 0, 0
        traced = self.trace and not self.inside_another_profiler
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self._cuda():
            torch.cuda.synchronize(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        token = _active.set(self)
        try:
            with (torch.profiler.profile(activities=activities, profile_memory=True)
                  if traced else contextlib.nullcontext()) as prof:
                start = time.perf_counter()
                yield self
                if self._cuda():
                    torch.cuda.synchronize(self.device)
                self.seconds = time.perf_counter() - start   # not the profiler's own post-processing
        finally:
            _active.reset(token)
        self._torch_profiler = prof
        if self._cuda():
            self._note_cuda_peak()
        elif prof is not None:
            self._cpu_peaks(prof)
        else:   # no events to read them from: unknown, which a 0 would hide
            self.peak_extra_bytes = None
            for record in self.steps:
                record["peak_extra_bytes"] = None

    def _note_cuda_peak(self) -> None:
        """Fold the CUDA peak since the last reset into the recording's peak and into each open step's (before a
        step resets it: a step nested in another lost the outer one's peak before it, 12-06)."""
        torch.cuda.synchronize(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        self.peak_extra_bytes = max(self.peak_extra_bytes, peak - self._cuda_base)
        for record, base in self._open_steps:
            record["peak_extra_bytes"] = max(record["peak_extra_bytes"], peak - base)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, int(torch.cuda.max_memory_reserved(self.device)))

    @contextlib.contextmanager
    def _step(self, name: str, kind: str) -> Iterator[None]:
        if kind not in KINDS:
            raise ValueError(f"profiling step kind must be one of {KINDS}, got {kind!r}")
        record = {"name": name, "kind": kind, "seconds": 0.0, "peak_extra_bytes": 0}
        if self._cuda():
            self._note_cuda_peak()
            self._open_steps.append((record, int(torch.cuda.memory_allocated(self.device))))
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(_MARK + name):
                yield
            if self._cuda():
                self._note_cuda_peak()
        finally:
            if self._cuda():
                self._open_steps.pop()
        record["seconds"] = time.perf_counter() - start
        self.steps.append(record)
        if self.on_step is not None:
            self.on_step(record)

    def _cpu_peaks(self, prof) -> None:
        """Peak extra bytes of each step from the profiler's allocation events (same clock as the step marks)."""
        events = prof.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        marks = {}
        for e in events:
            if e.name().startswith(_MARK):
                marks.setdefault(e.name()[len(_MARK):], []).append((e.start_ns(), e.start_ns() + e.duration_ns()))
        times = np.array([t for t, _ in memory], dtype=np.int64)
        held = np.cumsum([b for _, b in memory], dtype=np.int64)
        self.peak_extra_bytes = int(max(0, held.max())) if len(held) else 0
        for record in self.steps:
            start, stop = marks.get(record["name"], [(0, -1)]).pop(0)
            first, last = np.searchsorted(times, start), np.searchsorted(times, stop, side="right")
            base = held[first - 1] if first > 0 else 0
            record["peak_extra_bytes"] = int(max(0, held[first:last].max() - base)) if last > first else 0

    def summary(self) -> Dict:
        by_kind: Dict[str, Dict] = {}
        for record in self.steps:
            kind = by_kind.setdefault(record["kind"], {"seconds": 0.0, "peak_extra_bytes": 0})
            kind["seconds"] += record["seconds"]
            kind["peak_extra_bytes"] = _larger(kind["peak_extra_bytes"], record["peak_extra_bytes"])
        return {"device": str(self.device), "steps": [dict(r) for r in self.steps], "by_kind": by_kind,
                "seconds": self.seconds,
                "peak_extra_bytes": self.peak_extra_bytes,
                **({"inside_another_profiler": True} if self.inside_another_profiler else {}),
                **({"base_bytes": self._cuda_base, "peak_reserved_bytes": self.peak_reserved_bytes}
                   if self._cuda() else {})}

    @property
    def has_trace(self) -> bool:
        """Whether a Chrome trace was recorded (not on CUDA with ``trace=False``, nor inside another profiler)."""
        return self._torch_profiler is not None or self._trace_file is not None

    def export_trace(self, path: os.PathLike) -> None:
        """The torch.profiler Chrome trace of the recorded fit (open in chrome://tracing or Perfetto) into ``path``.
        torch saves a trace once (a second export raised "Trace is already saved."): the first export writes it
        there, a later one copies the file last written (:meth:`trace_moved` says where a caller moved it), so a
        trace of hundreds of MB is never staged elsewhere (a small temporary folder would not hold it)."""
        if not self.has_trace:
            raise ValueError(f"no trace recorded; {self._why_no_trace()}")
        if self._torch_profiler is not None:
            self._torch_profiler.export_chrome_trace(str(path))
            self._torch_profiler = None   # the events are in the file now: torch's copy may go
        elif not os.path.isfile(self._trace_file):
            raise ValueError(f"the trace was written to {self._trace_file}, which is gone, and torch saves a trace "
                             "once: copy it from where it was moved, or profile the fit again")
        elif os.path.abspath(self._trace_file) != os.path.abspath(path):
            shutil.copyfile(self._trace_file, path)
        self._trace_file = str(path)

    def trace_moved(self, path: os.PathLike) -> None:
        """The trace last exported now lies at ``path`` (a caller wrote it to a temporary name, then renamed it)."""
        self._trace_file = str(path)

    def _why_no_trace(self) -> str:
        if self.inside_another_profiler:
            return ("the fit ran inside another torch.profiler, which a second one would have cancelled: its steps "
                    "are in that profiler's trace (marked laic:STEP); profile outside it for laic's own")
        if self._trace_left_out:
            return "this is a copy or an unpickled profiler, and the trace stays with the one that recorded it"
        return "fit with LAIC(profile=True) first (FitProfiler(trace=True))"


def _larger(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """The larger peak; None (not measured) wins, so that a kind's peak never hides one of its steps' unknowns."""
    return None if a is None or b is None else max(a, b)


def _mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


# The step column's least width: the usual step names fit it, so that most tables look alike.
STEP_COLUMN = 34


def table(summary: Dict) -> str:
    """A short text table of a ``profile_`` summary: one line per step, then the totals; peaks in MiB (2**20 bytes),
    "-" where not measured. The step column is as wide as the longest name (the K search's run past 34)."""
    total = f"whole fit ({summary['device']})"
    kind_width = 13
    width = max([STEP_COLUMN, len(total) - kind_width - 1] + [len(r["name"]) for r in summary["steps"]])
    lines = [f"{'step':<{width}} {'kind':<{kind_width}} {'seconds':>9} {'peak extra MiB':>14}"]
    for r in summary["steps"]:
        lines.append(f"{r['name']:<{width}} {r['kind']:<{kind_width}} {r['seconds']:>9.2f} "
                     f"{_mib(r['peak_extra_bytes']):>14}")
    lines.append(f"{total:<{width + 1 + kind_width}} {summary['seconds']:>9.2f} "
                 f"{_mib(summary['peak_extra_bytes']):>14}")
    return "\n".join(lines)


def write(folder: os.PathLike, model) -> List[str]:
    """``profile.json`` (the model's ``profile_``) and, when one was recorded, ``trace.json`` (Chrome trace) into
    ``folder`` (made if missing), each written atomically, the trace first (a failed export leaves no new
    profile.json beside an old trace or none); returns the names written, in that order. A model may be written
    again and again. No trace.json for a fit that ran inside the caller's own torch.profiler: its profile.json says
    so (``"inside_another_profiler": true``), and its steps are in the caller's trace."""
    from . import io

    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"write(folder, model): folder must be a path, got {type(folder).__name__} (the arguments "
                        "the other way round?)")
    summary = getattr(model, "profile_", None)
    if summary is None:
        raise ValueError("the model has no profile; fit it with LAIC(profile=True)")
    names = []
    profiler = getattr(model, "profiler_", None)
    if profiler is not None and profiler.has_trace:
        with io.atomic_path(os.path.join(folder, "trace.json")) as tmp:
            profiler.export_trace(str(tmp))
        profiler.trace_moved(os.path.join(folder, "trace.json"))
        names.append("trace.json")
    io.write_text(os.path.join(folder, "profile.json"), json.dumps(summary, indent=1))
    return names + ["profile.json"]
