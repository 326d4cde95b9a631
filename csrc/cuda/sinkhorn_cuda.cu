// CUDA kernels of laic::sinkhorn. The plan stays implicit as exp(s/eps + a_b + f_k); the kernels update the log
// potentials a (rows) and f (columns), kept in global scratch, with warp-level online log-sum-exp reductions:
//   column step: lanes take 32 adjacent columns (coalesced reads of a row segment), warps split the rows, and the
//                per-warp partial (max, sum) pairs are merged in shared memory;
//   row step:    one warp per row, lanes stride over the columns, merged with shuffles.
// Scores are read in their own dtype (fp32/fp16/bf16) and all math is fp32.
//
// Two ways to run it, chosen by the caller (row_blocks; laic_kernels/sinkhorn.py picks it):
//   row_blocks == 1  one thread block per problem runs every iteration in a single launch. Right when there are
//                    enough problems to give every SM a block.
//   row_blocks > 1   few large problems: a problem's rows are split over row_blocks blocks. Each iteration is three
//                    launches (column partials, column merge, row step), so the column sums are reduced across blocks
//                    through global memory with the stream's ordering as the only barrier: no grid-wide sync, no
//                    cooperative launch, nothing that can deadlock or depend on how many blocks fit on the GPU.
//                    With tol, a problem's convergence is decided on the device (a per-problem flag that freezes it),
//                    so the host never waits on the GPU; the remaining launches of a converged problem return at once.
#include <torch/extension.h>  // what sinkhorn.h no longer brings: the full ATen API
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <string>

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

// Log-sum-exp over rows [b0, b1) of column k0 + lane of s / eps + a, merged over the block's warps. Every thread of
// the block must call it (it synchronises); the result is valid in warp 0 only, for columns k0 + lane < K.
template <typename scalar_t>
__device__ void column_tile_lse(const scalar_t* s, const float* a, int b0, int b1, int K, int k0, float inv_eps,
                                float (*sh_m)[32], float (*sh_s)[32], float& m, float& sum) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int k = k0 + lane;
  m = -INFINITY;
  sum = 0.f;
  if (k < K) {
#pragma unroll 4  // several rows' loads in flight per warp
    for (int b = b0 + warp; b < b1; b += kWarps) lse_add(m, sum, to_float(s[(int64_t)b * K + k]) * inv_eps + a[b]);
  }
  sh_m[warp][lane] = m;
  sh_s[warp][lane] = sum;
  __syncthreads();
  if (warp == 0)
    for (int w = 1; w < kWarps; ++w) lse_merge(m, sum, sh_m[w][lane], sh_s[w][lane]);
  __syncthreads();  // the shared arrays may be reused at once
}

// Log-sum-exp over k of row[k] / eps + f[k], computed by one warp; every lane gets the result.
template <typename scalar_t>
__device__ float warp_row_lse(const scalar_t* row, const float* f, int K, float inv_eps) {
  const int lane = threadIdx.x & 31;
  float m = -INFINITY, sum = 0.f;
#pragma unroll 4
  for (int k = lane; k < K; k += 32) lse_add(m, sum, to_float(row[k]) * inv_eps + f[k]);
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffff, sum, offset);
    lse_merge(m, sum, m2, s2);
  }
  return m + logf(sum);
}

