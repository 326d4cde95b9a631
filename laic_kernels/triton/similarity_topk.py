"""Triton kernel for similarity_topk: tiles of queries × keys on ``tl.dot``, a running top-k per query row on chip.

How it works. A program owns ``BLOCK_N`` query rows and streams over tiles of ``BLOCK_M`` keys, computing each tile
of similarities with ``tl.dot``. Each similarity is packed with its key index into one int64 whose integer order is
the order we want: the float32 bits made order-preserving in the high 32 bits, ``2^31 - 1 - index`` in the low 32
bits (so on equal values the smaller index wins: ties are deterministic and indices distinct). The running list
holds ``KP`` packed keys per row (``KP`` = next power of two of ``k``); ``K`` of its slots are live.

Merging a tile into the list, threshold-and-insert: a tile is first tested in float32 against each row's k-th best
value (one max per element); only a tile where some entry can enter is masked, packed and merged, by rounds in which
each row's best remaining tile entry replaces its k-th best while it beats it. Once the lists have filled up (after a
few tiles) almost every tile stops at the test. (A bitonic sort-and-merge of whole tiles was also built; on an H200
it took 1.53 s against this merge's 0.45 s at 1.28M x 82k, see benchmarks/RESULTS.md, and was removed.)

Tile sizes: :func:`plans` lists a few, the default first; on large CUDA problems the fastest on the device is picked
by timing them on a slice of the input (``tuning``), since no single choice is best on every GPU.

When queries are few and keys many, the keys are split across programs (grid axis 1); each writes its partial
top-``KP`` list of packed keys and a small second pass (``torch.topk`` on the packed int64, then unpacking) merges
them.

Precision: fp16/bf16 inputs go to the tensor cores with float32 accumulation (their products are exact in float32).
float32 inputs never get plain TF32 (which rounds the inputs to 10 mantissa bits, enough to reorder near neighbours):
on Ampere and later they use ``input_precision="tf32x3"`` (three TF32 passes, float32 accuracy on the tensor cores),
elsewhere (and under the interpreter) ``"ieee"``, exact float32 products and sums. Either way the values match the
float32 reference to about 1e-6 relative. For the highest speed on GPU, pass bf16/fp16 features. float64 (and mixed)
inputs are computed in float32, as the reference does. Inputs may be non-contiguous (strides are passed to the
kernel); offsets are computed in int64, so products beyond 2^31 elements are fine.

Registered as the custom op ``torch.ops.laic_triton.similarity_topk`` (with a fake kernel) so that it can sit inside
``torch.compile``d code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from ..backends import triton_interpreting
from . import COMPILE_OPTIONS, tuning

# Largest k the on-chip running list supports (a [BLOCK_N, 128] int64 tile); larger k runs on the next backend.
MAX_K = 128
# Key splitting: aim for this many programs per streaming multiprocessor; never split below this many key tiles each.
PROGRAMS_PER_SM = 2
MIN_TILES_PER_SPLIT = 4
# Under the interpreter there are no SMs; a small target still exercises the split path on small-N inputs.
INTERPRETER_PROGRAMS = 4
# The widest feature step of a tf32x3 dot (see block_d).
TF32X3_BLOCK_D = 16


def why_not(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False,
            k_name: str = "k") -> Optional[str]:
    """None when the kernel can take this input, else why not (the dispatcher then tries the next backend:
    ``symmetric`` for a set searched among itself, else the reference). ``k_name``:
    what the caller's user called ``k`` (semantic_mix's ``topk``)."""
    if k > MAX_K:
        return f"{k_name}={k} is above the kernel's on-chip top-k limit of {MAX_K}"
    if keys.shape[0] >= 2 ** 31 - 1:
        return f"M={keys.shape[0]} keys do not fit the kernel's 31-bit key index"
    return None


@triton.jit
def _pack(sims, cols):
    """float32 similarities and int32 key indices -> int64 whose integer order is (value, then smaller index)."""
    bits = sims.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _unpack(packed):
    ordered = (packed >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _compare_swap(x, ROWS: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                  DESCENDING: tl.constexpr):
    """One layer of a bitonic network along the last axis of ``x[ROWS, L]``: elements ``STRIDE`` apart are put in
    order, ascending in even blocks of ``BLOCK`` elements and descending in odd ones (all ``DESCENDING`` when
    ``BLOCK == L``). Built from min/max over a size-2 axis, which the compiler and the interpreter both do natively
    (``tl.sort`` goes through a generic reduction that the interpreter runs element by element)."""
    PAIRS: tl.constexpr = L // (2 * STRIDE)
    x4 = tl.reshape(x, [ROWS, PAIRS, 2, STRIDE])
    low = tl.min(x4, axis=2, keep_dims=True)
    high = tl.max(x4, axis=2, keep_dims=True)
    right = tl.arange(0, 2)[None, None, :, None]
    if BLOCK == L:
        descending = DESCENDING
    else:
        descending = ((tl.arange(0, PAIRS) * (2 * STRIDE) // BLOCK) % 2)[None, :, None, None]
    out = tl.where((right ^ descending) == 1, high, low)
    return tl.reshape(out, [ROWS, L])


@triton.jit
def _sort_rows(x, ROWS: tl.constexpr, L: tl.constexpr, LOG_L: tl.constexpr, DESCENDING: tl.constexpr):
    """Bitonic sort of each row of ``x[ROWS, L]`` (``L = 2**LOG_L``)."""
    for stage in tl.static_range(1, LOG_L + 1):
        for j in tl.static_range(0, stage):
            x = _compare_swap(x, ROWS, L, 1 << (stage - 1 - j), 1 << stage, DESCENDING)
    return x


@triton.jit
def _similarity_tile(q_rows, row_ok, k_ptr, cols, col_ok, D, stride_qd, stride_kn, stride_kd,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_IN_FP32: tl.constexpr):
    """``queries[rows] @ keys[cols].T`` as float32 ``[BLOCK_N, BLOCK_M]``, accumulated over D in ``BLOCK_D`` steps."""
    k_cols = k_ptr + cols.to(tl.int64)[None, :] * stride_kn
    sims = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        q = tl.load(q_rows + ds[None, :].to(tl.int64) * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(k_cols + ds[:, None].to(tl.int64) * stride_kd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        sims = tl.dot(q, kt, sims, input_precision=PRECISION)
    return sims


@triton.jit
def _insert_tile(running, kth_best, packed, active, K: tl.constexpr):
    """Threshold-and-insert: while some row's best remaining tile entry beats its k-th best, that entry replaces the
    k-th best (the minimum of the row's K active slots). Entries come out of the tile best first, so no row needs
    more than K rounds, and once the list has filled up most tiles need zero or one."""
    SENT: tl.constexpr = -9223372036854775808
    TOP: tl.constexpr = 9223372036854775807
    beats = tl.sum((packed > kth_best[:, None]).to(tl.int32), axis=1)
    rounds = tl.max(tl.minimum(beats, K), axis=0)
    for _ in range(rounds):
        best = tl.max(packed, axis=1)
        take = best > kth_best
        packed = tl.where(packed == best[:, None], SENT, packed)   # packed keys are unique: removes exactly one
        running = tl.where((running == kth_best[:, None]) & take[:, None], best[:, None], running)
        kth_best = tl.min(tl.where(active, running, TOP), axis=1)
    return running, kth_best


@triton.jit
def _threshold(kth_best, row_ok, KP: tl.constexpr):
    """Each row's k-th best similarity as a float: what a tile entry must reach to possibly enter the list (at equal
    value the smaller index may win). ``-inf`` while the list still holds placeholders, ``+inf`` for rows past N,
    which are never merged."""
    SENT: tl.constexpr = -9223372036854775808
    value, _ = _unpack(kth_best)
    value = tl.where(kth_best <= SENT + KP, float("-inf"), value)
    return tl.where(row_ok, value, float("inf"))


@triton.jit
def _merge_tile(running, kth_best, kth_value, sims, rows, row_ok, cols, col_ok, active, K: tl.constexpr,
                KP: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """Merge a tile of similarities ``sims[BLOCK_N, BLOCK_M]`` (of key indices ``cols``) into the running lists.

    Most tiles hold nothing that beats any row's k-th best once the lists have filled up, so the tile is first
    tested in float32 (one max per element: some row's largest entry at least its ``kth_value``) and only a tile
    that passes is masked (keys past the end, the row itself with ``EXCLUDE_SELF``), packed into int64 keys and
    inserted. For finite similarities (the public op refuses inputs whose products could overflow) the test is a
    superset of the packed comparison, so the result is exactly that of inserting every tile; entries the masks drop
    (the diagonal, keys past the end) can only make a tile pass needlessly, in one tile a row block."""
    SENT: tl.constexpr = -9223372036854775808
    if tl.max((tl.max(sims, axis=1) >= kth_value).to(tl.int32), axis=0) > 0:
        valid = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_SELF:
            valid = valid & (cols[None, :] != rows[:, None])
        packed = tl.where(valid, _pack(sims, cols), SENT)
        running, kth_best = _insert_tile(running, kth_best, packed, active, K)
        kth_value = _threshold(kth_best, row_ok, KP)
    return running, kth_best, kth_value


@triton.jit
def _topk_kernel(q_ptr, k_ptr, values_ptr, indices_ptr, partial_ptr,
                 N, M, D, keys_per_split,
                 stride_qn, stride_qd, stride_kn, stride_kd,
                 stride_vn, stride_in, stride_pn,
                 K: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 EXCLUDE_SELF: tl.constexpr, WRITE_PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr):
    SENT: tl.constexpr = -9223372036854775808   # below every real packed key: excluded and out-of-range entries
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn
    key_start = pid_s * keys_per_split
    key_stop = tl.minimum(key_start + keys_per_split, M)

    # The running list: the K slots from KP - K up hold the best so far, starting from distinct placeholders just
    # above SENT (distinct so that "the slot holding the k-th best" is always one slot); the others hold SENT.
    slots = tl.arange(0, KP)
    active = (slots >= KP - K)[None, :]
    running = tl.where(active, SENT + 1 + slots[None, :].to(tl.int64), SENT).broadcast_to([BLOCK_N, KP])
    kth_best = tl.full([BLOCK_N], SENT + 1 + KP - K, tl.int64)
    kth_value = _threshold(kth_best, row_ok, KP)
    for start in range(key_start, key_stop, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < key_stop
        sims = _similarity_tile(q_rows, row_ok, k_ptr, cols, col_ok, D, stride_qd, stride_kn, stride_kd,
                                BLOCK_N, BLOCK_M, BLOCK_D, PRECISION, DOT_IN_FP32)
        running, kth_best, kth_value = _merge_tile(running, kth_best, kth_value, sims, rows, row_ok, cols, col_ok,
                                                   active, K, KP, EXCLUDE_SELF)

    best_first = _sort_rows(running, BLOCK_N, KP, LOG_KP, 1)
    if WRITE_PARTIAL:
        offs = rows.to(tl.int64)[:, None] * stride_pn + (pid_s * KP + slots)[None, :]
        tl.store(partial_ptr + offs, best_first, mask=row_ok[:, None])
    else:
        values, indices = _unpack(best_first)
        out_mask = row_ok[:, None] & (slots[None, :] < K)
        row64 = rows.to(tl.int64)[:, None]
        tl.store(values_ptr + row64 * stride_vn + slots[None, :], values, mask=out_mask)
        tl.store(indices_ptr + row64 * stride_in + slots[None, :], indices.to(tl.int64), mask=out_mask)


def _unpack_torch(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``_pack`` on int64 tensors (for the merge of split partial lists)."""
    ordered = (packed >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 0x7FFFFFFF - (packed & 0x7FFFFFFF)


@dataclass(frozen=True)
class Plan:
    """Tile sizes for one call: KP slots in the running list, BLOCK_N query rows and BLOCK_M keys per tile."""
    kp: int
    block_n: int
    block_m: int
    num_warps: int

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_m}/{self.num_warps}w"


def plans(k: int) -> Tuple[Plan, ...]:
    """The tile plans the kernel may run with for this ``k``, the default first (the only one used off CUDA and on
    small problems; on large CUDA problems ``tuning`` times them all on the device and takes the fastest). Each
    compiles for sm_90 without spilling registers (tests/test_similarity_topk.py, at k = 10, 20 and 60): wide
    running lists hold more registers per row, so fewer and smaller plans as k grows."""
    kp = max(16, triton.next_power_of_2(k))
    if kp >= 128:
        return (Plan(kp, 32, 64, 8),)
    if kp == 64:
        return Plan(kp, 64, 64, 4), Plan(kp, 128, 64, 8)
    return Plan(kp, 64, 64, 4), Plan(kp, 128, 64, 8), Plan(kp, 128, 128, 8), Plan(kp, 64, 128, 4)


def _key_splits(n_row_blocks: int, m: int, block_m: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    if n_row_blocks >= target:
        return 1
    most = max(1, triton.cdiv(m, block_m * MIN_TILES_PER_SPLIT))
    return max(1, min(most, triton.cdiv(target, n_row_blocks)))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The Triton interpreter multiplies bfloat16 tiles as their raw uint16 bits (triton 3.9), so there bf16 tiles are
    widened to float32 first (exact; the GPU path keeps them on the tensor cores)."""
    return dtype == torch.bfloat16 and triton_interpreting()


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot``'s input_precision: float32 at float32 accuracy (see the module docstring); the default for halves."""
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16/bf16 operands
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def dot_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The one dtype tl.dot takes for operands of dtypes ``a`` and ``b``: the shared half type, else float32 (float64
    and mixed inputs)."""
    return a if a == b and a in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def dot_operands(queries: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both in :func:`dot_dtype`."""
    dtype = dot_dtype(queries.dtype, keys.dtype)
    return queries.to(dtype), keys.to(dtype)


def block_d(d: int, precision: str) -> int:
    """The feature-dimension step of ``_similarity_tile``: 16 to 64 (tl.dot needs 16). float32 at float32 accuracy
    (tf32x3: three dots a step) holds more a step: 64-wide steps spill registers on sm_90 in both kernels, 16-wide
    ones do not (compiled, not timed: tests/test_similarity_topk.py)."""
    widest = TF32X3_BLOCK_D if precision == "tf32x3" else 64
    return max(16, min(widest, triton.next_power_of_2(d)))


def kernel_constants(plan: Plan, k: int, d: int, exclude_self: bool, write_partial: bool, precision: str,
                     widen_bf16: bool) -> dict:
    """The compile-time arguments of ``_topk_kernel`` (also used by the test that compiles it for sm_90)."""
    return dict(K=k, KP=plan.kp, LOG_KP=plan.kp.bit_length() - 1, BLOCK_N=plan.block_n, BLOCK_M=plan.block_m,
                BLOCK_D=block_d(d, precision), EXCLUDE_SELF=bool(exclude_self), WRITE_PARTIAL=write_partial,
                PRECISION=precision, DOT_IN_FP32=widen_bf16)


def similarity_topk_into(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool,
                         values: torch.Tensor, indices: torch.Tensor, key_splits: Optional[int] = None,
                         plan: Optional[Plan] = None) -> None:
    """Write the top-k of ``queries @ keys.T`` into ``values[N, k]`` (float32) and ``indices[N, k]`` (int64), both
    with contiguous rows.

    Inputs are validated by the public op. ``key_splits`` overrides how many programs share each row's keys, ``plan``
    the tile plan (one of :func:`plans`; by default :func:`tuned_plan`)."""
    queries, keys = dot_operands(queries, keys)
    n, d = queries.shape
    m = keys.shape[0]
    plan = plan or tuned_plan(queries, keys, k, exclude_self)
    row_blocks = triton.cdiv(n, plan.block_n)
    splits = key_splits or _key_splits(row_blocks, m, plan.block_m, queries.device)
    keys_per_split = triton.cdiv(triton.cdiv(m, splits), plan.block_m) * plan.block_m
    splits = triton.cdiv(m, keys_per_split)
    partial = None
    if splits > 1:
        partial = torch.empty(n, splits * plan.kp, dtype=torch.int64, device=queries.device)
    constants = kernel_constants(plan, k, d, exclude_self, partial is not None,
                                 dot_precision(queries.dtype, queries.device), dot_in_fp32(queries.dtype))
    _topk_kernel[(row_blocks, splits)](
        queries, keys, values, indices, partial if partial is not None else values,
        n, m, d, keys_per_split,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), indices.stride(0), partial.stride(0) if partial is not None else 0,
        **constants, num_warps=plan.num_warps, **COMPILE_OPTIONS)
    if partial is not None:
        best = torch.topk(partial, k, dim=1, largest=True, sorted=True).values
        merged_values, merged_indices = _unpack_torch(best)
        values.copy_(merged_values)
        indices.copy_(merged_indices)


def tuned_plan(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool) -> Plan:
    """The plan for this call: on a large CUDA problem the fastest of :func:`plans` on a probe (the first
    ``tuning.PROBE_ROWS`` queries against the first ``tuning.PROBE_KEYS`` keys), timed once per process and
    problem kind; otherwise the default."""
    candidates = plans(k)
    n, d = queries.shape
    if not tuning.worth_tuning(queries.device, n * keys.shape[0] * d):
        return candidates[0]
    probe_queries, probe_keys = queries[:tuning.PROBE_ROWS], keys[:tuning.PROBE_KEYS]
    kind = ("similarity_topk", queries.device, queries.dtype, d, k, exclude_self, probe_queries.shape[0],
            probe_keys.shape[0])

    def run(plan: Plan) -> None:
        values = torch.empty(probe_queries.shape[0], k, dtype=torch.float32, device=queries.device)
        indices = torch.empty_like(values, dtype=torch.int64)
        similarity_topk_into(probe_queries, probe_keys, k, exclude_self, values, indices, plan=plan)

    return tuning.fastest(kind, candidates, run)


@torch.library.custom_op("laic_triton::similarity_topk", mutates_args=())
def _similarity_topk_op(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    n = queries.shape[0]
    values = torch.empty(n, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=queries.device)
    with backends.on_device(queries.device):
        similarity_topk_into(queries, keys, k, exclude_self, values, indices)
    return values, indices


@_similarity_topk_op.register_fake
def _(queries, keys, k, exclude_self):
    n = queries.shape[0]
    return queries.new_empty(n, k, dtype=torch.float32), queries.new_empty(n, k, dtype=torch.int64)


def similarity_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel behind ``laic_kernels.similarity_topk`` (inputs already validated there)."""
    return torch.ops.laic_triton.similarity_topk(queries, keys, int(k), bool(exclude_self))
