"""sinkhorn: batched log-domain Sinkhorn-Knopp balancing of score matrices."""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, reference
from .backends import Backend, always, dispatch, extension_has_cuda, extension_import_error

# Marginal sums may differ by float rounding only.
_MARGINAL_SUM_RTOL = 1e-4


def _marginals(name: str, marginals: Optional[torch.Tensor], batch_shape, size: int, like: torch.Tensor
               ) -> torch.Tensor:
    """``marginals`` broadcast to ``batch_shape + (size,)`` float32 (uniform ``1/size`` when None). Their values are
    checked in :func:`_validate`, all at once."""
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


def _validate(scores, eps, n_iters, row_marginals, col_marginals, tol):
    checks.tensor("scores", scores, min_ndim=2)
    checks.non_empty("scores", scores)
    checks.positive("eps", eps)
    checks.int_in_range("n_iters", n_iters, 1, 1 << 30)
    if tol is not None:
        checks.positive("tol", tol)
    batch, (b, k) = scores.shape[:-2], scores.shape[-2:]
    rows = _marginals("row_marginals", row_marginals, batch, b, scores)
    cols = _marginals("col_marginals", col_marginals, batch, k, scores)
    # Every value check in one device synchronisation (sinkhorn runs at every training step); the failing one is
    # then reported by name.
    row_sum, col_sum = rows.sum(-1), cols.sum(-1)
    problems = (
        ("scores", "contains NaN or infinite values; clean the input (e.g. torch.nan_to_num) first",
         torch.isfinite(scores).all()),
        ("row_marginals", "contains NaN or infinite values", torch.isfinite(rows).all()),
        ("col_marginals", "contains NaN or infinite values", torch.isfinite(cols).all()),
        ("row_marginals", "has negative entries; marginals must be >= 0", (rows >= 0).all()),
        ("col_marginals", "has negative entries; marginals must be >= 0", (cols >= 0).all()),
        ("row_marginals", "sums to zero for some problem; marginals need a positive total mass", (row_sum > 0).all()),
        ("col_marginals", "sums to zero for some problem; marginals need a positive total mass", (col_sum > 0).all()),
        ("row_marginals and col_marginals", "must have the same sum for every problem; rescale one of them",
         ((row_sum - col_sum).abs() <= _MARGINAL_SUM_RTOL * col_sum.abs()).all()),
    )
    ok = torch.stack([flag for _, _, flag in problems]).tolist()
    for (name, message, _), good in zip(problems, ok):
        if not good:
            raise ValueError(f"{name} {message}")
    return rows, cols


def _extension_why_not(scores, eps, n_iters, rows, cols, tol, *, forced) -> Optional[str]:
    error = extension_import_error()
    if error:
        return error
    if scores.device.type == "cuda" and not extension_has_cuda():
        return "laic_kernels._C was built without CUDA (no toolkit at build time, or LAIC_BUILD_CUDA=0)"
    if scores.device.type not in ("cpu", "cuda"):
        return f"no kernel for {scores.device.type} tensors"
    if scores.dtype == torch.float64:
        return "float64 scores run on the reference (the kernels compute in float32)"
    return None


def _run_extension(scores, eps, n_iters, rows, cols, tol):
    import laic_kernels.extension  # noqa: F401  (registers torch.ops.laic)
    batch, (b, k) = scores.shape[:-2], scores.shape[-2:]
    plan = torch.ops.laic.sinkhorn(scores.reshape(-1, b, k).contiguous(), rows.reshape(-1, b).contiguous(),
                                   cols.reshape(-1, k).contiguous(), float(eps), int(n_iters),
                                   -1.0 if tol is None else float(tol))
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
    problems; fp16/bf16 scores are accumulated in float32. ``B * plan`` is the SwAV-style balanced soft assignment.
    """
    rows, cols = _validate(scores, eps, n_iters, row_marginals, col_marginals, tol)
    return dispatch("sinkhorn", BACKENDS, scores, float(eps), n_iters, rows, cols, tol)
