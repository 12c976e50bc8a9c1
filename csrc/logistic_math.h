// The discretized logistic of one 8-bit sub-pixel, shared by the CPU loops of
// the mixture and single-logistic likelihoods (mixture_cpu.cpp): log P(x) and
// its gradient in the mean and the log-scale, float32. As torch.clamp's, the
// log-scale's gradient is zero at the clamp and below it.
//
// x and the mean are in [-1, 1] space, where the 256 bins have half-width
// 1/255 and the two edge bins are open (x = -1 takes all mass below, x = 1 all
// mass above). The log-scale is clamped below at -7. Inside, a bin's mass
// sigmoid(plus) - sigmoid(minus) is computed as
// sigmoid(plus) * sigmoid(-minus) * (1 - e^-w), with w = plus - minus the bin's
// width in standardized units: no cancellation in the tails or for wide
// scales. Where that mass is <= 1e-5 the log density at the bin centre stands
// in for it (the PixelCNN++ rule, which the reference formula follows too).
// Every branch is computed in every lane (SIMD) and each element picks its own.
#pragma once

#include <cmath>

#include "gaussian_math.h"  // FHV_HD

namespace fasthvae {

constexpr float kMinLogScale = -7.0f;
constexpr float kHalfBin = 1.0f / 255.0f;
constexpr float kEdge = 0.999f;
constexpr float kMinMass = 1e-5f;
constexpr float kLogHalfBins = 4.8481164632f;  // log(127.5)

// e^t for t >= -87, else e^-87 (~1.6e-38, the order of the smallest normal float): glibc's vector
// expf leaves its SIMD path for arguments that underflow (those lanes are redone in scalar code on
// AVX2 and SSE, several times slower), so arguments that can be very negative are floored first.
constexpr float kExpFloor = -87.0f;

FHV_HD float exp_floored(float t) { return expf(clamp_below(t, kExpFloor)); }

// cond ? a : b as a bit select: GCC turns a plain ternary next to the vector libm calls into a
// branch, and then vectorizes the loop for AVX-512 (masked) but not for AVX2 or SSE.
FHV_HD float pick(bool cond, float a, float b) {
#if defined(__CUDA_ARCH__)
  return cond ? a : b;
#else
  uint32_t ab, bb;
  __builtin_memcpy(&ab, &a, 4);
  __builtin_memcpy(&bb, &b, 4);
  const uint32_t take_a = 0u - static_cast<uint32_t>(cond);
  const uint32_t rb = (ab & take_a) | (bb & ~take_a);
  float r;
  __builtin_memcpy(&r, &rb, 4);
  return r;
#endif
}

// sigmoid(t), sigmoid(-t) and 1 / (1 + e^-|t|), from e = e^-|t| alone.
struct Sigmoids {
  float pos, neg, r;
};

FHV_HD Sigmoids sigmoids(float t, float e) {
  const float r = 1.0f / (1.0f + e);
  const bool positive = t >= 0.0f;
  return {pick(positive, r, e * r), pick(positive, e * r, r), r};
}

FHV_HD float positive_part(float t) { return clamp_below(t, 0.0f); }

// log P(x) = a + log(b) under the logistic (mean, e^log_scale), from log sigmoid(t) =
// -max(-t, 0) + log(1 / (1 + e^-|t|)): an element picks its branch's a and b. b lies in
// (kMinMass, 1] on every branch (inside a bin, mass = e^a b with a <= 0 and mass > kMinMass; the
// edges and the density have b >= 1/4), so the b's of several sub-pixels multiply without
// underflow and one logf serves them all. d_mean, d_log_scale: the gradient of log P (zero in the
// log-scale at and below the clamp).
struct LogProbParts {
  float a, b;
};

FHV_HD LogProbParts logistic_log_prob_parts(float x, float mean, float log_scale, float& d_mean,
                                            float& d_log_scale) {
  const float ls = clamp_below(log_scale, kMinLogScale);
  const float inv = expf(-ls);
  const float centered = x - mean;
  const float half = kHalfBin * inv;  // half the bin's width in standardized units
  const float mid = inv * centered, plus = mid + half, minus = mid - half;
  // e^-|plus| and e^-|minus| from s = e^-|mid| and q = e^-half: two products instead of two exps.
  const float s = exp_floored(-fabsf(mid));
  const float expm1_half = expm1f(-half);
  const float q = 1.0f + expm1_half;
  const float exp_neg_mid = pick(mid >= 0.0f, s, 1.0f / s), exp_mid = pick(mid >= 0.0f, 1.0f / s, s);
  const float e_plus = pick(plus >= 0.0f, q * exp_neg_mid, s / q);
  const float e_minus = pick(minus >= 0.0f, s / q, q * exp_mid);
  const Sigmoids sp = sigmoids(plus, e_plus), sm = sigmoids(minus, e_minus), sd = sigmoids(mid, s);
  const float w = 2.0f * half;
  const float neg_expm1_w = -expm1_half * (1.0f + q);  // 1 - e^-w = (1 - q)(1 + q)
  const float mass = sp.pos * sm.neg * neg_expm1_w;
  const bool low = x < -kEdge, high = x > kEdge, inside = mass > kMinMass;
  const float a_low = -positive_part(-plus), a_high = -positive_part(minus);
  const float a_density = mid - ls - 2.0f * positive_part(mid) - kLogHalfBins;
  const float a = pick(low, a_low, pick(high, a_high, pick(inside, a_low + a_high, a_density)));
  const float b = pick(low, sp.r, pick(high, sm.r, pick(inside, sp.r * sm.r * neg_expm1_w, sd.r * sd.r)));
  // d/dmean and d/dls of each branch (dplus/dmean = -inv, dplus/dls = -plus, likewise minus, mid).
  const float w_over_expm1_w = w * (1.0f - neg_expm1_w) / neg_expm1_w;  // w / (e^w - 1)
  const float g_mid = 1.0f - 2.0f * sd.pos;
  const float gm =
      pick(low, -inv * sp.neg, pick(high, inv * sm.pos, pick(inside, -inv * (sp.neg - sm.pos), -inv * g_mid)));
  const float gl = pick(low, -plus * sp.neg,
                        pick(high, minus * sm.pos,
                             pick(inside, -plus * sp.neg + minus * sm.pos - w_over_expm1_w, -mid * g_mid - 1.0f)));
  d_mean = gm;
  d_log_scale = pick(log_scale <= kMinLogScale, 0.0f, gl);
  return {a, b};
}

FHV_HD float logistic_log_prob(float x, float mean, float log_scale, float& d_mean, float& d_log_scale) {
  const LogProbParts parts = logistic_log_prob_parts(x, mean, log_scale, d_mean, d_log_scale);
  return parts.a + logf(parts.b);
}

}  // namespace fasthvae
