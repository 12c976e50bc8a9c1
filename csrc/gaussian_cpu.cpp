// CPU loops of the fused Gaussian ops: the elementwise math of gaussian_math.h
// in SIMD loops, one wrapper per ISA level (cpu_common.h). Threaded with
// at::parallel_for over fixed blocks so that reductions are deterministic
// whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "cpu_common.h"
#include "gaussian_math.h"
#include "gaussian_ops.h"

namespace fasthvae {

namespace {

constexpr int64_t kBlock = 4096;  // elements per reduction block (one partial sum)
constexpr int64_t kChunk = 256;   // elements per SIMD chunk (float staging buffers)
constexpr int64_t kGroups = kChunk / 4 + 8;  // noise groups of 4 covering any chunk, 8-aligned
static_assert(kBlock % kChunk == 0 && kChunk % 4 == 0);
constexpr int64_t kMinElemsPerTask = 4096;  // a block a task: a batch-32 8x8 latent uses both threads

// ---- SIMD chunks: float arrays of n <= kChunk elements -------------------

// Noise of elements [first, first + n) into buf (4 * kGroups floats); returns
// the pointer to element `first`. One Philox call per group of four elements.
FHV_INLINE const float* noise_chunk_impl(uint64_t seed, uint64_t first, int64_t n,
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
FHV_INLINE void forward_chunk_impl(const float* __restrict mu, const float* __restrict lv,
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
FHV_INLINE void backward_chunk_impl(const float* __restrict mu, const float* __restrict lv,
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
    } else if constexpr (kPrior) {  // no gradient reached the KL: the prior's gradients are zero
      dmu_p[i] = 0.0f;
      dlv_p[i] = 0.0f;
    }
    if constexpr (kSample) {
      gmu += gz[i];
      glv += reparameterize_grad_logvar(lv[i], eps[i], gz[i]);
    }
    dmu[i] = gmu;
    dlv[i] = glv;
  }
}

// ---- inputs read where they lie -------------------------------------------

// A tensor's elements, in the order of its dims, as rows of `run` contiguous elements `stride`
// apart: a dense tensor (one row), or a slice of a dense one along a dim, such as a channel half of
// a channels_last tensor viewed in its memory order (rows of C elements, 2C apart) or of an NCHW
// one (rows of C * H * W elements).
struct Rows {
  int64_t run;
  int64_t stride;
};

std::optional<Rows> rows_of(const at::Tensor& t) {
  const int64_t numel = t.numel();
  if (numel == 0 || t.is_contiguous()) return Rows{std::max<int64_t>(numel, 1), std::max<int64_t>(numel, 1)};
  int64_t d = t.dim() - 1, run = 1;
  for (; d >= 0; --d) {  // the dense suffix: one row's elements
    if (t.size(d) == 1) continue;
    if (t.stride(d) != run) break;
    run *= t.size(d);
  }
  if (d < 0) return Rows{numel, numel};
  const int64_t stride = t.stride(d);
  if (stride < run) return std::nullopt;  // rows would overlap (or run backwards)
  for (int64_t e = d - 1, next = stride * t.size(d); e >= 0; --e) {  // rows evenly spaced
    if (t.size(e) == 1) continue;
    if (t.stride(e) != next) return std::nullopt;
    next *= t.size(e);
  }
  return Rows{run, stride};
}

// The tensor the loops read for `t`: itself where its elements lie in rows, else a contiguous copy.
at::Tensor readable(const at::Tensor& t) { return rows_of(t).has_value() ? t : t.contiguous(); }

std::optional<at::Tensor> readable(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(readable(*t)) : std::nullopt;
}

Rows rows_or_dense(const at::Tensor& t) { return *rows_of(t); }

Rows rows_or_dense(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *rows_of(*t) : Rows{1, 1};
}

// A float view of the elements [c, c + n) of a tensor laid out as `rows` (see load_float): the
// pointer itself for dense float data, else a copy in buf.
template <typename T>
const float* load_rows(const T* base, const Rows& rows, int64_t c, int64_t n, float* buf) {
  if (base == nullptr) return nullptr;
  if (rows.run == rows.stride) return load_float(base + c, n, buf);
  int64_t row = c / rows.run, k = c % rows.run;
  for (int64_t done = 0; done < n; ++row, k = 0) {
    const int64_t len = std::min(rows.run - k, n - done);
    const float* part = load_float(base + row * rows.stride + k, len, buf + done);
    if (part != buf + done) std::copy(part, part + len, buf + done);
    done += len;
  }
  return buf;
}

// ---- the loops compiled for each ISA level, and their dispatch -------------

#define FHV_CHUNK_VARIANTS(attr, suffix)                                                          \
  template <bool kSample, bool kKL, bool kPrior>                                                  \
  attr void forward_chunk_##suffix(const float* mu, const float* lv, const float* mu_p,           \
                                   const float* lv_p, const float* eps, int64_t n, float* z,      \
                                   float* kl) {                                                   \
    forward_chunk_impl<kSample, kKL, kPrior>(mu, lv, mu_p, lv_p, eps, n, z, kl);                  \
  }                                                                                               \
  template <bool kSample, bool kKL, bool kPrior, bool kRowGrad>                                   \
  attr void backward_chunk_##suffix(const float* mu, const float* lv, const float* mu_p,          \
                                    const float* lv_p, const float* eps, int64_t n,               \
                                    const float* gz, const float* gk, float gk_row, float* dmu,   \
                                    float* dlv, float* dmu_p, float* dlv_p) {                     \
    backward_chunk_impl<kSample, kKL, kPrior, kRowGrad>(mu, lv, mu_p, lv_p, eps, n, gz, gk,       \
                                                        gk_row, dmu, dlv, dmu_p, dlv_p);          \
  }

