"""Ctrl-C and SIGTERM in the `laic` command: a stop that is never lost.

Python ignores an exception raised inside ``__del__``, and a DataLoader's iterator shuts its worker processes down
there, at the end of every pass: a Ctrl-C that lands then was swallowed ("Exception ignored in ...
_MultiProcessingDataLoaderIter.__del__") and a stage-2 fit ran on to the end and exited 0. And SIGTERM (what
``timeout``, batch schedulers and ``docker stop`` send) killed the command without running its clean-ups, leaving
staging folders behind. :func:`handled` (entered by ``laic.cli.main``) turns either signal into a
``KeyboardInterrupt`` and remembers it; loops over data loaders call :func:`stop_if_interrupted` after each batch
(the embedding passes) or each pass (a stage-2 epoch), which raises again where the first was swallowed. Without
``handled`` (the Python API) nothing is remembered, and :func:`stop_if_interrupted` does nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass
class Signals:
    received: Optional[int] = None    # the signal (signal.SIGINT or signal.SIGTERM) that came, if any


_current: Optional[Signals] = None    # that of the handled() block being run


def stop_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came (the first ``KeyboardInterrupt`` may have been swallowed)."""
    if _current is not None and _current.received is not None:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Within, a Ctrl-C (SIGINT) waits: it is raised as ``KeyboardInterrupt`` when the block ends. For a step that
    an exception must not cut in two: a data loader's iterator starting its worker processes, cut, left those it
    had forked running for good (laic.images.WorkerLoader). Only in the main thread, and only where SIGINT has
    Python's own handler (a notebook's "interrupt", a script's Ctrl-C); under :func:`handled` or a host program's
    handler nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    came = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if came:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled(sigterm: bool = True, signals: Optional[Signals] = None, raising: bool = True) -> Iterator[Signals]:
    """Within: SIGINT (and SIGTERM, with ``sigterm``) raise ``KeyboardInterrupt`` (with ``raising``; else they are
    only noted, for a block that an exception must not enter) and are remembered in the
    ``Signals`` it gives (read it after the block too). Handlers a host program set itself are kept; outside the
    main thread (where Python takes no handler) nothing changes. Under torchrun pass ``sigterm=False``: torchrun
    ends the other processes with SIGTERM when one fails, and a process waiting in a collective runs no Python
    handler until the wait ends (it lingered until torchrun's SIGKILL, then said it was stopped)."""
    global _current
    signals, outer = signals or Signals(), _current
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    closing, pid = False, os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != pid:
            # A data loader's worker forked a moment before the signal, not yet in its own handler
            # (laic.images.stop_quietly_on_sigterm): it ends at once, without multiprocessing's traceback.
            os._exit(0)
        signals.received = signum
        if raising and not closing:     # not while the handlers are put back (one would stay installed)
            raise KeyboardInterrupt

    defaults = {signal.SIGINT: signal.default_int_handler, **({signal.SIGTERM: signal.SIG_DFL} if sigterm else {})}
    previous = {sig: signal.getsignal(sig) for sig in defaults}
    ours = [sig for sig, default in defaults.items() if previous[sig] == default]
    for sig in ours:
        signal.signal(sig, on_signal)
    _current = signals
    try:
        with reports_quiet_after(signals):
            yield signals
    finally:
        closing = True
        _current = outer
        for sig in ours:
            signal.signal(sig, previous[sig])


@contextlib.contextmanager
def reports_quiet_after(signals: Signals) -> Iterator[None]:
    """Within: once ``signals`` holds a signal, what the stop leaves to ``__del__`` methods and helper threads is not
    reported (see :func:`_quiet_after`). :func:`handled` enters it; the command enters it around its whole handling
    of the stop as well, since the stop's exception lets go of the frames it interrupted after the signal block."""
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
    # (a data loader whose workers the same signal killed says so from its iterator's __del__: a RuntimeError)
    sys.unraisablehook = _quiet_after(signals, unraisable_hook, (KeyboardInterrupt, RuntimeError))
    # (multiprocessing's resource-sharing thread loses its peer when a stop ends the workers it served)
    threading.excepthook = _quiet_after(signals, thread_hook, (KeyboardInterrupt, ConnectionError, EOFError))
    try:
        yield
    finally:
        sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def _quiet_after(signals: Signals, hook, expected):
    """``hook`` (sys.unraisablehook or threading.excepthook), but silent about the ``expected`` exceptions once a
    signal came: the stop raised in an at-fork hook or a ``__del__`` (a data loader starting or ending its
    workers), or what it left a helper thread, is said once, by the command's one line, not by a traceback each
    (3 of 14 stopped stage-2 fits printed such traces, 12-06)."""
    def quiet(report):
        if signals.received is not None and isinstance(report.exc_value, expected):
            return
        hook(report)
    return quiet
