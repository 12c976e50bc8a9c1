// fasthvae::conv1x1_weight_grad: a 1x1 convolution's weight and bias gradients from its pixels,
// grad_w [O, C] = grad_y^T x and grad_b [O] = grad_y^T 1, where each pixel is a row of x [P, C] and
// of grad_y [P, O] (a channels_last batch viewed as a matrix, no copy). The products sum over many
// pixels into a small matrix: a BLAS copies both operands into its own layout first, and its
// matrix-vector product for grad_b runs on one thread (results/bench/README.md, "1x1 weight
// gradients in one pass under AVX2"). Here one pass over the pixels accumulates
// register tiles of grad_w (FMA on broadcast elements of one operand and 16 columns of the other),
// grad_b beside it, in tasks of a fixed number of pixels whose partial sums are added in task order:
// the bits do not depend on the thread count. AVX2 + FMA (run on AVX-512 CPUs too); elsewhere, where
// neither channel count is a multiple of 8, or where there is nothing to sum, the two products in ATen.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cpu_common.h"

namespace fasthvae {

namespace {

constexpr int64_t kTaskRows = 1024;  // pixels a task sums: fixed, so that no sum's order (or bits)
                                     // depends on the thread count
constexpr int64_t kCacheRows = 256;  // pixels every tile walks before the next block (kept in cache)
constexpr int64_t kSerialWork = int64_t{1} << 18;  // multiply-adds below which one thread runs it

// One product laid out for the kernel: out[b][v] = sum_p bcast[p][b] * vec[p][v], the operand whose
// columns are vector lanes (`vec`, a multiple of 8 columns) and the one broadcast (`bcast`).
struct Plan {
  const float* bcast;
  int64_t ld_bcast, cols_bcast;
  const float* vec;
  int64_t ld_vec, cols_vec;
};

#if FHV_X86_LEVELS
// out[i][0:8*NV] (row stride ldo) = (accumulate ? out : 0) + sum over `rows` pixels of
// b[p][i] * v[p][0:8*NV], for i < MR: MR x NV accumulators in registers.
template <int MR, int NV>
FHV_TARGET_AVX2 void tile_avx2(const float* b, int64_t ldb, const float* v, int64_t ldv, int64_t rows,
                               float* out, int64_t ldo, bool accumulate) {
  __m256 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      acc[i][j] = accumulate ? _mm256_loadu_ps(out + i * ldo + 8 * j) : _mm256_setzero_ps();
    }
  }
  for (int64_t p = 0; p < rows; ++p, b += ldb, v += ldv) {
    __m256 lanes[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) lanes[j] = _mm256_loadu_ps(v + 8 * j);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m256 s = _mm256_broadcast_ss(b + i);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(s, lanes[j], acc[i][j]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + i * ldo + 8 * j, acc[i][j]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

// The tile of `mr` broadcast columns by 8 * NV lanes (mr <= 12 / NV: 12 accumulators of 16 registers).
template <int NV, int MR = 1>
Tile tile_for(int64_t mr) {
  if constexpr (MR * NV < 12) {
    if (mr > MR) return tile_for<NV, MR + 1>(mr);
  }
  return tile_avx2<MR, NV>;
}

// One task: pixels [p0, p0 + rows) against lane chunks [chunk0, chunk1) of `vec` (16 lanes each,
// the last 8 where its width is an odd multiple of 8) and every column of `bcast`, into part[b][v]
// (row stride plan.cols_vec). The pixels are walked kCacheRows at a time, each block through every
// chunk and tile, so that both operands' rows stay in cache; the broadcast columns are split into
// tiles as even as 12 / NV accumulator rows allow.
FHV_TARGET_AVX2 void task_avx2(const Plan& plan, int64_t p0, int64_t rows, int64_t chunk0, int64_t chunk1,
                               float* part) {
  const int64_t n = plan.cols_bcast;
  for (int64_t s = 0; s < rows; s += kCacheRows) {
    const int64_t m = std::min(kCacheRows, rows - s);
    const float* b = plan.bcast + (p0 + s) * plan.ld_bcast;
    for (int64_t chunk = chunk0; chunk < chunk1; ++chunk) {
      const int64_t v0 = 16 * chunk;
      const bool full = v0 + 16 <= plan.cols_vec;
      const int64_t max_rows = full ? 6 : 12, tiles = (n + max_rows - 1) / max_rows;
      const float* v = plan.vec + (p0 + s) * plan.ld_vec + v0;
      for (int64_t t = 0, b0 = 0; t < tiles; ++t) {
        const int64_t mr = n / tiles + (t < n % tiles ? 1 : 0);
        const Tile tile = full ? tile_for<2>(mr) : tile_for<1>(mr);
        tile(b + b0, plan.ld_bcast, v, plan.ld_vec, m, part + b0 * plan.cols_vec + v0, plan.cols_vec, s > 0);
        b0 += mr;
      }
    }
  }
}

// sums[o] = sum of g[p][o] over pixels [p0, p0 + rows).
FHV_TARGET_AVX2 void column_sums_avx2(const float* g, int64_t ld, int64_t cols, int64_t p0, int64_t rows,
                                      float* sums) {
  std::fill(sums, sums + cols, 0.0f);
  for (int64_t p = p0; p < p0 + rows; ++p) {
    const float* row = g + p * ld;
#pragma omp simd
    for (int64_t o = 0; o < cols; ++o) sums[o] += row[o];
  }
}

std::tuple<at::Tensor, at::Tensor> weight_grad_avx2(const at::Tensor& g, const at::Tensor& x) {
  const int64_t pixels = g.size(0), o = g.size(1), c = x.size(1);
  // The lanes: the channel count that is a multiple of 16, else of 8; the larger where both are.
  const auto lane_rank = [](int64_t n) { return n % 16 == 0 ? 2 : n % 8 == 0 ? 1 : 0; };
  const bool lanes_are_x = lane_rank(c) > lane_rank(o) || (lane_rank(c) == lane_rank(o) && c >= o);
  const Plan plan = lanes_are_x ? Plan{g.const_data_ptr<float>(), g.stride(0), o, x.const_data_ptr<float>(),
                                       x.stride(0), c}
                                : Plan{x.const_data_ptr<float>(), x.stride(0), c, g.const_data_ptr<float>(),
                                       g.stride(0), o};
  const int64_t row_tasks = std::max<int64_t>(1, (pixels + kTaskRows - 1) / kTaskRows);
  const int64_t chunks = plan.cols_vec / 16 + (plan.cols_vec % 16 != 0 ? 1 : 0);
  // Few pixel tasks are split by lane chunks too, for the threads (this split changes no sum).
  const int64_t groups = std::clamp<int64_t>(2 * at::get_num_threads() / row_tasks, 1, chunks);
  const int64_t size = plan.cols_bcast * plan.cols_vec;
  at::Tensor parts = at::empty({row_tasks, size + o}, g.options());
  float* part = parts.mutable_data_ptr<float>();
  const bool serial = pixels * size < kSerialWork;
  at::parallel_for(0, row_tasks * groups, serial ? row_tasks * groups : 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / groups, group = task % groups;
      const int64_t p0 = r * kTaskRows, rows = std::min(kTaskRows, pixels - p0);
      float* mine = part + r * (size + o);
      task_avx2(plan, p0, rows, chunks * group / groups, chunks * (group + 1) / groups, mine);
      if (group == 0) column_sums_avx2(g.const_data_ptr<float>(), g.stride(0), o, p0, rows, mine + size);
    }
  });
  // The tasks' partial sums added into the first task's, in task order.
  at::parallel_for(0, size + o, serial ? size + o : 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = 1; r < row_tasks; ++r) {
      const float* other = part + r * (size + o);
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) part[k] += other[k];
    }
  });
  at::Tensor grad_w = at::empty({o, c}, g.options()), grad_b = at::empty({o}, g.options());
  float* w = grad_w.mutable_data_ptr<float>();
  if (lanes_are_x) {
    std::copy(part, part + size, w);  // part is [O][C]
  } else {
    for (int64_t i = 0; i < c; ++i) {  // part is [C][O]
      for (int64_t j = 0; j < o; ++j) w[j * c + i] = part[i * o + j];
    }
  }
  std::copy(part + size, part + size + o, grad_b.mutable_data_ptr<float>());
  return {grad_w, grad_b};
}
#endif

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fasthvae::conv1x1_weight_grad: ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fasthvae::conv1x1_weight_grad: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "fasthvae::conv1x1_weight_grad: ", name, " must be 2-D [pixels, channels], got ",
              t.dim(), "-D");
}

