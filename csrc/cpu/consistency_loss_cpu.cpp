// CPU kernel of laic::consistency_loss_with_grads: the loss of laic_kernels/reference/consistency_loss.py and its whole
// gradient in one call, by the formulas of laic_kernels/closed_form.py (its docstring derives them). At stage 1's
// shapes (B = 256, K = 10) the closed form in Python runs about 90 small ATen ops forward and backward, each costing
// more than its arithmetic; here the work on rows and columns is plain loops, and the products go to BLAS (at::mm).
// Forward and backward at B = 256, K = 10, D = 512 on two threads: 0.56 against 1.11 ms (benchmarks/RESULTS.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../consistency_loss.h"

namespace laic {
namespace {

// The eps of the definition (reference.consistency_loss.EPS): inside the instance logs, the floor of every norm and
// balance log.
constexpr double kEps = 1e-8;
// Below this many elements a loop runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kParallelElements = 1 << 11;

int64_t grain_for(int64_t width) { return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, width)); }

template <typename T>
void softmax_row(const T* x, T* y, int64_t k) {
  T top = x[0];
  for (int64_t j = 1; j < k; ++j) top = std::max(top, x[j]);
  T sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    y[j] = std::exp(x[j] - top);
    sum += y[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < k; ++j) y[j] *= inv;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// The log-softmax of each of the n lines of an n x n matrix (line r starts at r * line_step, its entries are
// elem_step apart: rows with (n, 1), columns with (1, n)), scaled by 1 / tau first; with skip_diagonal entry r of
// line r is left out (-inf).
template <typename T>
void log_softmax_lines(const T* in, T* out, int64_t n, int64_t line_step, int64_t elem_step, T inv_tau,
                       bool skip_diagonal) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, n, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * line_step;
      T* y = out + r * line_step;
      T top = neg_inf;
      for (int64_t j = 0; j < n; ++j)
        if (!(skip_diagonal && j == r)) top = std::max(top, x[j * elem_step] * inv_tau);
      T sum = 0;
      for (int64_t j = 0; j < n; ++j)
        if (!(skip_diagonal && j == r)) sum += std::exp(x[j * elem_step] * inv_tau - top);
      const T lse = top + std::log(sum);
      for (int64_t j = 0; j < n; ++j)
        y[j * elem_step] = (skip_diagonal && j == r) ? neg_inf : x[j * elem_step] * inv_tau - lse;
    }
  });
}

// Sums down the columns of x [rows, cols] (weighted entrywise by y when given), accumulated in double: a running
// float32 sum over tens of thousands of rows lost digits that the closed form's pairwise reductions keep (2e-5
// relative against 2e-8 for the balance term at B = 65536).
template <typename T>
std::vector<double> column_sums(const T* x, const T* y, int64_t rows, int64_t cols) {
  std::vector<double> sums(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) sums[j] += double(x[i * cols + j]) * (y ? double(y[i * cols + j]) : 1.0);
  return sums;
}

// <a, b> along each row of two [rows, cols] matrices, or along each column (by_columns; accumulated in double, as
// column_sums).
template <typename T>
std::vector<T> line_products(const T* a, const T* b, int64_t rows, int64_t cols, bool by_columns) {
  if (by_columns) {
    const std::vector<double> sums = column_sums<T>(a, b, rows, cols);
    return std::vector<T>(sums.begin(), sums.end());
  }
  std::vector<T> out(rows);
  for (int64_t i = 0; i < rows; ++i) out[i] = dot(a + i * cols, b + i * cols, cols);
  return out;
}

// 1 / max(norm, eps) for each norm.
template <typename T>
std::vector<T> inverse_clamped(const std::vector<T>& norms) {
  std::vector<T> inv(norms.size());
  for (size_t c = 0; c < norms.size(); ++c) inv[c] = T(1) / std::max(norms[c], T(kEps));
  return inv;
}