// plan[i] = exp(s[i] / eps + a[b] + f[k]) for i = b * K + k in start, start + stride, ...
template <typename scalar_t>
__device__ void write_plan(const scalar_t* s, const float* a, const float* f, float* out, int B, int K, float inv_eps,
                           int64_t start, int64_t stride) {
  for (int64_t i = start; i < (int64_t)B * K; i += stride) {
    const int b = static_cast<int>(i / K), k = static_cast<int>(i % K);
    out[i] = expf(to_float(s[i]) * inv_eps + a[b] + f[k]);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// One block per problem.

template <typename scalar_t>
__device__ void column_step(const scalar_t* s, const float* a, const float* c, float* f, int B, int K, float inv_eps,
                            float (*sh_m)[32], float (*sh_s)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int k0 = 0; k0 < K; k0 += 32) {
    float m, sum;
    column_tile_lse(s, a, 0, B, K, k0, inv_eps, sh_m, sh_s, m, sum);
    const int k = k0 + lane;
    if (warp == 0 && k < K) f[k] = logf(c[k]) - (m + logf(sum));
  }
}

template <typename scalar_t>
__device__ void row_step(const scalar_t* s, const float* f, const float* r, float* a, int B, int K, float inv_eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int b = warp; b < B; b += kWarps) {
    const float lse = warp_row_lse(s + (int64_t)b * K, f, K, inv_eps);
    if (lane == 0) a[b] = logf(r[b]) - lse;
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
  // A zero-marginal row starts at -inf, out of the first column step too (the reference's doc: padding rows).
  for (int b = threadIdx.x; b < B; b += kThreads) a[b] = r[b] > 0.f ? 0.f : -INFINITY;
  __syncthreads();
  for (int it = 0; it < n_iters; ++it) {
    column_step(s, a, c, f, B, K, inv_eps, sh_m, sh_s);
    __syncthreads();
    row_step(s, f, r, a, B, K, inv_eps);
    __syncthreads();
    if (tol > 0.f && columns_converged(s, a, f, c, B, K, inv_eps, tol, sh_s, &flag)) break;
  }
  write_plan(s, a, f, out + g * B * K, B, K, inv_eps, threadIdx.x, kThreads);
}

// ---------------------------------------------------------------------------------------------------------------------
// Rows split over blocks: grids carry the problem index g in their last dimension; active[g] == 0 freezes problem g
// (it converged). Partials are [G, row_blocks, K].

// Block (column tile x, row block y, problem z): the log-sum-exp partial of its 32 columns over its rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) column_partial_kernel(const scalar_t* __restrict__ scores,
                                                                  const float* __restrict__ a_all,
                                                                  const int* __restrict__ active,
                                                                  float* __restrict__ part_m,
                                                                  float* __restrict__ part_s, int B, int K,
                                                                  int rows_per_block, float inv_eps) {
  __shared__ float sh_m[kWarps][32];
  __shared__ float sh_s[kWarps][32];
  const int64_t g = blockIdx.z;
  if (!active[g]) return;  // block-uniform, before any barrier
  const int b0 = blockIdx.y * rows_per_block;
  const int b1 = min(B, b0 + rows_per_block);
  const int k0 = blockIdx.x * 32;
  float m, sum;
  column_tile_lse(scores + g * B * K, a_all + g * B, b0, b1, K, k0, inv_eps, sh_m, sh_s, m, sum);
  const int k = k0 + (threadIdx.x & 31);
  if (threadIdx.x < 32 && k < K) {
    const int64_t at = (g * gridDim.y + blockIdx.y) * K + k;
    part_m[at] = m;
    part_s[at] = sum;
  }
}

// f[k] = log c[k] - lse[k], lse merged from the row blocks' partials. With tol > 0 (launched with one block per
// problem) it first checks convergence of the previous iteration's plan, whose column sums are exp(f[k] + lse[k])
// (lse was computed from the current a): when every column is within tol, the problem is frozen instead of updated.
// That is the check the reference makes after each iteration, without a separate pass over the scores.
__global__ void __launch_bounds__(kThreads) column_merge_kernel(float* __restrict__ part_m,
                                                                const float* __restrict__ part_s,
                                                                const float* __restrict__ cols, float* __restrict__ f_all,
                                                                int* __restrict__ active, int row_blocks, int K,
                                                                float tol) {
  const int64_t g = blockIdx.y;
  if (!active[g]) return;  // block-uniform, read by every thread before thread 0 may clear it below
  float* pm = part_m + g * row_blocks * K;
  const float* ps = part_s + g * row_blocks * K;
  const float* c = cols + g * K;
  float* f = f_all + g * K;
  const bool check = tol > 0.f;
  bool converged = true;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x) {
    float m = pm[k], sum = ps[k];
    for (int j = 1; j < row_blocks; ++j) lse_merge(m, sum, pm[(int64_t)j * K + k], ps[(int64_t)j * K + k]);
    const float lse = m + logf(sum);
    if (check) {
      converged = converged && fabsf(expf(f[k] + lse) - c[k]) <= tol;
      pm[k] = lse;  // kept for the update below; only this thread touches column k
    } else {
      f[k] = logf(c[k]) - lse;
    }
  }
  if (!check) return;
  if (__syncthreads_and(converged)) {
    if (threadIdx.x == 0) active[g] = 0;
    return;
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) f[k] = logf(c[k]) - pm[k];
}

