// Host-side entry points of the fused discretized-logistic likelihoods (CPU).
//
// mixture_forward: -log P(x) per pixel of a discretized mixture of K logistics
//   (PixelCNN++ / VDVAE): x [B, 3, H, W] float32 in [0, 1] (values k / 255),
//   params [B, 10K, H, W] in channel blocks of K: logits, means of R, G, B,
//   log-scales of R, G, B, raw channel coefficients (tanh inside: G's mean
//   moves with R by the first, B's with R and G by the second and third).
//   Returns {nll, lse_logits}: float32 [B, H, W] each, lse_logits being the
//   per-pixel logsumexp of the logits, which the backward pass takes back.
//   Any strides (channels_last, views, broadcast dims).
// mixture_backward: the gradient of sum(grad * nll) in params, laid out as
//   empty_like(params); grad: float32 [B, H, W], contiguous.
// mixture_forward_backward: both passes at once, {nll, the gradient of sum(nll) in params (float32,
//   laid out as empty_like(params))}, for a step that takes the backward pass (which then scales
//   the gradient by each pixel's grad).
// logistic_forward / logistic_backward: the single discretized logistic per
//   sub-pixel, elementwise over contiguous tensors of one shape (x float32,
//   mean and log-scale of one dtype); nll and gradients in that dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fasthvae {

constexpr int64_t kMixtureParamBlocks = 10;  // params per component: logit, 3 means, 3 log-scales, 3 coefficients

std::vector<at::Tensor> mixture_forward_cpu(const at::Tensor& x, const at::Tensor& params);
at::Tensor mixture_backward_cpu(const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
                                const at::Tensor& lse_logits, const at::Tensor& grad);
std::vector<at::Tensor> mixture_forward_backward_cpu(const at::Tensor& x, const at::Tensor& params);

at::Tensor logistic_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale);
std::vector<at::Tensor> logistic_backward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                              const at::Tensor& log_scale, const at::Tensor& grad);

}  // namespace fasthvae
