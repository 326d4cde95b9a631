"""Triton kernels for semantic_mix: ``normalize(softmax(images @ nouns.T / tau) @ nouns)`` without the N×M matrix.

Full softmax (``topk=None``), flash-attention style: a program owns ``BLOCK_N`` image rows (held on chip with all D
features) and streams over tiles of ``BLOCK_M`` nouns. Each noun tile is loaded once and used twice, as the keys of
``images @ tile.T`` and as the values of ``p @ tile``; the program keeps the running row maximum, the running sum of
``exp`` and the D-wide weighted accumulator, rescaling them when the maximum grows, and writes each normalised row
once. D is padded to the next power of two (so D=768 costs the work of 1024); the row tile shrinks as D grows so the
accumulator fits. D above ``MAX_D`` runs on the reference.

With ``topk``: ``similarity_topk`` finds each row's best nouns (and their exact logits), then a gather-and-mix kernel
takes the softmax over those ``topk`` logits only and sums the gathered noun rows.

Precision: logits are float32. fp16/bf16 inputs run on the tensor cores with float32 accumulation, and the softmax
weights are rounded to the nouns' dtype before ``p @ tile`` (as in flash attention), which costs about 1e-3
relative. float32 inputs use ``input_precision="ieee"`` (exact float32, no tensor cores: ``tf32x3`` needs about
twice the shared memory and spills heavily at these D-wide tiles), so they are exact but slow on GPU: pass bf16/fp16
for speed. (The top-k path's ``similarity_topk`` uses its own choice, see there.)

Registered as the custom op ``torch.ops.laic_triton.semantic_mix`` (with a fake kernel) for ``torch.compile``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from . import COMPILE_OPTIONS
from . import similarity_topk as topk_kernel

# The accumulator is [BLOCK_N, D_PAD] float32 on chip; beyond this D it no longer fits with a useful row tile.
MAX_D = 1024


def why_not(images: torch.Tensor, nouns: torch.Tensor, tau: float, *, topk: Optional[int] = None) -> Optional[str]:
    """None when the kernels can take this input, else why not (the dispatcher then uses the reference)."""
    d = images.shape[1]
    if d > MAX_D:
        return f"D={d} is above the fused kernel's on-chip accumulator limit of {MAX_D}"
    if topk is not None:
        return topk_kernel.why_not(images, nouns, topk, k_name="topk")   # the user passed topk, not k
    dtype = topk_kernel.dot_dtype(images.dtype, nouns.dtype)
    return shared_memory_why_not(d, dtype, shared_memory_kib(images.device))


def shared_memory_why_not(d: int, dtype: torch.dtype, limit_kib: Optional[float]) -> Optional[str]:
    """Why no plan of the fused kernel fits a GPU giving a block ``limit_kib`` of shared memory (None: fits)."""
    if mix_plan(padded_d(d), dtype, limit_kib) is not None:
        return None
    smallest = mix_plans(padded_d(d), dtype)[-1]
    return (f"the fused kernel's smallest tile plan at D={d} ({dtype}) needs {smallest.shared_kib} KiB of shared "
            f"memory a block, and this GPU gives {limit_kib:.0f} KiB")


@dataclass(frozen=True)
class _MixPlan:
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    shared_kib: int     # shared memory a block takes: the most its compiles for sm_80, sm_86 and sm_90 took


# The fused kernel's tile plans by D_PAD, largest first; a launch takes the first that fits the GPU's shared memory a
# block (sm_90 and sm_100: 227 KiB; sm_80, A100: 163 KiB; sm_86, sm_89 and sm_120, the A10 / L4 / L40S / RTX cards:
# 99 KiB). The [BLOCK_N, D_PAD] float32 accumulator and the [BLOCK_M, D_PAD] noun tile must fit in registers and
# shared memory: each plan compiles without spills (ptxas; tests/test_semantic_mix.py checks sm_86 and sm_90 and the
# figures; sm_89 and sm_120 took no more, 12-05; sm_100 takes up to a third more at D_PAD 256 and 512, within its
# 227 KiB; none timed on a GPU yet). Float32 tiles are twice the bytes and their exact dots stage operands through
# shared memory, hence small tiles without pipelining; at D_PAD 1024 their one plan spills (336 to 1224 B a thread
# by architecture) and needs 128 KiB: GPUs with less take the reference. Before 12-05 the first plan of each was the only one (sm_86 has less
# shared memory than those at D_PAD 256 to 1024 take, 104 to 194 KiB there; review, no such GPU at hand).
_HALF_PLANS = {
    256: (_MixPlan(64, 64, 4, 3, 128), _MixPlan(64, 64, 4, 2, 96)),
    512: (_MixPlan(64, 32, 8, 3, 160), _MixPlan(32, 32, 4, 3, 98)),
    1024: (_MixPlan(32, 32, 8, 3, 194), _MixPlan(32, 32, 8, 2, 130), _MixPlan(32, 16, 8, 2, 97)),
}
_FLOAT32_PLANS = {
    128: (_MixPlan(32, 16, 4, 1, 27),),
    256: (_MixPlan(16, 16, 4, 1, 34),),
    512: (_MixPlan(16, 16, 4, 1, 64),),
    1024: (_MixPlan(16, 16, 4, 1, 128),),
}


def padded_d(d: int) -> int:
    """D as the kernels tile it: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


