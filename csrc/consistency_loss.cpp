// Registers torch.ops.laic.consistency_loss_with_grads: a CPU kernel (on CUDA the loss is a Triton kernel,
// laic_kernels/triton/consistency_loss.py). The fake kernel for torch.compile lives on the Python side
// (laic_kernels/extension.py); the autograd wrapper in laic_kernels/closed_form.py.
#include <torch/library.h>

#include "consistency_loss.h"

TORCH_LIBRARY_FRAGMENT(laic, m) {
  m.def("consistency_loss_with_grads(Tensor img_logits, Tensor txt_logits, Tensor img_nbr_logits, "
        "Tensor txt_nbr_logits, Tensor img_feats, Tensor txt_feats, Tensor balance_weights, float tau_assign, "
        "float tau_center, float alpha, float beta, float gamma, float delta, bool logit_grads, bool feat_grads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(laic, CPU, m) { m.impl("consistency_loss_with_grads", &laic::consistency_loss_with_grads_cpu); }
