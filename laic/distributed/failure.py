"""Failure as a collective event: a step that fails on one rank stops every rank with the same message.

A rank that raises between two collectives leaves the others waiting in the next one until the process group's
timeout (``LAIC_DIST_TIMEOUT_S``). :func:`stop_all_on_failure` runs one step's local work (checking a rank's input,
reading a batch, a forward pass) and then agrees with the other ranks, in one small all-reduce, on whether every rank
succeeded; if one did not, every rank raises the same error, which names the failing rank and its exception. Bad
input (a ``ValueError``, or a ``FileNotFoundError``: what the command line reports as one line, status 2) becomes a
:class:`CollectiveError` (a ``ValueError``) on every rank, so command-line tools report it once, from rank 0; the
machine's state (a full disk, a file this user may not read: one line, status 1) a :class:`CollectiveMachineError`
(an ``OSError``), reported alike; any other exception becomes a :class:`RankFailed`. When every rank failed with
the same error, its message is the one a single process gives (and an exception of another kind is itself).
:func:`from_main` is the same for a step that runs on rank 0 alone (writing a shared file), its result broadcast to
every rank. In a single process the step's own exception is raised unchanged.

What it cannot cover: a rank that dies (killed, out of memory inside a collective) never reaches the agreement; then
the others fail at the process group's timeout, and torchrun (or :func:`laic.distributed.spawn`) stops them all.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from ..io import MachineError, is_machine_error
from ..runtime import first_line
from .world import TIMEOUT_ENV, comm_device, group_rank, group_size, timeout_setting

T = TypeVar("T")

# Failures that are the input's fault. The command line (laic.cli) prints these as one line without a traceback
# (status 2); on a process group they become a CollectiveError, which it prints from rank 0 only.
INPUT_ERRORS = (ValueError, FileNotFoundError)
# Distinct messages of failing ranks shown in full; the rest are named by rank.
SHOWN_MESSAGES = 3


class CollectiveError(ValueError):
    """Bad input, raised alike on every rank (by :func:`stop_all_on_failure`, or by code that every rank reaches
    with the same values): one rank reporting it is enough."""


class CollectiveMachineError(MachineError):
    """The machine's state on one rank (:func:`laic.io.is_machine_error`: a full disk, a file this user may not read),
    raised alike on every rank: one rank reporting it is enough (status 1 on the command line, as for one process)."""


class RankFailed(RuntimeError):
    """Raised on every rank when a step failed on one of them with anything but bad input (:data:`INPUT_ERRORS`)."""


# How gloo words a collective that another rank never joined: a timeout or a closed connection, after the source
# path of its own code in brackets. (DistNetworkError and DistStoreError are torch's own words for the same.)
_GLOO_SOURCE = re.compile(r"^\[[^\]]*gloo[^\]]*\]\s*", re.IGNORECASE)
_PEER_GONE = re.compile(r"timed out|connection (reset|closed)", re.IGNORECASE)


def collective_failure(exc: BaseException) -> Optional[str]:
    """What a user reads when a collective failed because another process stopped or hung: this rank, torch's
    reason (without the backend's source path) and where to look; None for anything else (laic's own
    :class:`RankFailed` and :class:`CollectiveError` already say which rank failed and why)."""
    if isinstance(exc, (RankFailed, CollectiveError, CollectiveMachineError)):
        return None
    text = first_line(exc)
    peer_gone = (getattr(dist, "DistNetworkError", ()), getattr(dist, "DistStoreError", ()))
    if isinstance(exc, peer_gone):
        reason = text
    elif _GLOO_SOURCE.match(text) and _PEER_GONE.search(text):
        reason = _GLOO_SOURCE.sub("", text)
    else:
        return None
    rank = os.environ.get("RANK", "?")
    return (f"process {rank}: waiting for the other processes failed ({reason}); one of them stopped or did not "
            f"answer within {TIMEOUT_ENV}={timeout_setting().total_seconds():g} s: its own output says why, and "
            "torchrun's report names its exit code (130: interrupted, which only process 0 reports; -9: killed)")


_RAISED_AS = {"input": CollectiveError, "machine": CollectiveMachineError, "other": RankFailed}
_COLLECTIVE = tuple(_RAISED_AS.values())


def _describe(exc: BaseException) -> Tuple[str, str]:
    """(what kind of failure, "Type: message"); the kinds are :data:`_RAISED_AS`'s keys."""
    if isinstance(exc, _COLLECTIVE):
        kind = next(kind for kind, raised in _RAISED_AS.items() if isinstance(exc, raised))
    elif isinstance(exc, INPUT_ERRORS):
        kind = "input"
    elif is_machine_error(exc):
        kind = "machine"
    else:
        kind = "other"
    return kind, f"{type(exc).__name__}: {exc}"


