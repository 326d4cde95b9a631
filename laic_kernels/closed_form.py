"""The ``closed_form`` backend of consistency_loss: the reference's loss with its whole gradient written out (the
CPU's path above ``COMPILED_MAX_CLUSTERS`` or without the compiled extension, and GPUs' without Triton).

Autograd differentiates the reference op by op: at B = 256, K = 10 its graph has 75 nodes, and it dispatches 92
ops forward and 160 backward (views included; counted with a TorchDispatchMode), each with its own temporaries, for
a loss whose inputs are four [B, K] logits. At stage 1's shapes on the CPU those ops, not the arithmetic, are the
cost. Written out, with P, Q, Pn, Qn the row softmaxes, the gradient is:

- instance: with the dots ``a = <P,Qn>``, ``b = <Q,Pn>``, ``c = <P,Q>`` per row and ``s = -alpha / 3B``,
  ``dP = s (Qn/(a+eps) + Q/(c+eps))``, ``dQ = s (Pn/(b+eps) + P/(c+eps))``, ``dPn = s Q/(b+eps)``,
  ``dQn = s P/(a+eps)``;
- assignment: the 2K normalised columns ``C = [P̂, Q̂]`` and their similarities ``S = CᵀC / τ`` give
  ``dC = C (D + Dᵀ) / τ`` with ``D = (softmax_rows(S) - onehot(positives)) / 2K`` (one [B, 2K] × [2K, 2K] product
  where autograd makes two, and no [2K, 2K] temporary a step of the way: at K = 1000 that was most of the term);
- centre: ``M = Pᵀu``, ``N = Qᵀv`` (rows normalised to μ, ν) and ``S = μνᵀ / τ`` give
  ``dS = (softmax_rows(S) + softmax_cols(S) - 2I) / 2K``, ``dμ = dS ν / τ``, ``dν = dSᵀ μ / τ``, then
  ``dP = u dMᵀ``, ``du = P dM`` (the same for Q and v);
- balance: ``dP_ik = delta w_k (log max(p̄_k, eps) + [p̄_k >= eps]) / B`` (the same for Q);
- each normalisation ``x̂ = x / max(|x|, eps)`` passes ``(dx̂ - x̂ <x̂, dx̂>) / |x|`` above eps, ``dx̂ / eps`` below;
- each softmax ``dL = P (dP - <dP, P>)`` per row.

``python benchmarks/throughput.py --ops consistency_loss`` times it against the reference (benchmarks/RESULTS.md).
Same values as the reference up to float rounding (tested against it, float64 included, with gradcheck). A backward
asked for a graph of its own (``create_graph=True``: Hessian-vector products, gradient penalties) differentiates the
reference instead, so higher-order gradients are the reference's. Under autocast or inside a ``torch.func``
transform the dispatcher passes the op to the reference (:func:`why_not`).

The ``extension`` backend is the same closed form compiled (``csrc/cpu/consistency_loss_cpu.cpp``, CPU only, up to
``COMPILED_MAX_CLUSTERS``): the loss and its gradient in one call, the gradient scaled by the backward
(:class:`_CompiledConsistencyLoss`); the same tests hold it to the reference.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import small_softmax
from .backends import Backend, extension_import_error, hand_written_backward_why_not
from .reference.consistency_loss import EPS, TERM_NAMES, compute_dtype, input_grads_with_graph


def _normalised(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x / max(|x|, eps)`` along ``dim`` and the unclamped norms (for :func:`_through_normalisation`)."""
    norms = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return x / norms.clamp_min(EPS), norms


