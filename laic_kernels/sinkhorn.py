"""sinkhorn: batched log-domain Sinkhorn-Knopp balancing of score matrices."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, reference
from .backends import (Backend, always, dispatch, extension_cuda_why_not, extension_import_error,
                       no_backward_why_not)

# Marginal sums may differ by float rounding only: of the sums' float32 (this), or of the marginals' own dtype where
# it is coarser (:func:`_marginal_sum_rtol`: uniform float16 marginals of 9 rows and 4 columns differed by 2.4e-4,
# bfloat16 ones by 2e-3, and were refused; a QA helper, 12-08).
_MARGINAL_SUM_RTOL = 1e-4


def _marginal_sum_rtol(*marginals: Optional[torch.Tensor]) -> float:
    """The relative difference of the marginals' sums accepted: ``_MARGINAL_SUM_RTOL``, or the machine epsilon of
    the coarsest floating dtype given (each entry rounded by half of it at most, so their sum too). Entries in
    that dtype's subnormal range round by more (100,000 float16 rows of 1e-5 sum 1.4e-3 off 1): such marginals are
    still refused; give them in float32."""
    return max([_MARGINAL_SUM_RTOL] + [torch.finfo(m.dtype).eps for m in marginals
                                       if m is not None and m.dtype.is_floating_point])
# A plan's entries are at most its total mass; the compiled kernels' exp stops at e^88 (1.65e38), just short of
# float32's largest value (a mass of 2.5e38 came out as 1.75e38 there).
MAX_TOTAL_MASS = 1e38


def _marginals(name: str, marginals: Optional[torch.Tensor], batch_shape, size: int, like: torch.Tensor
               ) -> torch.Tensor:
    """``marginals`` broadcast to ``batch_shape + (size,)`` float32 (uniform ``1/size`` when None). Their values are
    checked in :func:`_check_values`, all at once."""
    shape = tuple(batch_shape) + (size,)
    if marginals is None:
        return torch.full(shape, 1.0 / size, dtype=torch.float32, device=like.device)
    checks.tensor(name, marginals, min_ndim=1)
    checks.same_device(scores=like, **{name: marginals})
    try:
        return torch.broadcast_to(marginals.float(), shape)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(marginals.shape)}, which does not broadcast to {shape} "
                         "(scores' leading dimensions, then one entry per "
                         f"{'row' if name == 'row_marginals' else 'column'})") from None


# Scores may span at most this many eps, and reach at most this many eps in magnitude: beyond it float32 potentials
# lose the plan (0.3% drift of the rows' sums at a range of 1e5, 60% at 1e7, and one-hot rows summing to 1 each at
# eps = 1e-30; scores offset by 2e6 eps, a constant that leaves the plan unchanged, moved entries by 33%, and still
# by 15% at the bound, 8-10% at 5e5 eps).
MAX_RANGE_OVER_EPS = 1e6


def _check_arguments(scores, eps, n_iters, tol) -> None:
    """Everything that can be checked from shapes, dtypes and Python numbers: no tensor is read."""
    checks.tensor("scores", scores, min_ndim=2)
    checks.non_empty("scores", scores)
    checks.positive("eps", eps)
    if 1.0 / float(eps) > checks.FLOAT32_MAX:   # every backend multiplies by 1/eps in float32: inf, then NaN plans
        raise ValueError(f"eps = {float(eps):g} is too small: 1/eps must be a finite float32 (eps >= "
                         f"{1.0 / checks.FLOAT32_MAX:.3g}); scale the scores and eps up together")
    checks.int_in_range("n_iters", n_iters, 1, 1 << 30)
    if tol is not None:
        checks.positive("tol", tol)


def _score_extent(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scores' largest magnitude and the larger of their range (largest minus smallest) and that magnitude, as
    float64 0-d tensors from one pass over them (on the device): float32 holds ``scores / eps`` to a precision set by
    its magnitude, so a large constant offset loses the plan as a large range does. In float64 because neither fits
    float32 everywhere: float64 scores may lie beyond it, and the range of float32 scores near its edge overflows it
    (either came out inf, and inf passed the comparison with an eps bound that was inf in float32 too)."""
    low, high = torch.aminmax(scores.detach())
    low, high = low.double(), high.double()
    magnitude = torch.maximum(high.abs(), low.abs())
    return magnitude, torch.maximum(high - low, magnitude)