// Rows (or columns) of x divided by their norms clamped at eps; the unclamped norms are returned in norms.
// by_columns: x is [rows, cols] and the norms are those of its columns.
template <typename T>
void normalise(T* x, int64_t rows, int64_t cols, bool by_columns, std::vector<T>& norms) {
  norms = line_products<T>(x, x, rows, cols, by_columns);
  for (T& norm : norms) norm = std::sqrt(norm);
  const std::vector<T> inv = inverse_clamped(norms);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] *= inv[by_columns ? j : i];
}

// d_unit (in place) becomes the gradient reaching x from d_unit, the gradient of unit = x / max(|x|, eps) (rows or
// columns, as normalise): the radial part removed where the norm is at least eps; below, the norm is the constant eps.
template <typename T>
void through_normalisation(const T* unit, const std::vector<T>& norms, T* d_unit, int64_t rows, int64_t cols,
                           bool by_columns) {
  std::vector<T> radial = line_products<T>(unit, d_unit, rows, cols, by_columns);
  for (size_t c = 0; c < norms.size(); ++c)
    if (!(norms[c] >= T(kEps))) radial[c] = 0;  // >=, as the forward's clamp passes its gradient
  const std::vector<T> inv = inverse_clamped(norms);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t c = by_columns ? j : i;
      d_unit[i * cols + j] = (d_unit[i * cols + j] - unit[i * cols + j] * radial[c]) * inv[c];
    }
}

struct Result {
  at::Tensor loss, terms, d_p, d_q, d_pn, d_qn, d_u, d_v;
};

