"""The `laic` command. Each subcommand lives in laic/commands/<name>.py with ``add_arguments(parser)`` and
``run(args) -> int`` (and optionally ``interrupted(args) -> str``, what Ctrl-C left behind, and ``resumable(args)``, how
to go on after a failure); this file only wires them together. A command module imports nothing that loads torch at
its top or in ``add_arguments``: its work's modules are imported inside ``run``."""
from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Iterator

if "torch" not in sys.modules:
    # OpenMP reads this once, when torch loads (the commands import it): threads that wait for each other sleep
    # instead of spinning, so a machine busy with other work cannot stall every parallel op (a fit ran
    # 18-34x slower with 2 spinning threads than with one on a busy 2-core machine; laic.runtime says how laic
    # picks the count). A value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch.profiler's C++ half (Kineto, `laic fit --profile`) logs its own start and stop, and on a machine without a GPU
# "ERROR: ... gpuGetDeviceCount failed with code 35", to stderr between the command's lines: 6 is above its highest
# level, so it logs nothing (read when the profiler first starts; a value the user set is kept).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

# In the order a user meets them.
COMMANDS = ("embed", "vocab", "fit", "predict", "evaluate", "report", "demo")
# The exit status of a command stopped by Ctrl-C (SIGINT), as shells report it: 128 + 2.
INTERRUPTED_STATUS = 130
TERMINATED_STATUS = 143   # and by SIGTERM: 128 + 15
# Every file is written atomically and a run is published whole (laic.io, laic.run_dir), so a stop leaves no half.
# Commands that keep more (a run folder, finished shards) say so through their own `interrupted(args)`.
INTERRUPTED = "interrupted; no file was left half-written"


def _load(name):
    try:
        return importlib.import_module(f"laic.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"laic.commands.{name}":
            return None
        raise


def _load_torch() -> None:
    """torch, which the commands' work loads (2 to 3 s on a cold start), loaded once the command line is read: the
    parser itself loads nothing heavy (a command module imports its work inside ``run``), so that --help and a
    mistyped flag answer at once (tests/test_cli.py holds the parser to it). Not where the command module's
    ``needs_torch(args)`` says False (laic evaluate on two label files: numpy's work, answered without the wait)."""
    importlib.import_module("torch")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="laic", description="Language-assisted image clustering")
    parser.add_argument("--version", action="version", version=f"laic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _laic_warnings_in_one_line(command: str):
    """A ``warnings.formatwarning`` that words laic's own warnings as ``laic CMD: warning: ...`` (a user needs the
    message, not laic's file and source line); other packages' warnings keep Python's format. Only the wording:
    Python still writes them (ignoring a closed stderr) and ``catch_warnings(record=True)`` still records them."""
    python_format = warnings.formatwarning
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def wording(message, category, filename, lineno, line=None):
        if not os.path.abspath(filename).startswith(package):
            return python_format(message, category, filename, lineno, line)
        return f"laic {command}: warning: {message}\n"

    return wording


class _Report:
    """``sys.stdout`` while a command runs. What a command prints is its report, not its work: a stdout that fails
    (the reader of a pipe gone, ``| head -1``; a full disk behind ``> file``) is sent to /dev/null at its first
    failure and the command goes on (a fit printing into a closed pipe stopped before writing its run, and exited
    0). ``failure`` keeps the error, for the exit status."""

    def __init__(self, stream):
        self._stream, self.failure = stream, None

    def write(self, text: str) -> int:
        if self.failure is None and self._stream is not None:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._lose(exc)
        return len(text)

    def flush(self) -> None:
        if self.failure is None and self._stream is not None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._lose(exc)

    def _lose(self, exc: OSError) -> None:
        self.failure = exc
        try:   # what stays buffered then goes nowhere, also at exit (else: "Exception ignored ... BrokenPipeError")
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError, AttributeError):   # a stream without a file descriptor (tests' capture)
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _paths_or_escapes(error: UnicodeError):
    """Of what stdout's encoding cannot show: a path's bytes that are not text in this locale (Python holds them as
    the lone surrogates U+DC80-U+DCFF: ``os.fsdecode``'s surrogateescape) written as those bytes, so that "wrote
    RUN_DIR/" names a path that can be pasted (escaped, it read runs/lat\\udce9/); anything else as a
    backslash escape (a noun under an ASCII terminal)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    chunk = error.object[error.start:error.end]
    raw = len(chunk) - len(chunk.lstrip(_ESCAPED_BYTES))
    if raw:
        return bytes(ord(c) - 0xDC00 for c in chunk[:raw]), error.start + raw
    text = len(chunk) - len(chunk.lstrip("".join(set(chunk) - set(_ESCAPED_BYTES))))   # up to the next raw byte
    return codecs.backslashreplace_errors(UnicodeEncodeError(error.encoding, error.object, error.start,
                                                             error.start + text, error.reason))


_ESCAPED_BYTES = "".join(map(chr, range(0xDC80, 0xDD00)))


codecs.register_error("laic.paths_or_escapes", _paths_or_escapes)


@contextlib.contextmanager
def _reported() -> Iterator[_Report]:
    """``sys.stdout`` as a :class:`_Report` for the block, flushed at its end; characters the terminal's encoding
    cannot show (a noun under LC_ALL=C with PYTHONUTF8=0, PYTHONIOENCODING=ascii) written as escapes, as Python
    writes stderr (the run was written, then the command ended with status 2 on 'ascii' codec can't encode)."""
    stream = sys.stdout   # None where stdout is closed (`>&-`): then nothing is written, as print() does
    errors = getattr(stream, "errors", None)
    try:
        stream.reconfigure(errors="laic.paths_or_escapes")
    except (AttributeError, ValueError, OSError):   # not a TextIOWrapper, or one that cannot change now
        errors = None
    report = sys.stdout = _Report(stream)
    try:
        yield report
        report.flush()
    finally:
        sys.stdout = stream
        if errors is not None:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors=errors)