def _check_values(scores: torch.Tensor, eps: float, rows: torch.Tensor, cols: torch.Tensor,
                  sum_rtol: float = _MARGINAL_SUM_RTOL) -> None:
    """Finite scores within float32's range spanning at most ``MAX_RANGE_OVER_EPS`` eps, finite non-negative
    marginals with equal positive sums: one device synchronisation for all of them, then the failing one is reported
    by name. Skipped inside :func:`checks.values_checked`, like :func:`checks.all_finite`."""
    if checks.values_are_checked():
        return
    # Summed in float64: a float32 sum of finite marginals overflows (columns of 3e38 each summed to inf, and the
    # equal-sum test below passed as inf <= inf for rows of 1e38, the columns ignored). Entries are float32, so no
    # float64 sum of them overflows, and the equal-sum test then bounds the columns' total by the rows'.
    row_sum, col_sum = rows.sum(-1, dtype=torch.float64), cols.sum(-1, dtype=torch.float64)
    magnitude, spread = _score_extent(scores)
    problems = (
        ("scores", checks.NOT_FINITE,
         checks.sum_is_finite(scores)),
        # float64 scores beyond float32's largest value became inf in every backend's float32 (an all-NaN plan).
        ("scores", f"reach beyond {checks.FLOAT32_MAX:.3g} in magnitude, float32's largest value, and every backend "
                   "computes in float32 (float64 scores too); scale the scores and eps down together (the plan "
                   "depends on scores / eps only)",
         magnitude <= checks.FLOAT32_MAX),
        ("eps", f"= {eps:g} is below 1/{MAX_RANGE_OVER_EPS:.0e} of the scores' range or largest magnitude: "
                "float32 cannot hold exp(scores / eps) faithfully there and the plan drifts by 15% or more (see the "
                "docstring); raise eps, scale the scores down, or subtract each problem's largest score (a "
                "constant per problem leaves the plan unchanged)",
         spread <= MAX_RANGE_OVER_EPS * eps),   # a float64 comparison: the bound is beyond float32 for eps > 3.4e32
        ("row_marginals", "contains NaN or infinite values", torch.isfinite(rows).all()),
        ("col_marginals", "contains NaN or infinite values", torch.isfinite(cols).all()),
        ("row_marginals", "has negative entries; marginals must be >= 0", (rows >= 0).all()),
        ("col_marginals", "has negative entries; marginals must be >= 0", (cols >= 0).all()),
        ("row_marginals", "sums to zero for some problem; marginals need a positive total mass", (row_sum > 0).all()),
        ("col_marginals", "sums to zero for some problem; marginals need a positive total mass", (col_sum > 0).all()),
        ("row_marginals", f"sums to more than {MAX_TOTAL_MASS:.0e} for some problem, beyond what a float32 plan holds; "
                          "scale both marginals down", (row_sum <= MAX_TOTAL_MASS).all()),
        ("row_marginals and col_marginals", "must have the same sum for every problem; rescale one of them",
         ((row_sum - col_sum).abs() <= sum_rtol * col_sum.abs()).all()),
    )
    ok = torch.stack([flag for _, _, flag in problems]).tolist()
    for (name, message, _), good in zip(problems, ok):
        # A non-finite sum of the scores may be finite scores whose sum overflows: checks.is_finite tells them apart.
        if not good and not (message is checks.NOT_FINITE and checks.is_finite(scores)):
            raise ValueError(f"{name} {message}")


def _extension_why_not(scores, eps, n_iters, rows, cols, tol, *, forced) -> Optional[str]:
    error = extension_import_error()
    if error:
        return error
    if scores.device.type == "cuda":
        why = extension_cuda_why_not(scores.device)
        if why:
            return why
    elif scores.device.type != "cpu":
        return f"no kernel for {scores.device.type} tensors"
    return no_backward_why_not(scores, rows, cols)


# How the CUDA kernel shares a problem's rows between thread blocks (csrc/cuda/sinkhorn_cuda.cu). These thresholds
# are reasoned, then checked on one H200 at two shapes (benchmarks/RESULTS.md, 2026-12-04: the chosen split within
# 0.4 ms of the best one timed); benchmarks/bench_sinkhorn.py times both launches.
_COLUMN_TILE = 32              # columns per block in the kernel's column step (one per lane)
_MIN_ROWS_PER_BLOCK = 64       # 8 rows per warp: fewer, and merging the blocks' partials outweighs reading the rows
_MIN_SPLIT_ENTRIES = 1 << 16   # smaller problems take longer to launch 3 kernels per iteration than to solve in one
_BLOCKS_PER_SM = 4             # column-step blocks wanted per SM, to keep enough loads in flight