def _through_normalisation(unit: torch.Tensor, norms: torch.Tensor, d_unit: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient reaching ``x`` from ``d_unit``, the gradient of ``unit = x / max(|x|, eps)`` (norms along
    ``dim``): the radial part removed above eps; below it the norm is the constant eps."""
    radial = (unit * d_unit).sum(dim, keepdim=True)
    # >= as the forward's clamp_min passes its gradient: at a norm of exactly eps both branches are the reference's.
    # The radial part masked on the norms' shape, not a select between two full-size branches.
    radial.mul_(norms >= EPS)
    return (d_unit - unit * radial).div_(norms.clamp_min(EPS))


# Below this many columns in a product's output the CPU's BLAS computes ``(b aᵀ)ᵀ`` faster than ``a bᵀ`` (ad hoc
# timings, one thread, u [B, 512] times dMᵀ [512, K]: 51 against 97 us at B = 256, K = 10, 162 against 244 us at
# K = 47; at K = 100 the direct product is 1.1x faster, at B = 1024 1.2x).
_NARROW_OUTPUT = 64


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b.t()`` in place, the product taken with its long side last where ``out`` is narrow on the CPU
    (timed there only)."""
    if out.device.type == "cpu" and out.shape[1] < _NARROW_OUTPUT:
        return out.add_((b @ a.t()).t())
    return out.addmm_(a, b.t())


class _Forward:
    """The four terms of the loss and what their gradients need, computed once without a graph."""

    def __init__(self, logits, u, v, weights, tau_assign, tau_center):
        self.p, self.q, self.pn, self.qn = (small_softmax.softmax(x) for x in logits)
        self.u, self.v, self.weights = u, v, weights
        self.tau_assign, self.tau_center = tau_assign, tau_center
        p, q, pn, qn = self.p, self.q, self.pn, self.qn
        b, k = p.shape
        # instance: the three dots of each row
        self.dots = torch.stack([(p * qn).sum(1), (q * pn).sum(1), (p * q).sum(1)]).add_(EPS)
        inst = -self.dots.log().sum() / (3 * b)
        # assignment: the 2K normalised columns; each one's log-softmax over the others (its own similarity is -inf).
        # Column r's positive is column r + K and back: the diagonals at offsets K and -K.
        self.columns, self.column_norms = _normalised(torch.cat([p, q], dim=1), dim=0)
        sims = self.columns.t() @ self.columns
        sims.mul_(1.0 / tau_assign).fill_diagonal_(float("-inf"))
        self.assign_log_probs = log_probs = torch.log_softmax(sims, dim=1)
        assign = -(log_probs.diagonal(k).sum() + log_probs.diagonal(-k).sum()) / (2 * k)
        # centre: the normalised cluster centres in each space, their similarities' log-softmax along rows and columns
        self.mu, self.mu_norms = _normalised(p.t() @ u, dim=1)
        self.nu, self.nu_norms = _normalised(q.t() @ v, dim=1)
        sims = (self.mu @ self.nu.t()).mul_(1.0 / tau_center)
        self.center_log_probs = (torch.log_softmax(sims, dim=1), torch.log_softmax(sims, dim=0))
        center = -0.5 * (self.center_log_probs[0].diagonal().mean() + self.center_log_probs[1].diagonal().mean())
        # balance: the mean assignments
        self.p_bar, self.q_bar = p.mean(0), q.mean(0)
        bal = (weights * (self.p_bar * self.p_bar.clamp_min(EPS).log()
                          + self.q_bar * self.q_bar.clamp_min(EPS).log())).sum()
        self.terms = torch.stack([inst, assign, center, bal])

    def instance_grads(self, scale: torch.Tensor):
        """dP, dQ, dPn, dQn of ``scale`` times the instance term."""
        a, b, c = (-scale / (3 * self.p.shape[0]) / self.dots).unbind(0)
        a, b, c = a[:, None], b[:, None], c[:, None]
        return (a * self.qn + c * self.q, b * self.pn + c * self.p, b * self.q, a * self.p)

    def assignment_grads(self, scale: torch.Tensor):
        """dP, dQ of ``scale`` times the assignment term."""
        two_k = self.assign_log_probs.shape[0]
        d = self.assign_log_probs.exp()   # the softmax of each row; the diagonal (-inf) is 0
        k = two_k // 2
        d.diagonal(k).sub_(1.0)
        d.diagonal(-k).sub_(1.0)
        d.mul_(scale / (two_k * self.tau_assign))
        d_columns = self.columns @ (d + d.t())
        return _through_normalisation(self.columns, self.column_norms, d_columns, dim=0).split(two_k // 2, dim=1)

    def center_grads(self, scale: torch.Tensor):
        """d(Pᵀu) and d(Qᵀv) of ``scale`` times the centre term."""
        by_rows, by_columns = self.center_log_probs
        k = by_rows.shape[0]
        d = by_rows.exp().add_(by_columns.exp())
        d.diagonal().sub_(2.0)
        d.mul_(scale / (2 * k * self.tau_center))
        d_mu = _through_normalisation(self.mu, self.mu_norms, d @ self.nu, dim=1)
        d_nu = _through_normalisation(self.nu, self.nu_norms, d.t() @ self.mu, dim=1)
        return d_mu, d_nu

    def balance_grads(self, scale: torch.Tensor):
        """The row of dP and the row of dQ (every row the same) of ``scale`` times the balance term."""
        b = self.p.shape[0]
        return tuple(self.weights * (m.clamp_min(EPS).log() + (m >= EPS).to(m.dtype)) * (scale / b)
                     for m in (self.p_bar, self.q_bar))


class _ConsistencyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, weights,
                tau_assign, tau_center, alpha, beta, gamma, delta):
        inputs = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats)
        dtype = compute_dtype(*inputs)
        logits = [x.to(dtype) for x in inputs[:4]]
        u, v = img_feats.to(dtype), txt_feats.to(dtype)
        state = _Forward(logits, u, v, weights.to(dtype), tau_assign, tau_center)
        # Python scales, as the reference weighs its terms: a tensor of them made here would be a host-to-device
        # copy, which waits for the GPU at every step.
        inst, assign, center, bal = state.terms.unbind(0)
        loss = alpha * inst + beta * assign + gamma * center + delta * bal
        ctx.state, ctx.scales = state, (alpha, beta, gamma, delta)
        ctx.dtypes = [x.dtype for x in inputs]
        ctx.save_for_backward(*inputs, weights)   # read only by a backward that builds a graph (create_graph=True)
        ctx.params = dict(tau_assign=tau_assign, tau_center=tau_center, alpha=alpha, beta=beta, gamma=gamma,
                          delta=delta)
        ctx.mark_non_differentiable(state.terms)
        return loss, state.terms

    @staticmethod
    def backward(ctx, grad, _terms_grad):
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, grad), *[None] * 7)
        state, (alpha, beta, gamma, delta) = ctx.state, ctx.scales
        g = grad   # a 0-d tensor, never read back: every scale below stays on the device
        d_p, d_q, d_pn, d_qn = state.instance_grads(alpha * g)
        d_p_assign, d_q_assign = state.assignment_grads(beta * g)
        d_mu, d_nu = state.center_grads(gamma * g)
        d_p = _add_product(d_p.add_(d_p_assign), state.u, d_mu)   # the centre term's u dMᵀ
        d_q = _add_product(d_q.add_(d_q_assign), state.v, d_nu)
        if delta != 0.0:
            d_p_bal, d_q_bal = state.balance_grads(delta * g)
            d_p.add_(d_p_bal)
            d_q.add_(d_q_bal)
        d_logits = [small_softmax.softmax_backward(probs, d).to(dtype) if needed else None
                    for probs, d, dtype, needed in zip((state.p, state.q, state.pn, state.qn),
                                                       (d_p, d_q, d_pn, d_qn), ctx.dtypes, ctx.needs_input_grad)]
        d_u = (state.p @ d_mu).to(ctx.dtypes[4]) if ctx.needs_input_grad[4] else None
        d_v = (state.q @ d_nu).to(ctx.dtypes[5]) if ctx.needs_input_grad[5] else None
        return (*d_logits, d_u, d_v, *[None] * 7)


