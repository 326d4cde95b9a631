// Batched log-domain Sinkhorn-Knopp: shared declarations for the CPU and CUDA kernels.
#pragma once
#include <torch/extension.h>

namespace laic {

// scores [G, B, K] (float, half or bfloat16), row_marginals [G, B] and col_marginals [G, K] float32, all contiguous.
// tol <= 0: run n_iters iterations; tol > 0: a problem stops once every column sum is within tol of its marginal.
// Returns the float32 plan [G, B, K].
at::Tensor sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                        double eps, int64_t n_iters, double tol);
#ifdef LAIC_WITH_CUDA
at::Tensor sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters, double tol);
#endif

void check_sinkhorn_args(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters);

}  // namespace laic
