// oneDNN's convolution primitives called directly (built once per shape, executed on the tensors'
// memory), for bench_onednn_calls (what ATen's call path around the same primitives costs) and
// bench_weight_gradients (the backward-weights primitive alone).
// bf16 or f32 NHWC activations, weights reordered once into the forward and backward-data primitives' own
// layouts (oneDNN may choose a different one for each), f32 bias;
// the backward's weight and bias gradients in f32 (the weight gradient reordered to OHWI). Grouped
// where the weight's input channels are a fraction of x's (weights [O, C / groups, K, K]).
#include <torch/extension.h>

#include <map>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <tuple>

#include "onednn_conv_primitives.h"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;
using fasthvae_onednn::engine;
using fasthvae_onednn::stream;

struct Conv {
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
  dnnl::reorder weight_grad_to_ohwi;
  memory::desc src, dst, bias, weights, weights_backward, weight_grad, weight_grad_ohwi;
  tag ohwi;  // the user's channels_last weights [O, C / groups, K, K]: ohwi, or gohwi where grouped
  std::string kernels;
};

// One (batch, in channels, side, out channels, kernel, groups, data type) -> its primitives; stride
// 1, "same" padding.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, dt>;

Conv& conv_for(int64_t n, int64_t c, int64_t side, int64_t o, int64_t k, int64_t groups, dt data) {
  static std::map<Key, std::unique_ptr<Conv>> cache;
  auto& slot = cache[Key{n, c, side, o, k, groups, data}];
  if (slot) return *slot;
  auto conv = std::make_unique<Conv>();
  Conv& p = *conv;
  const int64_t pad = k / 2;
  const memory::dims wdims =
      groups == 1 ? memory::dims{o, c, k, k} : memory::dims{groups, o / groups, c / groups, k, k};
  p.ohwi = groups == 1 ? tag::ohwi : tag::gohwi;
  p.src = memory::desc({n, c, side, side}, data, tag::nhwc);
  p.dst = memory::desc({n, o, side, side}, data, tag::nhwc);
  p.bias = memory::desc({o}, dt::f32, tag::a);
  const auto [fwd, bwd_data, bwd_weights] =
      fasthvae_onednn::conv_descs(p.src, p.dst, p.bias, wdims, data, {pad, pad}, ": try --dtype float32");
  p.weights = fwd.weights_desc();
  p.weights_backward = bwd_data.weights_desc();
  p.weight_grad = bwd_weights.diff_weights_desc();
  p.weight_grad_ohwi = memory::desc(wdims, dt::f32, p.ohwi);
  p.forward = dnnl::convolution_forward(fwd);
  p.backward_data = dnnl::convolution_backward_data(bwd_data);
  p.backward_weights = dnnl::convolution_backward_weights(bwd_weights);
  p.weight_grad_to_ohwi = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p.weight_grad, engine(), p.weight_grad_ohwi));
  p.kernels = std::string(fwd.impl_info_str()) + " / " + bwd_data.impl_info_str() + " / " + bwd_weights.impl_info_str();
  slot = std::move(conv);
  return *slot;
}

dt data_type_of(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat32,
      "tensors must be bfloat16 or float32, not ", t.scalar_type());
  return t.scalar_type() == torch::kBFloat16 ? dt::bf16 : dt::f32;
}

Conv& conv_of(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == x.size(3), "x must be [N, C, S, S]");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels_last");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) >= 1 && x.size(1) % weight.size(1) == 0 &&
      weight.size(0) % (x.size(1) / weight.size(1)) == 0 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
      "weight must be [O, C / groups, K, K] with an odd K, C x's channels and groups dividing O");
  return conv_for(x.size(0), x.size(1), x.size(2), weight.size(0), weight.size(2), x.size(1) / weight.size(1),
      data_type_of(x));
}

}  // namespace

// The weights in the forward's and the backward-data's layouts (bytes), from float weights
// [O, C / groups, K, K].
std::vector<torch::Tensor> pack_weights(torch::Tensor x, torch::Tensor weight) {
  Conv& p = conv_of(x, weight);
  auto ohwi = weight.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  memory user(memory::desc(p.weights.get_dims(), data_type_of(x), p.ohwi), engine(), ohwi.data_ptr());
  std::vector<torch::Tensor> packed;
  for (const auto& layout : {p.weights, p.weights_backward}) {
    packed.push_back(torch::empty({static_cast<int64_t>(layout.get_size())}, torch::kUInt8));
    memory own(layout, engine(), packed.back().data_ptr());
    dnnl::reorder(user, own).execute(stream(), user, own);
  }
  return packed;
}

