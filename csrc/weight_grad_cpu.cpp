// fasthvae::conv2d_weight_grad and fasthvae::conv1x1_weight_grad: a stride-1 convolution's weight
// and bias gradients from its pixels. Each pixel is a row of channels_last grad_y [N, Ho, Wo, O] and
// x [N, H, W, C]; for each tap (i, j) of the kernel, grad_w[:, :, i, j] = sum over output pixels
// (h, w) of grad_y[h, w]^T x[h + i - ph, w + j - pw] (pixels outside x are the padding's zeros), and
// grad_b = sum of grad_y's rows. A 1x1 convolution without padding is one tap over all pixels: the
// product of two matrices (conv1x1_weight_grad takes them as [P, O] and [P, C]). The products sum
// over many pixels into a small matrix: a BLAS copies both operands into its own layout first, and
// its matrix-vector product for grad_b runs on one thread; oneDNN's AVX2 weight gradients of the deep
// model's small-channel convolutions run at a third to a half of the machine's sgemm rate
// (results/bench/README.md). Here one pass over the output pixels accumulates register tiles of
// each tap's gradient (FMA on broadcast elements of one operand and 16 columns of the other) over
// the runs of pixels that the tap pairs along each image row, grad_b beside them, in tasks of a fixed
// number of pixels whose partial sums are added in task order: the bits do not depend on the thread
// count. A grouped convolution is each group's product in turn, on the group's channels where they
// lie. AVX2 + FMA (run on AVX-512 CPUs too); elsewhere, where neither of a group's channel counts is
// a multiple of 8, or where there is nothing to sum, ATen's products.
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace fasthvae {

namespace {

constexpr int64_t kTaskRows = 1024;  // output pixels a task sums: fixed, so that no sum's order (or
                                     // bits) depends on the thread count
constexpr int64_t kCacheRows = 256;  // output pixels every tile walks before the next block (kept in
                                     // cache, with the input pixels their taps pair them with)
constexpr int64_t kSerialWork = int64_t{1} << 18;  // multiply-adds below which one thread runs it

// Where the pixels lie: x's images [n, h, w], grad_y's [n, ho, wo], the kernel's taps [kh, kw] and
// the padding. A 1x1 convolution without padding is laid out as one image row of every pixel.
struct Geometry {
  int64_t n, h, w, ho, wo, kh, kw, ph, pw;
  int64_t taps() const { return kh * kw; }
  int64_t pixels() const { return n * ho * wo; }
};

// A channels_last operand: row p (a pixel) at data + p * ld, `cols` channels of unit stride.
struct Rows {
  const float* data;
  int64_t ld, cols;
};

// One product laid out for the kernel: out[b][v] = sum_p bcast[p][b] * vec[p][v], the operand whose
// columns are vector lanes (`vec`, a multiple of 8 columns) and the one broadcast (`bcast`).
struct Plan {
  Rows bcast, vec;
  bool bcast_is_x;
};

// A run of pixels along one image row that a tap pairs: rows [b, b + len) of the broadcast operand
// with rows [v, v + len) of the lanes' operand.
struct Span {
  int64_t b, v, len;
};

// The spans of output pixels [q0, q0 + m) for one tap: one per image row the block touches where the
// tap's input row exists, clipped to the output columns whose input column does (at most m + 1).
int64_t spans_of(const Geometry& g, bool bcast_is_x, int64_t q0, int64_t m, int64_t tap, Span* out) {
  const int64_t di = tap / g.kw - g.ph, dj = tap % g.kw - g.pw;  // output (h, w) reads x (h + di, w + dj)
  const int64_t w_lo = std::max<int64_t>(0, -dj), w_hi = std::min(g.wo, g.w - dj);
  int64_t count = 0;
  for (int64_t q = q0, end = q0 + m; q < end;) {
    const int64_t row = q / g.wo, w0 = q % g.wo, w1 = std::min(g.wo, w0 + (end - q));
    const int64_t h_in = row % g.ho + di, a = std::max(w0, w_lo), b = std::min(w1, w_hi);
    if (h_in >= 0 && h_in < g.h && a < b) {
      const int64_t gy = row * g.wo + a, x = ((row / g.ho) * g.h + h_in) * g.w + a + dj;
      out[count++] = bcast_is_x ? Span{x, gy, b - a} : Span{gy, x, b - a};
    }
    q += w1 - w0;
  }
  return count;
}

#if FHV_X86_LEVELS
// out[i][0:8*NV] (row stride ldo) = (accumulate ? out : 0) + sum over the spans' pixels p of
// b[p][i] * v[p][0:8*NV], for i < MR: MR x NV accumulators in registers.
template <int MR, int NV>
FHV_TARGET_AVX2 void tile_avx2(const float* b, int64_t ldb, const float* v, int64_t ldv, const Span* spans,
                               int64_t count, float* out, int64_t ldo, bool accumulate) {
  __m256 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      acc[i][j] = accumulate ? _mm256_loadu_ps(out + i * ldo + 8 * j) : _mm256_setzero_ps();
    }
  }
  for (int64_t s = 0; s < count; ++s) {
    const float* bp = b + spans[s].b * ldb;
    const float* vp = v + spans[s].v * ldv;
    for (int64_t p = 0; p < spans[s].len; ++p, bp += ldb, vp += ldv) {
      __m256 lanes[NV];
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) lanes[j] = _mm256_loadu_ps(vp + 8 * j);
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
        const __m256 x = _mm256_broadcast_ss(bp + i);
#pragma GCC unroll 2
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(x, lanes[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + i * ldo + 8 * j, acc[i][j]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, const Span*, int64_t, float*, int64_t, bool);

// The tile of `mr` broadcast columns by 8 * NV lanes (mr <= 12 / NV: 12 accumulators of 16 registers).
template <int NV, int MR = 1>
Tile tile_for(int64_t mr) {
  if constexpr (MR * NV < 12) {
    if (mr > MR) return tile_for<NV, MR + 1>(mr);
  }
  return tile_avx2<MR, NV>;
}

int64_t lane_chunks(int64_t cols) { return cols / 16 + (cols % 16 != 0 ? 1 : 0); }

// One task: output pixels [p0, p0 + rows) for units [unit0, unit1) of (tap, lane chunk) pairs, unit
// = tap * chunks + chunk (16 lanes a chunk, the last 8 where the width is an odd multiple of 8),
// against every column of `bcast`, into part[tap][b][v] (row stride plan.vec.cols). The pixels are
// walked kCacheRows at a time, each block through every unit and tile, so that both operands' rows
// stay in cache; the broadcast columns are split into tiles as even as 12 / NV accumulator rows allow.
FHV_TARGET_AVX2 void task_avx2(const Geometry& g, const Plan& plan, int64_t p0, int64_t rows, int64_t unit0,
                               int64_t unit1, float* part) {
  const int64_t n = plan.bcast.cols, chunks = lane_chunks(plan.vec.cols), size = n * plan.vec.cols;
  std::array<Span, kCacheRows + 1> spans;
  for (int64_t s = 0; s < rows; s += kCacheRows) {
    const int64_t m = std::min(kCacheRows, rows - s);
    int64_t tap = -1, count = 0;
    for (int64_t unit = unit0; unit < unit1; ++unit) {
      if (unit / chunks != tap) {
        tap = unit / chunks;
        count = spans_of(g, plan.bcast_is_x, p0 + s, m, tap, spans.data());
      }
      const int64_t v0 = 16 * (unit % chunks);
      const bool full = v0 + 16 <= plan.vec.cols;
      const int64_t max_rows = full ? 6 : 12, tiles = (n + max_rows - 1) / max_rows;
      for (int64_t t = 0, b0 = 0; t < tiles; ++t) {
        const int64_t mr = n / tiles + (t < n % tiles ? 1 : 0);
        const Tile tile = full ? tile_for<2>(mr) : tile_for<1>(mr);
        tile(plan.bcast.data + b0, plan.bcast.ld, plan.vec.data + v0, plan.vec.ld, spans.data(), count,
             part + tap * size + b0 * plan.vec.cols + v0, plan.vec.cols, s > 0);
        b0 += mr;
      }
    }
  }
}

// sums[o] = sum of g's rows [p0, p0 + rows).
FHV_TARGET_AVX2 void column_sums_avx2(const Rows& g, int64_t p0, int64_t rows, float* sums) {
  std::fill(sums, sums + g.cols, 0.0f);
  for (int64_t p = p0; p < p0 + rows; ++p) {
    const float* row = g.data + p * g.ld;
#pragma omp simd
    for (int64_t o = 0; o < g.cols; ++o) sums[o] += row[o];
  }
}

// (grad_w [O, taps * C], each row [tap][C]: a channels_last [O, C, KH, KW] weight's memory;
// grad_b [O]).
std::tuple<at::Tensor, at::Tensor> weight_grad_avx2(const Geometry& geo, const Rows& g, const Rows& x) {
  const int64_t o = g.cols, c = x.cols, taps = geo.taps(), pixels = geo.pixels();
  // The lanes: the channel count that is a multiple of 16, else of 8; the larger where both are.
  const auto lane_rank = [](int64_t n) { return n % 16 == 0 ? 2 : n % 8 == 0 ? 1 : 0; };
  const bool lanes_are_x = lane_rank(c) > lane_rank(o) || (lane_rank(c) == lane_rank(o) && c >= o);
  const Plan plan = lanes_are_x ? Plan{g, x, false} : Plan{x, g, true};
  const int64_t row_tasks = std::max<int64_t>(1, (pixels + kTaskRows - 1) / kTaskRows);
  const int64_t units = taps * lane_chunks(plan.vec.cols);
  // Few pixel tasks are split by taps and lane chunks too, for the threads (this split changes no sum).
  const int64_t groups = std::clamp<int64_t>(2 * at::get_num_threads() / row_tasks, 1, units);
  const int64_t size = c * o, total = taps * size + o;
  at::Tensor parts = at::empty({row_tasks, total}, at::TensorOptions().dtype(at::kFloat));
  float* part = parts.mutable_data_ptr<float>();
  const bool serial = pixels * size * taps < kSerialWork;
  at::parallel_for(0, row_tasks * groups, serial ? row_tasks * groups : 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / groups, group = task % groups;
      const int64_t p0 = r * kTaskRows, rows = std::min(kTaskRows, pixels - p0);
      float* mine = part + r * total;
      task_avx2(geo, plan, p0, rows, units * group / groups, units * (group + 1) / groups, mine);
      if (group == 0) column_sums_avx2(g, p0, rows, mine + taps * size);
    }
  });
  // The tasks' partial sums added into the first task's, in task order.
  at::parallel_for(0, total, serial ? total : 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = 1; r < row_tasks; ++r) {
      const float* other = part + r * total;
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) part[k] += other[k];
    }
  });
  at::Tensor grad_w = at::empty({o, taps * c}, parts.options()), grad_b = at::empty({o}, parts.options());
  float* w = grad_w.mutable_data_ptr<float>();
  for (int64_t t = 0; t < taps; ++t) {
    const float* tap = part + t * size;
    for (int64_t j = 0; j < o; ++j) {
      float* row = w + (j * taps + t) * c;
      if (lanes_are_x) {
        std::copy(tap + j * c, tap + (j + 1) * c, row);  // tap is [O][C]
      } else {
        for (int64_t i = 0; i < c; ++i) row[i] = tap[i * o + j];  // tap is [C][O]
      }
    }
  }
  std::copy(part + taps * size, part + total, grad_b.mutable_data_ptr<float>());
  return {grad_w, grad_b};
}
#endif

