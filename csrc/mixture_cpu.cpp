// CPU loops of the fused discretized-logistic likelihoods (mixture_ops.h): the
// math of logistic_math.h vectorized over pixels, one wrapper per ISA level
// (cpu_common.h). A task takes a chunk of pixels' parameters as float rows (read
// in place from float32 NCHW planes, staged from any other strides or dtype),
// computes every component in SIMD lanes, and writes per-pixel results
// (forward) or the parameters' gradients (backward; in place likewise).
// The backward pass recomputes the components from the inputs and the saved
// per-pixel logsumexps; no [B, 3, K, H, W] intermediate is ever stored.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "gaussian_ops.h"  // FHV_DISPATCH_KERNEL_TYPES
#include "logistic_math.h"
#include "mixture_ops.h"

namespace fasthvae {

namespace {

constexpr int64_t kPix = 64;     // pixels per chunk (the SIMD rows' length)
constexpr int64_t kElems = 256;  // elements per chunk of the single logistic
constexpr int64_t kChunksPerTask = 4;

// The parameter rows (mixture_ops.h's blocks): block 0 the logits, 1-3 the means of R, G, B, 4-6
// their log-scales, 7-9 the raw coefficients; row (block + channel) of component k. A chunk's
// rows lie `ps` floats apart (kPix when staged, the channel stride when read in place), its
// gradient rows `ds` apart.
FHV_INLINE int64_t row_of(int64_t block, int64_t channel, int64_t k_count, int64_t k) {
  return (block + channel) * k_count + k;
}

// Channel c's mean in component k at pixel i: its own, shifted by the channels before it.
// a, b, c2: the tanh'd coefficients this channel uses (1 for the unused ones).
template <int kChannel>
FHV_INLINE float channel_mean(const float* __restrict p, int64_t ps, const float* __restrict x, int64_t k_count,
                              int64_t k, int64_t i, float& a, float& b) {
  const float own = p[row_of(1, kChannel, k_count, k) * ps + i];
  if constexpr (kChannel == 0) {
    return own;
  } else if constexpr (kChannel == 1) {
    a = tanhf(p[row_of(7, 0, k_count, k) * ps + i]);
    return own + a * x[i];
  } else {
    a = tanhf(p[row_of(7, 1, k_count, k) * ps + i]);
    b = tanhf(p[row_of(7, 2, k_count, k) * ps + i]);
    return own + a * x[i] + b * x[kPix + i];
  }
}

// Channel kChannel's log P in component k as parts (logistic_math.h), for every pixel of the
// chunk: log_a[i] += a, prod_b[i] *= b. One channel per loop keeps the live values within the
// vector registers.
template <int kChannel>
FHV_INLINE void add_channel_log_prob(const float* __restrict p, int64_t ps, const float* __restrict x,
                                     int64_t k_count, int64_t k, int64_t n, float* __restrict log_a,
                                     float* __restrict prod_b) {
  const float* ls = p + row_of(4, kChannel, k_count, k) * ps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float a = 1.0f, b = 1.0f, d_mean, d_ls;
    const float mean = channel_mean<kChannel>(p, ps, x, k_count, k, i, a, b);
    const LogProbParts lp = logistic_log_prob_parts(x[kChannel * kPix + i], mean, ls[i], d_mean, d_ls);
    log_a[i] += lp.a;
    prod_b[i] *= lp.b;
  }
}

// log P of a component's three channels from their parts: one logf for the three (the product of
// three b's in (1e-5, 1] stays a normal float). The forward and the backward pass both form it
// here, in one order, so the backward pass's posteriors follow the forward pass's logsumexp.
FHV_INLINE float component_log_prob(float log_a, float prod_b) { return log_a + logf(prod_b); }

// Per-pixel logsumexps over the components of the logits (lse_l) and of the joints (logit + log P,
// lse_j), one component at a time across the lanes.
FHV_INLINE void logsumexps(const float* __restrict p, int64_t ps, const float* __restrict joint, int64_t k_count,
                           int64_t n, float* __restrict lse_l, float* __restrict lse_j) {
  alignas(64) float top_j[kPix], top_l[kPix], sum_j[kPix], sum_l[kPix];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    top_j[i] = joint[i];
    top_l[i] = p[i];
    sum_j[i] = sum_l[i] = 0.0f;
  }
  for (int64_t k = 1; k < k_count; ++k) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      top_j[i] = std::max(top_j[i], joint[k * kPix + i]);
      top_l[i] = std::max(top_l[i], p[k * ps + i]);
    }
  }
  for (int64_t k = 0; k < k_count; ++k) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      sum_j[i] += exp_floored(joint[k * kPix + i] - top_j[i]);
      sum_l[i] += exp_floored(p[k * ps + i] - top_l[i]);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    lse_l[i] = top_l[i] + logf(sum_l[i]);
    lse_j[i] = top_j[i] + logf(sum_j[i]);
  }
}