torch::Tensor forward(torch::Tensor x, torch::Tensor weight, torch::Tensor packed, torch::Tensor bias) {
  Conv& p = conv_of(x, weight);
  auto y = torch::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
      x.options().memory_format(at::MemoryFormat::ChannelsLast));
  memory src(p.src, engine(), x.data_ptr()), w(p.weights, engine(), packed.data_ptr()),
      b(p.bias, engine(), bias.data_ptr()), dst(p.dst, engine(), y.data_ptr());
  p.forward.execute(stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_BIAS, b}, {DNNL_ARG_DST, dst}});
  return y;
}

// (grad of x in x's dtype, NHWC, grad of weight in f32 channels_last [O, C, K, K], grad of bias in f32).
std::vector<torch::Tensor> backward(
    torch::Tensor grad_y, torch::Tensor x, torch::Tensor weight, torch::Tensor packed_backward) {
  Conv& p = conv_of(x, weight);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(at::MemoryFormat::ChannelsLast),
      "grad_y must be channels_last and of x's dtype");
  auto grad_x = torch::empty_like(x);
  auto grad_w_own = torch::empty({static_cast<int64_t>(p.weight_grad.get_size())}, torch::kUInt8);
  auto grad_w = torch::empty(weight.sizes(), torch::dtype(torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_b = torch::empty({weight.size(0)}, torch::kFloat32);
  memory gy(p.dst, engine(), grad_y.data_ptr()), src(p.src, engine(), x.data_ptr()),
      w(p.weights_backward, engine(), packed_backward.data_ptr()), gx(p.src, engine(), grad_x.data_ptr()),
      gw_own(p.weight_grad, engine(), grad_w_own.data_ptr()), gw(p.weight_grad_ohwi, engine(), grad_w.data_ptr()),
      gb(p.bias, engine(), grad_b.data_ptr());
  p.backward_data.execute(stream(), {{DNNL_ARG_DIFF_DST, gy}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, gx}});
  p.backward_weights.execute(stream(),
      {{DNNL_ARG_DIFF_DST, gy}, {DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, gw_own}, {DNNL_ARG_DIFF_BIAS, gb}});
  p.weight_grad_to_ohwi.execute(stream(), gw_own, gw);
  return {grad_x, grad_w, grad_b};
}

// The backward's weight and bias gradients alone (f32; the weight's channels_last [O, C / groups, K, K]).
std::vector<torch::Tensor> backward_weights(torch::Tensor grad_y, torch::Tensor x, torch::Tensor weight) {
  Conv& p = conv_of(x, weight);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(at::MemoryFormat::ChannelsLast),
      "grad_y must be channels_last and of x's dtype");
  auto grad_w_own = torch::empty({static_cast<int64_t>(p.weight_grad.get_size())}, torch::kUInt8);
  auto grad_w = torch::empty(weight.sizes(), torch::dtype(torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_b = torch::empty({weight.size(0)}, torch::kFloat32);
  memory gy(p.dst, engine(), grad_y.data_ptr()), src(p.src, engine(), x.data_ptr()),
      gw_own(p.weight_grad, engine(), grad_w_own.data_ptr()), gw(p.weight_grad_ohwi, engine(), grad_w.data_ptr()),
      gb(p.bias, engine(), grad_b.data_ptr());
  p.backward_weights.execute(stream(),
      {{DNNL_ARG_DIFF_DST, gy}, {DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, gw_own}, {DNNL_ARG_DIFF_BIAS, gb}});
  p.weight_grad_to_ohwi.execute(stream(), gw_own, gw);
  return {grad_w, grad_b};
}

std::string kernels(torch::Tensor x, torch::Tensor weight) { return conv_of(x, weight).kernels; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weights", &pack_weights);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("backward_weights", &backward_weights);
  m.def("kernels", &kernels);
}