def _reference_grads(ctx, grad):
    """The inputs' gradients as a graph (a backward under create_graph=True): the reference's."""
    *inputs, weights = ctx.saved_tensors
    return input_grads_with_graph(inputs, weights, ctx.params, ctx.needs_input_grad, grad)


def _loss_of(function):
    """The op's signature (``laic_kernels.consistency_loss``, its checks already done) over the autograd
    ``function`` of a closed form."""

    def loss_and_terms(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, *,
                       balance_weights: Optional[torch.Tensor] = None, tau_assign: float = 0.5,
                       tau_center: float = 0.5, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                       delta: float = 5.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        weights = (torch.ones(img_logits.shape[1], device=img_logits.device) if balance_weights is None
                   else balance_weights.detach())
        inputs = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats)
        if not torch.is_grad_enabled():
            # No graph is recorded, but a Function still sees its leaves' requires_grad (needs_input_grad): detached,
            # the compiled kernel skips the gradients nobody can ask for.
            inputs = tuple(x.detach() for x in inputs)
        loss, terms = function.apply(*inputs, weights, tau_assign, tau_center, alpha, beta, gamma, delta)
        return loss, dict(zip(TERM_NAMES, terms.unbind(0)))

    return loss_and_terms


consistency_loss = _loss_of(_ConsistencyLoss)