def _status_after_report(command: str, status: int, report: _Report) -> int:
    """A reader gone (EPIPE) is no error (`laic demo | head`); another failure of stdout (a full disk) is said, on
    stderr, naming stdout, with status 1 where the command itself succeeded."""
    import errno

    failure = report.failure
    if failure is None or isinstance(failure, BrokenPipeError) or failure.errno == errno.EPIPE:
        return status
    _say(f"laic {command}: error: writing to standard output: {failure}")
    return status or 1


def main(argv=None) -> int:
    from . import interrupts

    starting = interrupts.Signals()
    try:
        # Reads the command line, then loads torch: seconds on a cold start. (SIGTERM too: it killed the command
        # without a word then.) A signal is only noted, and acted on once the imports are done: a KeyboardInterrupt
        # raised inside torch's import aborted the process (SIGABRT and a 100-line stack, 2 of 80 Ctrl-Cs on a busy
        # machine) or was swallowed there, and the command ran to its end with status 0.
        with interrupts.handled(sigterm=not _under_torchrun(), signals=starting, raising=False), \
                _usage_from_one_process_a_machine():
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:   # --help, --version, a usage error: the stop still comes first (a `timeout` saw 0)
                if starting.received is None:
                    raise
            else:
                needs_torch = getattr(args._module, "needs_torch", None)
                if needs_torch is None or needs_torch(args):
                    _load_torch()
        if starting.received is not None:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        terminated = starting.received == signal.SIGTERM
        if not _under_torchrun() or _torchrun_process_zero():   # (a Ctrl-C reaches every process: process 0 says it)
            _say(f"laic: {'stopped by SIGTERM' if terminated else 'interrupted'} before the command started")
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS
    with _reported() as report:
        status = _run(args, report)
    return _status_after_report(args.command, status, report)


def console_main() -> int:
    """The ``laic`` command (its console script, ``python -m laic``): :func:`main`, then the rest of the process's
    life deaf to Ctrl-C and SIGTERM. Once the command has written its files and said so, Python's teardown of torch
    and the rest takes about a second, where those signals reset to their defaults killed it without a word, with
    status 130 or 143 for a command that had succeeded (twice in a row, 12-06); ignored, the command ends with its
    own status."""
    status = main()
    if threading.current_thread() is threading.main_thread():   # (where Python takes handlers)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if status in (INTERRUPTED_STATUS, TERMINATED_STATUS):
        # The stop is said, in one line; what it left to the teardown is not news: a data loader's workers killed
        # by the same SIGTERM (a `timeout` signals the whole process group) were reported by the iterator's
        # __del__ after that line, and multiprocessing's feeder threads by a KeyError (1 of 19 and 2 of 4 stopped
        # stage-2 fits, 12-06).
        sys.unraisablehook = threading.excepthook = lambda report: None
    return status


