// The ISA level the CPU loops run, and float16 staging with F16C (cpu_common.h).
#include "cpu_common.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "gaussian_ops.h"

namespace fasthvae {

// ---- ISA levels -----------------------------------------------------------

namespace {

constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if FHV_X86_LEVELS
  __builtin_cpu_init();
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("x86-64-v4");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("x86-64-v3");
  return true;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      const Isa isa = static_cast<Isa>(i);
      TORCH_CHECK(cpu_has(isa), "fasthvae: CPU ISA path '", name,
                  "' was asked for (FASTHVAE_CPU_ISA or set_cpu_isa) but this CPU lacks it");
      return isa;
    }
  }
  TORCH_CHECK(false, "fasthvae: unknown CPU ISA path '", name, "'; choose avx512, avx2 or baseline");
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kBaseline;
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet (FASTHVAE_CPU_ISA, else the best level)

}  // namespace

Isa active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("FASTHVAE_CPU_ISA");
    isa = static_cast<int>(env != nullptr && *env != '\0' ? parse_isa(env) : best_isa());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}


std::string cpu_isa() { return kIsaNames[static_cast<int>(active_isa())]; }

void set_cpu_isa(const std::string& name) {
  g_isa.store(static_cast<int>(name.empty() ? best_isa() : parse_isa(name)), std::memory_order_relaxed);
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int i = 2; i >= 0; --i) {
    if (cpu_has(static_cast<Isa>(i))) names.emplace_back(kIsaNames[i]);
  }
  return names;
}

#if FHV_F16C
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
#endif

}  // namespace fasthvae