def cuda_row_blocks(g: int, b: int, k: int, sm_count: int) -> Tuple[int, str]:
    """How many CUDA thread blocks should share each of ``g`` problems' ``b`` rows (``k`` columns) on a GPU with
    ``sm_count`` SMs, and why. 1 is the single fused launch with one block per problem; more splits the rows, at the
    price of three launches per iteration with the column sums reduced across blocks in between."""
    if g >= sm_count:
        return 1, f"{g} problems give each of the {sm_count} SMs a block already"
    if b < 2 * _MIN_ROWS_PER_BLOCK:
        return 1, f"{b} rows are too few to split (a block takes at least {_MIN_ROWS_PER_BLOCK})"
    if b * k < _MIN_SPLIT_ENTRIES:
        return 1, f"a {b} x {k} problem is too small to pay for three launches per iteration"
    column_tiles = -(-k // _COLUMN_TILE)
    wanted = -(-_BLOCKS_PER_SM * sm_count // (g * column_tiles))
    blocks = max(2, min(wanted, b // _MIN_ROWS_PER_BLOCK))
    return blocks, f"{g} problem(s) would leave {sm_count - g} of {sm_count} SMs idle: rows split over {blocks} blocks"


def _row_blocks(scores: torch.Tensor) -> int:
    if scores.device.type != "cuda":
        return 1  # the CPU kernel splits rows over threads itself
    g, b, k = scores.shape
    sm_count = torch.cuda.get_device_properties(scores.device).multi_processor_count  # cached: no device sync
    return cuda_row_blocks(g, b, k, sm_count)[0]


def _run_extension(scores, eps, n_iters, rows, cols, tol):
    import laic_kernels.extension  # noqa: F401  (registers torch.ops.laic)
    batch, (b, k) = scores.shape[:-2], scores.shape[-2:]
    # float64 scores in float32, as the reference takes them (every backend holds scores / eps in float32; they
    # were sent to the slower reference for no gain in precision).
    problems = scores.reshape(-1, b, k).to(torch.float32 if scores.dtype == torch.float64 else scores.dtype)
    problems = problems.contiguous()
    plan = torch.ops.laic.sinkhorn(problems, rows.reshape(-1, b).contiguous(), cols.reshape(-1, k).contiguous(),
                                   float(eps), int(n_iters), -1.0 if tol is None else float(tol),
                                   _row_blocks(problems))
    return plan.reshape(*batch, b, k)


BACKENDS = (
    Backend("extension", _extension_why_not, _run_extension),
    Backend("reference", always, reference.sinkhorn),
)


def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, *,
             row_marginals: Optional[torch.Tensor] = None, col_marginals: Optional[torch.Tensor] = None,
             tol: Optional[float] = None) -> torch.Tensor:
    """Batched Sinkhorn-Knopp on ``exp(scores / eps)``, in the log domain, as a float32 plan ``[..., B, K]``.

    Each iteration scales the columns to ``col_marginals`` (default ``1/K`` each), then the rows to ``row_marginals``
    (default ``1/B`` each), so the plan's rows match their marginals. With ``tol``, a problem stops early once every
    column sum is within ``tol`` of its marginal; ``n_iters`` is then the cap. Leading dimensions are independent
    problems; rows and columns of zero marginal are zero in the plan and change nothing else in it, so problems of
    other sizes batch together padded with them. fp16/bf16 scores are accumulated in float32. ``B * plan`` is the
    SwAV-style balanced soft assignment.
    Precision: every backend holds ``scores / eps`` and potentials of that size in float32 (float64 scores too), so the
    rows' sums drift from their marginals as the scores' range grows next to ``eps``: by about 3e-4 (relative) at a
    range of 1e4 ``eps``, 3e-3 at 1e5, 60% at 1e7 (scores in [0, 1), 50 iterations). Keep ``eps`` above about 1e-4 of
    the range and of the scores' largest magnitude (a constant offset costs the same precision: plan entries move by
    8-10% at 5e5 eps, 15% at 1e6); below 1e-6 of either, the value checks refuse it. (Shifting each row by its maximum
    would hold the rows, but it changes the plan of the first iterations, not only its rounding; one constant per
    problem changes nothing but rounding.)

    ``eps``, ``n_iters`` and ``tol`` are Python numbers and no backend reads a tensor back to the host (the
    convergence test of ``tol`` runs on the device). The value checks (finite scores within float32's range;
    finite, non-negative marginals of equal positive sums) cost one device synchronisation per call; inside
    ``laic_kernels.checks.values_checked()`` they are skipped and a call never waits for the GPU (stage 1 runs
    there: ``LAIC.fit`` checks its inputs once). A check on the device without a sync could only end in a
    device-side assert, which leaves the CUDA context unusable and cannot say which argument was wrong.
    """
    _check_arguments(scores, eps, n_iters, tol)
    batch, (b, k) = scores.shape[:-2], scores.shape[-2:]
    rows = _marginals("row_marginals", row_marginals, batch, b, scores)
    cols = _marginals("col_marginals", col_marginals, batch, k, scores)
    _check_values(scores, float(eps), rows, cols, _marginal_sum_rtol(row_marginals, col_marginals))
    return dispatch("sinkhorn", BACKENDS, scores, float(eps), n_iters, rows, cols, tol)
