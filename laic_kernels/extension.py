"""Loads the compiled ops (``torch.ops.laic.*``) and registers their fake kernels, so that ``torch.compile`` can
trace through them without running them."""
import torch

from laic_kernels import _C  # noqa: F401  (its TORCH_LIBRARY block registers torch.ops.laic)


def _no_gradient(op: str, instead: str):
    """An autograd rule for an op without a derivative: a backward through it raises, naming what to use. Without a
    rule torch only warned, and the inputs' .grad stayed None."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{op} has no gradient; {instead}")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


@torch.library.register_fake("laic::sinkhorn")
def _sinkhorn_fake(scores, row_marginals, col_marginals, eps, n_iters, tol, row_blocks=1):
    # The real kernel's shape checks, so that torch.compile's tracing refuses what a run would (csrc/sinkhorn.cpp).
    torch._check(scores.dim() == 3, lambda: f"sinkhorn: scores must be [G, B, K], got {tuple(scores.shape)}")
    g, b, k = scores.shape
    torch._check(tuple(row_marginals.shape) == (g, b),
                 lambda: f"sinkhorn: row_marginals must be [{g}, {b}], got {tuple(row_marginals.shape)}")
    torch._check(tuple(col_marginals.shape) == (g, k),
                 lambda: f"sinkhorn: col_marginals must be [{g}, {k}], got {tuple(col_marginals.shape)}")
    return scores.new_empty(scores.shape, dtype=torch.float32)


_no_gradient("laic::sinkhorn", "laic_kernels.sinkhorn runs it as a balancing step on detached scores (pass "
                               "scores.detach())")


# A _C built before this op lacks it: Sinkhorn still loads, and the consistency loss's dispatcher says to rebuild
# (laic_kernels.closed_form.compiled_why_not).
if hasattr(torch.ops.laic, "consistency_loss_with_grads"):
    @torch.library.register_fake("laic::consistency_loss_with_grads")
    def _consistency_loss_with_grads_fake(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats,
                                          txt_feats, balance_weights, tau_assign, tau_center, alpha, beta, gamma,
                                          delta, logit_grads, feat_grads):
        def grad_like(x, wanted):
            return x.new_empty(x.shape if wanted else (0,))

        # The real kernel's shape checks (csrc/consistency_loss.cpp), so that tracing refuses what a run would.
        torch._check(img_logits.dim() == 2 and img_logits.shape[1] >= 2,
                     lambda: f"consistency_loss_with_grads: logits must be [B, K] with K >= 2, got "
                             f"{tuple(img_logits.shape)}")
        for x in (txt_logits, img_nbr_logits, txt_nbr_logits):
            torch._check(x.shape == img_logits.shape,
                         lambda: "consistency_loss_with_grads: the four logits must have one shape")
        torch._check(img_feats.dim() == 2 and img_feats.shape == txt_feats.shape
                     and img_feats.shape[0] == img_logits.shape[0],
                     lambda: "consistency_loss_with_grads: the features must be [B, D], one shape for both")
        torch._check(tuple(balance_weights.shape) == (img_logits.shape[1],),
                     lambda: "consistency_loss_with_grads: balance_weights must be [K]")

        logits = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits)
        return (img_logits.new_empty(()), img_logits.new_empty(4), *[grad_like(x, logit_grads) for x in logits],
                grad_like(img_feats, feat_grads), grad_like(txt_feats, feat_grads))

    _no_gradient("laic::consistency_loss_with_grads", "it returns the gradients itself; laic_kernels.consistency_loss "
                                                      "wraps it in an autograd Function")


def with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return bool(_C.with_cuda())