FHV_CHUNK_VARIANTS(, baseline)

const float* noise_chunk_baseline(uint64_t seed, uint64_t first, int64_t n, float* buf) {
  return noise_chunk_impl(seed, first, n, buf);
}

#if FHV_X86_LEVELS
FHV_CHUNK_VARIANTS(FHV_TARGET_AVX512, avx512)
FHV_CHUNK_VARIANTS(FHV_TARGET_AVX2, avx2)

// AVX-512 has a 64-bit vector multiply (vpmullq), so GCC vectorizes Philox's 32x32->64 products.
FHV_TARGET_AVX512 const float* noise_chunk_avx512(uint64_t seed, uint64_t first, int64_t n, float* buf) {
  return noise_chunk_impl(seed, first, n, buf);
}

// High and low halves of k * x for eight uint32 lanes with AVX2's 32x32->64 multiply (vpmuludq),
// which takes the even lanes: once as they are, once shifted down.
FHV_TARGET_AVX2 FHV_INLINE void mul_hi_lo(__m256i k, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, k);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Without vpmullq GCC leaves Philox scalar; here its ten rounds run on eight groups at a time with
// intrinsics (the same arithmetic as philox4), then Box-Muller vectorizes as before.
FHV_TARGET_AVX2 const float* noise_chunk_avx2(uint64_t seed, uint64_t first, int64_t n,
                                               float* __restrict buf) {
  alignas(64) uint32_t bits[4][kGroups];
  alignas(64) float n0[kGroups], n1[kGroups], n2[kGroups], n3[kGroups];
  const uint64_t group0 = first >> 2;
  const int64_t lead = static_cast<int64_t>(first & 3u);
  const int64_t groups = (lead + n + 3) >> 2;
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int64_t j = 0; j < groups; j += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int lane = 0; lane < 8; ++lane) {
      const uint64_t counter = group0 + static_cast<uint64_t>(j + lane);
      lo[lane] = static_cast<uint32_t>(counter);
      hi[lane] = static_cast<uint32_t>(counter >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(round_b, c2, hi_b, lo_b);
      mul_hi_lo(round_a, c0, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(bits[0] + j), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bits[1] + j), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bits[2] + j), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bits[3] + j), c3);
  }
