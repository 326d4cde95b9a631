// CPU kernel of laic::sinkhorn. The plan is kept implicitly as exp(s/eps + a_b + f_k) with the log potentials a (rows)
// and f (columns), so each iteration only updates two vectors; parallel over problems, or over rows/columns inside
// each problem in turn when there are fewer problems than threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../sinkhorn.h"

namespace laic {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many elements a step runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kParallelElements = 1 << 16;

// The helpers called in the vector clones' loops (below) must be inlined there, so that they are compiled for the
// clone's target: a plain inline function is compiled once for the default target and called, one scalar call per
// element, from the AVX2 clone (seen in its disassembly).
#if defined(__GNUC__)
#define LAIC_INLINE inline __attribute__((always_inline))
#else
#define LAIC_INLINE inline
#endif

// exp(x) in plain arithmetic, so that the loops that call it vectorise (std::exp does not). Cephes-style:
// x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), and 2^n built in the exponent bits. Relative
// error about 2 ulp. Below -87 the result is 0 (exp(-inf) = 0 gives a zero marginal's empty row or column); x is
// capped at 88, which no plan entry reaches (entries are bounded by the marginals' total mass).
LAIC_INLINE float exp_clamped(float x_in) {
  float x = x_in < -87.0f ? -87.0f : x_in;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorises, unlike std::nearbyint).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));  // compiles to a register move; vectorises
  return x_in < -87.0f ? 0.0f : p * scale;
}

// exp(x) down to float32's subnormals, for the entries of a row of tiny mass (exp_clamped's 0 below -87 would flush
// them: a plan of total mass 1e-38 came out all zero). Below -87 it is exp(x + 87) e^-87, a product that rounds to the
// subnormal.
LAIC_INLINE float exp_with_subnormals(float x) {
  const float e_minus_87 = 1.64581143e-38f;
  return x < -87.0f ? exp_clamped(x + 87.0f) * e_minus_87 : exp_clamped(x);
}

// Rows whose marginal is below 2^-100 keep their subnormal entries. Above it an entry below e^-87 (2^-125.5) is under
// 2^-25.5 of its row's mass, below float32's rounding of that row, and is written as 0: subnormals take the x86 slow
// path in every op that reads them (an ad hoc timing on an Intel Xeon, one thread, a [2, 256, 100] plan at s / eps
// spanning 200, 4,232 subnormal entries: this kernel 957 us against 660, a three-op consumer 579 us against 101).
constexpr float kLogMassWithSubnormals = -69.3147181f;   // log(2^-100)

int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, inner)); }

// The inner loops. Each is compiled twice, for AVX2+FMA and for the baseline x86-64 (SSE2), and the loader picks the
// clone the CPU supports (GCC function multi-versioning): wide vectors where they exist, no illegal instruction where
// they do not. The AVX2 clone is x86-64-v3, chosen by the CPU's features (GCC 12 on): "arch=haswell", the only
// spelling before, is chosen by CPU model, so AMD CPUs ran the SSE2 clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define LAIC_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LAIC_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define LAIC_VECTOR_CLONES
#endif

// logsumexp_k(row[k] * inv_eps + f[k]). Inlined into the clones below, so compiled for each of their targets.
LAIC_INLINE float row_logsumexp(const float* row, const float* f, float inv_eps, int64_t K) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < K; ++k) mx = std::max(mx, row[k] * inv_eps + f[k]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) sum += exp_clamped(row[k] * inv_eps + f[k] - mx);
  return mx + std::log(sum);
}

// Each function below walks a block of rows itself (one call per block, not per row), its loops over k vectorised.

// f[k] = log c[k] - logsumexp_b(s[b, k] / eps + a[b]) for k in [k0, k1): two passes over the rows (max, then sum),
// vectorised over k; mx (floats) and sum (doubles) are scratch of k1 - k0. The sums run over all B rows one at a
// time: in float32 their error grew with B (columns off their marginals by 1e-5 relative at B = 1e5, 5e-5 at 4e6,
// the reference's 7e-7), and a tol below it was never met.
LAIC_VECTOR_CLONES void column_potentials(const float* s, const float* a, const float* log_c, float* f, float* mx,
                                          double* sum, int64_t B, int64_t K, int64_t k0, int64_t k1, float inv_eps) {
  const int64_t n = k1 - k0;
  for (int64_t k = 0; k < n; ++k) {
    mx[k] = kNegInf;
    sum[k] = 0.0;
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* row = s + b * K + k0;
    const float shift = a[b];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const float x = row[k] * inv_eps + shift;
      mx[k] = mx[k] < x ? x : mx[k];
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* row = s + b * K + k0;
    const float shift = a[b];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) sum[k] += exp_clamped(row[k] * inv_eps + shift - mx[k]);
  }
  for (int64_t k = 0; k < n; ++k) f[k0 + k] = log_c[k0 + k] - (mx[k] + static_cast<float>(std::log(sum[k])));
}

// a[b] = log r[b] - logsumexp_k(s[b, k] / eps + f[k]) for b in [b0, b1).
LAIC_VECTOR_CLONES void row_potentials(const float* s, const float* f, const float* log_r, float* a, int64_t b0,
                                       int64_t b1, int64_t K, float inv_eps) {
  for (int64_t b = b0; b < b1; ++b) a[b] = log_r[b] - row_logsumexp(s + b * K, f, inv_eps, K);
}

