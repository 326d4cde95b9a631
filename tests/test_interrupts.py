"""laic.interrupts: SIGINT and SIGTERM as a remembered KeyboardInterrupt while the laic command runs."""
import os
import signal

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