template <typename T>
Result run(const at::Tensor& img_logits, const at::Tensor& txt_logits, const at::Tensor& img_nbr_logits,
           const at::Tensor& txt_nbr_logits, const at::Tensor& u, const at::Tensor& v, const at::Tensor& weights,
           T tau_a, T tau_c, T alpha, T beta, T gamma, T delta, bool logit_grads, bool feat_grads) {
  const int64_t B = img_logits.size(0), K = img_logits.size(1), K2 = 2 * K;
  const auto options = img_logits.options();
  const T* logits[4] = {img_logits.const_data_ptr<T>(), txt_logits.const_data_ptr<T>(),
                        img_nbr_logits.const_data_ptr<T>(), txt_nbr_logits.const_data_ptr<T>()};
  const T* w = weights.const_data_ptr<T>();

  // Row softmaxes: P and Q side by side as the 2K columns [B, 2K] (normalised below, in `columns`), Pn and Qn apart.
  at::Tensor pq = at::empty({B, K2}, options);
  at::Tensor pn_t = at::empty({B, K}, options), qn_t = at::empty({B, K}, options);
  T* pq_ = pq.data_ptr<T>();
  T* pn = pn_t.data_ptr<T>();
  T* qn = qn_t.data_ptr<T>();
  // The instance term's dots (eps added): a = <P,Qn>, b = <Q,Pn>, c = <P,Q>.
  std::vector<T> da(B), db(B), dc(B);
  at::parallel_for(0, B, grain_for(4 * K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* p = pq_ + i * K2;
      T* q = p + K;
      softmax_row(logits[0] + i * K, p, K);
      softmax_row(logits[1] + i * K, q, K);
      softmax_row(logits[2] + i * K, pn + i * K, K);
      softmax_row(logits[3] + i * K, qn + i * K, K);
      da[i] = dot(p, qn + i * K, K) + T(kEps);
      db[i] = dot(q, pn + i * K, K) + T(kEps);
      dc[i] = dot(p, q, K) + T(kEps);
    }
  });
  double log_sum = 0;
  for (int64_t i = 0; i < B; ++i) log_sum += std::log(da[i]) + std::log(db[i]) + std::log(dc[i]);
  const T inst = static_cast<T>(-log_sum / (3.0 * B));

  // Balance: the mean assignments.
  const std::vector<double> column_totals = column_sums<T>(pq_, nullptr, B, K2);
  std::vector<T> mean(K2);
  double bal = 0;
  for (int64_t j = 0; j < K2; ++j) {
    mean[j] = static_cast<T>(column_totals[j] / B);
    bal += w[j % K] * mean[j] * std::log(std::max(mean[j], T(kEps)));
  }

  // Centre: M = Pᵀu and N = Qᵀv (from the softmaxes before the columns are normalised), rows normalised to mu, nu.
  at::Tensor mu_t = at::mm(pq.narrow(1, 0, K).t(), u), nu_t = at::mm(pq.narrow(1, K, K).t(), v);
  const int64_t D = u.size(1);
  std::vector<T> mu_norms, nu_norms;
  normalise(mu_t.data_ptr<T>(), K, D, false, mu_norms);
  normalise(nu_t.data_ptr<T>(), K, D, false, nu_norms);
  at::Tensor centre_sims = at::mm(mu_t, nu_t.t());   // [K, K], before the 1 / tau
  at::Tensor by_rows = at::empty({K, K}, options), by_cols = at::empty({K, K}, options);
  log_softmax_lines(centre_sims.const_data_ptr<T>(), by_rows.data_ptr<T>(), K, K, 1, T(1) / tau_c, false);
  log_softmax_lines(centre_sims.const_data_ptr<T>(), by_cols.data_ptr<T>(), K, 1, K, T(1) / tau_c, false);
  const T* lr = by_rows.const_data_ptr<T>();
  const T* lc = by_cols.const_data_ptr<T>();
  double diag_sum = 0;
  for (int64_t c = 0; c < K; ++c) diag_sum += lr[c * K + c] + lc[c * K + c];
  const T center = static_cast<T>(-0.5 * diag_sum / K);

  // Assignment: the 2K unit columns, their similarities' log-softmax over the others; column r's positive is r + K.
  at::Tensor columns = pq.clone();
  T* cols = columns.data_ptr<T>();
  std::vector<T> column_norms;
  normalise(cols, B, K2, true, column_norms);
  at::Tensor assign_lp = at::mm(columns.t(), columns);   // [2K, 2K], in place into its log-softmax
  T* la = assign_lp.data_ptr<T>();
  log_softmax_lines(la, la, K2, K2, 1, T(1) / tau_a, true);
  double positive_sum = 0;
  for (int64_t r = 0; r < K2; ++r) positive_sum += la[r * K2 + (r + K) % K2];
  const T assign = static_cast<T>(-positive_sum / K2);

  Result out;
  out.terms = at::empty({4}, options);
  T* terms = out.terms.data_ptr<T>();
  terms[0] = inst;
  terms[1] = assign;
  terms[2] = center;
  terms[3] = static_cast<T>(bal);
  out.loss = at::empty({}, options);
  *out.loss.data_ptr<T>() = alpha * inst + beta * assign + gamma * center + delta * static_cast<T>(bal);
  // The gradients not asked for: empty, each its own tensor (outputs must not alias).
  for (at::Tensor* grad : {&out.d_p, &out.d_q, &out.d_pn, &out.d_qn, &out.d_u, &out.d_v})
    *grad = at::empty({0}, options);
  if (!logit_grads && !feat_grads) return out;

  // Centre gradient: dS = (softmax_rows + softmax_cols - 2I) * gamma / (2K tau); d mu = dS nu / tau, d nu = dSᵀ mu /
  // tau, each through its normalisation: d_mu, d_nu are d(Pᵀu) and d(Qᵀv).
  at::Tensor ds_t = at::empty({K, K}, options);
  T* ds = ds_t.data_ptr<T>();
  const T centre_scale = gamma / (T(2 * K) * tau_c);
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < K; ++c)
      ds[r * K + c] = (std::exp(lr[r * K + c]) + std::exp(lc[r * K + c]) - (r == c ? T(2) : T(0))) * centre_scale;
  at::Tensor d_mu = at::mm(ds_t, nu_t), d_nu = at::mm(ds_t.t(), mu_t);
  through_normalisation(mu_t.const_data_ptr<T>(), mu_norms, d_mu.data_ptr<T>(), K, D, false);
  through_normalisation(nu_t.const_data_ptr<T>(), nu_norms, d_nu.data_ptr<T>(), K, D, false);
  if (feat_grads) {
    out.d_u = at::mm(pq.narrow(1, 0, K), d_mu);
    out.d_v = at::mm(pq.narrow(1, K, K), d_nu);
  }
  if (!logit_grads) return out;

  // Assignment gradient: D = (softmax of each row, its positive's entry less 1) * beta / (2K tau), dC = C (D + Dᵀ),
  // through the columns' normalisation. D is made in place of the log-probabilities, then symmetrised in place.
  const T assign_scale = beta / (T(K2) * tau_a);
  for (int64_t r = 0; r < K2; ++r)
    for (int64_t c = 0; c < K2; ++c)
      la[r * K2 + c] = (std::exp(la[r * K2 + c]) - (c == (r + K) % K2 ? T(1) : T(0))) * assign_scale;
  for (int64_t r = 0; r < K2; ++r) {
    la[r * K2 + r] *= 2;
    for (int64_t c = r + 1; c < K2; ++c) la[r * K2 + c] = la[c * K2 + r] = la[r * K2 + c] + la[c * K2 + r];
  }
  at::Tensor d_pq = at::mm(columns, assign_lp);   // [B, 2K]
  T* dpq = d_pq.data_ptr<T>();
  through_normalisation(cols, column_norms, dpq, B, K2, true);
  // The centre term's u d_muᵀ and v d_nuᵀ, as their transposes [K, B]: in that form BLAS takes half the time (one
  // thread, B = 256, K = 10, D = 512: 40 against 90 us), and loops of dot products, reading d_mu from L2 for every
  // row, took twice as long again.
  at::Tensor centre_p = at::mm(d_mu, u.t()), centre_q = at::mm(d_nu, v.t());
  const T* cp = centre_p.const_data_ptr<T>();
  const T* cq = centre_q.const_data_ptr<T>();
  // The balance term's row (the same for every row): delta w_k (log max(mean_k, eps) + [mean_k >= eps]) / B.
  std::vector<T> balance_row(K2, T(0));
  if (delta != 0)
    for (int64_t j = 0; j < K2; ++j)
      balance_row[j] =
          delta * w[j % K] * (std::log(std::max(mean[j], T(kEps))) + (mean[j] >= T(kEps) ? T(1) : T(0))) / T(B);

  out.d_p = at::empty({B, K}, options);
  out.d_q = at::empty({B, K}, options);
  out.d_pn = at::empty({B, K}, options);
  out.d_qn = at::empty({B, K}, options);
  T* d_logits[4] = {out.d_p.data_ptr<T>(), out.d_q.data_ptr<T>(), out.d_pn.data_ptr<T>(), out.d_qn.data_ptr<T>()};
  const T inst_scale = -alpha / T(3 * B);
  at::parallel_for(0, B, grain_for(8 * K), [&](int64_t begin, int64_t end) {
    std::vector<T> grad(4 * K);
    for (int64_t i = begin; i < end; ++i) {
      const T* p = pq_ + i * K2;
      const T* q = p + K;
      const T* pn_i = pn + i * K;
      const T* qn_i = qn + i * K;
      const T a = inst_scale / da[i], b = inst_scale / db[i], c = inst_scale / dc[i];
      T* g_p = grad.data();
      T* g_q = g_p + K;
      T* g_pn = g_q + K;
      T* g_qn = g_pn + K;
      for (int64_t j = 0; j < K; ++j) {
        g_p[j] = a * qn_i[j] + c * q[j] + dpq[i * K2 + j] + cp[j * B + i] + balance_row[j];
        g_q[j] = b * pn_i[j] + c * p[j] + dpq[i * K2 + K + j] + cq[j * B + i] + balance_row[K + j];
        g_pn[j] = b * q[j];
        g_qn[j] = a * p[j];
      }
      // Through each row softmax: probs * (grad - <grad, probs>).
      const T* probs[4] = {p, q, pn_i, qn_i};
      for (int t = 0; t < 4; ++t) {
        const T* g = grad.data() + t * K;
        const T inner = dot(g, probs[t], K);
        T* d = d_logits[t] + i * K;
        for (int64_t j = 0; j < K; ++j) d[j] = probs[t][j] * (g[j] - inner);
      }
    }
  });
  return out;
}

