// The stage-1 consistency loss with its gradient (the closed form of laic_kernels/closed_form.py): declarations.
#pragma once
// The light ATen header (not <torch/extension.h>, which costs ~20 s of compile time per file): declarations only.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace laic {

// Logits [B, K] (K >= 2), features [B, D] and balance weights [K], all of one dtype (float32 or float64) on the CPU.
// Returns (loss, terms, d_img_logits, d_txt_logits, d_img_nbr_logits, d_txt_nbr_logits, d_img_feats, d_txt_feats):
// the 0-d loss alpha*inst + beta*assign + gamma*center + delta*bal, the four terms [4], and the loss's gradients with
// respect to each input for an upstream gradient of 1; the logits' gradients only with logit_grads, the features'
// only with feat_grads (empty [0] tensors otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
consistency_loss_with_grads_cpu(const at::Tensor& img_logits, const at::Tensor& txt_logits,
                                const at::Tensor& img_nbr_logits, const at::Tensor& txt_nbr_logits,
                                const at::Tensor& img_feats, const at::Tensor& txt_feats,
                                const at::Tensor& balance_weights, double tau_assign, double tau_center, double alpha,
                                double beta, double gamma, double delta, bool logit_grads, bool feat_grads);

}  // namespace laic
