"""Triton kernel for consistent_neighbours: both k-NN graphs and their consistency filter in one pass.

A program owns ``BLOCK_N`` rows and streams over tiles of ``BLOCK_M`` key rows, the same tile indices in both spaces:
for each tile it computes the image-space and the text-space similarities (``tl.dot``, as in similarity_topk) and
merges each into its own running top-k list on chip (similarity_topk's packed keys and threshold-and-insert merge,
self excluded). After the last tile it sorts the image list best first, tests each image-space neighbour for
membership in the text list (a loop over the k text slots: no k×k tile), keeps the first image neighbour where none
agrees, compacts the kept ones to the left with an exclusive prefix sum and writes only ``indices`` (``-1`` padded)
and ``mask``; the two neighbour lists leave the chip only when asked for (``return_graphs``).

Against the composition (two ``knn_graph`` calls and the PyTorch filter) it saves the launch of the second graph, the
``[N, k]`` lists' round trip through memory and the filter's sort / searchsorted / gather passes; the similarity work
(two N×N×D products) is the same. Ties break as in similarity_topk (on equal similarity the smaller index wins), so
it agrees with the composition on the ``triton`` backend exactly. There is no key splitting: with few rows (N below
about 64 × 2 × SMs) the GPU is not full, and the composition's split similarity_topk may be faster there.

Precision as in similarity_topk (see there): fp16/bf16 on the tensor cores with float32 accumulation, float32 at
float32 accuracy (``tf32x3`` on Ampere and later, ``ieee`` elsewhere). Image and text features of different dtypes
are both computed in float32.

Registered as the custom op ``torch.ops.laic_triton.consistent_neighbours`` (with a fake kernel) for
``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from . import COMPILE_OPTIONS, tuning
from . import similarity_topk as topk_kernel
from .similarity_topk import _merge_tile, _similarity_tile, _sort_rows, _threshold, _unpack




def why_not(image_units: torch.Tensor, text_units: torch.Tensor, k: int, return_graphs: bool) -> Optional[str]:
    """None when the kernel can take this input, else why not (the dispatcher then tries the next backend,
    ``symmetric``, then the reference)."""
    return topk_kernel.why_not(image_units, image_units, k, exclude_self=True)


@triton.jit
def _space_tile(running, kth_best, kth_value, active, x_rows, rows, row_ok, x_ptr, cols, col_ok, D, stride_n,
                stride_d, K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """One key tile of one space: its similarities to the program's rows, merged into that space's running list."""
    sims = _similarity_tile(x_rows, row_ok, x_ptr, cols, col_ok, D, stride_d, stride_n, stride_d,
                            BLOCK_N, BLOCK_M, BLOCK_D, PRECISION, DOT_IN_FP32)
    return _merge_tile(running, kth_best, kth_value, sims, rows, row_ok, cols, col_ok, active, K, KP, True)


@triton.jit
def _store_list(out_ptr, stride_n, rows, row_ok, best_first, slots, K: tl.constexpr):
    """Write the first K slots of a best-first packed list as int64 indices."""
    _, indices = _unpack(best_first)
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_n + slots[None, :], indices.to(tl.int64), mask=out_mask)


@triton.jit
def _consistent_kernel(img_ptr, txt_ptr, indices_ptr, mask_ptr, image_graph_ptr, text_graph_ptr,
                       N, D_IMG, D_TXT,
                       stride_in, stride_id, stride_tn, stride_td,
                       stride_on, stride_mn, stride_gn,
                       K: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D_IMG: tl.constexpr, BLOCK_D_TXT: tl.constexpr,
                       WRITE_GRAPHS: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    SENT: tl.constexpr = -9223372036854775808   # below every real packed key: self and out-of-range entries
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    img_rows = img_ptr + rows.to(tl.int64)[:, None] * stride_in
    txt_rows = txt_ptr + rows.to(tl.int64)[:, None] * stride_tn

    # Two running lists laid out as in similarity_topk's kernel: K live slots from KP - K up, distinct placeholders.
    slots = tl.arange(0, KP)
    active = (slots >= KP - K)[None, :]
    img_list = tl.where(active, SENT + 1 + slots[None, :].to(tl.int64), SENT).broadcast_to([BLOCK_N, KP])
    txt_list = img_list
    img_kth = tl.full([BLOCK_N], SENT + 1 + KP - K, tl.int64)
    txt_kth = img_kth
    img_kth_value = _threshold(img_kth, row_ok, KP)
    txt_kth_value = img_kth_value
    for start in range(0, N, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < N
        img_list, img_kth, img_kth_value = _space_tile(
            img_list, img_kth, img_kth_value, active, img_rows, rows, row_ok, img_ptr, cols, col_ok, D_IMG,
            stride_in, stride_id, K, KP, BLOCK_N, BLOCK_M, BLOCK_D_IMG, PRECISION, DOT_IN_FP32)
        txt_list, txt_kth, txt_kth_value = _space_tile(
            txt_list, txt_kth, txt_kth_value, active, txt_rows, rows, row_ok, txt_ptr, cols, col_ok, D_TXT,
            stride_tn, stride_td, K, KP, BLOCK_N, BLOCK_M, BLOCK_D_TXT, PRECISION, DOT_IN_FP32)

    image_best = _sort_rows(img_list, BLOCK_N, KP, LOG_KP, 1)   # slots < K: the image neighbours, best first
    _, image_idx = _unpack(image_best)
    _, text_idx = _unpack(txt_list)                             # slots >= KP - K: the text neighbours, any order
    in_image_list = slots[None, :] < K
    agree = tl.zeros([BLOCK_N, KP], dtype=tl.int32)
    for t in range(KP - K, KP):
        text_t = tl.sum(tl.where(slots[None, :] == t, text_idx, 0), axis=1)
        agree = agree | (image_idx == text_t[:, None]).to(tl.int32)
    agree = tl.where(in_image_list, agree, 0)
    # Every row keeps at least its best image-space neighbour.
    nothing_kept = tl.max(agree, axis=1) == 0
    agree = agree | ((slots[None, :] == 0) & nothing_kept[:, None]).to(tl.int32)
    kept = tl.sum(agree, axis=1)
    position = tl.cumsum(agree, axis=1) - agree                 # where each kept neighbour lands: compacted left

    row64 = rows.to(tl.int64)[:, None]
    out_rows = indices_ptr + row64 * stride_on
    tl.store(out_rows + position, image_idx.to(tl.int64), mask=row_ok[:, None] & (agree == 1))
    padding = slots[None, :] >= kept[:, None]
    tl.store(out_rows + slots[None, :], tl.full([BLOCK_N, KP], -1, tl.int64),
             mask=row_ok[:, None] & in_image_list & padding)
    tl.store(mask_ptr + row64 * stride_mn + slots[None, :], (~padding).to(tl.uint8),
             mask=row_ok[:, None] & in_image_list)
    if WRITE_GRAPHS:
        _store_list(image_graph_ptr, stride_gn, rows, row_ok, image_best, slots, K)
        _store_list(text_graph_ptr, stride_gn, rows, row_ok, _sort_rows(txt_list, BLOCK_N, KP, LOG_KP, 1), slots, K)


def plans(k: int) -> Tuple[topk_kernel.Plan, ...]:
    """The tile plans this kernel may run with, the default first (``tuning`` picks among them as in
    similarity_topk). Two running lists and two similarity tiles per program: 8 warps for 64 rows by default, and
    one plan from k = 33 on, where the others spill registers on sm_90. Each compiles for sm_90 without spilling
    (tests/test_consistent_neighbours.py, at k = 10, 20 and 60)."""
    kp = topk_kernel.plans(k)[0].kp
    if kp >= 128:
        return (topk_kernel.Plan(kp, 32, 64, 8),)
    if kp == 64:
        return (topk_kernel.Plan(kp, 64, 64, 8),)
    return topk_kernel.Plan(kp, 64, 64, 8), topk_kernel.Plan(kp, 128, 64, 8), topk_kernel.Plan(kp, 64, 64, 4)


def kernel_constants(plan: topk_kernel.Plan, k: int, d_image: int, d_text: int, return_graphs: bool, precision: str,
                     widen_bf16: bool) -> dict:
    """The compile-time arguments of ``_consistent_kernel`` (also used by the test that compiles it for sm_90)."""
    return dict(K=k, KP=plan.kp, LOG_KP=plan.kp.bit_length() - 1, BLOCK_N=plan.block_n, BLOCK_M=plan.block_m,
                BLOCK_D_IMG=topk_kernel.block_d(d_image, precision), BLOCK_D_TXT=topk_kernel.block_d(d_text, precision),
                WRITE_GRAPHS=bool(return_graphs), PRECISION=precision, DOT_IN_FP32=widen_bf16)


def consistent_neighbours_into(image_units: torch.Tensor, text_units: torch.Tensor, k: int, indices: torch.Tensor,
                               mask: torch.Tensor, image_graph: Optional[torch.Tensor] = None,
                               text_graph: Optional[torch.Tensor] = None,
                               plan: Optional[topk_kernel.Plan] = None) -> None:
    """Write the consistent neighbours into ``indices[N, k]`` (int64) and ``mask[N, k]`` (bool), and the two
    neighbour lists into ``image_graph`` / ``text_graph`` (``[N, k]`` int64, both or neither), all with contiguous
    rows. Inputs are validated (and L2-normalised) by the public op. ``plan``: one of :func:`plans` (by default
    :func:`tuned_plan`)."""
    image_units, text_units = topk_kernel.dot_operands(image_units, text_units)
    n = image_units.shape[0]
    return_graphs = image_graph is not None
    if return_graphs and (text_graph is None or image_graph.stride(0) != text_graph.stride(0)):
        raise ValueError("pass image_graph and text_graph together, with the same row stride")
    plan = plan or tuned_plan(image_units, text_units, k, return_graphs)
    constants = kernel_constants(
        plan, k, image_units.shape[1], text_units.shape[1], return_graphs,
        topk_kernel.dot_precision(image_units.dtype, image_units.device), topk_kernel.dot_in_fp32(image_units.dtype))
    _consistent_kernel[(triton.cdiv(n, plan.block_n),)](
        image_units, text_units, indices, mask.view(torch.uint8),
        image_graph if return_graphs else indices, text_graph if return_graphs else indices,
        n, image_units.shape[1], text_units.shape[1],
        image_units.stride(0), image_units.stride(1), text_units.stride(0), text_units.stride(1),
        indices.stride(0), mask.stride(0), image_graph.stride(0) if return_graphs else 0,
        **constants, num_warps=plan.num_warps, **COMPILE_OPTIONS)


def tuned_plan(image_units: torch.Tensor, text_units: torch.Tensor, k: int, return_graphs: bool
               ) -> topk_kernel.Plan:
    """The plan for this call: on a large CUDA problem the fastest of :func:`plans` on the first
    ``tuning.PROBE_ROWS`` rows (both graphs of that subset, the lists written when the call writes them), timed once
    per process and problem kind."""
    candidates = plans(k)
    n = image_units.shape[0]
    if not tuning.worth_tuning(image_units.device, n * n * (image_units.shape[1] + text_units.shape[1])):
        return candidates[0]
    image_probe, text_probe = image_units[:tuning.PROBE_ROWS], text_units[:tuning.PROBE_ROWS]
    kind = ("consistent_neighbours", image_units.device, image_units.dtype, image_units.shape[1], text_units.shape[1],
            k, return_graphs, image_probe.shape[0])

    def run(plan: topk_kernel.Plan) -> None:
        outputs = [torch.empty(image_probe.shape[0], k, dtype=dtype, device=image_units.device)
                   for dtype in (torch.int64, torch.bool) + ((torch.int64, torch.int64) if return_graphs else ())]
        consistent_neighbours_into(image_probe, text_probe, k, *outputs, plan=plan)

    return tuning.fastest(kind, candidates, run)


@torch.library.custom_op("laic_triton::consistent_neighbours", mutates_args=())
def _consistent_neighbours_op(image_units: torch.Tensor, text_units: torch.Tensor, k: int, return_graphs: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = image_units.shape[0]
    device = image_units.device
    indices = torch.empty(n, k, dtype=torch.int64, device=device)
    mask = torch.empty(n, k, dtype=torch.bool, device=device)
    graph_rows = n if return_graphs else 0
    image_graph = torch.empty(graph_rows, k, dtype=torch.int64, device=device)
    text_graph = torch.empty(graph_rows, k, dtype=torch.int64, device=device)
    with backends.on_device(device):
        consistent_neighbours_into(image_units, text_units, k, indices, mask,
                                   image_graph if return_graphs else None, text_graph if return_graphs else None)
    return indices, mask, image_graph, text_graph


@_consistent_neighbours_op.register_fake
def _(image_units, text_units, k, return_graphs):
    n = image_units.shape[0]
    graph_rows = n if return_graphs else 0
    return (image_units.new_empty(n, k, dtype=torch.int64), image_units.new_empty(n, k, dtype=torch.bool),
            image_units.new_empty(graph_rows, k, dtype=torch.int64),
            image_units.new_empty(graph_rows, k, dtype=torch.int64))


def consistent_neighbours(image_units: torch.Tensor, text_units: torch.Tensor, k: int, return_graphs: bool
                          ) -> Tuple[torch.Tensor, ...]:
    """The kernel behind ``laic_kernels.consistent_neighbours(image_features, text_features, k)`` (unit rows,
    validated there). Returns ``(indices, mask)``, plus both neighbour lists when ``return_graphs``."""
    outputs = torch.ops.laic_triton.consistent_neighbours(image_units, text_units, int(k), bool(return_graphs))
    return outputs if return_graphs else outputs[:2]