// p: 10K rows of n floats, ps apart; x: 3 rows of kPix in [-1, 1] space; joint: K rows of kPix.
FHV_INLINE void mixture_forward_chunk_impl(const float* __restrict p, int64_t ps, const float* __restrict x,
                                           int64_t k_count, int64_t n, float* __restrict joint,
                                           float* __restrict nll, float* __restrict lse_logits) {
  for (int64_t k = 0; k < k_count; ++k) {
    float* jk = joint + k * kPix;
    const float* logit = p + k * ps;
    alignas(64) float prod_b[kPix];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      jk[i] = 0.0f;
      prod_b[i] = 1.0f;
    }
    add_channel_log_prob<0>(p, ps, x, k_count, k, n, jk, prod_b);
    add_channel_log_prob<1>(p, ps, x, k_count, k, n, jk, prod_b);
    add_channel_log_prob<2>(p, ps, x, k_count, k, n, jk, prod_b);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) jk[i] = logit[i] + component_log_prob(jk[i], prod_b[i]);
  }
  alignas(64) float lse_j[kPix];
  logsumexps(p, ps, joint, k_count, n, lse_logits, lse_j);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) nll[i] = lse_logits[i] - lse_j[i];
}

// First pass of a component's backward, one channel: adds its log P's parts to log_a and prod_b
// and writes its unscaled gradients in the mean and log-scale to their gradient rows, and the
// tanh'd coefficients it used to their gradient rows (the second pass turns them into gradients).
template <int kChannel>
FHV_INLINE void channel_grads(const float* __restrict p, int64_t ps, const float* __restrict x, int64_t k_count,
                              int64_t k, int64_t n, float* __restrict log_a, float* __restrict prod_b,
                              float* __restrict dp, int64_t ds) {
  const float* ls = p + row_of(4, kChannel, k_count, k) * ps;
  float* d_mean = dp + row_of(1, kChannel, k_count, k) * ds;
  float* d_ls = dp + row_of(4, kChannel, k_count, k) * ds;
  float* coeff_a = dp + row_of(7, kChannel == 1 ? 0 : 1, k_count, k) * ds;
  float* coeff_b = dp + row_of(7, 2, k_count, k) * ds;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float a = 1.0f, b = 1.0f, gm, gl;
    const float mean = channel_mean<kChannel>(p, ps, x, k_count, k, i, a, b);
    const LogProbParts lp = logistic_log_prob_parts(x[kChannel * kPix + i], mean, ls[i], gm, gl);
    log_a[i] += lp.a;
    prod_b[i] *= lp.b;
    d_mean[i] = gm;
    d_ls[i] = gl;
    if constexpr (kChannel > 0) coeff_a[i] = a;
    if constexpr (kChannel == 2) coeff_b[i] = b;
  }
}

