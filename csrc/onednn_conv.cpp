// 2-D convolution (stride 1, any padding, groups) on oneDNN's primitives called directly: each
// shape's forward, backward-data and backward-weights primitives are built once and cached, bound
// once per thread (Bound, below), and a call executes them on the tensors' own memory, allocating
// only its outputs. ATen reaches the same primitives through ideep, whose per-call work costs more
// than a small convolution's arithmetic (bench/bench_onednn_calls.py).
//
// Built against a standalone oneDNN (fasthvae/ops/onednn_conv.py) and registered as the custom ops
// fasthvae_onednn::conv2d, with its autograd (Conv2dFunction, below), and ::conv2d_backward (the
// input's gradient where asked for, the weight's and the bias's, in one call); their fake kernels
// are in Python. Activations: float32 or bfloat16, computed and returned in the layout
// the caller names (channels_last or NCHW). Weights in any dtype and strides (reordered into the
// primitive's layout and dtype each call; their gradient comes back in the weights' dtype and
// strides). Bias: float32.
//
// A weight gradient runs on one thread where oneDNN's primitive built for one thread gives the same
// bits as the one built for all and takes less time, measured on the shape's first backward call
// (choose_weights_threads): some split their work so that a second thread costs more than it
// saves, as AMX's 1x1 weight gradients from 64 channels on small images (results/bench/README.md).
//
// Where oneDNN runs float32 with AVX2 at most, a convolution's weight and bias gradients come from
// fasthvae::conv2d_weight_grad instead (own_weight_gradient), for ungrouped 1x1 kernels and for
// larger ones where a group's input or output channels are a multiple of 8: faster there than
// oneDNN's jit:avx2 and jit_1x1:avx2 primitives over the deep model's shapes, but for its grouped 1x1
// ones, which stay oneDNN's (bench/bench_weight_gradients.py).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <omp.h>

#include <array>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>
#include <unordered_map>

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

