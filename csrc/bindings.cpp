// Python bindings of the fused ops: argument checks, then dispatch
// to the CPU loops or (when built with CUDA) the CUDA kernels. Also the
// fasthvae_cpu ops: the Python ops' CPU paths in C++, for compiled graphs.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "gaussian_ops.h"
#include "mixture_ops.h"
#include "multi_tensor_ops.h"

namespace fasthvae {
namespace {

void check_like(const at::Tensor& ref, const at::Tensor& t, const char* name, const char* ref_name = "mu") {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fasthvae: ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fasthvae: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fasthvae: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.is_contiguous() || t.is_cpu(), "fasthvae: ", name, " must be contiguous on ", t.device());
}

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar,
                  const std::optional<at::Tensor>& mu_p, const std::optional<at::Tensor>& logvar_p) {
  // The CPU loops read any layout (rows of contiguous elements as they lie, anything else copied).
  TORCH_CHECK(mu.is_contiguous() || mu.is_cpu(), "fasthvae: mu must be contiguous on ", mu.device());
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

// ---- the discretized-logistic likelihoods (CPU kernels only) ----

void check_cpu_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fasthvae: ", name, " must be a CPU tensor (the likelihood kernels of "
              "fasthvae._C run on the CPU; CUDA tensors take the Triton kernels), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "fasthvae: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_pixels(const at::Tensor& t, const at::Tensor& params, int64_t channels, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == params.size(0) && t.size(1) == channels &&
                  t.size(2) == params.size(2) && t.size(3) == params.size(3),
              "fasthvae: ", name, " must be [", params.size(0), ", ", channels, ", ", params.size(2), ", ",
              params.size(3), "], got ", t.sizes());
}

void check_pixel_rows(const at::Tensor& t, const at::Tensor& params, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == params.size(0) && t.size(1) == params.size(2) &&
                  t.size(2) == params.size(3) && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.device().is_cpu(),
              "fasthvae: ", name, " must be a contiguous float32 CPU tensor [", params.size(0), ", ",
              params.size(2), ", ", params.size(3), "]");
}

void check_mixture(const at::Tensor& x, const at::Tensor& params) {
  check_cpu_floating(params, "params");
  TORCH_CHECK(params.dim() == 4 && params.size(1) > 0 && params.size(1) % kMixtureParamBlocks == 0,
              "fasthvae: mixture params must be [B, 10K, H, W], got ", params.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "fasthvae: x must be a float32 CPU tensor");
  check_pixels(x, params, 3, "x");
}

std::vector<at::Tensor> mixture_forward(const at::Tensor& x, const at::Tensor& params) {
  check_mixture(x, params);
  return mixture_forward_cpu(x, params);
}

at::Tensor mixture_backward(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                            const at::Tensor& lse_logits, const at::Tensor& grad) {
  check_mixture(x, params);
  check_pixel_rows(nll, params, "nll");
  check_pixel_rows(lse_logits, params, "lse_logits");
  check_pixel_rows(grad, params, "grad");
  return mixture_backward_cpu(x, params, nll, lse_logits, grad);
}

std::vector<at::Tensor> mixture_forward_backward(const at::Tensor& x, const at::Tensor& params) {
  check_mixture(x, params);
  return mixture_forward_backward_cpu(x, params);
}

void check_logistic(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  check_cpu_floating(mean, "mean");
  TORCH_CHECK(mean.is_contiguous(), "fasthvae: mean must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous() &&
                  x.sizes() == mean.sizes(),
              "fasthvae: x must be a contiguous float32 CPU tensor of mean's shape ", mean.sizes());
  check_like(mean, log_scale, "log_scale", "mean");
}

at::Tensor logistic_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  check_logistic(x, mean, log_scale);
  return logistic_forward_cpu(x, mean, log_scale);
}

std::vector<at::Tensor> logistic_backward(const at::Tensor& x, const at::Tensor& mean,
                                          const at::Tensor& log_scale, const at::Tensor& grad) {
  check_logistic(x, mean, log_scale);
  check_like(mean, grad, "grad", "mean");
  return logistic_backward_cpu(x, mean, log_scale, grad);
}

void check_tensor_list(const std::vector<at::Tensor>& tensors, const char* name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_floating_point(), "fasthvae: ", name, "[", i,
                "] must be a floating-point CPU tensor, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "fasthvae: ", name, "[", i,
                "] must be dense (no gaps or overlaps; any order of dims)");
  }
}

// Called directly (not through the dispatcher), the in-place loops mark their tensors modified
// themselves, as any in-place op does: autograd then refuses a changed tensor saved for backward.
void bump_versions(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device().is_cpu(), "fasthvae: ", name,
              " must be one float32 element on the CPU, got ", t.scalar_type(), " with ", t.numel(),
              " elements on ", t.device());
}