// The second pass of component k's gradient: its mean and log-scale rows (written unscaled by
// channel_grads) times d(g * nll) / d(its log P) = -g * posterior, its coefficient rows (holding the
// tanh'd coefficients) turned into their gradients, and its logit's gradient. joint_k: logit + log P
// of the component; g = 1 where kUnit.
template <bool kUnit>
FHV_INLINE void component_grads(const float* __restrict p, int64_t ps, const float* __restrict x, int64_t k_count,
                                int64_t k, int64_t n, const float* __restrict joint_k,
                                const float* __restrict lse_joint, const float* __restrict lse_logits,
                                const float* __restrict g, float* __restrict dp, int64_t ds) {
  const auto grad_row = [&](int64_t block, int64_t channel) { return dp + row_of(block, channel, k_count, k) * ds; };
  float* d_logit = dp + k * ds;
  float *d_m0 = grad_row(1, 0), *d_m1 = grad_row(1, 1), *d_m2 = grad_row(1, 2);
  float *d_s0 = grad_row(4, 0), *d_s1 = grad_row(4, 1), *d_s2 = grad_row(4, 2);
  float *d_r0 = grad_row(7, 0), *d_r1 = grad_row(7, 1), *d_r2 = grad_row(7, 2);
  const float* logit = p + k * ps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = kUnit ? 1.0f : g[i];
    const float posterior = exp_floored(joint_k[i] - lse_joint[i]);
    const float prior = exp_floored(logit[i] - lse_logits[i]);
    const float g_logp = -gi * posterior;  // d(g * nll) / d(log P of this component's channels)
    const float g1 = g_logp * d_m1[i], g2 = g_logp * d_m2[i];
    d_logit[i] = gi * (prior - posterior);
    d_m0[i] *= g_logp;
    d_m1[i] = g1;
    d_m2[i] = g2;
    d_s0[i] *= g_logp;
    d_s1[i] *= g_logp;
    d_s2[i] *= g_logp;
    d_r0[i] = g1 * x[i] * (1.0f - d_r0[i] * d_r0[i]);  // the rows hold the tanh'd coefficients
    d_r1[i] = g2 * x[i] * (1.0f - d_r1[i] * d_r1[i]);
    d_r2[i] = g2 * x[kPix + i] * (1.0f - d_r2[i] * d_r2[i]);
  }
}

// The first pass of component k's gradient: its log P's parts (log_a, prod_b) and its unscaled
// mean and log-scale gradients, channel by channel; joint_k = logit + log P.
FHV_INLINE void component_first_pass(const float* __restrict p, int64_t ps, const float* __restrict x,
                                     int64_t k_count, int64_t k, int64_t n, float* __restrict joint_k,
                                     float* __restrict dp, int64_t ds) {
  alignas(64) float log_a[kPix], prod_b[kPix];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    log_a[i] = 0.0f;
    prod_b[i] = 1.0f;
  }
  channel_grads<0>(p, ps, x, k_count, k, n, log_a, prod_b, dp, ds);
  channel_grads<1>(p, ps, x, k_count, k, n, log_a, prod_b, dp, ds);
  channel_grads<2>(p, ps, x, k_count, k, n, log_a, prod_b, dp, ds);
  const float* logit = p + k * ps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) joint_k[i] = logit[i] + component_log_prob(log_a[i], prod_b[i]);
}

FHV_INLINE void mixture_backward_chunk_impl(const float* __restrict p, int64_t ps, const float* __restrict x,
                                            int64_t k_count, int64_t n, const float* __restrict nll,
                                            const float* __restrict lse_logits, const float* __restrict g,
                                            float* __restrict dp, int64_t ds) {
  alignas(64) float joint_k[kPix], lse_joint[kPix];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) lse_joint[i] = lse_logits[i] - nll[i];
  for (int64_t k = 0; k < k_count; ++k) {
    component_first_pass(p, ps, x, k_count, k, n, joint_k, dp, ds);
    component_grads<false>(p, ps, x, k_count, k, n, joint_k, lse_joint, lse_logits, g, dp, ds);
  }
}

