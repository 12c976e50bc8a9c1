// CUDA kernels of the fused Gaussian ops. Launch geometry (see `geometry`): a row narrower than
// the CTA can keep busy shares a CTA with other rows, `threads_per_row` threads each (a power of
// two: one thread per noise group of four elements), so a 128-wide latent fills a 256-thread CTA
// with eight rows; a wide row gets CTAs of kBlock elements each. Row sums are reduced in fixed order
// (warp shuffles, then the row's warps in turn) into one partial per row and CTA, summed afterwards
// only where a row spans several CTAs, so reductions are deterministic. The elementwise math and
// the Philox noise come from gaussian_math.h, shared with the CPU loops; a thread draws the noise
// of four consecutive elements with one Philox call.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "gaussian_math.h"
#include "gaussian_ops.h"

namespace fasthvae {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kBlock = 4096;  // elements per CTA of a wide row (one partial sum)

// Which elements a CTA and a thread take: `rows_per_cta` whole rows (narrow rows) or kBlock
// elements of one row (`blocks_per_row` CTAs per row; then rows_per_cta is 1).
struct Geometry {
  int64_t rows;
  int64_t inner;
  int64_t blocks_per_row;
  int threads_per_row;
  int rows_per_cta;
  int64_t ctas;
};

Geometry geometry(int64_t rows, int64_t inner) {
  // One thread per noise group of four; a row not a multiple of four can touch one group more.
  const int64_t groups = (inner + 3) / 4 + (inner % 4 != 0);
  if (groups >= kThreads) {
    const int64_t blocks_per_row = (inner + kBlock - 1) / kBlock;
    return {rows, inner, blocks_per_row, kThreads, 1, rows * blocks_per_row};
  }
  int threads_per_row = 1;
  while (threads_per_row < groups) threads_per_row *= 2;
  const int rows_per_cta = kThreads / threads_per_row;
  return {rows, inner, 1, threads_per_row, rows_per_cta, (rows + rows_per_cta - 1) / rows_per_cta};
}

// This thread's part of the launch: its row, the element range [begin, end) its row's threads
// share in this CTA, and its lane among those threads. Rows past the end get an empty range.
struct Slice {
  int64_t row;
  int64_t begin;
  int64_t end;
  int lane;
};

__device__ __forceinline__ Slice slice_of(const Geometry& g) {
  const int sub = threadIdx.x / g.threads_per_row;
  const int lane = threadIdx.x % g.threads_per_row;
  const int64_t row = (blockIdx.x / g.blocks_per_row) * g.rows_per_cta + sub;
  const int64_t part = blockIdx.x % g.blocks_per_row;
  if (row >= g.rows) return {row, 0, 0, lane};
  const int64_t begin = row * g.inner + part * kBlock;
  const int64_t end = row * g.inner + min((part + 1) * kBlock, g.inner);
  return {row, begin, end, lane};
}

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Calls fn(i, eps_i) for every element i in [s.begin, s.end), `stride` threads sharing the range.
// With kSample each thread takes whole noise groups (four consecutive elements share one Philox
// call); eps is 0 otherwise.
template <bool kSample, typename Fn>
__device__ __forceinline__ void for_each_element(uint64_t seed, const Slice& s, int stride, Fn&& fn) {
  if constexpr (kSample) {
    for (int64_t g = (s.begin >> 2) + s.lane; 4 * g < s.end; g += stride) {
      float eps[4];
      philox_randn4(seed, static_cast<uint64_t>(g), eps[0], eps[1], eps[2], eps[3]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t i = 4 * g + k;
        if (i >= s.begin && i < s.end) fn(i, eps[k]);
      }
    }
  } else {
    for (int64_t i = s.begin + s.lane; i < s.end; i += stride) fn(i, 0.0f);
  }
}

// The sum of `value` over the threads of each row in this CTA, in a fixed order; the row's lane 0
// gets it. Every thread of the CTA must call it.
__device__ __forceinline__ float row_sum(float value, const Geometry& g) {
  const int width = min(g.threads_per_row, 32);
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset, width);
  }
  if (g.threads_per_row <= 32) return value;
  __shared__ float warp_sums[kWarps];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x % g.threads_per_row == 0) {
    for (int w = warp; w < warp + g.threads_per_row / 32; ++w) total += warp_sums[w];
  }
  return total;
}