// Whether the AVX2 kernel runs these channel counts on this CPU.
bool kernel_runs(int64_t pixels, int64_t o, int64_t c) {
#if FHV_X86_LEVELS
  const bool empty = pixels == 0 || o == 0 || c == 0;  // ATen's products give zeros and sums
  return !empty && active_isa() != Isa::kBaseline && (o % 8 == 0 || c % 8 == 0);
#else
  return false;
#endif
}

void check(const at::Tensor& t, const char* op, const char* name, int64_t dims, const char* shape) {
  TORCH_CHECK(t.device().is_cpu(), "fasthvae::", op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fasthvae::", op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "fasthvae::", op, ": ", name, " must be ", dims, "-D ", shape, ", got ", t.dim(), "-D");
}

// (grad_w [O, C], grad_b [O]) of the pixel matrices g [P, O] and xs [P, C] (rows of unit column
// stride): one tap over one image row of every pixel.
std::tuple<at::Tensor, at::Tensor> matrix_weight_grad(const at::Tensor& g, const at::Tensor& xs) {
  const int64_t pixels = g.size(0), o = g.size(1), c = xs.size(1);
#if FHV_X86_LEVELS
  if (kernel_runs(pixels, o, c)) {
    const Geometry geo{1, 1, pixels, 1, pixels, 1, 1, 0, 0};
    return weight_grad_avx2(geo, Rows{g.const_data_ptr<float>(), g.stride(0), o},
                            Rows{xs.const_data_ptr<float>(), xs.stride(0), c});
  }
#endif
  return {at::mm(g.t(), xs), at::sum(g, 0)};
}

// (grad_w [O, C], grad_b [O]) of grad_y [P, O] and x [P, C], float32 on the CPU.
std::tuple<at::Tensor, at::Tensor> conv1x1_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x) {
  constexpr const char* kOp = "conv1x1_weight_grad";
  check(grad_y, kOp, "grad_y", 2, "[pixels, channels]");
  check(x, kOp, "x", 2, "[pixels, channels]");
  TORCH_CHECK(grad_y.size(0) == x.size(0), "fasthvae::conv1x1_weight_grad: grad_y has ", grad_y.size(0),
              " pixels (rows), x has ", x.size(0));
  const auto rows = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  return matrix_weight_grad(rows(grad_y), rows(x));
}

