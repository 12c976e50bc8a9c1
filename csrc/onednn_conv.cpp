// 2-D convolution (stride 1, any padding, groups) on oneDNN's primitives called directly: each
// shape's forward, backward-data and backward-weights primitives are built once and cached, and a
// call executes them on the tensors' own memory. ATen reaches the same primitives through ideep,
// whose per-call work costs more than a small convolution's arithmetic (bench/bench_onednn_calls.py).
//
// Built against a standalone oneDNN (fasthvae/ops/onednn_conv.py) and registered as the custom ops
// fasthvae_onednn::conv2d and ::conv2d_backward (the input's gradient where asked for, the weight's
// and the bias's, in one call). Activations: float32 or bfloat16, computed and returned in the layout
// the caller names (channels_last or NCHW). Weights in any dtype and strides (reordered into the
// primitive's layout and dtype each call; their gradient comes back in the weights' dtype and
// strides). Bias: float32.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>

#include "onednn_conv_primitives.h"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;
using fasthvae_onednn::engine;
using fasthvae_onednn::stream;

dt data_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return dt::f32;
    case at::kBFloat16: return dt::bf16;
    default: TORCH_CHECK(false, "fasthvae_onednn: tensors must be float32 or bfloat16, not ", t);
  }
}

// The weights as oneDNN sees them: [O, C/g, K, K], or [g, O/g, C/g, K, K] for a grouped conv, with
// the tensor's own strides.
memory::desc user_weights(const at::Tensor& w, int64_t groups) {
  const auto s = w.strides();
  const int64_t o = w.size(0);
  if (groups == 1) return memory::desc(w.sizes().vec(), data_type_of(w.scalar_type()), s.vec());
  return memory::desc({groups, o / groups, w.size(1), w.size(2), w.size(3)}, data_type_of(w.scalar_type()),
      {(o / groups) * s[0], s[0], s[1], s[2], s[3]});
}

struct Conv {
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
  // The user's weights into the forward's and the backward-data's layouts (oneDNN may choose a
  // different one for each); the weight gradient from the backward's layout into the user's.
  dnnl::reorder pack_forward, pack_backward, unpack_grad;
  memory::desc src, dst, bias, weights, weights_backward, grad_weights, user;
  at::Tensor zero_bias;  // the forward's bias where the call has none
};

// N, C, H, W, O, KH, KW, pad H, pad W, groups, data type, channels_last, weight dtype, weight strides.
using Key = std::array<int64_t, 17>;

Conv& conv_for(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef padding, int64_t groups, bool nhwc) {
  static std::map<Key, std::unique_ptr<Conv>> cache;
  static std::mutex lock;
  const dt data = data_type_of(x.scalar_type());
  const Key key{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), padding[0],
      padding[1], groups, static_cast<int64_t>(data), nhwc, static_cast<int64_t>(data_type_of(w.scalar_type())),
      w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
  std::lock_guard<std::mutex> guard(lock);
  auto& slot = cache[key];
  if (slot) return *slot;
  auto conv = std::make_unique<Conv>();
  Conv& p = *conv;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), o = w.size(0);
  const int64_t oh = h + 2 * padding[0] - w.size(2) + 1, ow = wd + 2 * padding[1] - w.size(3) + 1;
  const memory::dims wdims = groups == 1 ? memory::dims{o, c, w.size(2), w.size(3)}
                                         : memory::dims{groups, o / groups, c / groups, w.size(2), w.size(3)};
  const tag layout = nhwc ? tag::nhwc : tag::nchw;
  p.src = memory::desc({n, c, h, wd}, data, layout);
  p.dst = memory::desc({n, o, oh, ow}, data, layout);
  p.bias = memory::desc({o}, dt::f32, tag::a);
  p.user = user_weights(w, groups);
  const auto [fwd, bwd_data, bwd_weights] =
      fasthvae_onednn::conv_descs(p.src, p.dst, p.bias, wdims, data, {padding[0], padding[1]});
  p.weights = fwd.weights_desc();
  p.weights_backward = bwd_data.weights_desc();
  p.grad_weights = bwd_weights.diff_weights_desc();
  p.forward = dnnl::convolution_forward(fwd);
  p.backward_data = dnnl::convolution_backward_data(bwd_data);
  p.backward_weights = dnnl::convolution_backward_weights(bwd_weights);
  p.pack_forward = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p.user, engine(), p.weights));
  p.pack_backward = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p.user, engine(), p.weights_backward));
  p.unpack_grad = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p.grad_weights, engine(), p.user));
  p.zero_bias = at::zeros({o}, at::TensorOptions().dtype(at::kFloat));
  slot = std::move(conv);
  return *slot;
}

