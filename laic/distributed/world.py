"""The one place that knows the world: which process this is, how many there are, and which rows are whose.

Started by ``torchrun`` (or :func:`laic.distributed.spawn`), a process finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init` turns them into the default process group, NCCL
when CUDA is available and gloo otherwise. Without those variables (or with ``WORLD_SIZE=1``) :func:`init` does
nothing and the world is this single process, so code written against this module runs unchanged on one machine.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import datetime
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
# Imported before any process group exists: its functions default to group=group.WORLD, evaluated at its first import.
# Imported later (the first torch.optim optimiser imports it, through torch._dynamo: stage 2's AdamW) they held the live
# default group, so that shutdown()'s destroy_process_group could not free it: its gloo worker threads outlived the
# interpreter, and one still releasing the last collective's tensors at exit waited for the finalising interpreter's
# GIL and ended the rank with SIGABRT ("terminate called without an active exception") after all its work was done.
import torch.distributed.nn.functional  # noqa: F401,E402

from laic_kernels import checks

# Seconds a collective waits for the other ranks before it fails: long enough for a slow rank, short enough that a
# rank that died without its launcher noticing turns into an error rather than a hang. LAIC_DIST_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "LAIC_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    """This process's place among all of them. ``group`` is None in a single process (every collective is then a
    no-op); ``device`` is where this rank computes (its own GPU under NCCL, else the CPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return dist.group.WORLD if self.size > 1 else None

    def is_main(self) -> bool:
        """True on rank 0 only: the rank that logs, shows progress and writes shared files."""
        return self.rank == 0

    def row_shard(self, n_rows: int) -> slice:
        """This rank's rows of an ``n_rows``-row matrix (see :func:`row_shard`)."""
        return row_shard(n_rows, self.rank, self.size)


_world = World()
_leave_at_exit = False   # leave_quietly registered with atexit (by init)


def row_counts(n_rows: int, size: int) -> List[int]:
    """Rows per rank when ``n_rows`` are split into ``size`` contiguous blocks in rank order: the first
    ``n_rows % size`` ranks get one more row than the others."""
    checks.int_in_range("n_rows", n_rows, 0, 2**62)   # (-5 rows gave [-2, -3]; 0 processes a ZeroDivisionError)
    checks.int_in_range("size", size, 1, 2**31)
    base, extra = divmod(int(n_rows), int(size))
    return [base + (r < extra) for r in range(size)]


def row_shard(n_rows: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous block of rows out of ``n_rows`` (blocks differ in size by at most one row)."""
    counts = row_counts(n_rows, size)
    checks.int_in_range("rank", rank, 0, size - 1, f" (the ranks of {size} processes)")   # -1 took the last block
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


# A day: beyond it a wait is a hang, and timedelta (and the backends' milliseconds) overflow near 1e9 days.
MIN_TIMEOUT_S = 0.001
MAX_TIMEOUT_S = 86400.0


def timeout_setting() -> datetime.timedelta:
    """How long a collective waits for the other processes: LAIC_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    # (NaN too) 0 or less timed every collective out at once; so did less than a millisecond, torch's unit
    if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds of at least {MIN_TIMEOUT_S:g} (a "
                         f"millisecond) and at most {MAX_TIMEOUT_S:.0f} (a day)")
    return datetime.timedelta(seconds=seconds)


def init(backend: Optional[str] = None) -> World:
    """Join the process group described by the environment (idempotent) and return the world.

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. A single process (no
    ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets ``World()`` and no process group."""
    global _world
    if dist.is_initialized():
        return current()
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _world = World()
        return _world
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={size} but {name} is not set; start the processes with torchrun "
                             "(or laic.distributed.spawn), which sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    # Checked here: a rank outside the world waited the whole timeout for peers that never come, then printed a
    # C++ stack.
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={size}); start the processes with torchrun (or "
                         "laic.distributed.spawn), which numbers them 0 to WORLD_SIZE - 1")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} must be >= 0 (torchrun numbers a machine's processes from 0)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                             "start at most one process per GPU (torchrun --nproc-per-node), or use backend='gloo'")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout_setting())
    # A group still there at exit is left before the interpreter finalises (the same abort, shutdown() or not).
    global _leave_at_exit
    if not _leave_at_exit:
        atexit.register(leave_quietly)
        _leave_at_exit = True
    _world = World(rank=rank, size=size, local_rank=local_rank, device=device)
    return _world


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    global _world
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:   # even after a failed destroy this process stops using the group (both callers then end)
        _world = World()


def leave_quietly() -> None:
    """:func:`shutdown` at the end of a rank's work, whatever state the group is in: a group broken by another
    rank's failure has nothing left to release cleanly, and the rank's own outcome is what it reports."""
    try:
        shutdown()
    except Exception:
        pass


def current() -> World:
    """This process's world: the default process group, whether :func:`init` or the caller's own code started it
    (a single process when there is none, or inside :func:`one_process`)."""
    global _world
    if not dist.is_initialized():
        # The caller destroyed its group itself (not through shutdown): a stale rank 1 of 2 embedded only its share
        # of the images, alone.
        _world = World() if _world.size > 1 else _world
    else:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        # The backend too: a group made again under another one computes elsewhere.
        if (_world.size, _world.rank, _world.device.type) != (dist.get_world_size(), dist.get_rank(), device.type):
            _world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0),
                           device=device)
    return dataclasses.replace(_world, rank=0, size=1) if _alone.get() else _world


_alone: contextvars.ContextVar[bool] = contextvars.ContextVar("laic_one_process", default=False)


@contextlib.contextmanager
def one_process() -> Iterator[None]:
    """Within, laic works as one process on this process's data alone, whatever process group is initialised:
    ``LAIC.fit`` (and ``fit_trace``, ``gather_labels``), ``fit_images`` and stage 2, the embedding of images; e.g.
    on rank 0 after a training that used the group, while the other ranks do something else (outside it every rank
    must make the call, or the ranks that did wait in its first collective until the timeout)."""
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)


def is_main() -> bool:
    """True on rank 0 (and in a single process): log and show progress only where this holds."""
    return current().is_main()


# -- any process group (the world's or a sub-group; None: this process alone) ---------------------------------------


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def comm_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where tensors must be for ``group``'s collectives: the current GPU under NCCL, else the CPU."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
