// Host-side entry points of the multi-tensor loops (CPU): one call over a list
// of tensors for the optimizer step's bookkeeping, no dispatcher call per tensor.
//
// multi_tensor_norms: each tensor's 2-norm, float32 [n] (squares summed in
//   double, so a norm carries only its final rounding).
// multi_tensor_scale_: each tensor *= factor (a one-element float32 tensor),
//   in place, computed as torch's mul_ by a 0-dim tensor (the tensor's opmath
//   type, one rounding); a factor of 1 leaves them as they are.
// multi_tensor_ema_: averages[i] += (values[i] - averages[i]) * weight, in
//   place, with the roundings of torch's foreach sub, mul_ and add_ (each
//   result rounded to the tensors' dtype).
// multi_tensor_adamw_: one AdamW step (decoupled weight decay) of every
//   parameter: steps[i] (a float32 scalar, as torch keeps it) += 1, then
//   p = p * (1 - lr * wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   with m = beta1 m + (1 - beta1) g and v = beta2 v + (1 - beta2) g^2 updated
//   in place; arithmetic in the tensors' opmath type, bias corrections in double.
// Tensors: CPU, floating, non-overlapping and dense (any strides; pairs alike).
// Threads share fixed blocks of the tensors; the results do not depend on the
// thread count.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fasthvae {

at::Tensor multi_tensor_norms_cpu(const std::vector<at::Tensor>& tensors);
void multi_tensor_scale_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& factor);
void multi_tensor_ema_cpu(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& values,
                          const at::Tensor& weight);

struct AdamWHyper {
  double lr, beta1, beta2, weight_decay, eps;
};

void multi_tensor_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& steps, const AdamWHyper& h);

}  // namespace fasthvae