// The groups' gradients, group i's rows (grad_w [O / groups, ...], grad_b [O / groups]) from
// group_grad(i), one group after another.
template <typename GroupGrad>
std::tuple<at::Tensor, at::Tensor> over_groups(int64_t groups, const GroupGrad& group_grad) {
  if (groups == 1) return group_grad(0);
  std::vector<at::Tensor> weights, biases;
  for (int64_t i = 0; i < groups; ++i) {
    auto [w, b] = group_grad(i);
    weights.push_back(w);
    biases.push_back(b);
  }
  return {at::cat(weights), at::cat(biases)};
}

// (grad_w [O, C / groups, KH, KW] in channels_last strides, grad_b [O]) of a stride-1 convolution
// of x [N, C, H, W] with that kernel, padding and groups, whose output's gradient is grad_y
// [N, O, Ho, Wo].
std::tuple<at::Tensor, at::Tensor> conv2d_weight_grad_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                                          int64_t groups) {
  constexpr const char* kOp = "conv2d_weight_grad";
  check(grad_y, kOp, "grad_y", 4, "[N, O, Ho, Wo]");
  check(x, kOp, "x", 4, "[N, C, H, W]");
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1,
              "fasthvae::conv2d_weight_grad: kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "fasthvae::conv2d_weight_grad: padding must be two non-negative ints, got ", padding);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], ph = padding[0], pw = padding[1];
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), o = grad_y.size(1);
  TORCH_CHECK(groups >= 1 && c % groups == 0 && o % groups == 0, "fasthvae::conv2d_weight_grad: groups must divide ",
              "x's ", c, " channels and grad_y's ", o, ", got groups=", groups);
  const int64_t ho = h + 2 * ph - kh + 1, wo = w + 2 * pw - kw + 1;
  TORCH_CHECK(grad_y.size(0) == n && grad_y.size(2) == ho && grad_y.size(3) == wo,
              "fasthvae::conv2d_weight_grad: a ", kh, "x", kw, " kernel with padding ", padding, " maps x ",
              x.sizes(), " to outputs [", n, ", O, ", ho, ", ", wo, "], but grad_y is ", grad_y.sizes());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad_y.contiguous(cl), xs = x.contiguous(cl);
  const int64_t pixels = n * ho * wo, cg = c / groups, og = o / groups;
  const auto weight_layout = [&](const at::Tensor& rows) {  // [O, taps * C/groups] as [O, C/groups, KH, KW]
    return rows.as_strided({o, cg, kh, kw}, {kh * kw * cg, 1, kw * cg, cg});
  };
  if (kh == 1 && kw == 1 && ph == 0 && pw == 0) {  // the pixel matrices' products (views)
    const auto pixel_rows = [](const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); };
    const at::Tensor g_rows = pixel_rows(g), x_rows = pixel_rows(xs);
    // Group i's columns; ungrouped, the matrix itself (views cost microseconds a call, measurable
    // against a small 1x1 convolution's whole gradient).
    const auto columns = [&](const at::Tensor& t, int64_t i, int64_t width) {
      return groups == 1 ? t : t.narrow(1, i * width, width);
    };
    auto [rows, grad_b] = over_groups(groups, [&](int64_t i) {
      return matrix_weight_grad(columns(g_rows, i, og), columns(x_rows, i, cg));
    });
    return {weight_layout(rows), grad_b};
  }
