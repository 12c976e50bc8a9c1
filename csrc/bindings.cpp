// Python bindings of the fused Gaussian ops: argument checks, then dispatch
// to the CPU loops or (when built with CUDA) the CUDA kernels.
#include <torch/extension.h>

#include "gaussian_ops.h"

namespace fasthvae {
namespace {

void check_like(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fasthvae: ", name, " has shape ", t.sizes(),
              " but mu has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fasthvae: ", name, " has dtype ",
              t.scalar_type(), " but mu has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fasthvae: ", name, " is on ", t.device(),
              " but mu is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "fasthvae: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar,
                  const std::optional<at::Tensor>& mu_p, const std::optional<at::Tensor>& logvar_p) {
  TORCH_CHECK(mu.is_contiguous(), "fasthvae: mu must be contiguous");
  TORCH_CHECK(mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kHalf ||
                  mu.scalar_type() == at::kBFloat16,
              "fasthvae: fused kernels take float32, float16 or bfloat16, got ", mu.scalar_type());
  check_like(mu, logvar, "logvar");
  TORCH_CHECK(mu_p.has_value() == logvar_p.has_value(),
              "fasthvae: pass both mu_p and logvar_p, or neither");
  if (mu_p.has_value()) {
    check_like(mu, *mu_p, "mu_p");
    check_like(mu, *logvar_p, "logvar_p");
  }
}

// The noise seed: a one-element int64 tensor on the inputs' device, needed when noise is drawn.
// The CUDA kernels read it on the device (no host value in a launch a CUDA graph captures).
void check_seed(const at::Tensor& mu, const std::optional<at::Tensor>& seed, bool needed) {
  TORCH_CHECK(!needed || seed.has_value(), "fasthvae: drawing noise needs a seed");
  if (!seed.has_value()) return;
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == mu.device(),
              "fasthvae: the seed must be one int64 element on ", mu.device(), ", got ",
              seed->scalar_type(), " with ", seed->numel(), " elements on ", seed->device());
}

uint64_t host_seed(const std::optional<at::Tensor>& seed) {
  return seed.has_value() ? static_cast<uint64_t>(seed->item<int64_t>()) : 0u;
}

#ifdef FASTHVAE_WITH_CUDA
const int64_t* device_seed(const std::optional<at::Tensor>& seed) {
  return seed.has_value() ? seed->const_data_ptr<int64_t>() : nullptr;
}
#endif

std::vector<at::Tensor> forward(const at::Tensor& mu, const at::Tensor& logvar,
                                const std::optional<at::Tensor>& mu_p,
                                const std::optional<at::Tensor>& logvar_p,
                                const std::optional<at::Tensor>& seed, bool sample, int64_t kl_mode) {
  check_inputs(mu, logvar, mu_p, logvar_p);
  check_seed(mu, seed, sample);
  TORCH_CHECK(kl_mode >= kNoKL && kl_mode <= kRowSumKL, "fasthvae: bad kl_mode ", kl_mode);
  if (mu.is_cuda()) {
#ifdef FASTHVAE_WITH_CUDA
    return forward_cuda(mu, logvar, mu_p, logvar_p, device_seed(seed), sample, kl_mode);
#else
    TORCH_CHECK(false, "fasthvae: this build of fasthvae._C has no CUDA kernels");
#endif
  }
  TORCH_CHECK(mu.device().is_cpu(), "fasthvae: unsupported device ", mu.device());
  return forward_cpu(mu, logvar, mu_p, logvar_p, host_seed(seed), sample, kl_mode);
}

std::vector<at::Tensor> backward(const at::Tensor& mu, const at::Tensor& logvar,
                                 const std::optional<at::Tensor>& mu_p,
                                 const std::optional<at::Tensor>& logvar_p,
                                 const std::optional<at::Tensor>& seed,
                                 const std::optional<at::Tensor>& grad_z,
                                 const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows) {
  check_inputs(mu, logvar, mu_p, logvar_p);
  check_seed(mu, seed, grad_z.has_value());
  if (grad_z.has_value()) check_like(mu, *grad_z, "grad_z");
  if (grad_kl.has_value()) {
    if (grad_kl_rows) {
      TORCH_CHECK(grad_kl->dim() == 1 && grad_kl->size(0) == num_rows(mu) &&
                      grad_kl->scalar_type() == at::kFloat && grad_kl->is_contiguous() &&
                      grad_kl->device() == mu.device(),
                  "fasthvae: per-row grad_kl must be a contiguous float32 vector of ",
                  num_rows(mu), " elements on ", mu.device());
    } else {
      check_like(mu, *grad_kl, "grad_kl");
    }
  }
  if (mu.is_cuda()) {
#ifdef FASTHVAE_WITH_CUDA
    return backward_cuda(mu, logvar, mu_p, logvar_p, device_seed(seed), grad_z, grad_kl, grad_kl_rows);
#else
    TORCH_CHECK(false, "fasthvae: this build of fasthvae._C has no CUDA kernels");
#endif
  }
  TORCH_CHECK(mu.device().is_cpu(), "fasthvae: unsupported device ", mu.device());
  return backward_cpu(mu, logvar, mu_p, logvar_p, host_seed(seed), grad_z, grad_kl, grad_kl_rows);
}

bool has_cuda() {
#ifdef FASTHVAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fasthvae

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasthvae fused Gaussian ops (CPU and CUDA kernels)";
  m.def("forward", &fasthvae::forward, "fused reparameterize / Gaussian KL forward");
  m.def("backward", &fasthvae::backward, "fused reparameterize / Gaussian KL backward");
  m.def("has_cuda", &fasthvae::has_cuda, "whether the CUDA kernels were built");
  m.def("cpu_isa", &fasthvae::cpu_isa, "the CPU loops' active ISA path");
  m.def("cpu_isas", &fasthvae::cpu_isas, "the ISA paths this CPU can run, best first");
  m.def("set_cpu_isa", &fasthvae::set_cpu_isa, "use this ISA path (avx512, avx2, baseline; '' for the best)");
}
