// Elementwise math shared by the CPU loops (gaussian_cpu.cpp) and the CUDA
// kernels (gaussian_cuda.cu): the counter-based RNG, the Gaussian KL terms
// and their gradients. Everything is computed in float32.
//
// The RNG is Philox-4x32-10 with the exact conventions of Triton's
// `tl.randn4x(seed, group)`: element i's noise is output i % 4 of group i / 4
// (one Philox call and two Box-Muller pairs per four elements), so every
// backend draws the same noise for the same (seed, element index). The Triton
// kernels and the pure-PyTorch reference (fasthvae/ops/philox.py) follow the
// same recipe.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FHV_HD __host__ __device__ __forceinline__
#else
#define FHV_HD inline __attribute__((always_inline))
#endif

namespace fasthvae {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

FHV_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Triton's uint_to_uniform_float: a uint32 to a float in [0, 1).
FHV_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i < 0 ? ~i : i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// max(x, lo) for non-NaN x, written as a bit select: GCC neither vectorizes
// fmaxf nor keeps a plain ternary branch-free ahead of the logf that follows.
FHV_HD float clamp_below(float x, float lo) {
#if defined(__CUDA_ARCH__)
  return fmaxf(x, lo);
#else
  uint32_t xb, lb;
  __builtin_memcpy(&xb, &x, 4);
  __builtin_memcpy(&lb, &lo, 4);
  const uint32_t take_lo = 0u - static_cast<uint32_t>(x < lo);
  const uint32_t rb = (xb & ~take_lo) | (lb & take_lo);
  float r;
  __builtin_memcpy(&r, &rb, 4);
  return r;
#endif
}

// Philox-4x32-10 of counter (counter_lo, counter_hi, 0, 0) under key `seed`:
// Triton's tl.randint4x(seed, counter).
FHV_HD void philox4(uint64_t seed, uint64_t counter, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                    uint32_t& c3) {
  c0 = static_cast<uint32_t>(counter);
  c1 = static_cast<uint32_t>(counter >> 32);
  c2 = 0u;
  c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// Box-Muller of two uniform draws, both branches: Triton's pair_uniform_to_normal.
FHV_HD void pair_to_normal(uint32_t a, uint32_t b, float& n_cos, float& n_sin) {
  const float u1 = clamp_below(uint_to_uniform(a), 1.0e-7f);
  const float theta = 6.2831855f * uint_to_uniform(b);
  const float r = sqrtf(-2.0f * logf(u1));
  n_cos = r * cosf(theta);
  n_sin = r * sinf(theta);
}

// The four normals of noise group `group`: Triton's tl.randn4x(seed, group).
FHV_HD void philox_randn4(uint64_t seed, uint64_t group, float& n0, float& n1, float& n2,
                          float& n3) {
  uint32_t c0, c1, c2, c3;
  philox4(seed, group, c0, c1, c2, c3);
  pair_to_normal(c0, c1, n0, n1);
  pair_to_normal(c2, c3, n2, n3);
}

// KL(N(mu, e^lv) || N(0, 1)) = 0.5 * (mu^2 + (e^lv - 1 - lv)); expm1 keeps the
// bracket accurate for lv near 0.
FHV_HD float kl_std_normal(float mu, float lv) {
  return 0.5f * (mu * mu + (expm1f(lv) - lv));
}

// KL(N(mu, e^lv) || N(mu_p, e^lvp)) = 0.5 * ((e^dl - 1 - dl) + d^2 e^-lvp),
// with d = mu - mu_p and dl = lv - lvp.
FHV_HD float kl_gaussians(float mu, float lv, float mu_p, float lvp) {
  const float d = mu - mu_p;
  const float dl = lv - lvp;
  return 0.5f * ((expm1f(dl) - dl) + d * d * expf(-lvp));
}

// Gradients of the KL terms, scaled by the upstream gradient g.
FHV_HD void kl_std_normal_grad(float mu, float lv, float g, float& dmu, float& dlv) {
  dmu = g * mu;
  dlv = 0.5f * g * expm1f(lv);
}

FHV_HD void kl_gaussians_grad(float mu, float lv, float mu_p, float lvp, float g,
                              float& dmu, float& dlv, float& dmu_p, float& dlvp) {
  const float d = mu - mu_p;
  const float inv_var_p = expf(-lvp);
  const float ratio_m1 = expm1f(lv - lvp);
  dmu = g * d * inv_var_p;
  dmu_p = -dmu;
  dlv = 0.5f * g * ratio_m1;
  dlvp = -0.5f * g * (ratio_m1 + d * d * inv_var_p);
}

// Reparameterized sample z = mu + e^(lv/2) * eps and d z / d lv = e^(lv/2) * eps / 2.
FHV_HD float reparameterize(float mu, float lv, float eps) {
  return mu + expf(0.5f * lv) * eps;
}

FHV_HD float reparameterize_grad_logvar(float lv, float eps, float g) {
  return 0.5f * g * expf(0.5f * lv) * eps;
}

}  // namespace fasthvae