#pragma omp simd
  for (int64_t j = 0; j < groups; ++j) {
    pair_to_normal(bits[0][j], bits[1][j], n0[j], n1[j]);
    pair_to_normal(bits[2][j], bits[3][j], n2[j], n3[j]);
  }
  for (int64_t j = 0; j < groups; ++j) {
    buf[4 * j] = n0[j];
    buf[4 * j + 1] = n1[j];
    buf[4 * j + 2] = n2[j];
    buf[4 * j + 3] = n3[j];
  }
  return buf + lead;
}
#endif

// Noise of elements [first, first + n) into buf (4 * kGroups floats); returns the pointer to
// element `first`. One Philox call per group of four elements.
const float* noise_chunk(uint64_t seed, uint64_t first, int64_t n, float* buf) {
  FHV_ISA_DISPATCH(noise_chunk, , seed, first, n, buf)
}

template <bool kSample, bool kKL, bool kPrior>
void forward_chunk(const float* mu, const float* lv, const float* mu_p, const float* lv_p,
                   const float* eps, int64_t n, float* z, float* kl) {
  FHV_ISA_DISPATCH(forward_chunk, FHV_TARGS(kSample, kKL, kPrior), mu, lv, mu_p, lv_p, eps, n, z, kl)
}

template <bool kSample, bool kKL, bool kPrior, bool kRowGrad>
void backward_chunk(const float* mu, const float* lv, const float* mu_p, const float* lv_p,
                    const float* eps, int64_t n, const float* gz, const float* gk, float gk_row,
                    float* dmu, float* dlv, float* dmu_p, float* dlv_p) {
  FHV_ISA_DISPATCH(backward_chunk, FHV_TARGS(kSample, kKL, kPrior, kRowGrad), mu, lv, mu_p, lv_p, eps, n, gz,
                   gk, gk_row, dmu, dlv, dmu_p, dlv_p)
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
  const Rows r_mu = rows_or_dense(mu), r_lv = rows_or_dense(lv), r_mup = rows_or_dense(mu_p),
             r_lvp = rows_or_dense(lv_p);
  const int64_t rows = num_rows(mu);
  for_each_block(rows, mu.numel() / rows, [&](int64_t block, int64_t begin, int64_t end) {
    alignas(64) float buf[6][kChunk];
    alignas(64) float noise[4 * kGroups];
    float acc = 0.0f;
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      const float* m = load_rows(mu_d, r_mu, c, n, buf[0]);
      const float* l = load_rows(lv_d, r_lv, c, n, buf[1]);
      const float* mp = kPrior ? load_rows(mup_d, r_mup, c, n, buf[2]) : nullptr;
      const float* lp = kPrior ? load_rows(lvp_d, r_lvp, c, n, buf[3]) : nullptr;
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
  const Rows r_mu = rows_or_dense(mu), r_lv = rows_or_dense(lv), r_mup = rows_or_dense(mu_p),
             r_lvp = rows_or_dense(lv_p), r_gz = rows_or_dense(grad_z),
             r_gk = kRowGrad ? Rows{1, 1} : rows_or_dense(grad_kl);
  const int64_t rows = num_rows(mu);
  const int64_t inner = mu.numel() / rows;
  for_each_block(rows, inner, [&](int64_t /*block*/, int64_t begin, int64_t end) {
    alignas(64) float buf[10][kChunk];
    alignas(64) float noise[4 * kGroups];
    const float g_row = kRowGrad ? gk_rows[begin / inner] : 0.0f;
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      const float* m = kKL ? load_rows(mu_d, r_mu, c, n, buf[0]) : nullptr;
      const float* l = load_rows(lv_d, r_lv, c, n, buf[1]);
      const float* mp = kPrior ? load_rows(mup_d, r_mup, c, n, buf[2]) : nullptr;
      const float* lp = kPrior ? load_rows(lvp_d, r_lvp, c, n, buf[3]) : nullptr;
      const float* gz = kSample ? load_rows(gz_d, r_gz, c, n, buf[4]) : nullptr;
      const float* gk = (kKL && !kRowGrad) ? load_rows(gk_d, r_gk, c, n, buf[5]) : nullptr;
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

}  // namespace

std::vector<at::Tensor> forward_cpu(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                    const std::optional<at::Tensor>& mu_p_in,
                                    const std::optional<at::Tensor>& logvar_p_in, uint64_t seed,
                                    bool sample, int64_t kl_mode) {
  const at::Tensor mu = readable(mu_in), logvar = readable(logvar_in);
  const std::optional<at::Tensor> mu_p = readable(mu_p_in), logvar_p = readable(logvar_p_in);
  const bool has_kl = kl_mode != kNoKL;
  const bool row_sums = kl_mode == kRowSumKL;
  const bool prior = mu_p.has_value();
  const int64_t rows = num_rows(mu);
  const int64_t inner = rows == 0 ? 0 : mu.numel() / rows;
  const int64_t blocks_per_row = (inner + kBlock - 1) / kBlock;
  // Outputs contiguous in the inputs' dim order (the order the caller views them in).
  at::Tensor z = sample ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  at::Tensor kl_elem = (has_kl && !row_sums) ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  at::Tensor partials =
      row_sums ? at::zeros({rows, std::max<int64_t>(blocks_per_row, 1)}, mu.options().dtype(at::kFloat))
               : at::Tensor();
  if (mu.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "fasthvae_forward_cpu", [&] {
      with_flag(sample, [&](auto s) {
        with_flag(has_kl, [&](auto k) {
          with_flag(prior, [&](auto p) {
            if constexpr (forward_reachable(std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value,
                                            std::decay_t<decltype(p)>::value)) {
              forward_typed<scalar_t, std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value, std::decay_t<decltype(p)>::value>(
                  mu, logvar, mu_p, logvar_p, seed, row_sums, z, kl_elem, partials);
            } else {
              TORCH_CHECK(false, "fasthvae: a forward pass must sample or compute a KL (a prior needs the KL)");
            }
          });
        });
      });
    });
  }
  return {z, row_sums ? partials.sum(1) : kl_elem};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                     const std::optional<at::Tensor>& mu_p_in,
                                     const std::optional<at::Tensor>& logvar_p_in, uint64_t seed,
                                     const std::optional<at::Tensor>& grad_z_in,
                                     const std::optional<at::Tensor>& grad_kl_in, bool grad_kl_rows) {
  const at::Tensor mu = readable(mu_in), logvar = readable(logvar_in);
  const std::optional<at::Tensor> mu_p = readable(mu_p_in), logvar_p = readable(logvar_p_in),
                                  grad_z = readable(grad_z_in), grad_kl = readable(grad_kl_in);
  const bool prior = mu_p.has_value();
  // Gradients contiguous in the inputs' dim order.
  at::Tensor dmu = at::empty(mu.sizes(), mu.options());
  at::Tensor dlv = at::empty(logvar.sizes(), logvar.options());
  at::Tensor dmu_p = prior ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  at::Tensor dlv_p = prior ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  if (mu.numel() > 0) {
    FHV_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "fasthvae_backward_cpu", [&] {
      with_flag(grad_z.has_value(), [&](auto s) {
        with_flag(grad_kl.has_value(), [&](auto k) {
          with_flag(prior, [&](auto p) {
            with_flag(grad_kl_rows, [&](auto r) {
              if constexpr (backward_reachable(std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value,
                                               std::decay_t<decltype(r)>::value)) {
                backward_typed<scalar_t, std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value, std::decay_t<decltype(p)>::value,
                               std::decay_t<decltype(r)>::value>(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl,
                                                   dmu, dlv, dmu_p, dlv_p);
              } else {
                TORCH_CHECK(false, "fasthvae: a backward pass needs grad_z or grad_kl (row grads only with grad_kl)");
              }
            });
          });
        });
      });
    });
  }
  return {dmu, dlv, dmu_p, dlv_p};
}

}  // namespace fasthvae
