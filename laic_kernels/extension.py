"""Loads the compiled ops (``torch.ops.laic.*``) and registers their fake kernels, so that ``torch.compile`` can
trace through them without running them."""
import torch

from laic_kernels import _C  # noqa: F401  (its TORCH_LIBRARY block registers torch.ops.laic)


@torch.library.register_fake("laic::sinkhorn")
def _sinkhorn_fake(scores, row_marginals, col_marginals, eps, n_iters, tol, row_blocks=1):
    return scores.new_empty(scores.shape, dtype=torch.float32)


# A _C built before this op lacks it: Sinkhorn still loads, and the consistency loss's dispatcher says to rebuild
# (laic_kernels.closed_form.compiled_why_not).
if hasattr(torch.ops.laic, "consistency_loss_with_grads"):
    @torch.library.register_fake("laic::consistency_loss_with_grads")
    def _consistency_loss_with_grads_fake(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats,
                                          txt_feats, balance_weights, tau_assign, tau_center, alpha, beta, gamma,
                                          delta, logit_grads, feat_grads):
        def grad_like(x, wanted):
            return x.new_empty(x.shape if wanted else (0,))

        logits = (img_logits, txt_logits, img_nbr_logits, txt_nbr_logits)
        return (img_logits.new_empty(()), img_logits.new_empty(4), *[grad_like(x, logit_grads) for x in logits],
                grad_like(img_feats, feat_grads), grad_like(txt_feats, feat_grads))


def with_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return bool(_C.with_cuda())