class _CompiledConsistencyLoss(torch.autograd.Function):
    """The same loss and gradient from the compiled CPU kernel (``csrc/cpu/consistency_loss_cpu.cpp``), which
    computes the gradient in the forward call, for an upstream gradient of 1 (the backward scales it): one call a
    step in place of about ninety small ops. Only the gradients that an input needs are computed."""

    @staticmethod
    def forward(ctx, img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, weights,
                tau_assign, tau_center, alpha, beta, gamma, delta):
        inputs = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats)
        dtype = compute_dtype(*inputs)
        needs = ctx.needs_input_grad
        loss, terms, *grads = torch.ops.laic.consistency_loss_with_grads(
            *[x.to(dtype) for x in inputs], weights.to(dtype), tau_assign, tau_center, alpha, beta, gamma, delta,
            any(needs[:4]), any(needs[4:6]))
        ctx.grads, ctx.dtypes = grads, [x.dtype for x in inputs]
        ctx.save_for_backward(*inputs, weights)   # read only by a backward that builds a graph (create_graph=True)
        ctx.params = dict(tau_assign=tau_assign, tau_center=tau_center, alpha=alpha, beta=beta, gamma=gamma,
                          delta=delta)
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad, _terms_grad):
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, grad), *[None] * 7)
        grads = [(g * grad).to(dtype) if needed else None
                 for g, dtype, needed in zip(ctx.grads, ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, *[None] * 7)


compiled_consistency_loss = _loss_of(_CompiledConsistencyLoss)


# Above this many clusters the compiled kernel's scalar loops (an exp per entry of the [B, K] and [2K, 2K] matrices)
# stop paying off against the closed form's ATen ops, which vectorise. ``python benchmarks/throughput.py --ops
# consistency_loss`` (forward and backward, every input requiring grad, AMD EPYC, two threads; benchmarks/RESULTS.md):
# 0.56 against 1.11 ms at B = 256, K = 10; 1.72 against 1.81 at K = 47; 9.0 against 8.9 at B = 1024, K = 100. An ad
# hoc sweep at stage 1's call (features without grad) put the crossing between K = 64 and 100 at B = 256, below 64 at
# B = 1024: the bound stays under both.
COMPILED_MAX_CLUSTERS = 50


def compiled_why_not(*args, forced: bool, **kwargs) -> Optional[str]:
    error = extension_import_error()
    if error:
        return error
    if not hasattr(torch.ops.laic, "consistency_loss_with_grads"):
        return ("laic_kernels._C was built before its consistency loss op; rebuild it with "
                "`pip install --no-build-isolation -e .`")
    logits = args[0]
    if logits.device.type != "cpu":
        return f"the compiled kernel is CPU-only, got {logits.device.type} tensors (CUDA takes the Triton kernel)"
    if logits.shape[1] > COMPILED_MAX_CLUSTERS and not forced:
        return (f"K = {logits.shape[1]} clusters: above {COMPILED_MAX_CLUSTERS} the closed form's vectorised ops "
                "are faster")
    return why_not(*args, forced=forced, **kwargs)


def why_not(*args, forced: bool, **kwargs) -> Optional[str]:
    return hand_written_backward_why_not(args[0].device.type)


BACKEND = Backend("closed_form", why_not, consistency_loss)
COMPILED_BACKEND = Backend("extension", compiled_why_not, compiled_consistency_loss)
