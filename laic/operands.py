"""What the kernels multiply: unit rows, and the operand precision chosen by device (half precision on GPUs)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from laic_kernels.reference._chunks import row_chunks


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


_forced_operand_dtype: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "laic_operand_dtype", default=None)


def operand_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the operands stage 0 hands to the kernels (similarity_topk, semantic_mix, the graphs, the
    k-means assignment) on ``device``: bfloat16 on CUDA sm80+ (tensor cores; range as float32), float16 on older
    GPUs, float32 on the CPU (no half-precision speed-up there). The kernels accumulate in float32 and return
    float32, and everything that feeds training (centres, counterparts, fused features) stays float32.
    :func:`half_operands` overrides the choice (measurement only: benchmarks/quality.py --half)."""
    forced = _forced_operand_dtype.get()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


@contextlib.contextmanager
def half_operands(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Use ``dtype`` operands on every device inside the block (to measure on the CPU what the GPU path's
    rounding does to the clustering)."""
    token = _forced_operand_dtype.set(dtype)
    try:
        yield
    finally:
        _forced_operand_dtype.reset(token)


# Row blocks of streamed passes (normalising into operands, neighbour averaging, Lloyd sums) hold at most this many
# elements: 64 MB of float32 temporaries, whatever N.
BLOCK_ELEMENTS = 1 << 24


def unit_operands(x: torch.Tensor) -> torch.Tensor:
    """Unit rows of ``x`` in :func:`operand_dtype`, normalised in float32 row blocks (no float32 copy of all of
    ``x`` when the operands are half precision)."""
    out = torch.empty(x.shape, dtype=operand_dtype(x.device), device=x.device)
    for start, stop in row_chunks(x.shape[0], x.shape[1], BLOCK_ELEMENTS):
        out[start:stop] = F.normalize(x[start:stop].float(), dim=1)
    return out