void check_args(const at::Tensor& img_logits, const at::Tensor& txt_logits, const at::Tensor& img_nbr_logits,
                const at::Tensor& txt_nbr_logits, const at::Tensor& img_feats, const at::Tensor& txt_feats,
                const at::Tensor& balance_weights) {
  const at::Tensor* all[7] = {&img_logits, &txt_logits, &img_nbr_logits, &txt_nbr_logits,
                              &img_feats,  &txt_feats,  &balance_weights};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device().is_cpu(), "consistency_loss_with_grads: every input must be on the CPU");
    TORCH_CHECK(t->scalar_type() == img_logits.scalar_type(),
                "consistency_loss_with_grads: every input must have one dtype, got ", t->scalar_type(), " and ",
                img_logits.scalar_type());
  }
  TORCH_CHECK(img_logits.scalar_type() == at::kFloat || img_logits.scalar_type() == at::kDouble,
              "consistency_loss_with_grads: inputs must be float32 or float64, got ", img_logits.scalar_type());
  TORCH_CHECK(img_logits.dim() == 2 && img_logits.size(1) >= 2, "consistency_loss_with_grads: logits must be [B, K] "
              "with K >= 2, got ", img_logits.sizes());
  for (const at::Tensor* t : {&txt_logits, &img_nbr_logits, &txt_nbr_logits})
    TORCH_CHECK(t->sizes() == img_logits.sizes(), "consistency_loss_with_grads: the four logits must have one shape, "
                "got ", img_logits.sizes(), " and ", t->sizes());
  TORCH_CHECK(img_feats.dim() == 2 && img_feats.sizes() == txt_feats.sizes() && img_feats.size(0) == img_logits.size(0),
              "consistency_loss_with_grads: features must be [B, D] with the logits' B, got ", img_feats.sizes(),
              " and ", txt_feats.sizes());
  TORCH_CHECK(balance_weights.dim() == 1 && balance_weights.size(0) == img_logits.size(1),
              "consistency_loss_with_grads: balance_weights must be [K], got ", balance_weights.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
consistency_loss_with_grads_cpu(const at::Tensor& img_logits, const at::Tensor& txt_logits,
                                const at::Tensor& img_nbr_logits, const at::Tensor& txt_nbr_logits,
                                const at::Tensor& img_feats, const at::Tensor& txt_feats,
                                const at::Tensor& balance_weights, double tau_assign, double tau_center, double alpha,
                                double beta, double gamma, double delta, bool logit_grads, bool feat_grads) {
  check_args(img_logits, txt_logits, img_nbr_logits, txt_nbr_logits, img_feats, txt_feats, balance_weights);
  TORCH_CHECK(tau_assign > 0 && tau_center > 0, "consistency_loss_with_grads: temperatures must be > 0");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(img_logits.scalar_type(), "consistency_loss_with_grads_cpu", [&] {
    auto out = run<scalar_t>(img_logits.contiguous(), txt_logits.contiguous(), img_nbr_logits.contiguous(),
                             txt_nbr_logits.contiguous(), img_feats.contiguous(), txt_feats.contiguous(),
                             balance_weights.contiguous(), static_cast<scalar_t>(tau_assign),
                             static_cast<scalar_t>(tau_center), static_cast<scalar_t>(alpha),
                             static_cast<scalar_t>(beta), static_cast<scalar_t>(gamma), static_cast<scalar_t>(delta),
                             logit_grads, feat_grads);
    result = {out.loss, out.terms, out.d_p, out.d_q, out.d_pn, out.d_qn, out.d_u, out.d_v};
  });
  return result;
}

}  // namespace laic