// out[b - b0, k] = exp(s[b, k] / eps + a[b] + f[k]) for b in [b0, b1): rows b0 .. b1 of the plan, from out on;
// subnormal entries only in rows of tiny mass (kLogMassWithSubnormals).
LAIC_VECTOR_CLONES void plan_rows(float* out, const float* s, const float* f, const float* a, const float* log_r,
                                  int64_t b0, int64_t b1, int64_t K, float inv_eps) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = s + b * K;
    float* plan = out + (b - b0) * K;
    const float shift = a[b];
    if (log_r[b] < kLogMassWithSubnormals) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) plan[k] = exp_with_subnormals(row[k] * inv_eps + shift + f[k]);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) plan[k] = exp_clamped(row[k] * inv_eps + shift + f[k]);
    }
  }
}

// The fewest columns a thread of column_step takes (sinkhorn_cpu's choice of how to share threads reads it too).
int64_t column_grain(int64_t B) { return std::max<int64_t>(64, grain_for(B)); }

void column_step(const float* s, const float* a, const float* log_c, float* f, int64_t B, int64_t K, float inv_eps) {
  at::parallel_for(0, K, column_grain(B), [&](int64_t k0, int64_t k1) {
    std::vector<float> mx(k1 - k0);
    std::vector<double> sum(k1 - k0);
    column_potentials(s, a, log_c, f, mx.data(), sum.data(), B, K, k0, k1, inv_eps);
  });
}

void row_step(const float* s, const float* f, const float* log_r, float* a, int64_t B, int64_t K, float inv_eps) {
  at::parallel_for(0, B, grain_for(K), [&](int64_t b0, int64_t b1) {
    row_potentials(s, f, log_r, a, b0, b1, K, inv_eps);
  });
}

// Whether every column sum of the current plan is within tol of its marginal (summed in double, as the potentials).
bool columns_converged(const float* s, const float* a, const float* f, const float* log_r, const float* c, int64_t B,
                       int64_t K, float inv_eps, float tol) {
  std::vector<double> col(K, 0.0);
  std::vector<float> row(K);
  for (int64_t b = 0; b < B; ++b) {
    plan_rows(row.data(), s, f, a, log_r, b, b + 1, K, inv_eps);
    for (int64_t k = 0; k < K; ++k) col[k] += row[k];
  }
  for (int64_t k = 0; k < K; ++k)
    if (!(std::fabs(col[k] - c[k]) <= tol)) return false;
  return true;
}

void solve_one(const float* s, const float* r, const float* c, float* out, int64_t B, int64_t K, float inv_eps,
               int64_t n_iters, float tol) {
  std::vector<float> a(B, 0.f), f(K, 0.f), log_r(B), log_c(K);
  for (int64_t b = 0; b < B; ++b) log_r[b] = std::log(r[b]);
  // A zero-marginal row starts at -inf, out of the first column step too (the reference's doc: padding rows).
  for (int64_t b = 0; b < B; ++b) a[b] = r[b] > 0.f ? 0.f : -INFINITY;
  for (int64_t k = 0; k < K; ++k) log_c[k] = std::log(c[k]);
  for (int64_t it = 0; it < n_iters; ++it) {
    column_step(s, a.data(), log_c.data(), f.data(), B, K, inv_eps);
    row_step(s, f.data(), log_r.data(), a.data(), B, K, inv_eps);
    if (tol > 0 && columns_converged(s, a.data(), f.data(), log_r.data(), c, B, K, inv_eps, tol)) break;
  }
  at::parallel_for(0, B, grain_for(K), [&](int64_t b0, int64_t b1) {
    plan_rows(out + b0 * K, s, f.data(), a.data(), log_r.data(), b0, b1, K, inv_eps);
  });
}

}  // namespace

at::Tensor sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& row_marginals, const at::Tensor& col_marginals,
                        double eps, int64_t n_iters, double tol, int64_t row_blocks) {
  // row_blocks only shapes the CUDA launch: here rows are split over threads by column_step and row_step.
  check_sinkhorn_args(scores, row_marginals, col_marginals, eps, n_iters, row_blocks);
  TORCH_CHECK(scores.device().is_cpu(), "sinkhorn_cpu: scores must be a CPU tensor");
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  const at::Tensor r = row_marginals.contiguous(), c = col_marginals.contiguous();
  const int64_t G = s.size(0), B = s.size(1), K = s.size(2);
  at::Tensor out = at::empty({G, B, K}, s.options());
  const float inv_eps = static_cast<float>(1.0 / eps);
  const float* sp = s.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto solve = [&](int64_t g) {
    solve_one(sp + g * B * K, rp + g * B, cp + g * K, op + g * B * K, B, K, inv_eps, n_iters, static_cast<float>(tol));
  };
  // The threads one problem's steps can use: column_step and row_step split into chunks of at least these sizes.
  const int64_t threads = at::get_num_threads();
  const int64_t column_chunks = (K + column_grain(B) - 1) / column_grain(B);
  const int64_t row_chunks = (B + grain_for(K) - 1) / grain_for(K);
  if (std::min({threads, column_chunks, row_chunks}) > G) {
    // Fewer problems than one problem's steps can use threads: one after the other, each split over them (under an
    // outer parallel_for over G those nested steps ran inline: 2 problems kept 2 of 16 threads busy). Otherwise one
    // problem a thread (stage 1's two 256-row problems: their steps do not split). The same result either way: every
    // column and row is computed alike however the threads share them.
    for (int64_t g = 0; g < G; ++g) solve(g);
  } else {
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) solve(g);
    });
  }
  return out;
}

}  // namespace laic