// Whether two tensors of one shape lay their elements out alike (the strides of size-1 dims, which
// never move, do not count).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Whether the multi-tensor loops take these lists: CPU floating tensors, each dense, the lists of one
// length with the tensors at one index alike in shape, layout and dtype.
bool multi_tensor_takes(const std::vector<std::vector<at::Tensor>>& lists) {
  for (const auto& list : lists) {
    if (list.size() != lists[0].size()) return false;
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor &t = list[i], &first = lists[0][i];
      if (!t.device().is_cpu() || !t.is_floating_point() || !t.is_non_overlapping_and_dense()) return false;
      if (!same_layout(t, first) || t.scalar_type() != first.scalar_type()) return false;
    }
  }
  return true;
}

at::Tensor multi_tensor_norms(const std::vector<at::Tensor>& tensors) {
  check_tensor_list(tensors, "tensors");
  return multi_tensor_norms_cpu(tensors);
}

void multi_tensor_scale_(const std::vector<at::Tensor>& tensors, const at::Tensor& factor) {
  check_tensor_list(tensors, "tensors");
  check_scalar(factor, "factor");
  multi_tensor_scale_cpu(tensors, factor);
  bump_versions(tensors);
}

void multi_tensor_ema_(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& values,
                       const at::Tensor& weight) {
  TORCH_CHECK(averages.size() == values.size(), "fasthvae: ", averages.size(), " averages but ", values.size(),
              " values");
  check_tensor_list(averages, "averages");
  check_tensor_list(values, "values");
  for (size_t i = 0; i < averages.size(); ++i) {
    const at::Tensor &a = averages[i], &v = values[i];
    TORCH_CHECK(same_layout(a, v) && a.scalar_type() == v.scalar_type(),
                "fasthvae: averages[", i, "] and values[", i, "] differ in shape, strides or dtype: ", a.sizes(),
                a.strides(), a.scalar_type(), " against ", v.sizes(), v.strides(), v.scalar_type());
  }
  check_scalar(weight, "weight");
  multi_tensor_ema_cpu(averages, values, weight);
  bump_versions(averages);
}

void multi_tensor_adamw_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                         const std::vector<at::Tensor>& steps, double lr, double beta1, double beta2,
                         double weight_decay, double eps, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(multi_tensor_takes({params, grads, exp_avgs, exp_avg_sqs}),
              "fasthvae: AdamW's params, grads, exp_avgs and exp_avg_sqs must be lists of one length of dense "
              "floating CPU tensors, alike at each index");
  TORCH_CHECK(steps.size() == params.size(), "fasthvae: ", steps.size(), " step counters for ", params.size(),
              " params");
  for (size_t i = 0; i < steps.size(); ++i) check_scalar(steps[i], "a step counter");
  if (found_inf.has_value()) {
    check_scalar(*found_inf, "found_inf");
    if (found_inf->item<float>() != 0.0f) return;  // a skipped step: nothing changes, the counters neither
  }
  multi_tensor_adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, {lr, beta1, beta2, weight_decay, eps});
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(steps);
}

// ---- the fasthvae_cpu ops -----------------------------------------------------------------
// What the fasthvae:: ops (fasthvae/ops/library.py, library_likelihoods.py) run for CPU tensors
// under the "cpu" backend, as dispatcher ops with C++ kernels: the same loops reached with the
// same layouts, so the same bits. A compiled CPU graph calls them in place of the Python ops
// (fasthvae/ops/compiled_cpu.py), without Python between its kernels. No autograd: they run
// inside graphs that autograd has already been traced through.

