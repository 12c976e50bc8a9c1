// CPU loops of the fused Gaussian ops: the elementwise math of gaussian_math.h
// in SIMD loops (GCC `omp simd` with glibc's vector libm, cloned for AVX-512,
// AVX2 and baseline x86-64 and picked at load time), threaded with
// at::parallel_for over fixed blocks so that reductions are deterministic
// whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// Vector variants of libm from glibc's libmvec; <math.h> only declares them
// under -ffast-math, which we do not want (it breaks inf handling).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float expm1f(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
float sinf(float);
}
#define FHV_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FHV_SIMD_CLONES
#endif

#include "gaussian_math.h"
#include "gaussian_ops.h"

namespace fasthvae {
namespace {

constexpr int64_t kBlock = 4096;  // elements per reduction block (one partial sum)
constexpr int64_t kChunk = 256;   // elements per SIMD chunk (float staging buffers)
constexpr int64_t kGroups = kChunk / 4 + 2;  // noise groups of 4 covering any chunk
static_assert(kBlock % kChunk == 0 && kChunk % 4 == 0);
constexpr int64_t kMinElemsPerTask = 16384;

// ---- SIMD chunks: float arrays of n <= kChunk elements -------------------

// Noise of elements [first, first + n) into buf (4 * kGroups floats); returns
// the pointer to element `first`. One Philox call per group of four elements.
FHV_SIMD_CLONES const float* noise_chunk(uint64_t seed, uint64_t first, int64_t n,
                                         float* __restrict buf) {
  alignas(64) float n0[kGroups], n1[kGroups], n2[kGroups], n3[kGroups];
  const uint64_t group0 = first >> 2;
  const int64_t lead = static_cast<int64_t>(first & 3u);
  const int64_t groups = (lead + n + 3) >> 2;
#pragma omp simd
  for (int64_t j = 0; j < groups; ++j) {
    philox_randn4(seed, group0 + static_cast<uint64_t>(j), n0[j], n1[j], n2[j], n3[j]);
  }
  for (int64_t j = 0; j < groups; ++j) {
    buf[4 * j] = n0[j];
    buf[4 * j + 1] = n1[j];
    buf[4 * j + 2] = n2[j];
    buf[4 * j + 3] = n3[j];
  }
  return buf + lead;
}

template <bool kSample, bool kKL, bool kPrior>
FHV_SIMD_CLONES void forward_chunk(const float* __restrict mu, const float* __restrict lv,
                                   const float* __restrict mu_p, const float* __restrict lv_p,
                                   const float* __restrict eps, int64_t n, float* __restrict z,
                                   float* __restrict kl) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kSample) {
      z[i] = reparameterize(mu[i], lv[i], eps[i]);
    }
    if constexpr (kKL) {
      if constexpr (kPrior) {
        kl[i] = kl_gaussians(mu[i], lv[i], mu_p[i], lv_p[i]);
      } else {
        kl[i] = kl_std_normal(mu[i], lv[i]);
      }
    }
  }
}

template <bool kSample, bool kKL, bool kPrior, bool kRowGrad>
FHV_SIMD_CLONES void backward_chunk(const float* __restrict mu, const float* __restrict lv,
                                    const float* __restrict mu_p, const float* __restrict lv_p,
                                    const float* __restrict eps, int64_t n,
                                    const float* __restrict gz, const float* __restrict gk,
                                    float gk_row, float* __restrict dmu, float* __restrict dlv,
                                    float* __restrict dmu_p, float* __restrict dlv_p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gmu = 0.0f, glv = 0.0f;
    if constexpr (kKL) {
      const float g = kRowGrad ? gk_row : gk[i];
      if constexpr (kPrior) {
        float gmp, glp;
        kl_gaussians_grad(mu[i], lv[i], mu_p[i], lv_p[i], g, gmu, glv, gmp, glp);
        dmu_p[i] = gmp;
        dlv_p[i] = glp;
      } else {
        kl_std_normal_grad(mu[i], lv[i], g, gmu, glv);
      }
    }
    if constexpr (kSample) {
      gmu += gz[i];
      glv += reparameterize_grad_logvar(lv[i], eps[i], gz[i]);
    }
    dmu[i] = gmu;
    dlv[i] = glv;
  }
}

// ---- dtype staging ------------------------------------------------------

// at::Half <-> float, 8 at a time with F16C where the CPU has it (round to nearest even, like
// at::Half's own scalar conversion, which is bit manipulation and 3x slower for the whole op).
#if defined(__x86_64__) && defined(__GNUC__)
#define FHV_F16C 1
__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const at::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, int64_t n, at::Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}

