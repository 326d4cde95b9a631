"""The ``closed_form`` backend of consistency_loss: the reference's loss with the assignment term's gradient written
out (the CPU's path, and GPUs' without Triton).

The assignment term compares the 2K normalised columns ``C = [P̂, Q̂]`` ([B, 2K]) through the 2K×2K similarities
``S = CᵀC / τ``. Autograd differentiates ``Cᵀ @ C`` as two products, one per operand, and keeps a 2K×2K temporary for
every elementwise step (scale, self mask, log-softmax, loss pick); written out, the gradient is

    dC = C (D + Dᵀ) / τ,    D = (softmax_rows(S) - onehot(positives)) / 2K

one [B, 2K] × [2K, 2K] product, with three 2K×2K temporaries in all. At K = 1000 (ImageNet, B = 256) this term
takes 66 ms forward and backward against the reference's 107 ms (an ad hoc timing, one CPU thread, while another
job ran); at K = 100 1.1 ms against 1.4. The whole loss: ``python benchmarks/throughput.py --ops consistency_loss``
(benchmarks/RESULTS.md). The other three terms are the reference's own (their products are the same in either form).

Same values as the reference up to float rounding (tested against it, float64 included). A backward asked for a
graph of its own (``create_graph=True``: Hessian-vector products, gradient penalties) differentiates the reference's
assignment term instead, so higher-order gradients are the reference's. Under autocast or inside a ``torch.func``
transform the dispatcher passes the op to the reference (:func:`why_not`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .backends import Backend
from .reference.consistency_loss import EPS
from .reference.consistency_loss import assignment_term as reference_assignment_term
from .reference.consistency_loss import consistency_loss as reference_loss


def _positives(k: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row r of the 2K columns and its positive: column k of P pairs with column k of Q and back."""
    rows = torch.arange(2 * k, device=device)
    return rows, (rows + k) % (2 * k)


class _AssignmentTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
        k = p.shape[1]
        raw = torch.cat([p, q], dim=1)
        raw_norms = raw.norm(dim=0)
        norms = raw_norms.clamp_min(EPS)
        columns = raw / norms
        sims = columns.t() @ columns
        sims.mul_(1.0 / tau).fill_diagonal_(float("-inf"))
        lse = torch.logsumexp(sims, dim=1)
        rows, positives = _positives(k, p.device)
        loss = (lse - sims[rows, positives]).mean()
        ctx.save_for_backward(p, q, columns, raw_norms, norms, sims, lse)
        ctx.tau = tau
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, q, columns, raw_norms, norms, sims, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the closed form below is built from values the forward made without a graph, so a
            # gradient of it would miss their dependence on p and q; the reference's term gives the full graph.
            with torch.enable_grad():
                return *torch.autograd.grad(reference_assignment_term(p, q, ctx.tau), (p, q), grad,
                                            create_graph=True), None
        two_k = sims.shape[0]
        # The softmax of each row (the diagonal, -inf, becomes 0); the saved S stays as it is, for a second backward
        # of a retained graph.
        d = (sims - lse[:, None]).exp_()
        rows, positives = _positives(two_k // 2, d.device)
        d[rows, positives] -= 1.0
        d.mul_(grad / (two_k * ctx.tau))
        d_columns = columns @ (d + d.t())
        # Through the column normalisation c = x / max(|x|, eps): the radial part removed above eps.
        radial = (columns * d_columns).sum(0)
        d_raw = torch.where(raw_norms > EPS, (d_columns - columns * radial) / norms, d_columns / EPS)
        return *d_raw.split(two_k // 2, dim=1), None


def assignment_term(p: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`laic_kernels.reference.consistency_loss.assignment_term` with its gradient in closed form."""
    return _AssignmentTerm.apply(p, q, tau)


def consistency_loss(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, *,
                     balance_weights: Optional[torch.Tensor] = None, **params
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    return reference_loss(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats,
                              balance_weights=balance_weights, assignment=assignment_term, **params)


def why_not(*args, forced: bool, **kwargs) -> Optional[str]:
    device = args[0].device.type
    if torch.is_autocast_enabled(device):
        return f"autocast is on for {device} (the hand-written backward would see the forward's autocast dtypes)"
    if torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform (the hand-written backward has no functorch rule)"
    return None


BACKEND = Backend("closed_form", why_not, consistency_loss)
