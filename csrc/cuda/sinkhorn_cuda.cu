// CUDA kernel of laic::sinkhorn: one thread block per problem runs every iteration in a single launch.
// The plan stays implicit as exp(s/eps + a_b + f_k); the block updates the log potentials a (rows) and f (columns),
// kept in global scratch, with warp-level online log-sum-exp reductions:
//   column step: lanes take 32 adjacent columns (coalesced reads of a row segment), warps split the rows, and the
//                per-warp partial (max, sum) pairs are merged in shared memory;
//   row step:    one warp per row, lanes stride over the columns, merged with shuffles.
// Scores are read in their own dtype (fp32/fp16/bf16) and all math is fp32.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "../sinkhorn.h"

namespace laic {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::Half x) { return __half2float(static_cast<__half>(x)); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return __bfloat162float(static_cast<__nv_bfloat16>(x)); }

// Merge two online log-sum-exp states (m, s) meaning s * exp(m).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x == -INFINITY) return;  // a zero marginal's row or column adds nothing
  if (x <= m) {
    s += expf(x - m);
  } else {
    s = s * expf(m - x) + 1.f;
    m = x;
  }
}

template <typename scalar_t>
__device__ void column_step(const scalar_t* s, const float* a, const float* c, float* f, int B, int K, float inv_eps,
                            float (*sh_m)[32], float (*sh_s)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    float m = -INFINITY, sum = 0.f;
    if (k < K)
      for (int b = warp; b < B; b += kWarps) lse_add(m, sum, to_float(s[(int64_t)b * K + k]) * inv_eps + a[b]);
    sh_m[warp][lane] = m;
    sh_s[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && k < K) {
      for (int w = 1; w < kWarps; ++w) lse_merge(m, sum, sh_m[w][lane], sh_s[w][lane]);
      f[k] = logf(c[k]) - (m + logf(sum));
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__device__ void row_step(const scalar_t* s, const float* f, const float* r, float* a, int B, int K, float inv_eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int b = warp; b < B; b += kWarps) {
    const scalar_t* row = s + (int64_t)b * K;
    float m = -INFINITY, sum = 0.f;
    for (int k = lane; k < K; k += 32) lse_add(m, sum, to_float(row[k]) * inv_eps + f[k]);
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
      const float s2 = __shfl_xor_sync(0xffffffff, sum, offset);
      lse_merge(m, sum, m2, s2);
    }
    if (lane == 0) a[b] = logf(r[b]) - (m + logf(sum));
  }
}

// Whether every column sum is within tol of its marginal (block-uniform answer).
template <typename scalar_t>
__device__ bool columns_converged(const scalar_t* s, const float* a, const float* f, const float* c, int B, int K,
                                  float inv_eps, float tol, float (*sh)[32], int* flag) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) *flag = 1;
  __syncthreads();
  for (int k0 = 0; k0 < K; k0 += 32) {
    const int k = k0 + lane;
    float sum = 0.f;
    if (k < K)
      for (int b = warp; b < B; b += kWarps) sum += expf(to_float(s[(int64_t)b * K + k]) * inv_eps + a[b] + f[k]);
    sh[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && k < K) {
      for (int w = 1; w < kWarps; ++w) sum += sh[w][lane];
      if (!(fabsf(sum - c[k]) <= tol)) *flag = 0;
    }
    __syncthreads();
  }
  return *flag != 0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sinkhorn_kernel(const scalar_t* __restrict__ scores,
                                                            const float* __restrict__ rows,
                                                            const float* __restrict__ cols, float* __restrict__ a_all,
                                                            float* __restrict__ f_all, float* __restrict__ out, int B,
                                                            int K, float inv_eps, int n_iters, float tol) {
  __shared__ float sh_m[kWarps][32];
  __shared__ float sh_s[kWarps][32];
  __shared__ int flag;
  const int64_t g = blockIdx.x;
  const scalar_t* s = scores + g * B * K;
  const float* r = rows + g * B;
  const float* c = cols + g * K;
  float* a = a_all + g * B;
  float* f = f_all + g * K;
  for (int b = threadIdx.x; b < B; b += kThreads) a[b] = 0.f;
  __syncthreads();
  for (int it = 0; it < n_iters; ++it) {
    column_step(s, a, c, f, B, K, inv_eps, sh_m, sh_s);
    __syncthreads();
    row_step(s, f, r, a, B, K, inv_eps);
    __syncthreads();
    if (tol > 0.f && columns_converged(s, a, f, c, B, K, inv_eps, tol, sh_s, &flag)) break;
  }
  float* o = out + g * B * K;
  for (int64_t i = threadIdx.x; i < (int64_t)B * K; i += kThreads) {
    const int b = static_cast<int>(i / K), k = static_cast<int>(i % K);
    o[i] = expf(to_float(s[i]) * inv_eps + a[b] + f[k]);
  }
}

}  // namespace

at::Tensor sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters, double tol) {
  check_sinkhorn_args(scores, row_marginals, col_marginals, eps, n_iters);
  TORCH_CHECK(scores.is_cuda(), "sinkhorn_cuda: scores must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  const at::Tensor r = row_marginals.contiguous(), c = col_marginals.contiguous();
  const int64_t G = s.size(0), B = s.size(1), K = s.size(2);
  TORCH_CHECK(B < (1LL << 31) && K < (1LL << 31), "sinkhorn_cuda: B and K must be below 2^31");
  at::Tensor out = at::empty({G, B, K}, s.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  at::Tensor a = at::empty({G, B}, out.options());
  at::Tensor f = at::zeros({G, K}, out.options());
  const float inv_eps = static_cast<float>(1.0 / eps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "laic_sinkhorn_cuda", [&] {
    sinkhorn_kernel<scalar_t><<<G, kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), r.data_ptr<float>(), c.data_ptr<float>(), a.data_ptr<float>(), f.data_ptr<float>(),
        out.data_ptr<float>(), static_cast<int>(B), static_cast<int>(K), inv_eps, static_cast<int>(n_iters),
        static_cast<float>(tol));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace laic