def _run(args, report: _Report) -> int:
    from . import interrupts

    joined, signals = False, interrupts.Signals()
    python_format, warnings.formatwarning = warnings.formatwarning, _laic_warnings_in_one_line(args.command)
    # The stop's exception holds the frames it interrupted (a data loader's iterator among them), let go at the end
    # of its except clause below, after the signal block: what their __del__ reports then is quiet too.
    with interrupts.reports_quiet_after(signals):
        try:
            with interrupts.handled(sigterm=not _under_torchrun(), signals=signals), _progress_shown(args):
                joined = _join_torchrun(args)
                status = int(args._module.run(args) or 0)
        except (ValueError, FileNotFoundError) as exc:
            # Bad input: one clear line, no traceback (an error raised alike on every rank: from rank 0 only).
            if not _reported_by_rank_zero(exc):
                _say(f"laic {args.command}: error: {exc}")
            status = 2
        except KeyboardInterrupt:
            status = _say_interrupted(args, signals.received)
        except OSError as exc:
            # The machine, not the input: a full disk, a read-only folder (laic.io.WriteError names the file), a file
            # this user may not read (on one process of a group: from rank 0 only). Any other OSError is a bug's: its
            # traceback stays.
            from .io import is_machine_error

            if not is_machine_error(exc):
                raise
            if not _reported_by_rank_zero(exc):
                _say(f"laic {args.command}: error: {exc}{_resumable(args)}")
            status = 1
        except RuntimeError as exc:
            # The same Ctrl-C may reach a data loader's worker processes first: "DataLoader worker exited
            # unexpectedly" is then the interrupt; else that worker died (laic.images.worker_death_said). Under torchrun: another process stopped or hung, and this one's
            # collective timed out or lost its peer (laic.distributed.failure.collective_failure); what happened there
            # is in that process's output.
            if signals.received is not None:
                status = _say_interrupted(args, signals.received)
            else:
                said = _collective_failure(exc) or _worker_death(exc)
                if said is None:
                    raise
                _say(f"laic {args.command}: error: {said}{_resumable(args)}")
                status = 1
        finally:
            warnings.formatwarning = python_format
    if joined:
        _end_torchrun_rank(args.command, status, report)
    return status


@contextlib.contextmanager
def _usage_from_one_process_a_machine():
    """Under torchrun, argparse's usage errors and --help from the first process of each machine alone (its
    processes parse the same command line, and each printed them; another machine's may differ, and says so
    itself); the others still exit with argparse's status."""
    if not _under_torchrun() or _torchrun_machine_zero():
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), contextlib.redirect_stderr(nowhere):
        yield


@contextlib.contextmanager
def _progress_shown(args):
    """For a command that says ``PROGRESS = True`` (a fit, a prediction on images, a report: minutes at scale),
    laic's INFO lines on stderr while it runs (the end of each step, laic.profiling; each stage-2 epoch), worded as
    ``laic CMD: ...``, and the bars of loops that ask ``laic.profiling.progress_shown()``; not with ``--quiet``, and
    under torchrun from process 0 only."""
    if not getattr(args._module, "PROGRESS", False) or getattr(args, "quiet", False) or \
            (_under_torchrun() and not _torchrun_process_zero()):
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"laic {args.command}: %(message)s"))
    logger = logging.getLogger("laic")
    level, propagate = logger.level, logger.propagate
    try:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        # Not also to the root logger's handlers: a library's module-level logging.info() (open_clip's) gives it one,
        # which printed every line twice.
        logger.propagate = False
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _say_interrupted(args, signum) -> int:
    """Ctrl-C or SIGTERM: one line saying what was kept, no traceback; the status a shell reports for the signal.
    Under torchrun process 0 says it (it alone writes, so it alone knows what was kept: another process claimed
    RUN_DIR untouched where process 0 had just published the run)."""
    import signal

    if _under_torchrun() and not _torchrun_process_zero():
        return TERMINATED_STATUS if signum == signal.SIGTERM else INTERRUPTED_STATUS
    describe = getattr(args._module, "interrupted", None)
    said = describe(args) if describe else INTERRUPTED
    if signum == signal.SIGTERM:
        _say(f"laic {args.command}: stopped by SIGTERM; {said}")
        return TERMINATED_STATUS
    _say(f"laic {args.command}: {said}")
    return INTERRUPTED_STATUS