bool has_f16c() {
  static const bool has =
      (__builtin_cpu_init(), __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2"));
  return has;
}
#else
#define FHV_F16C 0
#endif

// A float view of src[0:n]: the pointer itself for float, else a converted copy.
template <typename T>
inline const float* load_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    if (src == nullptr) return nullptr;
#if FHV_F16C
    if constexpr (std::is_same_v<T, at::Half>) {
      if (has_f16c()) {
        half_to_float_f16c(src, n, buf);
        return buf;
      }
    }
#endif
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Where a float result for dst[0:n] goes: dst itself for float, else buf.
template <typename T>
inline float* out_float(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return dst == nullptr ? nullptr : buf;
  }
}

template <typename T>
inline void store_float(T* dst, const float* src, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    if (dst == nullptr) return;
#if FHV_F16C
    if constexpr (std::is_same_v<T, at::Half>) {
      if (has_f16c()) {
        float_to_half_f16c(src, n, dst);
        return;
      }
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

template <typename T>
inline const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
inline T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Runs fn(row, begin, end) over the fixed blocks of every row, in parallel.
template <typename Fn>
void for_each_block(int64_t rows, int64_t inner, Fn&& fn) {
  const int64_t blocks_per_row = (inner + kBlock - 1) / kBlock;
  const int64_t block_elems = std::min(inner, kBlock);
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(1, block_elems));
  at::parallel_for(0, rows * blocks_per_row, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b / blocks_per_row;
      const int64_t j = b % blocks_per_row;
      const int64_t begin = row * inner + j * kBlock;
      const int64_t end = row * inner + std::min((j + 1) * kBlock, inner);
      fn(b, begin, end);
    }
  });
}

template <typename T, bool kSample, bool kKL, bool kPrior>
void forward_typed(const at::Tensor& mu, const at::Tensor& lv, const std::optional<at::Tensor>& mu_p,
                   const std::optional<at::Tensor>& lv_p, uint64_t seed, bool row_sums,
                   const at::Tensor& z, const at::Tensor& kl_elem, const at::Tensor& partials) {
  const T* mu_d = mu.const_data_ptr<T>();
  const T* lv_d = lv.const_data_ptr<T>();
  const T* mup_d = ptr_or_null<T>(mu_p);
  const T* lvp_d = ptr_or_null<T>(lv_p);
  T* z_d = mut_ptr_or_null<T>(z);
  T* kl_d = mut_ptr_or_null<T>(kl_elem);
  float* part_d = mut_ptr_or_null<float>(partials);
  const int64_t rows = num_rows(mu);
  for_each_block(rows, mu.numel() / rows, [&](int64_t block, int64_t begin, int64_t end) {
    alignas(64) float buf[6][kChunk];
    alignas(64) float noise[4 * kGroups];
    float acc = 0.0f;
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      const float* m = load_float(mu_d + c, n, buf[0]);
      const float* l = load_float(lv_d + c, n, buf[1]);
      const float* mp = kPrior ? load_float(mup_d + c, n, buf[2]) : nullptr;
      const float* lp = kPrior ? load_float(lvp_d + c, n, buf[3]) : nullptr;
      float* zf = kSample ? out_float(z_d + c, buf[4]) : nullptr;
      float* klf = kKL ? (row_sums ? buf[5] : out_float(kl_d + c, buf[5])) : nullptr;
      const float* eps = kSample ? noise_chunk(seed, static_cast<uint64_t>(c), n, noise) : nullptr;
      forward_chunk<kSample, kKL, kPrior>(m, l, mp, lp, eps, n, zf, klf);
      if constexpr (kSample) store_float(z_d + c, zf, n);
      if constexpr (kKL) {
        if (row_sums) {
          for (int64_t i = 0; i < n; ++i) acc += klf[i];
        } else {
          store_float(kl_d + c, klf, n);
        }
      }
    }
    if (kKL && row_sums) part_d[block] = acc;
  });
}

