// What the oneDNN convolution op (csrc/onednn_conv.cpp) and bench/onednn_calls.cpp share: the CPU
// engine and stream, and the three primitive descriptors of a stride-1 convolution.
#pragma once

#include <c10/util/Exception.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <string>

namespace fasthvae_onednn {

inline dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

inline dnnl::stream& stream() {
  static dnnl::stream s(engine());
  return s;
}

struct ConvDescs {
  dnnl::convolution_forward::primitive_desc forward;
  dnnl::convolution_backward_data::primitive_desc backward_data;
  dnnl::convolution_backward_weights::primitive_desc backward_weights;  // float32 weight gradient
};

// Forward (training), backward-data and backward-weights of a stride-1 convolution with ``src``,
// ``dst`` and ``bias`` as given and the weights (``wdims``, of ``data``) in the layouts oneDNN
// chooses. Where the CPU (at the ISA ONEDNN_MAX_CPU_ISA allows) has no convolution of ``data``, an
// error saying so, followed by ``hint``.
inline ConvDescs conv_descs(const dnnl::memory::desc& src, const dnnl::memory::desc& dst,
    const dnnl::memory::desc& bias, const dnnl::memory::dims& wdims, dnnl::memory::data_type data,
    const dnnl::memory::dims& padding, const std::string& hint = "") {
  using dnnl::memory;
  const memory::dims strides{1, 1};
  const memory::desc any_weights(wdims, data, memory::format_tag::any);
  const auto direct = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward;
  try {
    forward = dnnl::convolution_forward::primitive_desc(engine(), dnnl::prop_kind::forward_training, direct,
        src, any_weights, bias, dst, strides, padding, padding);
  } catch (const dnnl::error&) {
    TORCH_CHECK(false, "oneDNN has no ", data == memory::data_type::bf16 ? "bfloat16" : "float32",
        " convolution on this CPU (at the ISA ONEDNN_MAX_CPU_ISA allows)", hint);
  }
  dnnl::convolution_backward_data::primitive_desc backward_data(
      engine(), direct, src, any_weights, dst, strides, padding, padding, forward);
  dnnl::convolution_backward_weights::primitive_desc backward_weights(engine(), direct, src,
      memory::desc(wdims, memory::data_type::f32, memory::format_tag::any), bias, dst, strides, padding,
      padding, forward);
  return {forward, backward_data, backward_weights};
}

}  // namespace fasthvae_onednn
