"""Where and how laic computes: the one device resolver and the CPU thread setting, shared by the API and the CLI."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

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
    return resolved


@contextlib.contextmanager
def torch_threads(n: Optional[int], arg: str = "n_threads") -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: leave torch's setting), then restore the setting."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{arg} must be a whole number >= 1 (or None for torch's default), got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