at::MemoryFormat format_of(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::Tensor in_layout(const at::Tensor& t, bool nhwc) { return t.contiguous(format_of(nhwc)); }

void check(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef padding, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "fasthvae_onednn::conv2d: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "fasthvae_onednn::conv2d: x must be [N, C, H, W] and weight [O, C/groups, KH, KW]");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "fasthvae_onednn::conv2d: padding must be two non-negative ints");
  TORCH_CHECK(groups >= 1 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0,
      "fasthvae_onednn::conv2d: x has ", x.size(1), " channels, weight ", w.sizes(), " with groups=", groups);
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= w.size(2) && x.size(3) + 2 * padding[1] >= w.size(3),
      "fasthvae_onednn::conv2d: the kernel is larger than the padded input");
}

dnnl::memory mem(const memory::desc& d, const at::Tensor& t) { return memory(d, engine(), t.data_ptr()); }

at::Tensor scratch(const memory::desc& d) {
  return at::empty({static_cast<int64_t>(d.get_size())}, at::TensorOptions().dtype(at::kByte));
}

at::Tensor conv2d(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
    at::IntArrayRef padding, int64_t groups, bool nhwc) {
  check(x_in, w_in, padding, groups);
  const auto x = in_layout(x_in, nhwc);
  const auto w = w_in.is_non_overlapping_and_dense() ? w_in : w_in.contiguous();
  Conv& p = conv_for(x, w, padding, groups, nhwc);
  const auto dims = p.dst.get_dims();
  auto y = at::empty(dims, x.options().memory_format(format_of(nhwc)));
  auto packed = scratch(p.weights);
  const auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : p.zero_bias;
  auto user = mem(p.user, w), weights = mem(p.weights, packed);
  p.pack_forward.execute(stream(), user, weights);
  p.forward.execute(stream(), {{DNNL_ARG_SRC, mem(p.src, x)}, {DNNL_ARG_WEIGHTS, weights},
      {DNNL_ARG_BIAS, mem(p.bias, b)}, {DNNL_ARG_DST, mem(p.dst, y)}});
  return y;
}

// (grad of x in its dtype and the op's layout, or an empty tensor where not asked for; grad of the
// weight in the weights' dtype and strides; grad of the bias in float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
    const at::Tensor& w_in, at::IntArrayRef padding, int64_t groups, bool nhwc, bool input_grad) {
  check(x_in, w_in, padding, groups);
  const auto x = in_layout(x_in, nhwc);
  const auto w = w_in.is_non_overlapping_and_dense() ? w_in : w_in.contiguous();
  Conv& p = conv_for(x, w, padding, groups, nhwc);
  const auto gy = in_layout(grad_y.to(x.scalar_type()), nhwc);
  const auto dy = mem(p.dst, gy);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (input_grad) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(format_of(nhwc)));
    auto packed = scratch(p.weights_backward);
    auto user = mem(p.user, w), weights = mem(p.weights_backward, packed);
    p.pack_backward.execute(stream(), user, weights);
    p.backward_data.execute(stream(), {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, weights},
        {DNNL_ARG_DIFF_SRC, mem(p.src, grad_x)}});
  }
  auto grad_w = at::empty_strided(w.sizes(), w.strides(), w.options());
  auto grad_b = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  auto own = scratch(p.grad_weights);
  auto gw_own = mem(p.grad_weights, own), gw = mem(p.user, grad_w);
  p.backward_weights.execute(stream(), {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_SRC, mem(p.src, x)},
      {DNNL_ARG_DIFF_WEIGHTS, gw_own}, {DNNL_ARG_DIFF_BIAS, mem(p.bias, grad_b)}});
  p.unpack_grad.execute(stream(), gw_own, gw);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY(fasthvae_onednn, m) {
  m.def("conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding, int groups, bool channels_last) -> Tensor");
  m.def("conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[2] padding, int groups, bool channels_last, "
        "bool input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae_onednn, CPU, m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_backward", &conv2d_backward);
}