// The forward and the backward pass at once, for a step that takes both: -log P per pixel and the
// gradient of nll in params for a unit upstream gradient (the backward pass then scales it by each
// pixel's gradient). The components are evaluated once, where a forward then a backward pass
// evaluates them twice. joint: K rows of kPix (scratch).
FHV_INLINE void mixture_forward_backward_chunk_impl(const float* __restrict p, int64_t ps, const float* __restrict x,
                                                    int64_t k_count, int64_t n, float* __restrict joint,
                                                    float* __restrict nll, float* __restrict dp, int64_t ds) {
  for (int64_t k = 0; k < k_count; ++k) component_first_pass(p, ps, x, k_count, k, n, joint + k * kPix, dp, ds);
  alignas(64) float lse_l[kPix], lse_j[kPix];
  logsumexps(p, ps, joint, k_count, n, lse_l, lse_j);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) nll[i] = lse_l[i] - lse_j[i];
  for (int64_t k = 0; k < k_count; ++k) {
    component_grads<true>(p, ps, x, k_count, k, n, joint + k * kPix, lse_j, lse_l, nullptr, dp, ds);
  }
}

FHV_INLINE void logistic_forward_chunk_impl(const float* __restrict x, const float* __restrict mean,
                                            const float* __restrict ls, int64_t n, float* __restrict nll) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gm, gl;
    nll[i] = -logistic_log_prob(2.0f * x[i] - 1.0f, mean[i], ls[i], gm, gl);
  }
}

FHV_INLINE void logistic_backward_chunk_impl(const float* __restrict x, const float* __restrict mean,
                                             const float* __restrict ls, const float* __restrict g, int64_t n,
                                             float* __restrict d_mean, float* __restrict d_ls) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gm, gl;
    logistic_log_prob(2.0f * x[i] - 1.0f, mean[i], ls[i], gm, gl);
    d_mean[i] = -g[i] * gm;
    d_ls[i] = -g[i] * gl;
  }
}

#define FHV_MIXTURE_VARIANTS(attr, suffix)                                                              \
  attr void mixture_forward_chunk_##suffix(const float* p, int64_t ps, const float* x, int64_t k_count,  \
                                           int64_t n, float* joint, float* nll, float* lse_logits) {    \
    mixture_forward_chunk_impl(p, ps, x, k_count, n, joint, nll, lse_logits);                           \
  }                                                                                                     \
  attr void mixture_backward_chunk_##suffix(const float* p, int64_t ps, const float* x, int64_t k_count, \
                                            int64_t n, const float* nll, const float* lse_logits,       \
                                            const float* g, float* dp, int64_t ds) {                    \
    mixture_backward_chunk_impl(p, ps, x, k_count, n, nll, lse_logits, g, dp, ds);                      \
  }                                                                                                     \
  attr void mixture_forward_backward_chunk_##suffix(const float* p, int64_t ps, const float* x,           \
                                                    int64_t k_count, int64_t n, float* joint, float* nll, \
                                                    float* dp, int64_t ds) {                              \
    mixture_forward_backward_chunk_impl(p, ps, x, k_count, n, joint, nll, dp, ds);                      \
  }                                                                                                     \
  attr void logistic_forward_chunk_##suffix(const float* x, const float* mean, const float* ls,         \
                                            int64_t n, float* nll) {                                    \
    logistic_forward_chunk_impl(x, mean, ls, n, nll);                                                   \
  }                                                                                                     \
  attr void logistic_backward_chunk_##suffix(const float* x, const float* mean, const float* ls,        \
                                             const float* g, int64_t n, float* d_mean, float* d_ls) {   \
    logistic_backward_chunk_impl(x, mean, ls, g, n, d_mean, d_ls);                                      \
  }

FHV_MIXTURE_VARIANTS(, baseline)
#if FHV_X86_LEVELS
FHV_MIXTURE_VARIANTS(FHV_TARGET_AVX512, avx512)
FHV_MIXTURE_VARIANTS(FHV_TARGET_AVX2, avx2)
#endif

void mixture_forward_chunk(const float* p, int64_t ps, const float* x, int64_t k_count, int64_t n, float* joint,
                           float* nll, float* lse_logits) {
  FHV_ISA_DISPATCH(mixture_forward_chunk, , p, ps, x, k_count, n, joint, nll, lse_logits)
}

void mixture_backward_chunk(const float* p, int64_t ps, const float* x, int64_t k_count, int64_t n,
                            const float* nll, const float* lse_logits, const float* g, float* dp, int64_t ds) {
  FHV_ISA_DISPATCH(mixture_backward_chunk, , p, ps, x, k_count, n, nll, lse_logits, g, dp, ds)
}