template <typename T, bool kSample, bool kKL, bool kPrior>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ mu_p,
                   const T* __restrict__ lv_p, T* __restrict__ z, T* __restrict__ kl_elem,
                   float* __restrict__ partials, const int64_t* __restrict__ seed_ptr, Geometry g,
                   bool row_sums) {
  const Slice s = slice_of(g);
  const uint64_t seed = kSample ? static_cast<uint64_t>(*seed_ptr) : 0u;
  float acc = 0.0f;
  for_each_element<kSample>(seed, s, g.threads_per_row, [&](int64_t i, float eps) {
    const float m = ld(mu, i), l = ld(lv, i);
    if constexpr (kSample) {
      z[i] = static_cast<T>(reparameterize(m, l, eps));
    }
    if constexpr (kKL) {
      float k;
      if constexpr (kPrior) {
        k = kl_gaussians(m, l, ld(mu_p, i), ld(lv_p, i));
      } else {
        k = kl_std_normal(m, l);
      }
      if (row_sums) {
        acc += k;
      } else {
        kl_elem[i] = static_cast<T>(k);
      }
    }
  });
  if constexpr (kKL) {
    if (row_sums) {
      const float total = row_sum(acc, g);
      if (s.lane == 0 && s.row < g.rows) partials[s.row * g.blocks_per_row + blockIdx.x % g.blocks_per_row] = total;
    }
  }
}