// Whether oneDNN runs this process's float32 convolutions with AVX2 at most (no AVX-512): its
// weight gradients of 1x1 convolutions there, jit_1x1:avx2, take longer than the same matrix
// product in the BLAS torch calls (results/bench/README.md).
bool avx2_at_most() {
  using isa = dnnl::cpu_isa;
  static const bool value = [] {
    switch (dnnl::get_effective_cpu_isa()) {
      case isa::sse41: case isa::avx: case isa::avx2: case isa::avx2_vnni: case isa::avx2_vnni_2: return true;
      default: return false;
    }
  }();
  return value;
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
  memory::dims weight_dims, padding;
  dt data;
  // The weight gradient's primitive built for one thread, used instead of backward_weights where
  // one_thread_weights (both set once, by choose_weights_threads under weights_chosen).
  dnnl::convolution_backward_weights backward_weights_one_thread;
  bool one_thread_weights = false;
  std::once_flag weights_chosen;
  // The weight gradient from fasthvae::conv2d_weight_grad (own_weight_gradient) instead of
  // backward_weights.
  bool own_weights = false;
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
  p.weight_dims = wdims, p.padding = {padding[0], padding[1]}, p.data = data;
  const auto [fwd, bwd_data, bwd_weights] =
      fasthvae_onednn::conv_descs(p.src, p.dst, p.bias, wdims, data, p.padding);
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
  const bool one_by_one = w.size(2) == 1 && w.size(3) == 1 && padding[0] == 0 && padding[1] == 0;
  p.own_weights = nhwc && data == dt::f32 && w.scalar_type() == at::kFloat && avx2_at_most() &&
      (one_by_one ? groups == 1 : (c / groups) % 8 == 0 || (o / groups) % 8 == 0);
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

// One thread's bindings of a convolution's primitives: memory objects whose data handles a call sets
// to its tensors, buffers for the packed weights and the weight gradient in oneDNN's layouts, and
// each primitive's arguments, all made on the thread's first call of that convolution, so that a
// call allocates only its outputs.
struct Bound {
  memory src, dst, bias, user, diff_src, diff_dst, diff_bias, user_grad;
  memory weights, weights_backward, grad_weights;  // on the buffers below, for good
  at::Tensor packed, packed_backward, grad_own;
  std::unordered_map<int, memory> pack_forward, forward, pack_backward, backward_data, backward_weights,
      unpack_grad;
};

memory unbound(const memory::desc& d) { return memory(d, engine(), DNNL_MEMORY_NONE); }

Bound& bound_for(const Conv& p) {
  thread_local std::unordered_map<const Conv*, std::unique_ptr<Bound>> all;
  auto& slot = all[&p];
  if (slot) return *slot;
  slot = std::make_unique<Bound>();
  Bound& b = *slot;
  b.src = unbound(p.src), b.dst = unbound(p.dst), b.bias = unbound(p.bias), b.user = unbound(p.user);
  b.diff_src = unbound(p.src), b.diff_dst = unbound(p.dst), b.diff_bias = unbound(p.bias);
  b.user_grad = unbound(p.user);
  b.packed = scratch(p.weights), b.packed_backward = scratch(p.weights_backward), b.grad_own = scratch(p.grad_weights);
  b.weights = mem(p.weights, b.packed), b.weights_backward = mem(p.weights_backward, b.packed_backward);
  b.grad_weights = mem(p.grad_weights, b.grad_own);
  b.pack_forward = {{DNNL_ARG_FROM, b.user}, {DNNL_ARG_TO, b.weights}};
  b.forward = {{DNNL_ARG_SRC, b.src}, {DNNL_ARG_WEIGHTS, b.weights}, {DNNL_ARG_BIAS, b.bias}, {DNNL_ARG_DST, b.dst}};
  b.pack_backward = {{DNNL_ARG_FROM, b.user}, {DNNL_ARG_TO, b.weights_backward}};
  b.backward_data = {{DNNL_ARG_DIFF_DST, b.diff_dst}, {DNNL_ARG_WEIGHTS, b.weights_backward},
      {DNNL_ARG_DIFF_SRC, b.diff_src}};
  b.backward_weights = {{DNNL_ARG_DIFF_DST, b.diff_dst}, {DNNL_ARG_SRC, b.src},
      {DNNL_ARG_DIFF_WEIGHTS, b.grad_weights}, {DNNL_ARG_DIFF_BIAS, b.diff_bias}};
  b.unpack_grad = {{DNNL_ARG_FROM, b.grad_weights}, {DNNL_ARG_TO, b.user_grad}};
  return b;
}

void bind(memory& m, const at::Tensor& t) { m.set_data_handle(t.data_ptr()); }

// This thread's OpenMP teams limited to ``threads`` while in scope: oneDNN's OpenMP build sizes a
// primitive's work split, when the primitive is built, and its parallel regions by
// omp_get_max_threads(), which is the calling thread's own setting.
class ThreadLimit {
 public:
  explicit ThreadLimit(int threads) : before_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ThreadLimit() { omp_set_num_threads(before_); }
  ThreadLimit(const ThreadLimit&) = delete;
  ThreadLimit& operator=(const ThreadLimit&) = delete;

 private:
  int before_;
};

// The shortest of ``rounds`` timings of each of two runs, taken in turns: (first's, second's).
template <typename A, typename B>
std::pair<double, double> fastest_of(int rounds, A&& first, B&& second) {
  using clock = std::chrono::steady_clock;
  double a = 1e30, b = 1e30;
  for (int r = 0; r < rounds; ++r) {
    auto t0 = clock::now();
    first();
    auto t1 = clock::now();
    second();
    auto t2 = clock::now();
    a = std::min(a, std::chrono::duration<double>(t1 - t0).count());
    b = std::min(b, std::chrono::duration<double>(t2 - t1).count());
  }
  return {a, b};
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.const_data_ptr(), b.const_data_ptr(), a.nbytes()) == 0;
}

// Whether p's weight gradient runs on one thread: where the calling thread's OpenMP teams have more
// than one, the primitive is built again for one thread and run on the call's tensors (bound in b,
// its bias gradient into grad_b); it is kept if its weight and bias gradients equal the all-thread
// primitive's bit for bit (so the choice never changes a value) and the fastest of kRounds timings
// takes at most kTimeRatio of the all-thread one's.
void choose_weights_threads(Conv& p, Bound& b, const at::Tensor& grad_b) {
  constexpr int kRounds = 5;
  constexpr double kTimeRatio = 0.9;
  if (omp_get_max_threads() < 2) return;
  dnnl::convolution_backward_weights one_thread;
  {
    ThreadLimit limit(1);
    const auto descs =
        fasthvae_onednn::conv_descs(p.src, p.dst, p.bias, p.weight_dims, p.data, p.padding);
    if (descs.backward_weights.diff_weights_desc() != p.grad_weights) return;  // another layout
    one_thread = dnnl::convolution_backward_weights(descs.backward_weights);
  }
  const auto all = [&] { p.backward_weights.execute(stream(), b.backward_weights); };
  const auto one = [&] {
    ThreadLimit limit(1);
    one_thread.execute(stream(), b.backward_weights);
  };
  all();
  const at::Tensor weights_all = b.grad_own.clone(), bias_all = grad_b.clone();
  one();
  if (!same_bytes(b.grad_own, weights_all) || !same_bytes(grad_b, bias_all)) return;
  const auto [time_all, time_one] = fastest_of(kRounds, all, one);
  if (time_one <= kTimeRatio * time_all) {
    p.backward_weights_one_thread = one_thread;
    p.one_thread_weights = true;
  }
}

