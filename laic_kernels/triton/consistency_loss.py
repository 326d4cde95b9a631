"""Fused Triton kernels for consistency_loss, forward and backward.

Forward, two launches over the batch rows, then a small epilogue:
  1. ``_row_stats_kernel`` (one program per row block): the four row logsumexps (online over K tiles), the three
     instance dot products <P_i,Qn_i>, <Q_i,Pn_i>, <P_i,Q_i>, and the block's column sums of P and Q.
  2. ``_reduce_kernel`` (one program per output tile, product and row split): the Gram products PᵀP, QᵀQ, PᵀQ and the
     centre products PᵀU, QᵀV with ``tl.dot``, recomputing the softmax tiles from the logits and row logsumexps
     instead of storing P and Q.
  Every reduced value is owned by one program that adds its rows in a fixed order; the per-block / per-split partials
  are summed by ``torch.sum``. No atomics, so two runs on the same inputs are bitwise equal.
  3. The epilogue (PyTorch on the K×K and K×D reductions) gives the four terms.
Backward: the epilogue's closed-form gradient with respect to the reductions (dL/dGrams, dL/dPᵀU, dL/dQᵀV, dL/d
column sums, dL/d instance dots), then two launches over row blocks × column tiles:
  1. ``_backward_products_kernel``: dL/dP and dL/dQ tile by tile (P·W, Q·W and U·Mᵀ products with ``tl.dot``, plus
     the instance and balance terms) into a float32 buffer with each tile's share of the softmax-backward row sums;
     dL/dU = P·M_u and dL/dV = Q·M_v.
  2. ``_backward_softmax_kernel``: the softmax backward for the four logit matrices (the neighbour logits in closed
     form), written in the input dtype.
Splitting the backward over column tiles keeps few tiles live per program (no register spills on sm_80 / sm_90)
and gives B/32 × K/64 programs to fill the GPU.

Math is float32 whatever the input dtype (float32, float16, bfloat16). The ops are registered with
``torch.library`` (``laic::consistency_loss_forward`` / ``_backward``) so that they compose with ``torch.compile``.
As in ``laic_kernels.closed_form``: a backward asked for a graph of its own (``create_graph=True``) differentiates
the reference, and under autocast or inside a ``torch.func`` transform the dispatcher passes the op on
(:func:`why_not`); ``balance_weights`` take no gradient.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from ..backends import triton_interpreting
from . import COMPILE_OPTIONS
from ..reference.consistency_loss import EPS, input_grads_with_graph

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Element offsets are int32 inside the kernels.
MAX_ELEMENTS = 2**31 - 1
TERM_NAMES = ("inst", "assign", "center", "bal")
# The four logit matrices' row logsumexps, each kept as its rows' max and the log of their shifted sum (8 rows of B:
# the four maxes, then the four log-sums), so that a softmax tile is exp((x - max) - log(sum)) (_softmax_tile_from).
LSE_PARTS = 8


# ---------------------------------------------------------------------------------------------------------------------
# Tile helpers


@triton.jit
def _load_logits(ptr, rows, cols, B, K):
    """A [rows, cols] tile of a [B, K] logit matrix in float32; -inf past column K. Rows past B are clamped to B-1
    (finite values that the callers mask), so that no row is all -inf and no NaN appears."""
    safe_rows = tl.minimum(rows, B - 1)
    mask = (safe_rows[:, None] >= 0) & (cols[None, :] < K)
    return tl.load(ptr + safe_rows[:, None] * K + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _softmax_tile(ptr, lse_ptr, rows, row_ok, cols, B, K):
    """A tile of softmax(logits) rebuilt from the logits and their row logsumexp, which ``lse_ptr`` holds in two
    parts (LSE_PARTS): the row's max at ``lse_ptr[row]``, the log of its shifted sum at ``lse_ptr[4 B + row]``; zero
    outside the valid rows and columns (so it can go straight into a reduction)."""
    safe_rows = tl.minimum(rows, B - 1)
    return _softmax_tile_from(ptr, tl.load(lse_ptr + safe_rows), tl.load(lse_ptr + 4 * B + safe_rows), rows, row_ok,
                              cols, B, K)


@triton.jit
def _softmax_tile_from(ptr, row_max, log_sum, rows, row_ok, cols, B, K):
    # (x - max) - log(sum), never x - (max + log(sum)): in float32, max + log(sum) loses log(sum) once |max| dwarfs
    # it (logits near 1e4 moved the gradients by 2e-3, logits of 1e30 made every entry of P 1); the reference, which
    # subtracts the max, does not.
    p = tl.exp((_load_logits(ptr, rows, cols, B, K) - row_max[:, None]) - log_sum[:, None])
    return tl.where(row_ok[:, None], p, 0.0)


@triton.jit
def _load_matrix(ptr, rows, row_ok, cols, n_cols):
    """A tile of a row-major [*, n_cols] matrix in float32, zero outside ``row_ok`` and ``cols < n_cols``."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _row_stats_kernel(img_ptr, txt_ptr, img_nbr_ptr, txt_nbr_ptr, lse_ptr, dots_ptr, colsum_ptr, B, K,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    # Pass 1: online logsumexp of the four logit rows.
    m0 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m1 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m3 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s0 = tl.zeros([BLOCK_R], tl.float32)
    s1 = tl.zeros([BLOCK_R], tl.float32)
    s2 = tl.zeros([BLOCK_R], tl.float32)
    s3 = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m0, s0 = _online_lse(_load_logits(img_ptr, rows, cols, B, K), m0, s0)
        m1, s1 = _online_lse(_load_logits(txt_ptr, rows, cols, B, K), m1, s1)
        m2, s2 = _online_lse(_load_logits(img_nbr_ptr, rows, cols, B, K), m2, s2)
        m3, s3 = _online_lse(_load_logits(txt_nbr_ptr, rows, cols, B, K), m3, s3)
    ls0 = tl.log(s0)
    ls1 = tl.log(s1)
    ls2 = tl.log(s2)
    ls3 = tl.log(s3)
    tl.store(lse_ptr + rows, m0, mask=row_ok)
    tl.store(lse_ptr + B + rows, m1, mask=row_ok)
    tl.store(lse_ptr + 2 * B + rows, m2, mask=row_ok)
    tl.store(lse_ptr + 3 * B + rows, m3, mask=row_ok)
    tl.store(lse_ptr + 4 * B + rows, ls0, mask=row_ok)
    tl.store(lse_ptr + 5 * B + rows, ls1, mask=row_ok)
    tl.store(lse_ptr + 6 * B + rows, ls2, mask=row_ok)
    tl.store(lse_ptr + 7 * B + rows, ls3, mask=row_ok)
    # Pass 2: the softmaxes tile by tile, the instance dots and this block's column sums.
    dot_p_qn = tl.zeros([BLOCK_R], tl.float32)
    dot_q_pn = tl.zeros([BLOCK_R], tl.float32)
    dot_p_q = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        p = _softmax_tile_from(img_ptr, m0, ls0, rows, row_ok, cols, B, K)
        q = _softmax_tile_from(txt_ptr, m1, ls1, rows, row_ok, cols, B, K)
        pn = _softmax_tile_from(img_nbr_ptr, m2, ls2, rows, row_ok, cols, B, K)
        qn = _softmax_tile_from(txt_nbr_ptr, m3, ls3, rows, row_ok, cols, B, K)
        dot_p_qn += tl.sum(p * qn, 1)
        dot_q_pn += tl.sum(q * pn, 1)
        dot_p_q += tl.sum(p * q, 1)
        tl.store(colsum_ptr + block * 2 * K + cols, tl.sum(p, 0), mask=cols < K)
        tl.store(colsum_ptr + block * 2 * K + K + cols, tl.sum(q, 0), mask=cols < K)
    tl.store(dots_ptr + rows, dot_p_qn, mask=row_ok)
    tl.store(dots_ptr + B + rows, dot_q_pn, mask=row_ok)
    tl.store(dots_ptr + 2 * B + rows, dot_p_q, mask=row_ok)