// One warp per row: a[b] = log r[b] - logsumexp_k(s[b, k] / eps + f[k]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_step_kernel(const scalar_t* __restrict__ scores,
                                                            const float* __restrict__ f_all,
                                                            const float* __restrict__ rows_marg,
                                                            const int* __restrict__ active, float* __restrict__ a_all,
                                                            int B, int K, float inv_eps) {
  const int64_t g = blockIdx.y;
  if (!active[g]) return;
  const int b = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (b >= B) return;  // warp-uniform: the shuffles below see full warps
  const float lse = warp_row_lse(scores + (g * B + b) * K, f_all + g * K, K, inv_eps);
  if ((threadIdx.x & 31) == 0) a_all[g * B + b] = logf(rows_marg[g * B + b]) - lse;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) plan_kernel(const scalar_t* __restrict__ scores,
                                                        const float* __restrict__ a_all,
                                                        const float* __restrict__ f_all, float* __restrict__ out,
                                                        int B, int K, float inv_eps) {
  const int64_t g = blockIdx.y, n = (int64_t)B * K;
  write_plan(scores + g * n, a_all + g * B, f_all + g * K, out + g * n, B, K, inv_eps,
             blockIdx.x * (int64_t)blockDim.x + threadIdx.x, (int64_t)gridDim.x * blockDim.x);
}

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename scalar_t>
void one_block_per_problem(const at::Tensor& s, const at::Tensor& r, const at::Tensor& c, at::Tensor& out,
                           float inv_eps, int64_t n_iters, float tol, cudaStream_t stream) {
  const int64_t G = s.size(0), B = s.size(1), K = s.size(2);
  at::Tensor a = at::empty({G, B}, out.options());
  at::Tensor f = at::zeros({G, K}, out.options());
  sinkhorn_kernel<scalar_t><<<G, kThreads, 0, stream>>>(
      s.data_ptr<scalar_t>(), r.data_ptr<float>(), c.data_ptr<float>(), a.data_ptr<float>(), f.data_ptr<float>(),
      out.data_ptr<float>(), static_cast<int>(B), static_cast<int>(K), inv_eps, static_cast<int>(n_iters), tol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void rows_split_over_blocks(const at::Tensor& s, const at::Tensor& r, const at::Tensor& c, at::Tensor& out,
                            float inv_eps, int64_t n_iters, float tol, int64_t row_blocks, cudaStream_t stream) {
  const int64_t G = s.size(0), B = s.size(1), K = s.size(2);
  TORCH_CHECK(G <= 65535, "sinkhorn_cuda: row_blocks > 1 takes at most 65535 problems, got ", G,
              "; pass row_blocks=1");
  const int64_t rows_per_block = ceil_div(B, std::min(row_blocks, B));
  const int64_t blocks = ceil_div(B, rows_per_block);  // every row block gets at least one row
  TORCH_CHECK(blocks <= 65535, "sinkhorn_cuda: row_blocks must be at most 65535, got ", row_blocks);
  const auto options = out.options();
  at::Tensor a = at::zeros({G, B}, options).masked_fill_(r.le(0), -INFINITY);  // zero-marginal rows: as above
  at::Tensor f = at::zeros({G, K}, options);
  at::Tensor active = at::ones({G}, options.dtype(at::kInt));
  at::Tensor part_m = at::empty({G, blocks, K}, options);
  at::Tensor part_s = at::empty({G, blocks, K}, options);
  const dim3 partial_grid(ceil_div(K, 32), blocks, G);
  const dim3 merge_grid(ceil_div(K, kThreads), G);
  const dim3 check_grid(1, G);  // the convergence check ANDs over all of a problem's columns: one block each
  const dim3 row_grid(ceil_div(B, kWarps), G);
  const dim3 plan_grid(std::min<int64_t>(ceil_div(B * K, kThreads), 1 << 16), G);
  const int b = static_cast<int>(B), k = static_cast<int>(K);
  for (int64_t it = 0; it < n_iters; ++it) {
    column_partial_kernel<scalar_t><<<partial_grid, kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), a.data_ptr<float>(), active.data_ptr<int>(), part_m.data_ptr<float>(),
        part_s.data_ptr<float>(), b, k, static_cast<int>(rows_per_block), inv_eps);
    // Nothing to check before the first iteration: the reference checks after each one.
    const bool check = tol > 0.f && it > 0;
    column_merge_kernel<<<check ? check_grid : merge_grid, kThreads, 0, stream>>>(
        part_m.data_ptr<float>(), part_s.data_ptr<float>(), c.data_ptr<float>(), f.data_ptr<float>(),
        active.data_ptr<int>(), static_cast<int>(blocks), k, check ? tol : -1.f);
    row_step_kernel<scalar_t><<<row_grid, kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), f.data_ptr<float>(), r.data_ptr<float>(), active.data_ptr<int>(), a.data_ptr<float>(),
        b, k, inv_eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  plan_kernel<scalar_t><<<plan_grid, kThreads, 0, stream>>>(s.data_ptr<scalar_t>(), a.data_ptr<float>(),
                                                            f.data_ptr<float>(), out.data_ptr<float>(), b, k, inv_eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::string cuda_kernels_error(int64_t device) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error == cudaSuccess && (device < 0 || device >= count))
    return "no CUDA device " + std::to_string(device) + " (" + std::to_string(count) + " visible)";
  if (error == cudaSuccess) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaFuncAttributes attributes;
    // Every kernel of this file is built for the same architectures: one stands for all. A GPU none of them was
    // built for (and whose driver cannot compile their PTX) answers cudaErrorNoKernelImageForDevice.
    error = cudaFuncGetAttributes(&attributes, plan_kernel<float>);
  }
  if (error == cudaSuccess) return "";
  cudaGetLastError();  // not a sticky error: cleared, so that the next launch's check does not report it
  return cudaGetErrorString(error);
}

at::Tensor sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                         double eps, int64_t n_iters, double tol, int64_t row_blocks) {
  // The arguments were checked by the caller (sinkhorn.cpp's sinkhorn_cuda_checked, in host-compiler code).
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  const at::Tensor r = row_marginals.contiguous(), c = col_marginals.contiguous();
  const int64_t G = s.size(0), B = s.size(1), K = s.size(2);
  TORCH_CHECK(B < (1LL << 31) && K < (1LL << 31), "sinkhorn_cuda: B and K must be below 2^31");
  at::Tensor out = at::empty({G, B, K}, s.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const float inv_eps = static_cast<float>(1.0 / eps);
  const float tol_f = static_cast<float>(tol);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "laic_sinkhorn_cuda", [&] {
    if (row_blocks == 1)
      one_block_per_problem<scalar_t>(s, r, c, out, inv_eps, n_iters, tol_f, stream);
    else
      rows_split_over_blocks<scalar_t>(s, r, c, out, inv_eps, n_iters, tol_f, row_blocks, stream);
  });
  return out;
}

}  // namespace laic