#if FHV_X86_LEVELS
  if (kernel_runs(pixels, og, cg)) {
    const Geometry geo{n, h, w, ho, wo, kh, kw, ph, pw};
    auto [rows, grad_b] = over_groups(groups, [&](int64_t i) {
      return weight_grad_avx2(geo, Rows{g.const_data_ptr<float>() + i * og, o, og},
                              Rows{xs.const_data_ptr<float>() + i * cg, c, cg});
    });
    return {weight_layout(rows), grad_b};
  }
#endif
  if (pixels == 0 || og == 0 || cg == 0) {
    return {weight_layout(at::zeros({o, kh * kw * cg}, g.options())), at::sum(g, {0, 2, 3})};
  }
  auto grads = at::convolution_backward(g, xs, at::empty({o, cg, kh, kw}, xs.options()), std::vector<int64_t>{o},
                                        {1, 1}, padding, {1, 1}, false, {0, 0}, groups, {false, true, true});
  return {std::get<1>(grads).contiguous(cl), std::get<2>(grads)};
}

}  // namespace

}  // namespace fasthvae

TORCH_LIBRARY_FRAGMENT(fasthvae, m) {
  m.def("conv1x1_weight_grad(Tensor grad_y, Tensor x) -> (Tensor, Tensor)");
  m.def(
      "conv2d_weight_grad(Tensor grad_y, Tensor x, int[2] kernel_size, int[2] padding, int groups=1) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fasthvae, CPU, m) {
  m.impl("conv1x1_weight_grad", &fasthvae::conv1x1_weight_grad_cpu);
  m.impl("conv2d_weight_grad", &fasthvae::conv2d_weight_grad_cpu);
}