// The weight and bias gradients of a convolution of channels_last float32 tensors from
// fasthvae::conv2d_weight_grad (csrc/weight_grad_cpu.cpp, in fasthvae._C), which returns the weight's
// in channels_last strides: as they are where w's memory is laid out so (every 1x1 weight with
// stride(0) == C and stride(1) == 1 is), else copied into w's strides.
std::pair<at::Tensor, at::Tensor> own_weight_gradient(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
    at::IntArrayRef padding, int64_t groups) {
  using WeightGrad = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                        at::IntArrayRef, int64_t);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fasthvae::conv2d_weight_grad", "").typed<WeightGrad>();
  auto [grad, grad_b] = op.call(gy, x, {w.size(2), w.size(3)}, padding, groups);
  bool same_memory = true;
  for (int64_t d = 0; d < 4; ++d) same_memory = same_memory && (w.size(d) == 1 || w.stride(d) == grad.stride(d));
  if (same_memory) return {grad.as_strided(w.sizes(), w.strides()), grad_b};
  auto grad_w = at::empty_strided(w.sizes(), w.strides(), w.options());
  grad_w.copy_(grad);
  return {grad_w, grad_b};
}

at::Tensor conv2d(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
    at::IntArrayRef padding, int64_t groups, bool nhwc) {
  check(x_in, w_in, padding, groups);
  const auto x = in_layout(x_in, nhwc);
  const auto w = w_in.is_non_overlapping_and_dense() ? w_in : w_in.contiguous();
  Conv& p = conv_for(x, w, padding, groups, nhwc);
  Bound& b = bound_for(p);
  const auto dims = p.dst.get_dims();
  auto y = at::empty(dims, x.options().memory_format(format_of(nhwc)));
  const auto bias_f32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : p.zero_bias;
  bind(b.user, w), bind(b.src, x), bind(b.bias, bias_f32), bind(b.dst, y);
  p.pack_forward.execute(stream(), b.pack_forward);
  p.forward.execute(stream(), b.forward);
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
  Bound& b = bound_for(p);
  const auto gy = in_layout(grad_y.to(x.scalar_type()), nhwc);
  bind(b.diff_dst, gy);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (input_grad) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(format_of(nhwc)));
    bind(b.user, w), bind(b.diff_src, grad_x);
    p.pack_backward.execute(stream(), b.pack_backward);
    p.backward_data.execute(stream(), b.backward_data);
  }
  if (p.own_weights) {
    auto [grad_w, grad_b] = own_weight_gradient(gy, x, w, padding, groups);
    return {grad_x, grad_w, grad_b};
  }
  auto grad_w = at::empty_strided(w.sizes(), w.strides(), w.options());
  auto grad_b = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  bind(b.src, x), bind(b.diff_bias, grad_b), bind(b.user_grad, grad_w);
  std::call_once(p.weights_chosen, [&] { choose_weights_threads(p, b, grad_b); });
  if (p.one_thread_weights) {
    ThreadLimit limit(1);
    p.backward_weights_one_thread.execute(stream(), b.backward_weights);
  } else {
    p.backward_weights.execute(stream(), b.backward_weights);
  }
  p.unpack_grad.execute(stream(), b.unpack_grad);
  return {grad_x, grad_w, grad_b};
}

// A convolution's arguments that its backward needs, kept in its autograd context.
void save_conv_args(torch::autograd::AutogradContext* ctx, at::IntArrayRef padding, int64_t groups, bool nhwc,
    bool has_bias) {
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["nhwc"] = nhwc;
  ctx->saved_data["has_bias"] = has_bias;
}

// conv2d_backward of the convolution whose arguments ctx keeps, x its input: (grad of x where
// input_grad, grad of the weight, grad of the bias or an undefined tensor where it has none). The
// incoming gradient is taken to x's dtype and the op's layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(torch::autograd::AutogradContext* ctx,
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool input_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fasthvae_onednn::conv2d_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t, bool, bool)>();
  const bool nhwc = ctx->saved_data["nhwc"].toBool();
  auto [grad_x, grad_w, grad_b] = op.call(grad_y.to(x.scalar_type()).contiguous(format_of(nhwc)), x, weight,
      ctx->saved_data["padding"].toIntVector(), ctx->saved_data["groups"].toInt(), nhwc, input_grad);
  return {grad_x, grad_w, ctx->saved_data["has_bias"].toBool() ? grad_b : at::Tensor()};
}