def _failures_message(what: str, reports: List[Optional[Tuple[str, str]]]) -> str:
    """"``what`` failed on rank R of G: <message>; on rank S: <another message>; all G ranks stopped": each distinct
    message once (the ranks that raised it named together), the first :data:`SHOWN_MESSAGES` of them in full (a
    rank's message may say only what its rows hold: the others' are part of the answer)."""
    by_message: Dict[str, List[int]] = {}
    for rank, report in enumerate(reports):
        if report is not None:
            by_message.setdefault(report[1], []).append(rank)

    def ranks(of: List[int]) -> str:
        return f"rank{'s' * (len(of) > 1)} {', '.join(map(str, of))}"

    shown = list(by_message.items())[:SHOWN_MESSAGES]
    parts = [f"on {ranks(of)}{f' of {len(reports)}' * (i == 0)}: {message}" for i, (message, of) in enumerate(shown)]
    rest = sorted(r for _, of in list(by_message.items())[SHOWN_MESSAGES:] for r in of)
    if rest:
        parts.append(f"and on {ranks(rest)}")
    return f"{what} failed {'; '.join(parts)}; all {len(reports)} ranks stopped"


def stop_all_on_failure(group: Optional[dist.ProcessGroup], step: Callable[[], T], what: str) -> T:
    """Run ``step()`` on every rank of ``group`` and return its result; if it raised on any rank, raise on every rank
    one error: "``what`` failed on rank R of G: <its exception>; all G ranks stopped" (each distinct exception
    once: :func:`_failures_message`), a :class:`CollectiveError` for bad input, a :class:`CollectiveMachineError`
    for the machine's state and a :class:`RankFailed` otherwise (as the first failing rank's exception is), the
    rank's own exception as its ``__cause__``. Every ``Exception`` is caught, not only bad input: one that stayed on
    its rank would leave the others waiting in their next collective until the timeout. An exception that every
    rank raised alike (an option every rank refuses, a nested step's collective error) keeps its message, as a
    single process words it, and one that is neither bad input nor the machine's state is raised as it is.
    Collective: every rank must call it at the same point. In a single process ``step``'s exception is raised
    unchanged."""
    result: Optional[T] = None
    error: Optional[Exception] = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 -- every failure must reach the other ranks, whatever its type
        if group_size(group) == 1:
            raise
        error = exc
    if group_size(group) == 1:
        return result
    flag = torch.tensor([int(error is not None)], device=comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return result
    reports: List[Optional[Tuple[str, str]]] = [None] * group_size(group)
    dist.all_gather_object(reports, None if error is None else _describe(error), group=group)
    kind = next(report for report in reports if report is not None)[0]
    if len(set(reports)) == 1:   # every rank failed alike: as one process says it
        if isinstance(error, _COLLECTIVE) or kind == "other":
            raise error   # (an error of the code's own, e.g. a caller's exception from a callback: its own type)
        raise _RAISED_AS[kind](str(error)) from error
    raise _RAISED_AS[kind](_failures_message(what, reports)) from error


def from_main(group: Optional[dist.ProcessGroup], step: Callable[[], T], what: str) -> T:
    """Run ``step()`` on rank 0 only and return its (picklable) result on every rank, e.g. a file that only rank 0
    can be relied on to see, or a run only rank 0 writes; every rank waits for rank 0 to finish. A failure on rank 0
    is raised on every rank as :func:`stop_all_on_failure` does, on rank 0 too (its own exception is the
    ``__cause__``): every rank then takes the same ``except`` branch, which matters if that branch is collective."""
    rank = group_rank(group)
    result = stop_all_on_failure(group, lambda: step() if rank == 0 else None, what)
    if group_size(group) == 1:
        return result
    box = [result]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def same_on_all_ranks(group: Optional[dist.ProcessGroup], values: Dict[str, object]) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed equal (picklable) ``values``, naming those that
    differ: ranks handed different inputs would otherwise compute on mismatched data without noticing."""
    if group_size(group) == 1:
        return
    gathered: List = [None] * group_size(group)
    dist.all_gather_object(gathered, values, group=group)
    differ = sorted({name for other in gathered[1:] for name in values if other.get(name) != gathered[0].get(name)})
    if differ:
        ranks = [r for r, other in enumerate(gathered) if other != gathered[0]]
        raise CollectiveError(f"{', '.join(differ)} differ{'s' * (len(differ) == 1)} between rank 0 and rank"
                              f"{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}; give every rank the same")


def warn_from_main(group: Optional[dist.ProcessGroup], warn: Callable[[], None]) -> None:
    """Run ``warn`` (code that may issue a warning) on rank 0 only, as a step every rank takes: where warnings are
    errors (``python -W error``) rank 0's becomes every rank's error, instead of rank 0 leaving the others waiting in
    their next collective. In a single process, ``warn()``."""
    stop_all_on_failure(group, lambda: warn() if group_rank(group) == 0 else None, "a warning")