def _resumable(args) -> str:
    """``"; how to go on"`` from what a command that failed for the machine's sake or another process's kept (its
    optional ``resumable(args)``: stage 2's checkpoint of ``laic fit --images``), else nothing. Not after bad input:
    that may be the checkpoint's own refusal."""
    describe = getattr(args._module, "resumable", None)
    resume = describe(args) if describe else None
    return "" if resume is None else f"; {resume}"


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every process shares the terminal, and a line written as its
    text and then its newline (an unbuffered stderr) ran into another process's. Nothing where stderr is closed
    (``2>&-``: Python's sys.stderr is then None, and writing to it turned status 2 or 130 into 1)."""
    if sys.stderr is None:
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _torchrun_process_zero() -> bool:
    """Whether this is torchrun's process 0 (by its RANK, known before the process group is joined)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _torchrun_machine_zero() -> bool:
    """Whether this is the first torchrun process of its machine (LOCAL_RANK 0; process 0 on one machine; by RANK
    where a launcher sets no LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK", "").strip()
    return local in ("", "0") if local else _torchrun_process_zero()


def _collective_failure(exc: BaseException):
    if "torch.distributed" not in sys.modules or not _under_torchrun():
        return None
    from .distributed.failure import collective_failure

    return collective_failure(exc)


def _worker_death(exc: BaseException):
    """A data loader's worker that died, said in one line (laic.images.worker_death_said), or None."""
    if "laic.images" not in sys.modules:
        return None
    from .images import worker_death_said

    return worker_death_said(exc)


class _RefusedByEveryProcess(ValueError):
    """A refusal that every torchrun process of a machine reaches alike before any joins the process group (its
    command line, its environment): the first process of each machine says it."""


def _reported_by_rank_zero(exc: BaseException) -> bool:
    if isinstance(exc, _RefusedByEveryProcess):
        return not _torchrun_machine_zero()
    if "laic.distributed" not in sys.modules:
        return False
    from .distributed import is_main
    from .distributed.failure import CollectiveError, CollectiveMachineError

    return isinstance(exc, (CollectiveError, CollectiveMachineError)) and not is_main()


def _join_torchrun(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group, for the commands that share their work out; the
    others would each do all of it and race to write the same files, so they refuse. True when this call started
    the group (a caller's own group is the caller's to leave)."""
    if not _under_torchrun():
        return False
    if not getattr(args._module, "DISTRIBUTED", False):
        raise _RefusedByEveryProcess(f"`laic {args.command}` does not run under torchrun yet (WORLD_SIZE="
                                     f"{os.environ['WORLD_SIZE']}); run it as one process (`laic embed` and `laic "
                                     "fit` do run under torchrun)")
    import torch.distributed as dist

    from .distributed import init
    from .distributed.world import timeout_setting

    try:   # every process of a machine reads the same environment: a bad setting said once a machine
        timeout_setting()
    except ValueError as exc:
        raise _RefusedByEveryProcess(str(exc)) from None
    started = not dist.is_initialized()
    init()
    return started


def _end_torchrun_rank(command: str, status: int, report: _Report) -> None:
    """Leave the process group and end this torchrun rank now, skipping the interpreter's teardown.

    With gloo, a worker thread may still be releasing the last collective's tensors when Python finalises; it then
    waits for the GIL, is unwound by the finalising interpreter, and the rank dies with SIGABRT ("terminate called
    without an active exception") after the run was written (seen in CI, and in 1 to 9 of 25 runs of a 2-rank
    `torchrun -m laic fit` on a busy 2-core machine, destroy_process_group or not; a core dump showed
    ProcessGroupGloo::runLoop destroying an AsyncBroadcastWork during Py_FinalizeEx). Every file is already written
    (atomically), so nothing is lost by not finalising. (The "or not": torch's own collectives held the group for
    good, so it could not be destroyed; laic.distributed.world now keeps them from it, and leaves a group of its
    init() at exit, which ends the abort for the Python API too; this stays, for a group of the caller's own.)"""
    from .distributed import leave_quietly

    leave_quietly()
    sys.stdout.flush()   # (the command's _Report: a failing stdout is noted, and said below)
    status = _status_after_report(command, status, report)
    if sys.stderr is not None:
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(console_main())
