"""Failure as a collective event: a step that fails on one rank stops every rank with the same message.

A rank that raises between two collectives leaves the others waiting in the next one until the process group's
timeout (``LAIC_DIST_TIMEOUT_S``). :func:`stop_all_on_failure` runs one step's local work (checking a rank's input,
reading a batch, a forward pass) and then agrees with the other ranks, in one small all-reduce, on whether every rank
succeeded; if one did not, every rank raises the same error, which names the failing rank and its exception. Bad
input (a ``ValueError``, or a ``FileNotFoundError``: what the command line reports as one line) becomes a
:class:`CollectiveError` (a ``ValueError``) on every rank, so command-line tools report it once, from rank 0; any
other exception becomes a :class:`RankFailed`. :func:`from_main` is the same for a step that runs on rank 0 alone
(writing a shared file), its result broadcast to every rank. In a single process the step's own exception is raised
unchanged.

What it cannot cover: a rank that dies (killed, out of memory inside a collective) never reaches the agreement; then
the others fail at the process group's timeout, and torchrun (or :func:`laic.distributed.spawn`) stops them all.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from ..io import WriteError
from ..runtime import first_line
from .world import TIMEOUT_ENV, _timeout, comm_device, group_rank, group_size

T = TypeVar("T")

# Failures that are the input's fault, or the disk's (laic.io.WriteError: full, read-only). The command line
# (laic.cli) prints these as one line without a traceback; on a process group they become a CollectiveError, which it
# prints from rank 0 only.
INPUT_ERRORS = (ValueError, FileNotFoundError, WriteError)


class CollectiveError(ValueError):
    """Bad input, raised alike on every rank (by :func:`stop_all_on_failure`, or by code that every rank reaches
    with the same values): one rank reporting it is enough."""


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
    if isinstance(exc, (RankFailed, CollectiveError)):
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
            f"answer within {TIMEOUT_ENV}={_timeout().total_seconds():g} s: its own output says why (torchrun prints "
            "each process's)")


def _describe(exc: BaseException) -> Tuple[bool, str]:
    return isinstance(exc, INPUT_ERRORS), f"{type(exc).__name__}: {exc}"


def stop_all_on_failure(group: Optional[dist.ProcessGroup], step: Callable[[], T], what: str) -> T:
    """Run ``step()`` on every rank of ``group`` and return its result; if it raised on any rank, raise on every rank
    one error: "``what`` failed on rank R of G: <its exception>; all G ranks stopped" (R the first failing rank, the
    others listed after it), a :class:`CollectiveError` for bad input and a :class:`RankFailed` otherwise, the
    rank's own exception as its ``__cause__``. Every ``Exception`` is caught, not only bad input: one that stayed on
    its rank would leave the others waiting in their next collective until the timeout. A :class:`CollectiveError`
    or :class:`RankFailed` that every rank raised with the same message is raised as it is. Collective: every rank must call it at the
    same point. In a single process ``step``'s exception is raised unchanged."""
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
    reports: List[Optional[Tuple[bool, str]]] = [None] * group_size(group)
    dist.all_gather_object(reports, None if error is None else _describe(error), group=group)
    failed = [r for r, report in enumerate(reports) if report is not None]
    if isinstance(error, (CollectiveError, RankFailed)) and len(set(reports)) == 1:
        raise error   # raised alike on every rank already (an option every rank refuses, a nested step): as it is
    first_is_bad_input, first_message = reports[failed[0]]
    others = f" (and on rank{'s' * (len(failed) > 2)} {', '.join(map(str, failed[1:]))})" if len(failed) > 1 else ""
    message = (f"{what} failed on rank {failed[0]} of {len(reports)}{others}: {first_message}; all {len(reports)} "
               "ranks stopped")
    raise (CollectiveError if first_is_bad_input else RankFailed)(message) from error


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
