// Batched log-domain Sinkhorn-Knopp: shared declarations for the CPU and CUDA kernels.
#pragma once
// The light ATen header (not <torch/extension.h>, which costs ~20 s of compile time per file): declarations only.
#include <ATen/core/Tensor.h>

#include <string>

namespace laic {

// scores [G, B, K] (float, half or bfloat16), row_marginals [G, B] and col_marginals [G, K] float32, all contiguous.
// tol <= 0: run n_iters iterations; tol > 0: a problem stops once every column sum is within tol of its marginal.
// row_blocks >= 1: how many CUDA thread blocks share one problem's rows (1: one block per problem, every iteration in
// one launch; > 1: a few launches per iteration, for a few large problems). The CPU kernel splits rows over threads
// on its own and ignores it. Returns the float32 plan [G, B, K].
at::Tensor sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                        double eps, int64_t n_iters, double tol, int64_t row_blocks);
#ifdef LAIC_WITH_CUDA
// "" where this build's CUDA kernels can run on GPU `device`, else why not (the CUDA runtime's words: e.g. "no kernel
// image is available for execution on the device" for a GPU architecture the build left out, or no GPU at all).
std::string cuda_kernels_error(int64_t device);
// Expects arguments that passed check_sinkhorn_args and CUDA tensors (the op's CUDA kernel checks them first).
at::Tensor sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters, double tol, int64_t row_blocks);
#endif

void check_sinkhorn_args(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters, int64_t row_blocks);

}  // namespace laic
