// Host-side entry points of the fused Gaussian ops (CPU and CUDA).
//
// forward: z = mu + exp(logvar / 2) * eps (if `sample`) and the KL of
//   N(mu, exp(logvar)) to N(mu_p, exp(logvar_p)) (or to N(0, I) without a prior):
//   kl_mode 0: no KL, 1: elementwise KL in the input dtype, 2: float32 sums
//   over every dim but the first (shape [rows]).
// backward: gradients of sum(grad_z * z) + sum(grad_kl * kl) with respect to
//   mu, logvar, mu_p, logvar_p; grad_kl is elementwise (input dtype) or, when
//   grad_kl_rows, one float32 value per row. eps is regenerated from the seed.
// All tensors are contiguous, of one shape, dtype and device (checked in
// bindings.cpp).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>
#include <string>
#include <vector>

namespace fasthvae {

enum KLMode : int64_t { kNoKL = 0, kElementwiseKL = 1, kRowSumKL = 2 };

// The dtypes the kernels are compiled for: float64 runs the PyTorch reference (fasthvae.ops.backend).
#define FHV_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The flag combinations the ops reach, the only ones compiled: a forward pass samples or computes a
// KL (a prior only with the KL); a backward pass has a gradient for z or the KL (row gradients only
// for the KL; a prior without a KL gradient gets zeros).
constexpr bool forward_reachable(bool sample, bool kl, bool prior) { return (sample || kl) && (kl || !prior); }
constexpr bool backward_reachable(bool grad_z, bool grad_kl, bool rows) {
  return (grad_z || grad_kl) && (grad_kl || !rows);
}

std::vector<at::Tensor> forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                    const std::optional<at::Tensor>& mu_p,
                                    const std::optional<at::Tensor>& logvar_p, uint64_t seed,
                                    bool sample, int64_t kl_mode);

std::vector<at::Tensor> backward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                     const std::optional<at::Tensor>& mu_p,
                                     const std::optional<at::Tensor>& logvar_p, uint64_t seed,
                                     const std::optional<at::Tensor>& grad_z,
                                     const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows);

#ifdef FASTHVAE_WITH_CUDA
// The CUDA kernels read the seed from device memory (`seed`: one int64, null when no noise is drawn).
std::vector<at::Tensor> forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                     const std::optional<at::Tensor>& mu_p,
                                     const std::optional<at::Tensor>& logvar_p, const int64_t* seed,
                                     bool sample, int64_t kl_mode);

std::vector<at::Tensor> backward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                      const std::optional<at::Tensor>& mu_p,
                                      const std::optional<at::Tensor>& logvar_p, const int64_t* seed,
                                      const std::optional<at::Tensor>& grad_z,
                                      const std::optional<at::Tensor>& grad_kl,
                                      bool grad_kl_rows);
#endif

// Rows are the first dim (1 for a 0-dim tensor); every row has numel / rows elements.
// The CPU loops' ISA path: the active one, every one this CPU runs, and a choice by name
// ("avx512", "avx2", "baseline"; "" for the best). FASTHVAE_CPU_ISA sets the first choice.
std::string cpu_isa();
std::vector<std::string> cpu_isas();
void set_cpu_isa(const std::string& name);

inline int64_t num_rows(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

// Calls fn with std::integral_constant<bool, flag>.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace fasthvae