@triton.jit
def _online_lse(x, m, s):
    m_new = tl.maximum(m, tl.max(x, 1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, s


@triton.jit
def _product_tile(a_ptr, a_lse_ptr, c_ptr, c_lse_ptr, out_ptr, tile, B, K, N, row_start, row_stop,
                  C_IS_SOFTMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] tile of Aᵀ C over rows [row_start, row_stop), A = softmax(a logits) [B, K] and C either
    a softmax [B, K] or a feature matrix [B, N]."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tile_k = tile // n_tiles_n
    tile_n = tile % n_tiles_n
    if tile_k < tl.cdiv(K, BLOCK_K):
        ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
        for r0 in range(row_start, row_stop, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < row_stop
            a = _softmax_tile(a_ptr, a_lse_ptr, rows, row_ok, ks, B, K)
            if C_IS_SOFTMAX:
                c = _softmax_tile(c_ptr, c_lse_ptr, rows, row_ok, ns, B, K)
            else:
                c = _load_matrix(c_ptr, rows, row_ok, ns, N)
            acc = tl.dot(tl.trans(a), c, acc, input_precision=PRECISION)
        mask = (ks[:, None] < K) & (ns[None, :] < N)
        tl.store(out_ptr + ks[:, None] * N + ns[None, :], acc, mask=mask)


@triton.jit
def _reduce_kernel(img_ptr, txt_ptr, u_ptr, v_ptr, lse_ptr, grams_ptr, centres_ptr, B, K, D, rows_per_split,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """grams[split] = (PᵀP, QᵀQ, PᵀQ), centres[split] = (PᵀU, QᵀV) over the split's rows. Axis 1 picks the product."""
    tile = tl.program_id(0)
    product = tl.program_id(1)
    split = tl.program_id(2)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, B)
    grams = grams_ptr + split * 3 * K * K
    centres = centres_ptr + split * 2 * K * D
    q_lse = lse_ptr + B
    if product == 0:
        _product_tile(img_ptr, lse_ptr, img_ptr, lse_ptr, grams, tile, B, K, K, row_start, row_stop,
                      True, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)
    elif product == 1:
        _product_tile(txt_ptr, q_lse, txt_ptr, q_lse, grams + K * K, tile, B, K, K, row_start, row_stop,
                      True, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)
    elif product == 2:
        _product_tile(img_ptr, lse_ptr, txt_ptr, q_lse, grams + 2 * K * K, tile, B, K, K, row_start, row_stop,
                      True, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)
    elif product == 3:
        _product_tile(img_ptr, lse_ptr, u_ptr, lse_ptr, centres, tile, B, K, D, row_start, row_stop,
                      False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)
    else:
        _product_tile(txt_ptr, q_lse, v_ptr, q_lse, centres + K * D, tile, B, K, D, row_start, row_stop,
                      False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)


# ---------------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _grad_tile_p(img_ptr, txt_ptr, lse_ptr, u_ptr, w_pp_ptr, w_pq_ptr, m_u_ptr, rows, row_ok, ks, B, K, D,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The matrix part of dL/dP on a [rows, ks] tile: P W_pp + Q W_pqᵀ + U M_uᵀ."""
    k_ok = ks < K
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < K
        p_j = _softmax_tile(img_ptr, lse_ptr, rows, row_ok, js, B, K)
        acc = tl.dot(p_j, _load_matrix(w_pp_ptr, js, j_ok, ks, K), acc, input_precision=PRECISION)
        q_j = _softmax_tile(txt_ptr, lse_ptr + B, rows, row_ok, js, B, K)
        w_pq_t = _load_matrix(w_pq_ptr, ks, k_ok, js, K)                  # W_pq[k, j]
        acc = tl.dot(q_j, tl.trans(w_pq_t), acc, input_precision=PRECISION)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m_u = _load_matrix(m_u_ptr, ks, k_ok, ds, D)                      # M_u[k, d]
        acc = tl.dot(_load_matrix(u_ptr, rows, row_ok, ds, D), tl.trans(m_u), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grad_tile_q(img_ptr, txt_ptr, lse_ptr, v_ptr, w_qq_ptr, w_pq_ptr, m_v_ptr, rows, row_ok, ks, B, K, D,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The matrix part of dL/dQ on a [rows, ks] tile: Q W_qq + P W_pq + V M_vᵀ."""
    k_ok = ks < K
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < K
        q_j = _softmax_tile(txt_ptr, lse_ptr + B, rows, row_ok, js, B, K)
        acc = tl.dot(q_j, _load_matrix(w_qq_ptr, js, j_ok, ks, K), acc, input_precision=PRECISION)
        p_j = _softmax_tile(img_ptr, lse_ptr, rows, row_ok, js, B, K)
        acc = tl.dot(p_j, _load_matrix(w_pq_ptr, js, j_ok, ks, K), acc, input_precision=PRECISION)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m_v = _load_matrix(m_v_ptr, ks, k_ok, ds, D)
        acc = tl.dot(_load_matrix(v_ptr, rows, row_ok, ds, D), tl.trans(m_v), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grad_tile_feats(a_ptr, a_lse_ptr, m_ptr, rows, row_ok, ds, B, K, D,
                     BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """A [rows, ds] tile of A M for A = softmax(a logits) and M = M_u or M_v: the gradient of U or V."""
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        a = _softmax_tile(a_ptr, a_lse_ptr, rows, row_ok, js, B, K)
        acc = tl.dot(a, _load_matrix(m_ptr, js, js < K, ds, D), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _backward_products_kernel(img_ptr, txt_ptr, img_nbr_ptr, txt_nbr_ptr, u_ptr, v_ptr, lse_ptr, coef_ptr,
                              w_pp_ptr, w_qq_ptr, w_pq_ptr, m_u_ptr, m_v_ptr, col_ptr,
                              g_p_ptr, g_q_ptr, row_dots_ptr, d_u_ptr, d_v_ptr, B, K, D,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Axis 2 picks the output: 0 and 1 write a [rows, ks] tile of G_P = dL/dP and G_Q = dL/dQ,
        G_P = P W_pp + Q W_pqᵀ + U M_uᵀ + col_p + c_a·Qn + c_c·Q,
        G_Q = Q W_qq + P W_pq + V M_vᵀ + col_q + c_b·Pn + c_c·P
    (float32, into g_p / g_q) and the tile's share of the row sums <G_P, P>, <G_Q, Q> (into row_dots[side, tile]);
    2 and 3 write a [rows, ds] tile of dU = P M_u and dV = Q M_v. The coefficients already carry the term weights and
    the upstream gradient. Each program owns its outputs: no atomics."""
    block = tl.program_id(0)
    tile = tl.program_id(1)
    side = tl.program_id(2)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    if side < 2:
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if tile * BLOCK_K < K:  # the tile grid covers max(K, D) columns
            safe_rows = tl.minimum(rows, B - 1)
            c_c = tl.load(coef_ptr + 2 * B + safe_rows)
            p = _softmax_tile(img_ptr, lse_ptr, rows, row_ok, ks, B, K)
            q = _softmax_tile(txt_ptr, lse_ptr + B, rows, row_ok, ks, B, K)
            if side == 0:
                g = _grad_tile_p(img_ptr, txt_ptr, lse_ptr, u_ptr, w_pp_ptr, w_pq_ptr, m_u_ptr, rows, row_ok, ks,
                                 B, K, D, BLOCK_R, BLOCK_K, BLOCK_J, BLOCK_D, PRECISION)
                c_a = tl.load(coef_ptr + safe_rows)
                qn = _softmax_tile(txt_nbr_ptr, lse_ptr + 3 * B, rows, row_ok, ks, B, K)
                g += tl.load(col_ptr + ks, mask=k_ok, other=0.0)[None, :] + c_a[:, None] * qn + c_c[:, None] * q
                tl.store(g_p_ptr + rows[:, None] * K + ks[None, :], g, mask=row_ok[:, None] & k_ok[None, :])
                own = p
            else:
                g = _grad_tile_q(img_ptr, txt_ptr, lse_ptr, v_ptr, w_qq_ptr, w_pq_ptr, m_v_ptr, rows, row_ok, ks,
                                 B, K, D, BLOCK_R, BLOCK_K, BLOCK_J, BLOCK_D, PRECISION)
                c_b = tl.load(coef_ptr + B + safe_rows)
                pn = _softmax_tile(img_nbr_ptr, lse_ptr + 2 * B, rows, row_ok, ks, B, K)
                g += tl.load(col_ptr + K + ks, mask=k_ok, other=0.0)[None, :] + c_b[:, None] * pn + c_c[:, None] * p
                tl.store(g_q_ptr + rows[:, None] * K + ks[None, :], g, mask=row_ok[:, None] & k_ok[None, :])
                own = q
            n_k_tiles = tl.cdiv(K, BLOCK_K)
            tl.store(row_dots_ptr + (side * n_k_tiles + tile) * B + rows, tl.sum(g * own, 1), mask=row_ok)
    else:
        ds = tile * BLOCK_D + tl.arange(0, BLOCK_D)
        if tile * BLOCK_D < D:
            mask = row_ok[:, None] & (ds[None, :] < D)
            offsets = rows[:, None] * D + ds[None, :]
            if side == 2:
                d_u = _grad_tile_feats(img_ptr, lse_ptr, m_u_ptr, rows, row_ok, ds, B, K, D,
                                       BLOCK_R, BLOCK_J, BLOCK_D, PRECISION)
                tl.store(d_u_ptr + offsets, d_u.to(d_u_ptr.dtype.element_ty), mask=mask)
            else:
                d_v = _grad_tile_feats(txt_ptr, lse_ptr + B, m_v_ptr, rows, row_ok, ds, B, K, D,
                                       BLOCK_R, BLOCK_J, BLOCK_D, PRECISION)
                tl.store(d_v_ptr + offsets, d_v.to(d_v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_softmax_kernel(img_ptr, txt_ptr, img_nbr_ptr, txt_nbr_ptr, lse_ptr, dots_ptr, coef_ptr, g_p_ptr,
                             g_q_ptr, row_dots_ptr, d_img_ptr, d_txt_ptr, d_img_nbr_ptr, d_txt_nbr_ptr, B, K, n_k_tiles,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The softmax backward on one [rows, ks] tile: P ⊙ (G_P - <G_P, P>) and Q ⊙ (G_Q - <G_Q, Q>), the row sums added
    up from their per-tile shares in a fixed order; the neighbour logits in closed form, c_b·Pn ⊙ (Q - <Q,Pn>) and
    c_a·Qn ⊙ (P - <P,Qn>). G_P and G_Q may be the float32 gradients themselves: each element is read before it is
    written, by the same program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    safe_rows = tl.minimum(rows, B - 1)
    dot_p = tl.zeros([BLOCK_R], tl.float32)
    dot_q = tl.zeros([BLOCK_R], tl.float32)
    for t in range(0, n_k_tiles):
        dot_p += tl.load(row_dots_ptr + t * B + safe_rows)
        dot_q += tl.load(row_dots_ptr + (n_k_tiles + t) * B + safe_rows)
    mask = row_ok[:, None] & (ks[None, :] < K)
    offsets = rows[:, None] * K + ks[None, :]
    p = _softmax_tile(img_ptr, lse_ptr, rows, row_ok, ks, B, K)
    q = _softmax_tile(txt_ptr, lse_ptr + B, rows, row_ok, ks, B, K)
    g_p = tl.load(g_p_ptr + offsets, mask=mask, other=0.0)
    g_q = tl.load(g_q_ptr + offsets, mask=mask, other=0.0)
    tl.store(d_img_ptr + offsets, (p * (g_p - dot_p[:, None])).to(d_img_ptr.dtype.element_ty), mask=mask)
    tl.store(d_txt_ptr + offsets, (q * (g_q - dot_q[:, None])).to(d_txt_ptr.dtype.element_ty), mask=mask)
    pn = _softmax_tile(img_nbr_ptr, lse_ptr + 2 * B, rows, row_ok, ks, B, K)
    qn = _softmax_tile(txt_nbr_ptr, lse_ptr + 3 * B, rows, row_ok, ks, B, K)
    c_a = tl.load(coef_ptr + safe_rows)
    c_b = tl.load(coef_ptr + B + safe_rows)
    dot_p_qn = tl.load(dots_ptr + safe_rows)
    dot_q_pn = tl.load(dots_ptr + B + safe_rows)
    d_pn = c_b[:, None] * pn * (q - dot_q_pn[:, None])
    d_qn = c_a[:, None] * qn * (p - dot_p_qn[:, None])
    tl.store(d_img_nbr_ptr + offsets, d_pn.to(d_img_nbr_ptr.dtype.element_ty), mask=mask)
    tl.store(d_txt_nbr_ptr + offsets, d_qn.to(d_txt_nbr_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launch configuration


def _pow2_between(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


def _blocks(b: int, k: int, d: int, device: torch.device) -> Dict[str, int]:
    """Tile sizes. tl.dot needs every dimension >= 16."""
    return cuda_blocks(b, k, d) if device.type == "cuda" else interpreter_blocks(b, k, d)


def cuda_blocks(b: int, k: int, d: int) -> Dict[str, int]:
    # With LAUNCH_OPTIONS, these compile for sm_80 and sm_90 without register spills (checked by the tests).
    return dict(BLOCK_R=32, BLOCK_K=_pow2_between(k, 16, 64), BLOCK_J=16, BLOCK_N=64, BLOCK_D=32)


def interpreter_blocks(b: int, k: int, d: int) -> Dict[str, int]:
    """The interpreter runs one program at a time, so it gets fewer, larger tiles; K tiles stay at 64 and D tiles at
    128 so that K = 100 and D = 512 still take several (the tiling paths are what the CPU tests exercise)."""
    block_k = _pow2_between(k, 16, 64)
    return dict(BLOCK_R=_pow2_between(b, 16, 128), BLOCK_K=block_k, BLOCK_J=block_k, BLOCK_N=128, BLOCK_D=128)


def _launch_options(device: torch.device, kernel: str) -> Dict[str, int]:
    """Warps and pipeline stages on CUDA, chosen (without a GPU at hand) so that compiling for sm_80 and sm_90 shows
    no register spills and fits the shared memory of both."""
    if device.type != "cuda":
        return COMPILE_OPTIONS
    return LAUNCH_OPTIONS[kernel]


LAUNCH_OPTIONS = {name: {**options, **COMPILE_OPTIONS} for name, options in {
    "row_stats": dict(num_warps=8), "reduce": dict(num_warps=8, num_stages=3),
    "products": dict(num_warps=8, num_stages=2), "softmax": {}}.items()}


@functools.lru_cache(maxsize=None)
def _precision(device: torch.device) -> str:
    # tf32 alone rounds the Gram products to ~1e-3; three tf32 passes recover float32 accuracy on tensor cores.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_splits(b: int, n_tiles: int, block_r: int, device: torch.device) -> int:
    """How many row ranges the reduction is split into (each writes its own partial, summed afterwards): enough
    programs to fill the GPU when there are few output tiles (small K), one when the tiles already fill it."""
    row_blocks = triton.cdiv(b, block_r)
    if device.type == "cuda":
        wanted = 4 * _multiprocessors(device)
    else:
        wanted = 2 * n_tiles  # two splits on the interpreter: the partial-sum path is tested on the CPU too
    return max(1, min(row_blocks, triton.cdiv(wanted, max(1, n_tiles))))


# ---------------------------------------------------------------------------------------------------------------------
# Forward and backward on tensors (float32 math), then the epilogue


def _contiguous(*tensors: torch.Tensor):
    return [t.contiguous() for t in tensors]


def forward_reductions(img, txt, img_nbr, txt_nbr, u, v):
    """The kernels' reductions: row logsumexps [LSE_PARTS = 8, B] (the four rows' maxes, then their log-sums),
    instance dots [3, B], column sums [2, K], Grams [3, K, K] (PᵀP, QᵀQ, PᵀQ) and centre products [2, K, D] (PᵀU,
    QᵀV), all float32."""
    b, k = img.shape
    d = u.shape[1]
    device = img.device
    blk = _blocks(b, k, d, device)
    n_row_blocks = triton.cdiv(b, blk["BLOCK_R"])
    lse = torch.empty(LSE_PARTS, b, dtype=torch.float32, device=device)
    dots = torch.empty(3, b, dtype=torch.float32, device=device)
    colsum_parts = torch.empty(n_row_blocks, 2, k, dtype=torch.float32, device=device)
    _row_stats_kernel[(n_row_blocks,)](img, txt, img_nbr, txt_nbr, lse, dots, colsum_parts, b, k,
                                       BLOCK_R=blk["BLOCK_R"], BLOCK_K=blk["BLOCK_K"],
                                       **_launch_options(device, "row_stats"))
    # Grid of the reduction: the output tiles of the largest product, the five products, the row splits.
    k_tiles = triton.cdiv(k, blk["BLOCK_K"])
    gram_tiles = k_tiles * triton.cdiv(k, blk["BLOCK_N"])
    centre_tiles = k_tiles * triton.cdiv(d, blk["BLOCK_N"])
    splits = _row_splits(b, 3 * gram_tiles + 2 * centre_tiles, blk["BLOCK_R"], device)
    rows_per_split = triton.cdiv(n_row_blocks, splits) * blk["BLOCK_R"]
    splits = triton.cdiv(b, rows_per_split)
    gram_parts = torch.empty(splits, 3, k, k, dtype=torch.float32, device=device)
    centre_parts = torch.empty(splits, 2, k, d, dtype=torch.float32, device=device)
    _reduce_kernel[(max(gram_tiles, centre_tiles), 5, splits)](
        img, txt, u, v, lse, gram_parts, centre_parts, b, k, d, rows_per_split, BLOCK_R=blk["BLOCK_R"],
        BLOCK_K=blk["BLOCK_K"], BLOCK_N=blk["BLOCK_N"], PRECISION=_precision(device), **_launch_options(device, "reduce"))
    return lse, dots, colsum_parts.sum(0), gram_parts.sum(0), centre_parts.sum(0)


def _assign_logits(grams: torch.Tensor, tau: float):
    """The 2K×2K similarities of the normalised columns of P and Q (diagonal -inf), with what the backward needs."""
    k = grams.shape[-1]
    g_pp, g_qq, g_pq = grams
    gram = torch.cat([torch.cat([g_pp, g_pq], 1), torch.cat([g_pq.t(), g_qq], 1)], 0)
    raw_norms = gram.diagonal().clamp_min(0).sqrt()
    norms = raw_norms.clamp_min(EPS)
    cosines = gram / (norms[:, None] * norms[None, :])
    sims = (cosines / tau).fill_diagonal_(float("-inf"))
    positives = (torch.arange(2 * k, device=grams.device) + k) % (2 * k)
    return sims, positives, cosines, norms, raw_norms


def _centre_logits(centres: torch.Tensor, tau: float):
    raw_norms = centres.norm(dim=2, keepdim=True)
    norms = raw_norms.clamp_min(EPS)
    mu, nu = centres / norms
    return (mu @ nu.t()) / tau, mu, nu, norms, raw_norms


def epilogue_terms(dots, colsums, grams, centres, weights, b: int, tau_a: float, tau_c: float) -> torch.Tensor:
    """The four unweighted terms [inst, assign, center, bal] from the reductions."""
    k = grams.shape[-1]
    inst = -torch.log(dots + EPS).sum() / (3 * b)
    sims, positives, *_ = _assign_logits(grams, tau_a)
    rows = torch.arange(2 * k, device=grams.device)
    assign = (torch.logsumexp(sims, 1) - sims[rows, positives]).mean()
    c, *_ = _centre_logits(centres, tau_c)
    diag = c.diagonal()
    center = 0.5 * ((torch.logsumexp(c, 1) - diag).mean() + (torch.logsumexp(c, 0) - diag).mean())
    means = colsums / b
    bal = (weights * (means * means.clamp_min(EPS).log()).sum(0)).sum()
    return torch.stack([inst, assign, center, bal])


def _assign_grad(grams, tau: float) -> torch.Tensor:
    """d assign / d(PᵀP, QᵀQ, PᵀQ) in closed form."""
    k = grams.shape[-1]
    sims, positives, cosines, norms, raw_norms = _assign_logits(grams, tau)
    rows = torch.arange(2 * k, device=grams.device)
    d_sims = torch.softmax(sims, 1)
    d_sims[rows, positives] -= 1.0
    d_cos = d_sims / (2 * k * tau)                  # zero diagonal: the masked self-similarities
    d_gram = d_cos / (norms[:, None] * norms[None, :])
    d_norms = -((d_cos + d_cos.t()) * cosines).sum(1) / norms
    # norm = sqrt(G_xx) above eps, a constant below it
    d_gram.diagonal().add_(torch.where(raw_norms > EPS, d_norms / (2 * norms), torch.zeros_like(norms)))
    return torch.stack([d_gram[:k, :k], d_gram[k:, k:], d_gram[:k, k:] + d_gram[k:, :k].t()])


def _centre_grad(centres, tau: float) -> torch.Tensor:
    """d center / d(PᵀU, QᵀV) in closed form."""
    k = centres.shape[1]
    c, mu, nu, norms, raw_norms = _centre_logits(centres, tau)
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    d_c = (torch.softmax(c, 1) + torch.softmax(c, 0) - 2 * eye) / (2 * k)
    d_unit = torch.stack([d_c @ nu, d_c.t() @ mu]) / tau
    unit = torch.stack([mu, nu])
    radial = (unit * d_unit).sum(2, keepdim=True)
    return torch.where(raw_norms > EPS, (d_unit - unit * radial) / norms, d_unit / EPS)


def backward_coefficients(grad, dots, colsums, grams, centres, weights, b, tau_a, tau_c, alpha, beta, gamma, delta):
    """The backward kernels' inputs: per-row instance coefficients [3, B], the K×K matrices W_pp, W_qq, W_pq, the K×D
    M_u, M_v and the per-cluster column terms [2, K], each already scaled by its term weight and ``grad``."""
    coef = -(alpha * grad / (3 * b)) / (dots + EPS)
    d_grams = _assign_grad(grams, tau_a) * (beta * grad)
    w_pp = d_grams[0] + d_grams[0].t()
    w_qq = d_grams[1] + d_grams[1].t()
    d_centres = _centre_grad(centres, tau_c) * (gamma * grad)
    means = colsums / b
    d_means = weights * (means.clamp_min(EPS).log() + (means > EPS).to(means.dtype))
    col = d_means * (delta * grad / b)
    return coef, w_pp, w_qq, d_grams[2], d_centres[0], d_centres[1], col


def backward_rows(img, txt, img_nbr, txt_nbr, u, v, lse, dots, coef, w_pp, w_qq, w_pq, m_u, m_v, col, *,
                  feature_grads: bool = True):
    """The gradients of the six inputs from the backward coefficients: two launches over row blocks × column tiles.
    Without ``feature_grads`` the programs for dU and dV are not launched and those two come back empty."""
    b, k = img.shape
    d = u.shape[1]
    device = img.device
    blk = _blocks(b, k, d, device)
    grads = [torch.empty_like(t) for t in (img, txt, img_nbr, txt_nbr)]
    grads += [torch.empty_like(t) if feature_grads else t.new_empty(0) for t in (u, v)]
    row_blocks = triton.cdiv(b, blk["BLOCK_R"])
    k_tiles = triton.cdiv(k, blk["BLOCK_K"])
    col_tiles = max(k_tiles, triton.cdiv(d, blk["BLOCK_D"])) if feature_grads else k_tiles
    # dL/dP and dL/dQ wait in float32 until the row sums of the softmax backward are complete: in the logit
    # gradients themselves when those are float32.
    g = [grad if grad.dtype == torch.float32 else torch.empty(b, k, dtype=torch.float32, device=device)
         for grad in grads[:2]]
    row_dots = torch.empty(2, k_tiles, b, dtype=torch.float32, device=device)
    coef = coef.contiguous()
    _backward_products_kernel[(row_blocks, col_tiles, 4 if feature_grads else 2)](
        img, txt, img_nbr, txt_nbr, u, v, lse, coef, w_pp.contiguous(), w_qq.contiguous(), w_pq.contiguous(),
        m_u.contiguous(), m_v.contiguous(), col.contiguous(), *g, row_dots, grads[4], grads[5], b, k, d,
        BLOCK_R=blk["BLOCK_R"], BLOCK_K=blk["BLOCK_K"], BLOCK_J=blk["BLOCK_J"], BLOCK_D=blk["BLOCK_D"],
        PRECISION=_precision(device), **_launch_options(device, "products"))
    _backward_softmax_kernel[(row_blocks, k_tiles)](
        img, txt, img_nbr, txt_nbr, lse, dots, coef, *g, row_dots, *grads[:4], b, k, k_tiles,
        BLOCK_R=blk["BLOCK_R"], BLOCK_K=blk["BLOCK_K"], **_launch_options(device, "softmax"))
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) with their autograd formula


@torch.library.custom_op("laic::consistency_loss_forward", mutates_args=())
def _forward_op(img: torch.Tensor, txt: torch.Tensor, img_nbr: torch.Tensor, txt_nbr: torch.Tensor,
                u: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, tau_a: float, tau_c: float, alpha: float,
                beta: float, gamma: float, delta: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    """Returns (loss, terms[4], and what the backward needs: lse, dots, colsums, grams, centres)."""
    img, txt, img_nbr, txt_nbr, u, v = _contiguous(img, txt, img_nbr, txt_nbr, u, v)
    with backends.on_device(img.device):
        lse, dots, colsums, grams, centres = forward_reductions(img, txt, img_nbr, txt_nbr, u, v)
    terms = epilogue_terms(dots, colsums, grams, centres, weights.float(), img.shape[0], tau_a, tau_c)
    # Python scalars times 0-d tensors: no host-to-device copy of the weights.
    loss = alpha * terms[0] + beta * terms[1] + gamma * terms[2] + delta * terms[3]
    return loss, terms, lse, dots, colsums, grams, centres


@_forward_op.register_fake
def _(img, txt, img_nbr, txt_nbr, u, v, weights, tau_a, tau_c, alpha, beta, gamma, delta):
    b, k = img.shape
    d = u.shape[1]
    new = lambda *shape: img.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(), new(4), new(LSE_PARTS, b), new(3, b), new(2, k), new(3, k, k), new(2, k, d)


@torch.library.custom_op("laic::consistency_loss_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, img_nbr: torch.Tensor,
                 txt_nbr: torch.Tensor, u: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor,
                 dots: torch.Tensor, colsums: torch.Tensor, grams: torch.Tensor, centres: torch.Tensor,
                 tau_a: float, tau_c: float, alpha: float, beta: float, gamma: float, delta: float,
                 feature_grads: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six input gradients; with ``feature_grads`` False (fixed embeddings), dU and dV are skipped and come
    back as empty tensors."""
    img, txt, img_nbr, txt_nbr, u, v = _contiguous(img, txt, img_nbr, txt_nbr, u, v)
    coefficients = backward_coefficients(grad.float(), dots, colsums, grams, centres, weights.float(), img.shape[0],
                                         tau_a, tau_c, alpha, beta, gamma, delta)
    with backends.on_device(img.device):
        return tuple(backward_rows(img, txt, img_nbr, txt_nbr, u, v, lse, dots, *coefficients,
                                   feature_grads=feature_grads))


@_backward_op.register_fake
def _(grad, img, txt, img_nbr, txt_nbr, u, v, *rest):
    feature_grads = rest[-1]
    logit_grads = [torch.empty_like(t) for t in (img, txt, img_nbr, txt_nbr)]
    feat_grads = [torch.empty_like(t) if feature_grads else t.new_empty(0) for t in (u, v)]
    return tuple(logit_grads + feat_grads)


def _setup_context(ctx, inputs, output):
    img, txt, img_nbr, txt_nbr, u, v, weights, *params = inputs
    _, _, lse, dots, colsums, grams, centres = output
    ctx.save_for_backward(img, txt, img_nbr, txt_nbr, u, v, weights, lse, dots, colsums, grams, centres)
    ctx.params = params


def _backward(ctx, grad_loss, *unused_grads):
    # Only the loss is differentiated: the terms are handed out detached, the rest is internal.
    if torch.is_grad_enabled():     # create_graph=True: the kernels' gradient has no graph; the reference's has
        inputs, weights = ctx.saved_tensors[:6], ctx.saved_tensors[6]
        params = dict(zip(("tau_assign", "tau_center", "alpha", "beta", "gamma", "delta"), ctx.params))
        return (*input_grads_with_graph(inputs, weights, params, ctx.needs_input_grad, grad_loss), *[None] * 7)
    feature_grads = bool(ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
    grads = list(_backward_op(grad_loss, *ctx.saved_tensors, *ctx.params, feature_grads))
    if not feature_grads:
        grads[4:] = [None, None]
    return (*grads, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points used by laic_kernels.consistency_loss


def why_not(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, *,
            balance_weights=None, **params) -> Optional[str]:
    tensors = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats)
    if any(t.dtype not in KERNEL_DTYPES for t in tensors):
        return "float64 inputs take a float64 backend (the kernel computes in float32)"
    b, k = img_logits.shape
    d = img_feats.shape[1]
    if max(2 * b * k, b * d, 3 * k * k, 2 * k * d) > MAX_ELEMENTS:
        return f"B={b}, K={k}, D={d} is too large for the kernel's 32-bit offsets"
    if img_logits.device.type == "cpu" and not triton_interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    return backends.hand_written_backward_why_not(img_logits.device.type)


def consistency_loss(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, *,
                     balance_weights=None, tau_assign=0.5, tau_center=0.5, alpha=1.0, beta=1.0, gamma=1.0, delta=5.0
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    if balance_weights is None:
        balance_weights = torch.ones(img_logits.shape[1], dtype=torch.float32, device=img_logits.device)
    else:
        balance_weights = balance_weights.detach()   # set by the trainer, not learnt (as in the reference)
    loss, terms, *_ = _forward_op(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats,
                                  balance_weights, float(tau_assign), float(tau_center), float(alpha), float(beta),
                                  float(gamma), float(delta))
    return loss, {name: terms[i].detach() for i, name in enumerate(TERM_NAMES)}