void mixture_forward_backward_chunk(const float* p, int64_t ps, const float* x, int64_t k_count, int64_t n,
                                    float* joint, float* nll, float* dp, int64_t ds) {
  FHV_ISA_DISPATCH(mixture_forward_backward_chunk, , p, ps, x, k_count, n, joint, nll, dp, ds)
}

void logistic_forward_chunk(const float* x, const float* mean, const float* ls, int64_t n, float* nll) {
  FHV_ISA_DISPATCH(logistic_forward_chunk, , x, mean, ls, n, nll)
}

void logistic_backward_chunk(const float* x, const float* mean, const float* ls, const float* g, int64_t n,
                             float* d_mean, float* d_ls) {
  FHV_ISA_DISPATCH(logistic_backward_chunk, , x, mean, ls, g, n, d_mean, d_ls)
}

// Where each pixel of a [B, C, H, W] tensor starts, and its channel stride.
struct PixelLayout {
  int64_t hw, w, stride_b, stride_c, stride_h, stride_w;

  explicit PixelLayout(const at::Tensor& t)
      : hw(t.size(2) * t.size(3)), w(t.size(3)), stride_b(t.stride(0)), stride_c(t.stride(1)),
        stride_h(t.stride(2)), stride_w(t.stride(3)) {}

  int64_t offset(int64_t pixel) const {
    const int64_t b = pixel / hw, r = pixel % hw;
    return b * stride_b + (r / w) * stride_h + (r % w) * stride_w;
  }

  // Pixels [first, first + n) of one image lie one after another in each channel (NCHW).
  bool plane_run(int64_t first, int64_t n) const {
    return stride_w == 1 && stride_h == w && first / hw == (first + n - 1) / hw;
  }
};

// Runs fn(first, n) over the chunks of `total` items, kChunksPerTask chunks per task, in parallel.
template <typename Fn>
void for_each_chunk(int64_t total, int64_t chunk, Fn&& fn) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c * chunk, std::min(chunk, total - c * chunk));
  });
}

// Channels [0, rows) of pixels [first, first + n) as float rows of kPix: plane runs (NCHW) load
// as vectors, any other layout (channels_last included) pixel by pixel through its offset.
template <typename T>
void gather(const T* src, const PixelLayout& l, int64_t rows, int64_t first, int64_t n, float* dst) {
  if (l.plane_run(first, n)) {
    const T* base = src + l.offset(first);
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[r * kPix + i] = static_cast<float>(base[r * l.stride_c + i]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* pixel = src + l.offset(first + i);
    for (int64_t r = 0; r < rows; ++r) dst[r * kPix + i] = static_cast<float>(pixel[r * l.stride_c]);
  }
}

template <typename T>
void scatter(const float* src, const PixelLayout& l, int64_t rows, int64_t first, int64_t n, T* dst) {
  if (l.plane_run(first, n)) {
    T* base = dst + l.offset(first);
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) base[r * l.stride_c + i] = static_cast<T>(src[r * kPix + i]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    T* pixel = dst + l.offset(first + i);
    for (int64_t r = 0; r < rows; ++r) pixel[r * l.stride_c] = static_cast<T>(src[r * kPix + i]);
  }
}

// x of pixels [first, first + n) as 3 float rows of kPix, in [-1, 1] space.
void stage_images(const float* x, const PixelLayout& xl, int64_t first, int64_t n, float* xs) {
  gather(x, xl, 3, first, n, xs);
  for (int64_t i = 0; i < 3 * kPix; ++i) xs[i] = 2.0f * xs[i] - 1.0f;
}

// Rows of floats `stride` apart, read (or written) where they are or through a staging buffer.
struct Rows {
  float* data;
  int64_t stride;
  bool in_place;
};

// Channels [0, rows) of pixels [first, first + n) of `t`: a float32 plane run (NCHW) in place,
// anything else staged into `stage` (kPix apart; gathered when `load`).
template <typename T>
Rows rows_of(T* t, const PixelLayout& l, int64_t rows, int64_t first, int64_t n, float* stage, bool load) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>) {
    if (l.plane_run(first, n)) return {const_cast<float*>(t + l.offset(first)), l.stride_c, true};
  }
  if (load) gather(t, l, rows, first, n, stage);
  return {stage, kPix, false};
}

