"""laic.interrupts: SIGINT and SIGTERM as a remembered KeyboardInterrupt while the laic command runs."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from laic import interrupts


def test_both_signals_raise_are_remembered_and_the_handlers_come_back(ctrl_c_as_a_terminal_gives_it):
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with interrupts.handled() as signals:
            assert signals.received is None
            interrupts.stop_if_interrupted()          # nothing came: nothing raised
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
            assert signals.received == sig
            with pytest.raises(KeyboardInterrupt):
                interrupts.stop_if_interrupted()     # again, where the first was swallowed
        assert {s: signal.getsignal(s) for s in before} == before
        interrupts.stop_if_interrupted()             # after the block (the Python API): nothing raised
        assert signals.received == sig               # still readable by the command


def test_a_host_programs_own_handler_is_kept():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with interrupts.handled() as signals:
            os.kill(os.getpid(), signal.SIGTERM)     # the host's handler, not a KeyboardInterrupt
        assert seen == [signal.SIGTERM] and signals.received is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_ignored_ctrl_c_stays_ignored():
    # `nohup laic ... &` from a script: SIGINT is ignored on purpose, and the command must not take it back.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.handled() as signals:
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.received is None and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_without_sigterm_only_ctrl_c_is_taken(ctrl_c_as_a_terminal_gives_it):
    # Under torchrun SIGTERM keeps its default (torchrun ends the other processes with it when one fails).
    with interrupts.handled(sigterm=False):
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)


def _python(code: str) -> subprocess.CompletedProcess:
    # A fresh process, Ctrl-C as a terminal gives it (a background test run inherits SIGINT ignored).
    return subprocess.run([sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, "
                           "signal.default_int_handler)\n" + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_a_stop_raised_in_a_del_or_a_helper_thread_is_said_by_no_traceback():
    # A data loader starting or ending its workers (an at-fork hook, __del__) took the KeyboardInterrupt, and Python
    # printed "Exception ignored in ..." with its traceback beside the command's one line; a multiprocessing helper
    # thread losing its peer printed its ConnectionResetError.
    result = _python("""
        import os, signal, sys, threading
        from laic import interrupts

        class Loader:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))              # the handler runs here, inside __del__: the exception is unraisable

        def helper():
            raise ConnectionResetError("peer gone")

        with interrupts.handled() as signals:
            Loader()
            thread = threading.Thread(target=helper)
            thread.start()
            thread.join()
            try:
                interrupts.stop_if_interrupted()
            except KeyboardInterrupt:
                print("stopped", signals.received == signal.SIGINT)
        # Outside the block, and before any signal inside one: reported as Python reports them.
        class Broken:
            def __del__(self):
                raise KeyboardInterrupt("after")
        Broken()
        with interrupts.handled():
            thread = threading.Thread(target=helper)
            thread.start()
            thread.join()
        """)
    assert result.returncode == 0 and result.stdout == "stopped True\n", result
    assert result.stderr.count("Traceback") == 2 and "KeyboardInterrupt: after" in result.stderr and \
        "ConnectionResetError: peer gone" in result.stderr, result.stderr


def test_the_command_ends_with_its_own_status_when_a_signal_comes_after_it():
    # Python's teardown of torch takes about a second after the command has written its files and said so; a
    # Ctrl-C or SIGTERM there killed it silently, status 130 or 143 for a command that had succeeded.
    for sig in ("SIGINT", "SIGTERM"):
        result = _python(f"""
            import os, signal
            import laic.cli as cli

            cli.main = lambda argv=None: 0              # a command that succeeded
            status = cli.console_main()
            os.kill(os.getpid(), signal.{sig})      # the signal in the process's last moments
            print("ended with", status)
            raise SystemExit(status)
            """)
        assert (result.returncode, result.stdout, result.stderr) == (0, "ended with 0\n", ""), (sig, result)


def test_what_a_stop_leaves_to_the_teardown_prints_nothing_after_its_line():
    # A `timeout` sends SIGTERM to the whole process group: stage 2's loader workers died too, and after the
    # command's one line their iterator's __del__ printed "DataLoader worker ... is killed by signal" (a
    # RuntimeError), or a feeder thread a KeyError. After a stop the process only ends: nothing more is said. A
    # command that succeeded keeps Python's reports.
    for status, quiet in ((143, True), (130, True), (0, False)):
        result = _python(f"""
            import threading
            import laic.cli as cli

            class Loader:
                def __del__(self):
                    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

            def feeder():
                raise KeyError("QueueFeederThread")

            def stopped(argv=None):
                print("laic fit: stopped by SIGTERM; interrupted")
                return {status}

            cli.main = stopped
            status = cli.console_main()
            Loader()
            thread = threading.Thread(target=feeder)
            thread.start()
            thread.join()
            raise SystemExit(status)
            """)
        assert result.returncode == status and result.stdout == "laic fit: stopped by SIGTERM; interrupted\n", result
        assert (result.stderr == "") == quiet, result.stderr
        if not quiet:
            assert "RuntimeError: DataLoader worker" in result.stderr and "KeyError" in result.stderr


def test_a_loaders_workers_killed_by_the_stop_say_nothing_inside_the_block_either():
    result = _python("""
        import os, signal
        from laic import interrupts

        class Loader:
            def __del__(self):
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

        with interrupts.handled() as signals:
            Loader()                                   # before any signal: reported
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))
            except KeyboardInterrupt:
                pass
            Loader()                                   # after it: the stop's doing
        print("received", signals.received == signal.SIGTERM)
        """)
    assert result.returncode == 0 and result.stdout == "received True\n", result
    assert result.stderr.count("RuntimeError: DataLoader worker") == 1, result.stderr


def test_what_the_stops_exception_lets_go_of_after_the_signal_block_is_quiet():
    # The stop's KeyboardInterrupt holds the frames it interrupted (stage 2's `for batch in loader`); the loader's
    # iterator is let go at the end of the command's except clause, after the signal block had put Python's hooks
    # back, and its __del__ printed "DataLoader worker ... is killed by signal" after the line (a SIGTERM hunt: 1 of
    # 24 group-stopped stage-2 fits).
    result = _python("""
        import os, signal, sys
        import laic.cli, laic.commands.evaluate as command

        class Iterator:
            def __del__(self):
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.")

        def run(args):
            batches = Iterator()
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
            return 0

        command.run = run
        sys.argv = ["laic", "evaluate", "--run", "x", "--labels", "y"]
        raise SystemExit(laic.cli.console_main())
        """)
    assert result.returncode == 143, result
    assert result.stderr == "laic evaluate: stopped by SIGTERM; interrupted; no file was left half-written\n", \
        result.stderr


def test_a_process_forked_inside_the_block_ends_quietly_on_the_signal():
    # A data loader's worker forked a moment before the group's SIGTERM ran laic's handler before its own: its
    # KeyboardInterrupt came out as multiprocessing's "Process Process-2: Traceback ...".
    result = _python("""
        import os, signal
        from laic import interrupts

        with interrupts.handled() as signals:
            child = os.fork()
            if child == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))
                os._exit(3)                        # not reached: the handler ends the child
            _, status = os.waitpid(child, 0)
        print("child status", os.waitstatus_to_exitcode(status), "parent received", signals.received)
        """)
    assert result.returncode == 0 and result.stdout == "child status 0 parent received None\n", result
    assert result.stderr == "", result.stderr


def test_sigterm_while_the_commands_load_is_one_line_and_143():
    for sig, status, said in (("SIGTERM", 143, "laic: stopped by SIGTERM before the command started\n"),
                              ("SIGINT", 130, "laic: interrupted before the command started\n")):
        result = _python(f"""
            import os, signal, sys
            import laic.cli as cli

            real = cli.build_parser

            def loading():                             # the commands' imports take seconds on a cold start
                os.kill(os.getpid(), signal.{sig})
                sum(range(1000))
                return real()                          # (noted, the signal is acted on once they are done)

            cli.build_parser = loading
            sys.argv = ["laic", "evaluate", "--labels", "t.npy", "--pred", "p.npy"]
            raise SystemExit(cli.console_main())
            """)
        assert (result.returncode, result.stderr) == (status, said), (sig, result)


def test_a_loader_worker_says_nothing_of_a_peer_a_stop_took_away():
    # The worker's resource-sharer thread reports through sys.excepthook: a ConnectionResetError's traceback when
    # the stopped main process dropped a batch's handover; any other error is still reported.
    result = _python("""
        import sys
        from laic.images import stop_quietly_on_sigterm

        stop_quietly_on_sigterm(0)
        for error in (ConnectionResetError("peer gone"), EOFError(), ValueError("a real one")):
            try:
                raise error
            except BaseException:
                sys.excepthook(*sys.exc_info())
        """)
    assert result.returncode == 0, result
    assert "ValueError: a real one" in result.stderr and "ConnectionResetError" not in result.stderr and \
        "EOFError" not in result.stderr, result.stderr