// (grad_w [O, C], grad_b [O]) of grad_y [P, O] and x [P, C], float32 on the CPU.
std::tuple<at::Tensor, at::Tensor> conv1x1_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x) {
  check(grad_y, "grad_y");
  check(x, "x");
  TORCH_CHECK(grad_y.size(0) == x.size(0), "fasthvae::conv1x1_weight_grad: grad_y has ", grad_y.size(0),
              " pixels (rows), x has ", x.size(0));
  const auto rows = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  const at::Tensor g = rows(grad_y), xs = rows(x);
  const int64_t o = g.size(1), c = xs.size(1);
#if FHV_X86_LEVELS
  const bool empty = g.size(0) == 0 || o == 0 || c == 0;  // ATen's products give zeros and sums
  if (!empty && active_isa() != Isa::kBaseline && (o % 8 == 0 || c % 8 == 0)) return weight_grad_avx2(g, xs);
#endif
  return {at::mm(g.t(), xs), at::sum(g, 0)};
}

}  // namespace

}  // namespace fasthvae

TORCH_LIBRARY_FRAGMENT(fasthvae, m) {
  m.def("conv1x1_weight_grad(Tensor grad_y, Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae, CPU, m) {
  m.impl("conv1x1_weight_grad", &fasthvae::conv1x1_weight_grad_cpu);
}