template <typename T, bool kSample, bool kKL, bool kPrior, bool kRowGrad>
void backward_typed(const at::Tensor& mu, const at::Tensor& lv,
                    const std::optional<at::Tensor>& mu_p, const std::optional<at::Tensor>& lv_p,
                    uint64_t seed, const std::optional<at::Tensor>& grad_z,
                    const std::optional<at::Tensor>& grad_kl, const at::Tensor& dmu,
                    const at::Tensor& dlv, const at::Tensor& dmu_p, const at::Tensor& dlv_p) {
  const T* mu_d = mu.const_data_ptr<T>();
  const T* lv_d = lv.const_data_ptr<T>();
  const T* mup_d = ptr_or_null<T>(mu_p);
  const T* lvp_d = ptr_or_null<T>(lv_p);
  const T* gz_d = ptr_or_null<T>(grad_z);
  const T* gk_d = kRowGrad ? nullptr : ptr_or_null<T>(grad_kl);
  const float* gk_rows = kRowGrad ? ptr_or_null<float>(grad_kl) : nullptr;
  T* dmu_d = dmu.mutable_data_ptr<T>();
  T* dlv_d = dlv.mutable_data_ptr<T>();
  T* dmup_d = mut_ptr_or_null<T>(dmu_p);
  T* dlvp_d = mut_ptr_or_null<T>(dlv_p);
  const int64_t rows = num_rows(mu);
  const int64_t inner = mu.numel() / rows;
  for_each_block(rows, inner, [&](int64_t /*block*/, int64_t begin, int64_t end) {
    alignas(64) float buf[10][kChunk];
    alignas(64) float noise[4 * kGroups];
    const float g_row = kRowGrad ? gk_rows[begin / inner] : 0.0f;
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      const float* m = kKL ? load_float(mu_d + c, n, buf[0]) : nullptr;
      const float* l = load_float(lv_d + c, n, buf[1]);
      const float* mp = kPrior ? load_float(mup_d + c, n, buf[2]) : nullptr;
      const float* lp = kPrior ? load_float(lvp_d + c, n, buf[3]) : nullptr;
      const float* gz = kSample ? load_float(gz_d + c, n, buf[4]) : nullptr;
      const float* gk = (kKL && !kRowGrad) ? load_float(gk_d + c, n, buf[5]) : nullptr;
      float* a = out_float(dmu_d + c, buf[6]);
      float* b = out_float(dlv_d + c, buf[7]);
      float* ap = kPrior ? out_float(dmup_d + c, buf[8]) : nullptr;
      float* bp = kPrior ? out_float(dlvp_d + c, buf[9]) : nullptr;
      const float* eps = kSample ? noise_chunk(seed, static_cast<uint64_t>(c), n, noise) : nullptr;
      backward_chunk<kSample, kKL, kPrior, kRowGrad>(m, l, mp, lp, eps, n, gz, gk, g_row, a, b, ap, bp);
      store_float(dmu_d + c, a, n);
      store_float(dlv_d + c, b, n);
      if constexpr (kPrior) {
        store_float(dmup_d + c, ap, n);
        store_float(dlvp_d + c, bp, n);
      }
    }
  });
}

// Calls fn with std::integral_constant<bool, flag>.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace

std::vector<at::Tensor> forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                    const std::optional<at::Tensor>& mu_p,
                                    const std::optional<at::Tensor>& logvar_p, uint64_t seed,
                                    bool sample, int64_t kl_mode) {
  const bool has_kl = kl_mode != kNoKL;
  const bool row_sums = kl_mode == kRowSumKL;
  const bool prior = mu_p.has_value();
  const int64_t rows = num_rows(mu);
  const int64_t inner = rows == 0 ? 0 : mu.numel() / rows;
  const int64_t blocks_per_row = (inner + kBlock - 1) / kBlock;
  at::Tensor z = sample ? at::empty_like(mu) : at::Tensor();
  at::Tensor kl_elem = (has_kl && !row_sums) ? at::empty_like(mu) : at::Tensor();
  at::Tensor partials =
      row_sums ? at::zeros({rows, std::max<int64_t>(blocks_per_row, 1)}, mu.options().dtype(at::kFloat))
               : at::Tensor();
  if (mu.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fasthvae_forward_cpu", [&] {
      with_flag(sample, [&](auto s) {
        with_flag(has_kl, [&](auto k) {
          with_flag(prior, [&](auto p) {
            forward_typed<scalar_t, decltype(s)::value, decltype(k)::value, decltype(p)::value>(
                mu, logvar, mu_p, logvar_p, seed, row_sums, z, kl_elem, partials);
          });
        });
      });
    });
  }
  return {z, row_sums ? partials.sum(1) : kl_elem};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                     const std::optional<at::Tensor>& mu_p,
                                     const std::optional<at::Tensor>& logvar_p, uint64_t seed,
                                     const std::optional<at::Tensor>& grad_z,
                                     const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows) {
  const bool prior = mu_p.has_value();
  at::Tensor dmu = at::empty_like(mu);
  at::Tensor dlv = at::empty_like(logvar);
  at::Tensor dmu_p = prior ? at::empty_like(mu) : at::Tensor();
  at::Tensor dlv_p = prior ? at::empty_like(mu) : at::Tensor();
  if (mu.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fasthvae_backward_cpu", [&] {
      with_flag(grad_z.has_value(), [&](auto s) {
        with_flag(grad_kl.has_value(), [&](auto k) {
          with_flag(prior, [&](auto p) {
            with_flag(grad_kl_rows, [&](auto r) {
              backward_typed<scalar_t, decltype(s)::value, decltype(k)::value, decltype(p)::value,
                             decltype(r)::value>(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl,
                                                 dmu, dlv, dmu_p, dlv_p);
            });
          });
        });
      });
    });
  }
  return {dmu, dlv, dmu_p, dlv_p};
}

}  // namespace fasthvae