def mix_plans(d_pad: int, dtype: torch.dtype) -> Tuple[_MixPlan, ...]:
    """The fused kernel's candidate plans at ``d_pad``, largest first (the smallest table entry at or above it)."""
    table = _FLOAT32_PLANS if dtype == torch.float32 else _HALF_PLANS
    return table[min(width for width in table if width >= d_pad)] if d_pad <= max(table) else ()


def mix_plan(d_pad: int, dtype: torch.dtype, shared_limit_kib: Optional[float] = None) -> Optional[_MixPlan]:
    """The first plan that fits ``shared_limit_kib`` (None: no limit known, the first plan), None when none fits."""
    return next((plan for plan in mix_plans(d_pad, dtype)
                 if shared_limit_kib is None or plan.shared_kib <= shared_limit_kib), None)


@functools.lru_cache(maxsize=None)
def shared_memory_kib(device: torch.device) -> Optional[float]:
    """The shared memory a block may take on ``device`` (KiB, opt-in), None off CUDA or where torch does not say."""
    if device.type != "cuda":
        return None
    limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return limit / 1024 if limit else None


@triton.jit
def _normalised_store(out_ptr, rows, row_ok, dcols, d_ok, stride_on, acc, total):
    """``acc / total`` scaled to unit L2 norm (as F.normalize: the norm is floored at 1e-12), written once."""
    mixed = acc / total[:, None]
    norm = tl.sqrt(tl.sum(mixed * mixed, axis=1))
    mixed = mixed / tl.maximum(norm, 1e-12)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + dcols[None, :], mixed,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _mix_kernel(img_ptr, noun_ptr, out_ptr, N, M, D, logit_scale,
                stride_in, stride_id, stride_nm, stride_nd, stride_on,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
                DOT_IN_FP32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dcols = tl.arange(0, D_PAD)
    d_ok = dcols < D
    images = tl.load(img_ptr + rows.to(tl.int64)[:, None] * stride_in + dcols[None, :].to(tl.int64) * stride_id,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_IN_FP32:
        images = images.to(tl.float32)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)   # in log2 units: logits * log2(e)
    total = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        tile = tl.load(noun_ptr + cols.to(tl.int64)[:, None] * stride_nm + dcols[None, :].to(tl.int64) * stride_nd,
                       mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            tile = tile.to(tl.float32)
        logits = tl.dot(images, tl.trans(tile), input_precision=PRECISION) * logit_scale
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp2(running_max - new_max)
        weights = tl.exp2(logits - new_max[:, None])
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(tile.dtype), tile, input_precision=PRECISION)
        running_max = new_max
    _normalised_store(out_ptr, rows, row_ok, dcols, d_ok, stride_on, acc, total)


@triton.jit
def _gather_mix_kernel(values_ptr, indices_ptr, noun_ptr, out_ptr, N, D, K, logit_scale,
                       stride_vn, stride_xn, stride_nm, stride_nd, stride_on,
                       BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    dcols = tl.arange(0, D_PAD)
    d_ok = dcols < D
    # similarity_topk sorts descending, so the first value is the row maximum.
    row_max = tl.load(values_ptr + rows64 * stride_vn, mask=row_ok, other=0.0)
    total = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for j in range(0, K):
        value = tl.load(values_ptr + rows64 * stride_vn + j, mask=row_ok, other=0.0)
        noun = tl.load(indices_ptr + rows64 * stride_xn + j, mask=row_ok, other=0)
        weight = tl.exp2((value - row_max) * logit_scale)
        rows_of_nouns = tl.load(noun_ptr + noun[:, None] * stride_nm + dcols[None, :].to(tl.int64) * stride_nd,
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        total += weight
        acc += weight[:, None] * rows_of_nouns.to(tl.float32)
    _normalised_store(out_ptr, rows, row_ok, dcols, d_ok, stride_on, acc, total)


def mix_constants(plan: _MixPlan, d_pad: int, dtype: torch.dtype) -> dict:
    """The compile-time arguments of ``_mix_kernel`` (also used by the test that compiles it for sm_90)."""
    return dict(BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, D_PAD=d_pad,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_IN_FP32=topk_kernel.dot_in_fp32(dtype))


def gather_plan(d_pad: int) -> Tuple[int, int]:
    """(rows per program, warps) of the gather-and-mix kernel: its [BLOCK_N, D_PAD] float32 accumulator stays in
    registers, 32 values a thread. Compiled for sm_86 and sm_90 without spills by Triton 3.6 (the GPU machine's) and
    3.8 (tests/test_semantic_mix.py; 64 a thread spilled 136 to 480 bytes a thread under 3.6, none under 3.8, and at
    D_PAD 512 and 1024 four warps spilled 216 to 280 bytes before 12-05)."""
    if d_pad <= 256:
        return 16, 4
    return (16, 8) if d_pad <= 512 else (8, 8)


def semantic_mix_into(images: torch.Tensor, nouns: torch.Tensor, tau: float, topk: Optional[int],
                      out: torch.Tensor) -> None:
    """Write the text counterparts of ``images`` into ``out[N, D]`` (float32). Inputs are validated by the public op."""
    images, nouns = topk_kernel.dot_operands(images, nouns)
    n, d = images.shape
    m = nouns.shape[0]
    d_pad = padded_d(d)
    logit_scale = math.log2(math.e) / tau      # exp(x / tau) == exp2(x * log2(e) / tau)
    if topk is None:
        limit = shared_memory_kib(images.device)
        plan = mix_plan(d_pad, images.dtype, limit)
        if plan is None:   # (the dispatcher's why_not keeps such inputs from here; the custom op alone does not)
            raise RuntimeError(f"semantic_mix: {shared_memory_why_not(d, images.dtype, limit)}")
        _mix_kernel[(triton.cdiv(n, plan.block_n),)](
            images, nouns, out, n, m, d, logit_scale,
            images.stride(0), images.stride(1), nouns.stride(0), nouns.stride(1), out.stride(0),
            **mix_constants(plan, d_pad, images.dtype), num_warps=plan.num_warps, num_stages=plan.num_stages,
            **COMPILE_OPTIONS)
        return
    values = torch.empty(n, topk, dtype=torch.float32, device=images.device)
    indices = torch.empty(n, topk, dtype=torch.int64, device=images.device)
    topk_kernel.similarity_topk_into(images, nouns, topk, False, values, indices)
    block_n, num_warps = gather_plan(d_pad)
    _gather_mix_kernel[(triton.cdiv(n, block_n),)](
        values, indices, nouns, out, n, d, topk, logit_scale,
        values.stride(0), indices.stride(0), nouns.stride(0), nouns.stride(1), out.stride(0),
        BLOCK_N=block_n, D_PAD=d_pad, num_warps=num_warps, **COMPILE_OPTIONS)


@torch.library.custom_op("laic_triton::semantic_mix", mutates_args=())
def _semantic_mix_op(images: torch.Tensor, nouns: torch.Tensor, tau: float, topk: Optional[int]) -> torch.Tensor:
    out = torch.empty(images.shape[0], images.shape[1], dtype=torch.float32, device=images.device)
    with backends.on_device(images.device):
        semantic_mix_into(images, nouns, tau, topk, out)
    return out


@_semantic_mix_op.register_fake
def _(images, nouns, tau, topk):
    return images.new_empty(images.shape[0], images.shape[1], dtype=torch.float32)


def semantic_mix(images: torch.Tensor, nouns: torch.Tensor, tau: float, *, topk: Optional[int] = None
                 ) -> torch.Tensor:
    """The kernels behind ``laic_kernels.semantic_mix`` (inputs already validated there)."""
    return torch.ops.laic_triton.semantic_mix(images, nouns, float(tau), topk)
