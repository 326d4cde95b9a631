"""Start a small process group on this machine: what the tests use, and a way to run on several CPU processes
without torchrun. (On GPUs and across machines, use torchrun: ``laic.distributed.init`` reads its environment.)

Failure is collective: when one rank raises, the other ranks are stopped (they may be waiting for it in a collective)
and :func:`spawn` raises one ``RuntimeError`` naming the rank, with its traceback; a run past its deadline is
stopped and raises ``TimeoutError``. Nothing is left hanging either way.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, List, Optional

import torch

from laic_kernels import checks

from . import world

POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(fn: Callable, rank: int, size: int, port: int, backend: Optional[str], results, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        world.init(backend)
        # Plain pickle copies tensors into the message (torch's sharing pickler would need this process alive).
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        world.leave_quietly()


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def spawn(fn: Callable, size: int, *args: Any, timeout_s: float = 120.0, backend: Optional[str] = None) -> List[Any]:
    """Run ``fn(*args)`` on ranks ``0 .. size-1`` of a fresh process group and return the ranks' return values in
    rank order. ``backend`` defaults to NCCL when there is a GPU for every rank, else gloo.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function): each rank is a new Python process."""
    checks.int_in_range("size", size, 1, 1 << 16, " (the number of processes)")
    size = int(size)
    # (NaN never passed the deadline: a hung rank hung the caller for good; 0 or less gave up at once)
    if not checks.is_real(timeout_s) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    timeout_s = float(timeout_s)   # (a Fraction passed the check, then could not be formatted in the timeout's message)
    if backend is None:
        backend = "nccl" if torch.cuda.device_count() >= size else "gloo"
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_run_rank, args=(fn, rank, size, port, backend, results, args), daemon=True)
                 for rank in range(size)]
    for p in processes:
        p.start()
    returned: dict = {}
    deadline = time.monotonic() + timeout_s
    ended_quietly: set = set()   # ranks seen ended (status 0) with nothing received: a poll later they are dead
    try:
        while len(returned) < size:
            try:
                rank, ok, payload = results.get(timeout=POLL_S)
            except queue.Empty:
                # A rank ended with status 0 before reporting (os._exit(0)) was waited for until the deadline, then
                # called a timeout; it is dead once a whole poll after its end brought nothing of it.
                silent = [r for r, p in enumerate(processes) if r not in returned and p.exitcode is not None and
                          (p.exitcode != 0 or r in ended_quietly)]
                ended_quietly.update(r for r, p in enumerate(processes) if p.exitcode == 0 and r not in returned)
                if silent:
                    code = processes[silent[0]].exitcode
                    raise RuntimeError(f"rank {silent[0]} of {size} died with exit code {code} before reporting; "
                                       "the other ranks were stopped")
                if time.monotonic() > deadline:
                    waiting = [r for r in range(size) if r not in returned]
                    raise TimeoutError(f"ranks {waiting} of {size} did not finish within {timeout_s:g} s; all ranks "
                                       "were stopped")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {size} failed; the other ranks were stopped. "
                                   f"Its error:\n{payload}")
            returned[rank] = pickle.loads(payload)
    finally:
        _stop(processes)
    return [returned[r] for r in range(size)]