// Autograd in C++: in a compiled graph's forward, where grad mode is off, the call passes its
// Autograd kernel in the dispatcher instead of a Python function. The backward takes the incoming
// gradient in the op's layout (in a traced graph Inductor then writes it so in the kernel that
// makes it, not in a copy in the op), and the input's gradient only where it is needed.
class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, at::IntArrayRef padding, int64_t groups, bool nhwc) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasthvae_onednn::conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   at::IntArrayRef, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, weight});
    save_conv_args(ctx, padding, groups, nhwc, bias.has_value());
    return op.call(x, weight, bias, padding, groups, nhwc);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool input_grad = ctx->needs_input_grad(0);
    auto [grad_x, grad_w, grad_b] = conv_backward(ctx, grads[0], saved[0], saved[1], input_grad);
    return {input_grad ? grad_x : at::Tensor(), grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef padding, int64_t groups, bool nhwc) {
  return Conv2dFunction::apply(x, weight, bias, padding, groups, nhwc);
}

// conv2d(gelu(x)) with the GELU from fasthvae::gelu (or ::gelu_bfloat16, where a float32 x feeds a
// bfloat16 convolution): (the convolution's output, gelu(x), gelu'(x) or an empty tensor where not
// asked for), gelu(x) and gelu'(x) in the op's layout. One call where a model would make two (and
// a cast where the dtypes differ); the GELU's kernels live in fasthvae._C, reached through the
// dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_conv2d(const at::Tensor& x_in, const at::Tensor& w,
    const std::optional<at::Tensor>& bias, at::IntArrayRef padding, int64_t groups, bool nhwc, bool bfloat16,
    bool derivative) {
  using Gelu = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool);
  static const auto same_dtype =
      c10::Dispatcher::singleton().findSchemaOrThrow("fasthvae::gelu", "").typed<Gelu>();
  static const auto to_bfloat16 =
      c10::Dispatcher::singleton().findSchemaOrThrow("fasthvae::gelu_bfloat16", "").typed<Gelu>();
  check(x_in, w, padding, groups);
  const auto x = in_layout(x_in, nhwc);
  TORCH_CHECK(!bfloat16 || x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
      "fasthvae_onednn::gelu_conv2d: x must be float32 or bfloat16, not ", x.scalar_type());
  auto [a, d] = (bfloat16 ? to_bfloat16 : same_dtype).call(x, derivative);
  return {conv2d(a, w, bias, padding, groups, nhwc), a, d};
}

// Autograd of gelu_conv2d: saves gelu(x) (the convolution's input) and gelu'(x); the backward is the
// convolution's, then the input's gradient times gelu'(x), in x's dtype.
class GeluConv2dFunction : public torch::autograd::Function<GeluConv2dFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
      const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef padding, int64_t groups,
      bool nhwc, bool bfloat16, bool derivative) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasthvae_onednn::gelu_conv2d", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef, int64_t,
                                   bool, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, a, d] = op.call(x, weight, bias, padding, groups, nhwc, bfloat16, derivative);
    ctx->save_for_backward({a, d, weight});
    ctx->mark_non_differentiable({a, d});
    save_conv_args(ctx, padding, groups, nhwc, bias.has_value());
    return {y, a, d};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &d = saved[1];
    const bool input_grad = ctx->needs_input_grad(0);
    TORCH_CHECK(!input_grad || d.dim() == a.dim(),  // not asked for: an empty 1-D tensor
        "fasthvae_onednn::gelu_conv2d was called with derivative=False; call fasthvae.nn.gelu_conv2d");
    auto [grad_a, grad_w, grad_b] = conv_backward(ctx, grads[0], a, saved[2], input_grad);
    return {input_grad ? grad_a * d : at::Tensor(), grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor(),
        at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef padding, int64_t groups, bool nhwc, bool bfloat16,
    bool derivative) {
  auto out = GeluConv2dFunction::apply(x, weight, bias, padding, groups, nhwc, bfloat16, derivative);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(fasthvae_onednn, m) {
  m.def("conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding, int groups, bool channels_last) -> Tensor");
  m.def("conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[2] padding, int groups, bool channels_last, "
        "bool input_grad) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding, int groups, bool channels_last, "
        "bool bfloat16, bool derivative) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae_onednn, CPU, m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_backward", &conv2d_backward);
  m.impl("gelu_conv2d", &gelu_conv2d);
}

TORCH_LIBRARY_IMPL(fasthvae_onednn, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("gelu_conv2d", &gelu_conv2d_autograd);
}