// The dims of t by falling stride (ties by dim) when the batch dim is outermost and that order is
// not the plain one (library.memory_order); empty for the plain order and anything else.
std::vector<int64_t> memory_order(const at::Tensor& t) {
  if (t.dim() < 3 || t.is_contiguous()) return {};
  std::vector<int64_t> order(t.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  if (order[0] != 0 || std::is_sorted(order.begin(), order.end())) return {};
  return order;
}

std::optional<at::Tensor> in_order(const std::optional<at::Tensor>& t, const std::vector<int64_t>& order) {
  if (!t.has_value() || order.empty()) return t;
  return t->permute(order);
}

at::Tensor restored(const at::Tensor& t, const std::vector<int64_t>& order) {
  if (!t.defined() || order.empty()) return t;
  std::vector<int64_t> inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
  return t.permute(inverse);
}

std::optional<at::Tensor> seed_on(const std::optional<at::Tensor>& seed, const at::Device& device) {
  if (!seed.has_value()) return seed;
  return seed->reshape({1}).to(device, at::kLong);
}

int64_t kl_mode_of(c10::string_view reduction) { return reduction == "none" ? kElementwiseKL : kRowSumKL; }

// The loops' row sums as the reduction asks (library._finish_kl); an elementwise KL passes through.
at::Tensor finish_kl(const at::Tensor& kl, c10::string_view reduction, const at::Tensor& like) {
  if (reduction == "none" || reduction == "sample") return kl;
  const at::Tensor total = kl.sum();
  if (reduction == "mean") return total / std::max<int64_t>(like.numel(), 1);
  if (reduction == "batchmean") return total / std::max<int64_t>(num_rows(like), 1);
  TORCH_CHECK(reduction == "sum", "fasthvae: unknown reduction ", reduction);
  return total;
}

// (z or undefined, the KL elementwise or per row or undefined) in the callers' dim order.
std::pair<at::Tensor, at::Tensor> forward_in_order(const at::Tensor& mu, const at::Tensor& logvar,
                                                   const std::optional<at::Tensor>& mu_p,
                                                   const std::optional<at::Tensor>& logvar_p,
                                                   const std::optional<at::Tensor>& seed, bool sample,
                                                   int64_t kl_mode) {
  const std::vector<int64_t> order = memory_order(logvar);
  const auto out = forward(*in_order(mu, order), *in_order(logvar, order), in_order(mu_p, order),
                           in_order(logvar_p, order), seed_on(seed, mu.device()), sample, kl_mode);
  const at::Tensor kl = kl_mode == kElementwiseKL ? restored(out[1], order) : out[1];
  return {restored(out[0], order), kl};
}

at::Tensor gaussian_kl_op(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& mu_p,
                          const std::optional<at::Tensor>& logvar_p, c10::string_view reduction) {
  return finish_kl(forward_in_order(mu, logvar, mu_p, logvar_p, std::nullopt, false, kl_mode_of(reduction)).second,
                   reduction, mu);
}

at::Tensor reparameterize_op(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed) {
  return forward_in_order(mu, logvar, std::nullopt, std::nullopt, seed, true, kNoKL).first;
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_op(const at::Tensor& mu, const at::Tensor& logvar,
                                                    const std::optional<at::Tensor>& mu_p,
                                                    const std::optional<at::Tensor>& logvar_p,
                                                    const at::Tensor& seed, c10::string_view reduction) {
  auto [z, kl] = forward_in_order(mu, logvar, mu_p, logvar_p, seed, true, kl_mode_of(reduction));
  return {z, finish_kl(kl, reduction, mu)};
}

std::vector<at::Tensor> gaussian_backward_in_order(const std::optional<at::Tensor>& mu, const at::Tensor& logvar,
                                                   const std::optional<at::Tensor>& mu_p,
                                                   const std::optional<at::Tensor>& logvar_p,
                                                   const std::optional<at::Tensor>& seed,
                                                   const std::optional<at::Tensor>& grad_z,
                                                   const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows) {
  const std::vector<int64_t> order = memory_order(logvar);
  std::optional<at::Tensor> kl_grad = grad_kl;
  if (grad_kl.has_value()) {  // per row: float32 [rows]; elementwise: laid out as logvar
    kl_grad = grad_kl_rows ? grad_kl->contiguous() : *in_order(grad_kl->to(logvar.scalar_type()), order);
  }
  const at::Tensor lv = *in_order(logvar, order);
  const auto grads = backward(mu.has_value() ? *in_order(mu, order) : lv, lv, in_order(mu_p, order),
                              in_order(logvar_p, order), seed_on(seed, logvar.device()), in_order(grad_z, order),
                              kl_grad, grad_kl_rows);
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) {
    if (g.defined()) out.push_back(restored(g, order));
  }
  return out;
}

// The shared backward as two ops of fixed arity (a Tensor[] return would take Inductor's C++ wrapper
// back into Python): (dmu, dlogvar) without a prior, and with one (dmu, dlogvar, dmu_p, dlogvar_p).
std::tuple<at::Tensor, at::Tensor> gaussian_backward_op(const std::optional<at::Tensor>& mu, const at::Tensor& logvar,
                                                        const std::optional<at::Tensor>& seed,
                                                        const std::optional<at::Tensor>& grad_z,
                                                        const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows) {
  const auto g =
      gaussian_backward_in_order(mu, logvar, std::nullopt, std::nullopt, seed, grad_z, grad_kl, grad_kl_rows);
  return {g[0], g[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_backward_with_prior_op(
    const std::optional<at::Tensor>& mu, const at::Tensor& logvar, const at::Tensor& mu_p, const at::Tensor& logvar_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& grad_z,
    const std::optional<at::Tensor>& grad_kl, bool grad_kl_rows) {
  const auto g = gaussian_backward_in_order(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, grad_kl_rows);
  return {g[0], g[1], g[2], g[3]};
}

// torch.randint(0, high, (), dtype=torch.int64) from PyTorch's CPU generator (library.cpu_seed).
at::Tensor cpu_seed_op(int64_t high) { return at::randint(0, high, {}, at::TensorOptions().dtype(at::kLong)); }

std::tuple<at::Tensor, at::Tensor> mixture_nll_with_grad_op(const at::Tensor& x, const at::Tensor& params) {
  const auto out = mixture_forward_backward(x, params);
  return {out[0], out[1]};
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

TORCH_LIBRARY(fasthvae_cpu, m) {
  m.def("gaussian_kl(Tensor mu, Tensor logvar, Tensor? mu_p, Tensor? logvar_p, str reduction) -> Tensor");
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor seed) -> Tensor");
  m.def("sample_and_kl(Tensor mu, Tensor logvar, Tensor? mu_p, Tensor? logvar_p, Tensor seed, str reduction) "
        "-> (Tensor, Tensor)");
  m.def("gaussian_backward(Tensor? mu, Tensor logvar, Tensor? seed, Tensor? grad_z, Tensor? grad_kl, "
        "bool grad_kl_rows) -> (Tensor, Tensor)");
  m.def("gaussian_backward_with_prior(Tensor? mu, Tensor logvar, Tensor mu_p, Tensor logvar_p, Tensor? seed, "
        "Tensor? grad_z, Tensor? grad_kl, bool grad_kl_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_seed(int high) -> Tensor", {at::Tag::nondeterministic_seeded});
  m.def("mixture_nll_with_grad(Tensor x, Tensor params) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae_cpu, CPU, m) {
  m.impl("gaussian_kl", &fasthvae::gaussian_kl_op);
  m.impl("reparameterize", &fasthvae::reparameterize_op);
  m.impl("sample_and_kl", &fasthvae::sample_and_kl_op);
  m.impl("gaussian_backward", &fasthvae::gaussian_backward_op);
  m.impl("gaussian_backward_with_prior", &fasthvae::gaussian_backward_with_prior_op);
  m.impl("mixture_nll_with_grad", &fasthvae::mixture_nll_with_grad_op);
}

// No tensor argument to dispatch on: the kernel for every key.
TORCH_LIBRARY_IMPL(fasthvae_cpu, CompositeExplicitAutograd, m) { m.impl("cpu_seed", &fasthvae::cpu_seed_op); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasthvae fused ops: Gaussian (CPU and CUDA kernels), discretized logistic likelihoods (CPU), multi-tensor bookkeeping (CPU)";
  m.def("forward", &fasthvae::forward, "fused reparameterize / Gaussian KL forward");
  m.def("backward", &fasthvae::backward, "fused reparameterize / Gaussian KL backward");
  m.def("mixture_forward", &fasthvae::mixture_forward, "discretized logistic mixture: nll and lse of logits per pixel");
  m.def("mixture_backward", &fasthvae::mixture_backward, "discretized logistic mixture: gradient in params");
  m.def("mixture_forward_backward", &fasthvae::mixture_forward_backward,
        "discretized logistic mixture: nll per pixel and the gradient of its sum in params, in one pass");
  m.def("logistic_forward", &fasthvae::logistic_forward, "discretized logistic: nll per sub-pixel");
  m.def("logistic_backward", &fasthvae::logistic_backward, "discretized logistic: gradients in mean, log-scale");
  m.def("multi_tensor_takes", &fasthvae::multi_tensor_takes, "whether the multi-tensor loops take these lists");
  m.def("multi_tensor_norms", &fasthvae::multi_tensor_norms, "each tensor's 2-norm, float32 [n]");
  m.def("multi_tensor_scale_", &fasthvae::multi_tensor_scale_, "each tensor *= factor, in place");
  m.def("multi_tensor_ema_", &fasthvae::multi_tensor_ema_, "averages += (values - averages) * weight, in place");
  m.def("multi_tensor_adamw_", &fasthvae::multi_tensor_adamw_, "one AdamW step of every parameter, in place");
  m.def("has_cuda", &fasthvae::has_cuda, "whether the CUDA kernels were built");
  m.def("cpu_isa", &fasthvae::cpu_isa, "the CPU loops' active ISA path");
  m.def("cpu_isas", &fasthvae::cpu_isas, "the ISA paths this CPU can run, best first");
  m.def("set_cpu_isa", &fasthvae::set_cpu_isa, "use this ISA path (avx512, avx2, baseline; '' for the best)");
}
