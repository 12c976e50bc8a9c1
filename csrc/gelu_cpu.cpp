// fasthvae::gelu, the GELU that returns its derivative: one pass over x writes gelu(x) and, where
// asked, gelu'(x), so that a backward pass multiplies by a saved tensor instead of evaluating the
// error function and an exponential again. Registered with the dispatcher here, so that a call
// reaches this kernel with no Python implementation in between; its fake kernel and autograd are in
// fasthvae/ops/activation.py. SIMD loops, one wrapper per ISA level (cpu_common.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cpu_common.h"

namespace fasthvae {

namespace {

constexpr int64_t kChunk = 256;   // elements per SIMD chunk (float staging buffers)
constexpr int64_t kBlock = 4096;  // elements per task: fixed blocks, so that an element's place in
                                  // its SIMD loop, and so its bits, do not depend on the thread count

// Phi(x) = 1 - erfc(x / sqrt 2) / 2, erfc(u) ~ t (a1 + t (a2 + ...)) exp(-u^2), t = 1 / (1 + p u)
// for u >= 0 (Abramowitz and Stegun 7.1.26: absolute error <= 1.5e-7, the approximation of ATen's
// vectorized erf). Its exp(-u^2) = exp(-x^2 / 2) is also the normal density's, so gelu(x) = x Phi(x)
// and gelu'(x) = Phi(x) + x phi(x) take one exponential. Phi(-|x|) comes from the tail directly (no
// 1 - (1 - tail) cancellation); x -> -inf gives gelu -> -0 and gelu' -> 0, x -> +inf gives x and 1.
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kP = 0.3275911f;
constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f, kA4 = -1.453152027f,
                kA5 = 1.061405429f;

template <bool kDerivative>
FHV_INLINE void gelu_chunk(const float* __restrict x, int64_t n, float* __restrict y, float* __restrict d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = 1.0f / (1.0f + kP * kInvSqrt2 * std::fabs(v));
    const float poly = ((((kA5 * t + kA4) * t + kA3) * t + kA2) * t + kA1) * t;
    const float e = expf(-0.5f * v * v);
    const float tail = 0.5f * poly * e;  // Phi(-|x|)
    const float head = 1.0f - tail;
    const float cdf = v < 0.0f ? tail : head;
    const float gelu = v * cdf;
    y[i] = cdf == 0.0f ? -0.0f : gelu;
    if constexpr (kDerivative) {
      const float density_term = v * e * kInvSqrt2Pi;
      d[i] = cdf + (e == 0.0f ? 0.0f : density_term);
    }
  }
}

// gelu (and gelu') of x[0:n]: y in U, d in x's type T; staged through float chunks where either is
// not float.
template <typename T, typename U, bool kDerivative>
FHV_INLINE void gelu_span_impl(const T* x, int64_t n, U* y, T* d) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
    gelu_chunk<kDerivative>(x, n, y, d);
  } else {
    alignas(64) float xb[kChunk], yb[kChunk], db[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      float* ys = out_float(y + s, yb);
      float* ds = kDerivative ? out_float(d + s, db) : db;
      gelu_chunk<kDerivative>(load_float(x + s, m, xb), m, ys, ds);
      store_float(y + s, ys, m);
      if constexpr (kDerivative) store_float(d + s, ds, m);
    }
  }
}

#define FHV_GELU_VARIANT(attr, suffix)                                      \
  template <typename T, typename U, bool kDerivative>                       \
  attr void gelu_span_##suffix(const T* x, int64_t n, U* y, T* d) {         \
    gelu_span_impl<T, U, kDerivative>(x, n, y, d);                          \
  }

FHV_GELU_VARIANT(, baseline)
#if FHV_X86_LEVELS
FHV_GELU_VARIANT(FHV_TARGET_AVX512, avx512)
FHV_GELU_VARIANT(FHV_TARGET_AVX2, avx2)
#endif

template <typename T, typename U, bool kDerivative>
void gelu_span(const T* x, int64_t n, U* y, T* d) {
  FHV_ISA_DISPATCH(gelu_span, FHV_TARGS(T, U, kDerivative), x, n, y, d)
}

template <typename T, typename U, bool kDerivative>
void gelu_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& d) {
  const T* xp = x.const_data_ptr<T>();
  U* yp = y.mutable_data_ptr<U>();
  T* dp = kDerivative ? d.mutable_data_ptr<T>() : nullptr;
  const int64_t n = x.numel();
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock, len = std::min(kBlock, n - begin);
      gelu_span<T, U, kDerivative>(xp + begin, len, yp + begin, kDerivative ? dp + begin : nullptr);
    }
  });
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only, got one on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
}

// x where it is dense (any order of its dims: the outputs share its strides, and one walk over its
// memory covers all three), else x.contiguous(x.suggest_memory_format()).
at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous(x.suggest_memory_format());
}

// gelu(x) into y (of type U) and, where asked, gelu'(x) into d (x's type T).
template <typename T, typename U>
void run_gelu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& d, bool derivative) {
  if (derivative) {
    gelu_typed<T, U, true>(x, y, d);
  } else {
    gelu_typed<T, U, false>(x, y, d);
  }
}

// (gelu(x), gelu'(x) or an empty tensor where not asked for), laid out as dense(x).
std::tuple<at::Tensor, at::Tensor> gelu_cpu(const at::Tensor& x_in, bool derivative) {
  check_input(x_in, "fasthvae::gelu");
  const at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  at::Tensor d = derivative ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {y, d};
  switch (x.scalar_type()) {
    case at::kFloat: run_gelu<float, float>(x, y, d, derivative); break;
    case at::kHalf: run_gelu<at::Half, at::Half>(x, y, d, derivative); break;
    default: run_gelu<at::BFloat16, at::BFloat16>(x, y, d, derivative);
  }
  return {y, d};
}

// As gelu_cpu, gelu(x) written in bfloat16 (gelu'(x) in x's dtype): a bfloat16 convolution's input
// from a float32 x, without a float32 gelu(x) in between.
std::tuple<at::Tensor, at::Tensor> gelu_bfloat16_cpu(const at::Tensor& x_in, bool derivative) {
  check_input(x_in, "fasthvae::gelu_bfloat16");
  const at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x, x.options().dtype(at::kBFloat16));
  at::Tensor d = derivative ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {y, d};
  switch (x.scalar_type()) {
    case at::kFloat: run_gelu<float, at::BFloat16>(x, y, d, derivative); break;
    case at::kHalf: run_gelu<at::Half, at::BFloat16>(x, y, d, derivative); break;
    default: run_gelu<at::BFloat16, at::BFloat16>(x, y, d, derivative);
  }
  return {y, d};
}

}  // namespace

}  // namespace fasthvae

TORCH_LIBRARY_FRAGMENT(fasthvae, m) {
  m.def("gelu(Tensor x, bool derivative) -> (Tensor, Tensor)");
  m.def("gelu_bfloat16(Tensor x, bool derivative) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae, CPU, m) {
  m.impl("gelu", &fasthvae::gelu_cpu);
  m.impl("gelu_bfloat16", &fasthvae::gelu_bfloat16_cpu);
}
