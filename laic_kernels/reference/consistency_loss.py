from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# The eps of the definition: added inside the instance logs, and the floor of every norm and balance log.
EPS = 1e-8
# The four terms, in the order the loss weights them (alpha, beta, gamma, delta).
TERM_NAMES = ("inst", "assign", "center", "bal")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (so the reference can be checked in float64), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def instance_term(p: torch.Tensor, q: torch.Tensor, pn: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
    """``-(1/3B) Σ_i [log(<P_i,Qn_i>+eps) + log(<Q_i,Pn_i>+eps) + log(<P_i,Q_i>+eps)]``."""
    dots = torch.stack([(p * qn).sum(1), (q * pn).sum(1), (p * q).sum(1)])
    return -torch.log(dots + EPS).sum() / (3 * p.shape[0])


def assignment_term(p: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
    """Cluster-level contrastive loss over the 2K normalised columns of P and Q: the positive of column k of P is
    column k of Q and back; every other column except itself is a negative."""
    k = p.shape[1]
    columns = torch.cat([F.normalize(p, dim=0, eps=EPS), F.normalize(q, dim=0, eps=EPS)], dim=1)   # [B, 2K]
    sims = (columns.t() @ columns) / tau                                                            # [2K, 2K]
    self_mask = torch.eye(2 * k, dtype=torch.bool, device=p.device)
    sims = sims.masked_fill(self_mask, float("-inf"))
    positives = (torch.arange(2 * k, device=p.device) + k) % (2 * k)
    return F.cross_entropy(sims, positives)


def center_term(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between the image cluster centres μ_k = normalize(Σ_i P_ik u_i) and the text centres ν_k."""
    mu = F.normalize(p.t() @ u, dim=1, eps=EPS)
    nu = F.normalize(q.t() @ v, dim=1, eps=EPS)
    sims = (mu @ nu.t()) / tau
    target = torch.arange(p.shape[1], device=p.device)
    return 0.5 * (F.cross_entropy(sims, target) + F.cross_entropy(sims.t(), target))


def balance_term(p: torch.Tensor, q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k (p̄_k log p̄_k + q̄_k log q̄_k)``: the weighted negative entropies of the mean assignments."""
    p_bar, q_bar = p.mean(0), q.mean(0)
    return (weights * (p_bar * p_bar.clamp_min(EPS).log() + q_bar * q_bar.clamp_min(EPS).log())).sum()


def consistency_loss(img_logits: torch.Tensor, txt_logits: torch.Tensor, img_nbr_logits: torch.Tensor,
                     txt_nbr_logits: torch.Tensor, img_feats: torch.Tensor, txt_feats: torch.Tensor, *,
                     balance_weights: Optional[torch.Tensor] = None, tau_assign: float = 0.5,
                     tau_center: float = 0.5, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                     delta: float = 5.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The stage-1 cross-modal consistency loss (see ``laic_kernels.consistency_loss`` for the definition).

    Plain differentiable PyTorch: autograd gives its backward (``laic_kernels.closed_form`` writes it out). Computes
    in float32 (float64 when any input is float64). Returns ``(loss, terms)`` with ``terms`` the detached unweighted
    ``inst``, ``assign``, ``center`` and ``bal``.
    """
    inputs = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats)
    dtype = compute_dtype(*inputs)
    p, q, pn, qn = (torch.softmax(x.to(dtype), dim=1)
                    for x in (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits))
    u, v = img_feats.to(dtype), txt_feats.to(dtype)
    if balance_weights is None:
        weights = torch.ones(p.shape[1], dtype=dtype, device=p.device)
    else:
        weights = balance_weights.detach().to(dtype)  # set by the trainer, not learnt
    terms = dict(zip(TERM_NAMES, (instance_term(p, q, pn, qn), assignment_term(p, q, tau_assign),
                                  center_term(p, q, u, v, tau_center), balance_term(p, q, weights))))
    loss = (alpha * terms["inst"] + beta * terms["assign"] + gamma * terms["center"] + delta * terms["bal"])
    return loss, {name: t.detach() for name, t in terms.items()}


def input_grads_with_graph(inputs, weights: torch.Tensor, params: Dict[str, float], wanted, grad: torch.Tensor):
    """The six inputs' gradients of :func:`consistency_loss` scaled by ``grad``, as a graph of their own, for a
    hand-written backward asked for one (``create_graph=True``: Hessian-vector products, gradient penalties): its
    closed form is made of values the forward computed without a graph, so a gradient of it would miss their
    dependence on the inputs. ``wanted[i]``: whether input i needs its gradient (None where not). Each input enters
    through a view of its own, so that a tensor passed in two places (the same logits as a row's and as its
    neighbour's) gets each place's gradient, not the sum twice."""
    wanted = [i for i, needed in enumerate(wanted[:6]) if needed]
    with torch.enable_grad():
        slots = [x.view_as(x) for x in inputs]
        loss, _ = consistency_loss(*slots, balance_weights=weights, **params)
        found = torch.autograd.grad(loss, [slots[i] for i in wanted], grad, create_graph=True)
    grads = [None] * 6
    for i, g in zip(wanted, found):
        grads[i] = g
    return grads