template <typename T>
void mixture_forward_typed(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                           const at::Tensor& lse_logits) {
  const int64_t rows = params.size(1), k_count = rows / kMixtureParamBlocks;
  const PixelLayout pl(params), xl(x);
  const T* p_d = params.const_data_ptr<T>();
  const float* x_d = x.const_data_ptr<float>();
  float* nll_d = nll.mutable_data_ptr<float>();
  float* lse_d = lse_logits.mutable_data_ptr<float>();
  for_each_chunk(nll.numel(), kPix, [&](int64_t first, int64_t n) {
    thread_local std::vector<float> stage;
    stage.resize((rows + 3 + k_count) * kPix);
    float* xs = stage.data();
    float* joint = xs + 3 * kPix;
    const Rows p = rows_of(p_d, pl, rows, first, n, joint + k_count * kPix, true);
    stage_images(x_d, xl, first, n, xs);
    mixture_forward_chunk(p.data, p.stride, xs, k_count, n, joint, nll_d + first, lse_d + first);
  });
}

// Runs fn(p, xs, scratch, dp, first, n) over the chunks of pixels in parallel: p the chunk's
// parameter rows (in place or staged), xs its images (3 rows of kPix in [-1, 1] space), scratch
// scratch_rows rows of kPix, dp its rows of d_params (in place, or staged and scattered after fn).
template <typename T, typename D, typename Fn>
void for_each_gradient_chunk(const at::Tensor& x, const at::Tensor& params, const at::Tensor& d_params,
                             int64_t scratch_rows, Fn&& fn) {
  const int64_t rows = params.size(1);
  const PixelLayout pl(params), xl(x), dl(d_params);
  const T* p_d = params.const_data_ptr<T>();
  const float* x_d = x.const_data_ptr<float>();
  D* dp_d = d_params.mutable_data_ptr<D>();
  for_each_chunk(params.size(0) * pl.hw, kPix, [&](int64_t first, int64_t n) {
    thread_local std::vector<float> stage;
    stage.resize((2 * rows + 3 + scratch_rows) * kPix);
    float* xs = stage.data();
    float* scratch = xs + 3 * kPix;
    float* dp_stage = scratch + scratch_rows * kPix;
    const Rows p = rows_of(p_d, pl, rows, first, n, dp_stage + rows * kPix, true);
    const Rows dp = rows_of(dp_d, dl, rows, first, n, dp_stage, false);
    stage_images(x_d, xl, first, n, xs);
    fn(p, xs, scratch, dp, first, n);
    if (!dp.in_place) scatter(dp_stage, dl, rows, first, n, dp_d);
  });
}

template <typename T>
void mixture_backward_typed(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                            const at::Tensor& lse_logits, const at::Tensor& grad, const at::Tensor& d_params) {
  const int64_t k_count = params.size(1) / kMixtureParamBlocks;
  const float* nll_d = nll.const_data_ptr<float>();
  const float* lse_d = lse_logits.const_data_ptr<float>();
  const float* g_d = grad.const_data_ptr<float>();
  for_each_gradient_chunk<T, T>(
      x, params, d_params, 0, [&](const Rows& p, const float* xs, float*, const Rows& dp, int64_t first, int64_t n) {
        mixture_backward_chunk(p.data, p.stride, xs, k_count, n, nll_d + first, lse_d + first, g_d + first,
                               dp.data, dp.stride);
      });
}

template <typename T>
void mixture_forward_backward_typed(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                                    const at::Tensor& d_params) {
  const int64_t k_count = params.size(1) / kMixtureParamBlocks;
  float* nll_d = nll.mutable_data_ptr<float>();
  for_each_gradient_chunk<T, float>(
      x, params, d_params, k_count,
      [&](const Rows& p, const float* xs, float* joint, const Rows& dp, int64_t first, int64_t n) {
        mixture_forward_backward_chunk(p.data, p.stride, xs, k_count, n, joint, nll_d + first, dp.data, dp.stride);
      });
}

