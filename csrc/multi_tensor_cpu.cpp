// Multi-tensor loops of the optimizer step (multi_tensor_ops.h): per-tensor
// norms, in-place scaling, the EMA update and AdamW over a whole list of
// parameters or gradients in one call. torch's foreach ops on CPU make one
// dispatcher call per tensor and op; a small model's 400 tensors cost more in
// those calls than in their arithmetic. Memory-bound, plain loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "multi_tensor_ops.h"

namespace fasthvae {

namespace {

template <typename T>
double sum_of_squares(const T* p, int64_t n) {
  using opmath = at::opmath_type<T>;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: the loop is not bound by one add's latency
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const double v = static_cast<double>(static_cast<opmath>(p[i + k]));
      acc[k] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(static_cast<opmath>(p[i]));
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The lists are cut into blocks of at most kBlock elements, a block never spanning two tensors, and
// the blocks are shared among the threads: a list of many small tensors and one of a few large
// ones both keep every thread busy. A norm sums its tensor's block partials in block order, so its
// value does not depend on the thread count.
constexpr int64_t kBlock = int64_t{1} << 15;

struct Block {
  int64_t tensor, begin, end;
};

std::vector<Block> blocks_of(const std::vector<at::Tensor>& tensors) {
  std::vector<Block> blocks;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t b = 0; b < n; b += kBlock) blocks.push_back({i, b, std::min(n, b + kBlock)});
  }
  return blocks;
}

// In-place scaling, one rounding per element as _foreach_mul_; the plain loop vectorized per ISA
// level (a multiply alone: nothing for the compiler to contract, the same bits on every level).
template <typename T>
FHV_INLINE void scale_impl(T* __restrict__ p, int64_t n, float factor) {
  using opmath = at::opmath_type<T>;
  const opmath g = static_cast<opmath>(factor);
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(static_cast<opmath>(p[k]) * g);
}

template <typename T>
void scale_baseline(T* p, int64_t n, float factor) {
  scale_impl(p, n, factor);
}

#if FHV_X86_LEVELS
template <typename T>
FHV_TARGET_AVX512 void scale_avx512(T* p, int64_t n, float factor) {
  scale_impl(p, n, factor);
}

template <typename T>
FHV_TARGET_AVX2 void scale_avx2(T* p, int64_t n, float factor) {
  scale_impl(p, n, factor);
}
#endif

template <typename T>
void scale(T* p, int64_t n, float factor) {
  FHV_ISA_DISPATCH(scale, , p, n, factor)
}

template <typename F>
void for_each_block(const std::vector<Block>& blocks, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i, blocks[i]);
  });
}

}  // namespace

at::Tensor multi_tensor_norms_cpu(const std::vector<at::Tensor>& tensors) {
  const std::vector<Block> blocks = blocks_of(tensors);
  std::vector<double> partial(blocks.size());
  for_each_block(blocks, [&](int64_t i, const Block& b) {
    const at::Tensor& t = tensors[b.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "multi_tensor_norms", [&] {
      partial[i] = sum_of_squares(t.const_data_ptr<scalar_t>() + b.begin, b.end - b.begin);
    });
  });
  at::Tensor norms = at::zeros({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  double sum = 0.0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    sum += partial[i];
    if (i + 1 == blocks.size() || blocks[i + 1].tensor != blocks[i].tensor) {
      out[blocks[i].tensor] = static_cast<float>(std::sqrt(sum));
      sum = 0.0;
    }
  }
  return norms;
}

void multi_tensor_scale_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& factor) {
  const float f = factor.item<float>();
  if (f == 1.0f) return;  // x * 1 == x: the usual unclipped step needs no pass
  for_each_block(blocks_of(tensors), [&](int64_t, const Block& b) {
    const at::Tensor& t = tensors[b.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "multi_tensor_scale_", [&] {
      scale(t.data_ptr<scalar_t>() + b.begin, b.end - b.begin, f);
    });
  });
}

void multi_tensor_ema_cpu(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& values,
                          const at::Tensor& weight) {
  const float w = weight.item<float>();
  for_each_block(blocks_of(averages), [&](int64_t, const Block& b) {
    const at::Tensor& avg = averages[b.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, avg.scalar_type(), "multi_tensor_ema_", [&] {
      using opmath = at::opmath_type<scalar_t>;
      const opmath ww = static_cast<opmath>(w);
      scalar_t* __restrict__ a = avg.data_ptr<scalar_t>();
      const scalar_t* __restrict__ v = values[b.tensor].const_data_ptr<scalar_t>();
      for (int64_t k = b.begin; k < b.end; ++k) {
        // The roundings of _foreach_sub, _foreach_mul_ and _foreach_add_, one after another.
        const scalar_t delta = static_cast<scalar_t>(static_cast<opmath>(v[k]) - static_cast<opmath>(a[k]));
        const scalar_t scaled = static_cast<scalar_t>(static_cast<opmath>(delta) * ww);
        a[k] = static_cast<scalar_t>(static_cast<opmath>(a[k]) + static_cast<opmath>(scaled));
      }
    });
  });
}

void multi_tensor_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& steps, const AdamWHyper& h) {
  // Each tensor's own step count and bias corrections (in double, as torch's AdamW), then its update.
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<double> step_size(n), bias_correction2_sqrt(n);
  for (int64_t i = 0; i < n; ++i) {
    float* step = steps[i].data_ptr<float>();
    *step += 1.0f;
    const double t = *step;
    step_size[i] = h.lr / (1.0 - std::pow(h.beta1, t));
    bias_correction2_sqrt[i] = std::sqrt(1.0 - std::pow(h.beta2, t));
  }
  for_each_block(blocks_of(params), [&](int64_t, const Block& b) {
    const int64_t i = b.tensor;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "multi_tensor_adamw_", [&] {
      using opmath = at::opmath_type<scalar_t>;
      const opmath decay = static_cast<opmath>(1.0 - h.lr * h.weight_decay);
      const opmath beta1 = static_cast<opmath>(h.beta1), beta2 = static_cast<opmath>(h.beta2);
      const opmath one_minus_beta1 = static_cast<opmath>(1.0 - h.beta1);
      const opmath one_minus_beta2 = static_cast<opmath>(1.0 - h.beta2);
      const opmath eps = static_cast<opmath>(h.eps);
      const opmath size = static_cast<opmath>(step_size[i]);
      const opmath correction = static_cast<opmath>(bias_correction2_sqrt[i]);
      scalar_t* __restrict__ p = params[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ g = grads[i].const_data_ptr<scalar_t>();
      scalar_t* __restrict__ m = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ v = exp_avg_sqs[i].data_ptr<scalar_t>();
      for (int64_t k = b.begin; k < b.end; ++k) {
        const opmath grad = static_cast<opmath>(g[k]);
        const opmath m_k = static_cast<opmath>(m[k]) * beta1 + grad * one_minus_beta1;
        const opmath v_k = static_cast<opmath>(v[k]) * beta2 + grad * grad * one_minus_beta2;
        const opmath denom = std::sqrt(v_k) / correction + eps;
        p[k] = static_cast<scalar_t>(static_cast<opmath>(p[k]) * decay - size * m_k / denom);
        m[k] = static_cast<scalar_t>(m_k);
        v[k] = static_cast<scalar_t>(v_k);
      }
    });
  });
}

}  // namespace fasthvae
