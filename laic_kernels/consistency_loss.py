"""consistency_loss: the stage-1 cross-modal consistency loss, its four levels in one op with one backward."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from . import checks, closed_form, reference
from .backends import Backend, always, dispatch, triton_backend
from .reference.consistency_loss import compute_dtype

LOGIT_NAMES = ("img_logits", "txt_logits", "img_nbr_logits", "txt_nbr_logits")
FEAT_NAMES = ("img_feats", "txt_feats")


def _finite_number(name: str, value) -> None:
    # numpy scalars (np.float32(1.0)) are numbers too, as checks.positive already takes them.
    if not checks.is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _validate(logits, feats, balance_weights, tau_assign, tau_center, weights) -> None:
    for name, x in zip(LOGIT_NAMES, logits):
        checks.tensor(name, x, ndim=2)
        checks.non_empty(name, x)
    for name, x in zip(FEAT_NAMES, feats):
        checks.tensor(name, x, ndim=2)
        checks.non_empty(name, x)
    checks.same_device(**dict(zip(LOGIT_NAMES, logits)), **dict(zip(FEAT_NAMES, feats)),
                       balance_weights=balance_weights)
    for i, what in ((0, "batch size B (dimension 0)"), (1, "number of clusters K (dimension 1)")):
        checks.same_size(LOGIT_NAMES, [x.shape[i] for x in logits], what)
    batch, k = logits[0].shape
    if k < 2:
        raise ValueError(f"img_logits has K={k} cluster column; the loss needs K >= 2 clusters "
                         "(logits of shape [B, K])")
    checks.same_size(("img_logits",) + FEAT_NAMES, [batch] + [f.shape[0] for f in feats], "batch size B (dimension 0)")
    checks.same_size(FEAT_NAMES, [f.shape[1] for f in feats], "feature dimension D (dimension 1)")
    if balance_weights is not None:
        checks.tensor("balance_weights", balance_weights, ndim=1)
        if balance_weights.shape[0] != k:
            raise ValueError(f"balance_weights must have shape ({k},), one weight per cluster, got "
                             f"{tuple(balance_weights.shape)}")
    dtype = compute_dtype(*logits, *feats)
    largest = torch.finfo(dtype).max
    for name, tau in (("tau_assign", tau_assign), ("tau_center", tau_center)):
        checks.positive(name, tau)
        if 1.0 / float(tau) >= largest:   # every backend divides by it in ``dtype``: inf, then a NaN loss
            raise ValueError(f"{name} = {float(tau):g} is too small: 1 / {name} must be a finite {dtype} "
                             f"({name} >= {1.0 / largest:.3g})")
    for name, value in weights.items():
        _finite_number(name, value)
        if abs(float(value)) >= largest:   # the weighted terms overflow to an infinite loss
            raise ValueError(f"{name} = {float(value):g} must be a finite {dtype} weight (below {largest:.3g})")
    named = dict(zip(LOGIT_NAMES + FEAT_NAMES, logits + feats), balance_weights=balance_weights)
    checks.all_finite(**named)
    _check_centre_norms(feats, batch, dtype)


def _check_centre_norms(feats, batch: int, dtype: torch.dtype) -> None:
    """The centre term sums up to B feature rows (``Pᵀu``, P's entries at most 1) and squares their norms in the
    computation's dtype (``dtype``: float64 where an input is, else float32): features of magnitude m overflow
    there once ``D (B m)^2`` nears its largest value (float32 features of 1e20 gave the loss of zero features, 1e19
    a wrong one). One common scale of a feature tensor changes nothing in the loss (each centre is normalised), so
    scaling it down is the fix. One device read; skipped inside values_checked."""
    if checks.values_are_checked():
        return
    largest = torch.finfo(dtype).max
    magnitudes = torch.stack([checks.magnitude(f).double() for f in feats]).tolist()
    for name, f, magnitude in zip(FEAT_NAMES, feats, magnitudes):
        if magnitude >= math.sqrt(largest / 2 / f.shape[1]) / batch:     # D (B m)^2 >= largest / 2
            raise ValueError(f"{name} reaches {magnitude:.3g} in magnitude: the centres (sums of up to B = {batch} "
                             f"rows) would overflow {str(dtype).replace('torch.', '')} in their squared norms at D = "
                             f"{f.shape[1]}; scale the tensor down by one common factor (which leaves the loss "
                             "unchanged)")


BACKENDS = (
    triton_backend("consistency_loss", differentiable=True),
    closed_form.COMPILED_BACKEND,
    closed_form.BACKEND,
    Backend("reference", always, reference.consistency_loss),
)


def consistency_loss(img_logits: torch.Tensor, txt_logits: torch.Tensor, img_nbr_logits: torch.Tensor,
                     txt_nbr_logits: torch.Tensor, img_feats: torch.Tensor, txt_feats: torch.Tensor, *,
                     balance_weights: Optional[torch.Tensor] = None, tau_assign: float = 0.5,
                     tau_center: float = 0.5, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                     delta: float = 5.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The stage-1 cross-modal consistency loss over a batch of B samples and K clusters.

    P, Q, Pn, Qn are the row softmaxes of ``img_logits``, ``txt_logits``, ``img_nbr_logits``, ``txt_nbr_logits``
    (each ``[B, K]``, K >= 2); u_i, v_i the rows of ``img_feats`` and ``txt_feats`` (``[B, D]``); eps = 1e-8.

    - ``inst = -(1/3B) Σ_i [log(<P_i,Qn_i>+eps) + log(<Q_i,Pn_i>+eps) + log(<P_i,Q_i>+eps)]``
    - ``assign``: contrastive loss over the 2K columns p_k = P[:,k]/‖P[:,k]‖, q_k = Q[:,k]/‖Q[:,k]‖; the positive of
      p_k is q_k and back, the other 2K-2 columns are negatives, temperature ``tau_assign``; mean over the 2K columns.
    - ``center``: μ_k = normalize(Σ_i P_ik u_i), ν_k = normalize(Σ_i Q_ik v_i); the mean over k of
      ``-log softmax_j(μ_k·ν_j/τ)_k - log softmax_j(ν_k·μ_j/τ)_k``, halved, ``τ = tau_center``.
    - ``bal = Σ_k w_k (p̄_k log p̄_k + q̄_k log q̄_k)`` with p̄, q̄ the column means of P and Q and w =
      ``balance_weights`` (default ones).

    Norms and balance logs are clamped at eps. Returns ``(loss, terms)``, ``loss = alpha·inst + beta·assign +
    gamma·center + delta·bal`` (a scalar that gradients flow from to the four logits and both feature tensors) and
    ``terms`` the four unweighted terms, detached. Inputs may be float32, float16 or bfloat16 (math in float32) or
    float64 (the reference then runs in float64).
    """
    logits = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits)
    feats = (img_feats, txt_feats)
    weights = dict(alpha=alpha, beta=beta, gamma=gamma, delta=delta)
    _validate(logits, feats, balance_weights, tau_assign, tau_center, weights)
    return dispatch("consistency_loss", BACKENDS, *logits, *feats, balance_weights=balance_weights,
                    tau_assign=float(tau_assign), tau_center=float(tau_center),
                    **{name: float(value) for name, value in weights.items()})
