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

// gelu (and gelu') of x[0:n], staged through float chunks for half and bfloat16.
template <typename T, bool kDerivative>
FHV_INLINE void gelu_span_impl(const T* x, int64_t n, T* y, T* d) {
  if constexpr (std::is_same_v<T, float>) {
    gelu_chunk<kDerivative>(x, n, y, d);
  } else {
    alignas(64) float xb[kChunk], yb[kChunk], db[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      gelu_chunk<kDerivative>(load_float(x + s, m, xb), m, yb, db);
      store_float(y + s, yb, m);
      if constexpr (kDerivative) store_float(d + s, db, m);
    }
  }
}

#define FHV_GELU_VARIANT(attr, suffix)                                      \
  template <typename T, bool kDerivative>                                   \
  attr void gelu_span_##suffix(const T* x, int64_t n, T* y, T* d) {         \
    gelu_span_impl<T, kDerivative>(x, n, y, d);                             \
  }

FHV_GELU_VARIANT(, baseline)
#if FHV_X86_LEVELS
FHV_GELU_VARIANT(FHV_TARGET_AVX512, avx512)
FHV_GELU_VARIANT(FHV_TARGET_AVX2, avx2)
#endif

template <typename T, bool kDerivative>
void gelu_span(const T* x, int64_t n, T* y, T* d) {
  FHV_ISA_DISPATCH(gelu_span, FHV_TARGS(T, kDerivative), x, n, y, d)
}

template <typename T, bool kDerivative>
void gelu_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& d) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  T* dp = kDerivative ? d.mutable_data_ptr<T>() : nullptr;
  const int64_t n = x.numel();
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock, len = std::min(kBlock, n - begin);
      gelu_span<T, kDerivative>(xp + begin, len, yp + begin, kDerivative ? dp + begin : nullptr);
    }
  });
}

// (gelu(x), gelu'(x) or an empty tensor where not asked for), laid out as x where x is dense (any
// order of its dims: the outputs share its strides, and one walk over its memory covers all three),
// else as x.contiguous(x.suggest_memory_format()).
std::tuple<at::Tensor, at::Tensor> gelu_cpu(const at::Tensor& x_in, bool derivative) {
  TORCH_CHECK(x_in.device().is_cpu(), "fasthvae::gelu: CPU tensors only, got one on ", x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fasthvae::gelu: x must be float32, float16 or bfloat16, got ", dtype);
  const at::Tensor x =
      x_in.is_non_overlapping_and_dense() ? x_in : x_in.contiguous(x_in.suggest_memory_format());
  at::Tensor y = at::empty_like(x);
  at::Tensor d = derivative ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {y, d};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    if (derivative) {
      gelu_typed<T, true>(x, y, d);
    } else {
      gelu_typed<T, false>(x, y, d);
    }
  };
  if (dtype == at::kFloat) {
    run(float{});
  } else if (dtype == at::kHalf) {
    run(at::Half{});
  } else {
    run(at::BFloat16{});
  }
  return {y, d};
}

}  // namespace

}  // namespace fasthvae

TORCH_LIBRARY_FRAGMENT(fasthvae, m) {
  m.def("gelu(Tensor x, bool derivative) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae, CPU, m) { m.impl("gelu", &fasthvae::gelu_cpu); }