template <typename T, bool kSample, bool kKL, bool kPrior, bool kRowGrad>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ mu_p,
                    const T* __restrict__ lv_p, const T* __restrict__ grad_z,
                    const T* __restrict__ grad_kl, const float* __restrict__ grad_kl_rows,
                    T* __restrict__ dmu, T* __restrict__ dlv, T* __restrict__ dmu_p,
                    T* __restrict__ dlv_p, const int64_t* __restrict__ seed_ptr, Geometry geo) {
  const Slice s = slice_of(geo);
  const uint64_t seed = kSample ? static_cast<uint64_t>(*seed_ptr) : 0u;
  const float g_row = kRowGrad && s.row < geo.rows ? grad_kl_rows[s.row] : 0.0f;
  for_each_element<kSample>(seed, s, geo.threads_per_row, [&](int64_t i, float eps) {
    const float l = ld(lv, i);
    float gmu = 0.0f, glv = 0.0f;
    if constexpr (kKL) {
      const float g = kRowGrad ? g_row : ld(grad_kl, i);
      if constexpr (kPrior) {
        float gmp, glp;
        kl_gaussians_grad(ld(mu, i), l, ld(mu_p, i), ld(lv_p, i), g, gmu, glv, gmp, glp);
        dmu_p[i] = static_cast<T>(gmp);
        dlv_p[i] = static_cast<T>(glp);
      } else {
        kl_std_normal_grad(ld(mu, i), l, g, gmu, glv);
      }
    } else if constexpr (kPrior) {  // no gradient reached the KL: the prior's gradients are zero
      dmu_p[i] = static_cast<T>(0.0f);
      dlv_p[i] = static_cast<T>(0.0f);
    }
    if constexpr (kSample) {
      const float gz = ld(grad_z, i);
      gmu += gz;
      glv += reparameterize_grad_logvar(l, eps, gz);
    }
    dmu[i] = static_cast<T>(gmu);
    dlv[i] = static_cast<T>(glv);
  });
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* out_ptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                     const std::optional<at::Tensor>& mu_p,
                                     const std::optional<at::Tensor>& logvar_p, const int64_t* seed,
                                     bool sample, int64_t kl_mode) {
  const c10::cuda::CUDAGuard guard(mu.device());
  const bool has_kl = kl_mode != kNoKL;
  const bool row_sums = kl_mode == kRowSumKL;
  const int64_t rows = num_rows(mu);
  const Geometry geo = geometry(rows, rows == 0 ? 0 : mu.numel() / rows);
  const int64_t blocks_per_row = geo.blocks_per_row;
  at::Tensor z = sample ? at::empty_like(mu) : at::Tensor();
  at::Tensor kl_elem = (has_kl && !row_sums) ? at::empty_like(mu) : at::Tensor();
  // One partial per row and CTA, each written once (zeros only when there is no CTA to write them).
  const auto partials_options = mu.options().dtype(at::kFloat);
  at::Tensor partials;
  if (row_sums) {
    partials = mu.numel() > 0 ? at::empty({rows, blocks_per_row}, partials_options)
                              : at::zeros({rows, 1}, partials_options);
  }
  if (mu.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    FHV_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "fasthvae_forward_cuda", [&] {
      with_flag(sample, [&](auto s) {
        with_flag(has_kl, [&](auto k) {
          with_flag(mu_p.has_value(), [&](auto p) {
            if constexpr (forward_reachable(std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value,
                                            std::decay_t<decltype(p)>::value)) {
              forward_kernel<scalar_t, std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value, std::decay_t<decltype(p)>::value>
                  <<<geo.ctas, kThreads, 0, stream>>>(
                      mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(),
                      opt_ptr<scalar_t>(mu_p), opt_ptr<scalar_t>(logvar_p), out_ptr<scalar_t>(z),
                      out_ptr<scalar_t>(kl_elem), out_ptr<float>(partials), seed, geo, row_sums);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            } else {
              TORCH_CHECK(false, "fasthvae: a forward pass must sample or compute a KL (a prior needs the KL)");
            }
          });
        });
      });
    });
  }
  if (!row_sums) return {z, kl_elem};
  return {z, partials.size(1) > 1 ? partials.sum(1) : partials.view({rows})};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                      const std::optional<at::Tensor>& mu_p,
                                      const std::optional<at::Tensor>& logvar_p, const int64_t* seed,
                                      const std::optional<at::Tensor>& grad_z,
                                      const std::optional<at::Tensor>& grad_kl,
                                      bool grad_kl_rows) {
  const c10::cuda::CUDAGuard guard(mu.device());
  const bool prior = mu_p.has_value();
  const int64_t rows = num_rows(mu);
  const Geometry geo = geometry(rows, rows == 0 ? 0 : mu.numel() / rows);
  at::Tensor dmu = at::empty_like(mu);
  at::Tensor dlv = at::empty_like(logvar);
  at::Tensor dmu_p = prior ? at::empty_like(mu) : at::Tensor();
  at::Tensor dlv_p = prior ? at::empty_like(mu) : at::Tensor();
  if (mu.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    FHV_DISPATCH_KERNEL_TYPES(mu.scalar_type(), "fasthvae_backward_cuda", [&] {
      with_flag(grad_z.has_value(), [&](auto s) {
        with_flag(grad_kl.has_value(), [&](auto k) {
          with_flag(prior, [&](auto p) {
            with_flag(grad_kl_rows, [&](auto r) {
              constexpr bool kRows = std::decay_t<decltype(r)>::value;
              if constexpr (backward_reachable(std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value, kRows)) {
                backward_kernel<scalar_t, std::decay_t<decltype(s)>::value, std::decay_t<decltype(k)>::value, std::decay_t<decltype(p)>::value, kRows>
                    <<<geo.ctas, kThreads, 0, stream>>>(
                        mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(),
                        opt_ptr<scalar_t>(mu_p), opt_ptr<scalar_t>(logvar_p), opt_ptr<scalar_t>(grad_z),
                        kRows ? nullptr : opt_ptr<scalar_t>(grad_kl),
                        kRows ? opt_ptr<float>(grad_kl) : nullptr, out_ptr<scalar_t>(dmu),
                        out_ptr<scalar_t>(dlv), out_ptr<scalar_t>(dmu_p), out_ptr<scalar_t>(dlv_p), seed,
                        geo);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              } else {
                TORCH_CHECK(false, "fasthvae: a backward pass needs grad_z or grad_kl (row grads only with grad_kl)");
              }
            });
          });
        });
      });
    });
  }
  return {dmu, dlv, dmu_p, dlv_p};
}

}  // namespace fasthvae
