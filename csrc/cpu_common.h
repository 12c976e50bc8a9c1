// What the CPU loops share: glibc's vector libm, the x86-64 ISA levels each loop
// is compiled for and the one that runs, and float32 staging of float16 /
// bfloat16 data. The loops are written once as `omp simd` chunks, inlined into
// one wrapper per ISA level (AVX-512 = x86-64-v4, AVX2 = x86-64-v3, baseline)
// and dispatched at run time on active_isa(): the best level the CPU has, or
// the one named by FASTHVAE_CPU_ISA / set_cpu_isa (so every path can be tested
// on any machine that has it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// Vector variants of libm from glibc's libmvec (2.35+); <math.h> only declares them under
// -ffast-math, which we do not want (it breaks inf handling).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float expm1f(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
float sinf(float);
}
#define FHV_X86_LEVELS 1
#define FHV_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FHV_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FHV_X86_LEVELS 0
#endif
// The chunk loops are inlined into one wrapper per ISA level, which vectorizes them for it.
#define FHV_INLINE inline __attribute__((always_inline))

namespace fasthvae {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA level the loops run (FASTHVAE_CPU_ISA, else the best the CPU has, until set_cpu_isa).
Isa active_isa();

// `return name_<level> targs (args...)` for the active level, where a loop has one wrapper per
// level (name_avx512, name_avx2, name_baseline). `targs`: FHV_TARGS(...) for a template's
// arguments, or empty.
#define FHV_TARGS(...) <__VA_ARGS__>
#if FHV_X86_LEVELS
#define FHV_ISA_DISPATCH(name, targs, ...)     \
  switch (active_isa()) {                       \
    case Isa::kAvx512:                          \
      return name##_avx512 targs(__VA_ARGS__);  \
    case Isa::kAvx2:                            \
      return name##_avx2 targs(__VA_ARGS__);    \
    default:                                    \
      return name##_baseline targs(__VA_ARGS__); \
  }
#else
#define FHV_ISA_DISPATCH(name, targs, ...) return name##_baseline targs(__VA_ARGS__);
#endif

// ---- dtype staging: the loops compute on float arrays ----------------------

#if defined(__x86_64__) && defined(__GNUC__)
#define FHV_F16C 1
// at::Half <-> float, 8 at a time with F16C (round to nearest even, like at::Half's own scalar
// conversion, which is bit manipulation and slower).
void half_to_float_f16c(const at::Half* src, int64_t n, float* dst);
void float_to_half_f16c(const float* src, int64_t n, at::Half* dst);
bool has_f16c();
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

}  // namespace fasthvae