template <typename T>
void logistic_typed(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale,
                    const at::Tensor* grad, const at::Tensor& out0, const at::Tensor& out1) {
  const float* x_d = x.const_data_ptr<float>();
  const T* m_d = mean.const_data_ptr<T>();
  const T* s_d = log_scale.const_data_ptr<T>();
  const T* g_d = grad != nullptr ? grad->const_data_ptr<T>() : nullptr;
  T* o0 = out0.mutable_data_ptr<T>();
  T* o1 = out1.defined() ? out1.mutable_data_ptr<T>() : nullptr;
  for_each_chunk(x.numel(), kElems, [&](int64_t first, int64_t n) {
    alignas(64) float buf[5][kElems];
    const float* m = load_float(m_d + first, n, buf[0]);
    const float* s = load_float(s_d + first, n, buf[1]);
    const float* g = g_d != nullptr ? load_float(g_d + first, n, buf[2]) : nullptr;
    float* a = out_float(o0 + first, buf[3]);
    float* b = o1 != nullptr ? out_float(o1 + first, buf[4]) : nullptr;
    if (g == nullptr) {
      logistic_forward_chunk(x_d + first, m, s, n, a);
    } else {
      logistic_backward_chunk(x_d + first, m, s, g, n, a, b);
    }
    store_float(o0 + first, a, n);
    if (o1 != nullptr) store_float(o1 + first, b, n);
  });
}

}  // namespace

std::vector<at::Tensor> mixture_forward_cpu(const at::Tensor& x, const at::Tensor& params) {
  const auto shape = std::vector<int64_t>{params.size(0), params.size(2), params.size(3)};
  at::Tensor nll = at::empty(shape, params.options().dtype(at::kFloat));
  at::Tensor lse_logits = at::empty(shape, params.options().dtype(at::kFloat));
  if (nll.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(params.scalar_type(), "fasthvae_mixture_forward_cpu",
                       [&] { mixture_forward_typed<scalar_t>(x, params, nll, lse_logits); });
  }
  return {nll, lse_logits};
}

at::Tensor mixture_backward_cpu(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                                const at::Tensor& lse_logits, const at::Tensor& grad) {
  at::Tensor d_params = at::empty_like(params);
  if (nll.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(params.scalar_type(), "fasthvae_mixture_backward_cpu",
                       [&] { mixture_backward_typed<scalar_t>(x, params, nll, lse_logits, grad, d_params); });
  }
  return d_params;
}

std::vector<at::Tensor> mixture_forward_backward_cpu(const at::Tensor& x, const at::Tensor& params) {
  at::Tensor nll = at::empty({params.size(0), params.size(2), params.size(3)}, params.options().dtype(at::kFloat));
  // float32 whatever params' dtype: the backward pass's product with each pixel's gradient is then
  // rounded once to params' dtype, as mixture_backward's result is
  at::Tensor d_params = at::empty_like(params, params.options().dtype(at::kFloat));
  if (nll.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(params.scalar_type(), "fasthvae_mixture_forward_backward_cpu",
                       [&] { mixture_forward_backward_typed<scalar_t>(x, params, nll, d_params); });
  }
  return {nll, d_params};
}

at::Tensor logistic_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  at::Tensor nll = at::empty_like(mean);
  if (nll.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(mean.scalar_type(), "fasthvae_logistic_forward_cpu",
                       [&] { logistic_typed<scalar_t>(x, mean, log_scale, nullptr, nll, at::Tensor()); });
  }
  return nll;
}

std::vector<at::Tensor> logistic_backward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                              const at::Tensor& log_scale, const at::Tensor& grad) {
  at::Tensor d_mean = at::empty_like(mean), d_ls = at::empty_like(mean);
  if (d_mean.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(mean.scalar_type(), "fasthvae_logistic_backward_cpu",
                       [&] { logistic_typed<scalar_t>(x, mean, log_scale, &grad, d_mean, d_ls); });
  }
  return {d_mean, d_ls};
}

}  // namespace fasthvae
