// Sparse (CSR) times dense products on the CPU, for pruned linears and 1x1 convolutions.
//
//   Y[n, p] = bias[n] + sum_{j in row n} values[j] * X[cols[j], p]
//
// as in Elsen et al. 2020, "Fast Sparse ConvNets": the dense operand is laid out [K, P] with P
// contiguous (H*W of one image for a 1x1 convolution; the M rows of a linear's input, transposed
// once here), so every nonzero costs one broadcast and one contiguous vector load per 8 columns of
// P instead of a gather. A single row (M = 1) has nothing to vectorise across: it is a plain CSR
// matrix-vector product over gathered inputs.
//
// Built by sparsewise/kernels/cpu_sparse.py with torch.utils.cpp_extension.load; the operator
// namespace carries the build hash (SPARSEWISE_CPU_NS) so two builds never collide in one process.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSEWISE_AVX2 1
#endif

namespace {

constexpr int kLanes = 8;        // floats per 256-bit register
constexpr int kTileVectors = 8;  // a tile of P is up to 8 registers (64 floats) of accumulators
constexpr int kTileWidth = kLanes * kTileVectors;
// Below this many multiply-adds a call runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

struct CsrView {
  const int64_t* row_ptr;
  const float* values;
  const float* bias;  // nullptr: no bias
  int64_t rows;
};

// Row boundaries that split (nonzeros + rows) evenly into `parts`: rows are never split, and an
// empty row still costs its bias store, so fully pruned rows do not all land on one thread.
std::vector<int64_t> balanced_row_splits(const int64_t* row_ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> splits(parts + 1, rows);
  splits[0] = 0;
  const int64_t total = row_ptr[rows] + rows;
  for (int64_t part = 1; part < parts; ++part) {
    const int64_t target = total * part / parts;
    int64_t lo = splits[part - 1], hi = rows;  // first row whose cumulative cost reaches the target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (row_ptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    splits[part] = lo;
  }
  return splits;
}

// y[n] for rows [row_begin, row_end) of a CSR matrix times one vector x.
template <typename Index>
void csr_matvec(const CsrView& w, const Index* cols, const float* x, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    int64_t j = w.row_ptr[n];
    const int64_t end = w.row_ptr[n + 1];
    // four chains: one would wait on FMA latency; AVX2 gathers measured slower than these scalar
    // loads on Zen 3 (and x, K floats, stays in L1 anyway)
    float chain0 = 0.0f, chain1 = 0.0f, chain2 = 0.0f, chain3 = 0.0f;
    for (; j + 4 <= end; j += 4) {
      chain0 += w.values[j] * x[cols[j]];
      chain1 += w.values[j + 1] * x[cols[j + 1]];
      chain2 += w.values[j + 2] * x[cols[j + 2]];
      chain3 += w.values[j + 3] * x[cols[j + 3]];
    }
    for (; j < end; ++j) chain0 += w.values[j] * x[cols[j]];
    const float total = (chain0 + chain1) + (chain2 + chain3);
    y[n * y_stride] = (w.bias ? w.bias[n] : 0.0f) + total;
  }
}

#ifdef SPARSEWISE_AVX2
// Rows [row_begin, row_end) of Y over one tile of `width` (<= 64) columns of P. Vectors: registers
// per tile row; Masked: the last register is partial. With few registers per row one FMA chain
// would stall on latency, so Chains independent accumulator sets take alternate nonzeros.
template <typename Index, int Vectors, bool Masked>
void csr_times_tile(const CsrView& w, const Index* cols, const float* x, int64_t ldx, float* y,
                    int64_t y_row_stride, int64_t y_col_stride, int64_t row_begin, int64_t row_end, int width) {
  constexpr int Chains = Vectors >= 4 ? 1 : (Vectors == 1 ? 4 : 2);
  const int last_lanes = width - kLanes * (Vectors - 1);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i last_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(last_lanes), lane_ids);
  for (int64_t n = row_begin; n < row_end; ++n) {
    __m256 acc[Chains][Vectors];
#pragma GCC unroll 8
    for (int c = 0; c < Chains; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < Vectors; ++v) acc[c][v] = _mm256_setzero_ps();
    int64_t j = w.row_ptr[n];
    const int64_t end = w.row_ptr[n + 1];
    for (; j + Chains <= end; j += Chains) {
#pragma GCC unroll 4
      for (int c = 0; c < Chains; ++c) {
        const float* xr = x + static_cast<int64_t>(cols[j + c]) * ldx;
        const __m256 weight = _mm256_broadcast_ss(w.values + j + c);
#pragma GCC unroll 8
        for (int v = 0; v < Vectors; ++v) {
          const __m256 xv = (Masked && v == Vectors - 1) ? _mm256_maskload_ps(xr + v * kLanes, last_mask)
                                                           : _mm256_loadu_ps(xr + v * kLanes);
          acc[c][v] = _mm256_fmadd_ps(weight, xv, acc[c][v]);
        }
      }
    }
    for (; j < end; ++j) {
      const float* xr = x + static_cast<int64_t>(cols[j]) * ldx;
      const __m256 weight = _mm256_broadcast_ss(w.values + j);
#pragma GCC unroll 8
      for (int v = 0; v < Vectors; ++v) {
        const __m256 xv = (Masked && v == Vectors - 1) ? _mm256_maskload_ps(xr + v * kLanes, last_mask)
                                                         : _mm256_loadu_ps(xr + v * kLanes);
        acc[0][v] = _mm256_fmadd_ps(weight, xv, acc[0][v]);
      }
    }
    const __m256 bias = _mm256_set1_ps(w.bias ? w.bias[n] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < Vectors; ++v) {
      __m256 sum = _mm256_add_ps(acc[0][v], bias);
#pragma GCC unroll 4
      for (int c = 1; c < Chains; ++c) sum = _mm256_add_ps(sum, acc[c][v]);
      acc[0][v] = sum;
    }
    float* yr = y + n * y_row_stride;
    if (y_col_stride == 1) {
#pragma GCC unroll 8
      for (int v = 0; v < Vectors; ++v) {
        if (Masked && v == Vectors - 1) _mm256_maskstore_ps(yr + v * kLanes, last_mask, acc[0][v]);
        else _mm256_storeu_ps(yr + v * kLanes, acc[0][v]);
      }
    } else {  // a linear's output [M, N]: this row's values are one column of it
      alignas(32) float staged[kTileWidth];
#pragma GCC unroll 8
      for (int v = 0; v < Vectors; ++v) _mm256_store_ps(staged + v * kLanes, acc[0][v]);
      for (int c = 0; c < width; ++c) yr[c * y_col_stride] = staged[c];
    }
  }
}

template <typename Index, int Vectors>
void tile_dispatch_masked(const CsrView& w, const Index* cols, const float* x, int64_t ldx, float* y,
                          int64_t rs, int64_t cs, int64_t r0, int64_t r1, int width) {
  if (width == Vectors * kLanes) csr_times_tile<Index, Vectors, false>(w, cols, x, ldx, y, rs, cs, r0, r1, width);
  else csr_times_tile<Index, Vectors, true>(w, cols, x, ldx, y, rs, cs, r0, r1, width);
}
#endif

template <typename Index>
void csr_times_columns(const CsrView& w, const Index* cols, const float* x, int64_t ldx, float* y,
                       int64_t y_row_stride, int64_t y_col_stride, int64_t row_begin, int64_t row_end, int width) {
#ifdef SPARSEWISE_AVX2
  switch ((width + kLanes - 1) / kLanes) {
    case 1: return tile_dispatch_masked<Index, 1>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 2: return tile_dispatch_masked<Index, 2>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 3: return tile_dispatch_masked<Index, 3>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 4: return tile_dispatch_masked<Index, 4>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 5: return tile_dispatch_masked<Index, 5>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 6: return tile_dispatch_masked<Index, 6>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    case 7: return tile_dispatch_masked<Index, 7>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
    default: return tile_dispatch_masked<Index, 8>(w, cols, x, ldx, y, y_row_stride, y_col_stride, row_begin, row_end, width);
  }
#else
  // portable path: the compiler vectorises the inner loop over the tile
  float acc[kTileWidth];
  for (int64_t n = row_begin; n < row_end; ++n) {
    const float b = w.bias ? w.bias[n] : 0.0f;
    for (int c = 0; c < width; ++c) acc[c] = b;
    for (int64_t j = w.row_ptr[n]; j < w.row_ptr[n + 1]; ++j) {
      const float* xr = x + static_cast<int64_t>(cols[j]) * ldx;
      const float weight = w.values[j];
      for (int c = 0; c < width; ++c) acc[c] += weight * xr[c];
    }
    float* yr = y + n * y_row_stride;
    for (int c = 0; c < width; ++c) yr[c * y_col_stride] = acc[c];
  }
#endif
}

// Y_b[n, p] for every image b: X is [images, K, P] (image stride x_image), Y is addressed as
// y + b * y_image + n * y_row_stride + p * y_col_stride. Work items are (image, tile of P, row
// part), consecutive items share a tile of X so it stays in cache on one thread.
template <typename Index>
void csr_times_dense(const CsrView& w, const Index* cols, const float* x, int64_t images, int64_t k, int64_t p,
                     int64_t x_image, float* y, int64_t y_image, int64_t y_row_stride, int64_t y_col_stride) {
  const int64_t nnz = w.row_ptr[w.rows];
  const int64_t tiles = (p + kTileWidth - 1) / kTileWidth;
  const int64_t work = (nnz + w.rows) * p * images;
  const int64_t parts = work < kMinParallelWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const std::vector<int64_t> splits = balanced_row_splits(w.row_ptr, w.rows, parts);
  const int64_t items = images * tiles * parts;
  auto run_items = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item % parts;
      const int64_t tile = (item / parts) % tiles;
      const int64_t image = item / (parts * tiles);
      const int64_t p0 = tile * kTileWidth;
      const int width = static_cast<int>(std::min<int64_t>(kTileWidth, p - p0));
      if (p == 1) {
        csr_matvec<Index>(w, cols, x + image * x_image, y + image * y_image, y_row_stride, splits[part],
                          splits[part + 1]);
      } else {
        csr_times_columns<Index>(w, cols, x + image * x_image + p0, p, y + image * y_image + p0 * y_col_stride,
                                 y_row_stride, y_col_stride, splits[part], splits[part + 1], width);
      }
    }
  };
  // a small call stays on this thread: even a one-task parallel region wakes the whole pool
  if (parts == 1) run_items(0, items);
  else at::parallel_for(0, items, 1, run_items);
  (void)k;
}

CsrView check_csr(const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias, int64_t in_features) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.is_contiguous(),
              "row_ptr must be a contiguous int64 vector");
  TORCH_CHECK(cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt, "cols must be int16 or int32");
  TORCH_CHECK(cols.is_contiguous() && values.is_contiguous(), "cols and values must be contiguous");
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values must be float32");
  TORCH_CHECK(cols.numel() == values.numel(), "cols and values must hold one entry per nonzero");
  TORCH_CHECK(in_features > 0, "in_features must be positive");
  TORCH_CHECK(cols.scalar_type() == at::kInt || in_features <= 32767, "int16 cols need in_features <= 32767");
  const int64_t rows = row_ptr.numel() - 1;
  TORCH_CHECK(rows >= 0 && row_ptr.data_ptr<int64_t>()[rows] == values.numel(), "row_ptr must end at nnz");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == rows,
                "bias must be a contiguous float32 vector of out_features");
    bias_ptr = bias->data_ptr<float>();
  }
  return CsrView{row_ptr.data_ptr<int64_t>(), values.data_ptr<float>(), bias_ptr, rows};
}

template <typename Fn>
void with_index_type(const at::Tensor& cols, Fn&& fn) {
  if (cols.scalar_type() == at::kShort) fn(cols.data_ptr<int16_t>());
  else fn(cols.data_ptr<int32_t>());
}

// x [M, K] float32 -> y [M, N] = x W^T + b.
at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& cols,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t in_features) {
  const CsrView w = check_csr(row_ptr, cols, values, bias, in_features);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == in_features,
              "x must be a float32 CPU matrix [M, in_features]");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0);
  at::Tensor y = at::empty({m, w.rows}, xc.options());
  if (m == 0) return y;
  if (m == 1) {
    with_index_type(cols, [&](auto* c) {
      csr_times_dense(w, c, xc.data_ptr<float>(), 1, in_features, 1, 0, y.data_ptr<float>(), 0, 1, 1);
    });
    return y;
  }
  // [K, M]: the M rows of one input feature become one contiguous vector (a few KB; copied once)
  at::Tensor xt = at::empty({in_features, m}, xc.options());
  const float* src = xc.data_ptr<float>();
  float* dst = xt.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < in_features; ++c) dst[c * m + r] = src[r * in_features + c];
  with_index_type(cols, [&](auto* c) {
    csr_times_dense(w, c, dst, 1, in_features, m, 0, y.data_ptr<float>(), 0, 1, w.rows);
  });
  return y;
}

// x [B, C, P] float32 (P = H*W) -> y [B, N, P]: a 1x1 convolution with the weight [N, C].
at::Tensor csr_conv1x1(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& cols,
                       const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t in_features) {
  const CsrView w = check_csr(row_ptr, cols, values, bias, in_features);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == in_features,
              "x must be a float32 CPU tensor [B, in_channels, H*W]");
  const at::Tensor xc = x.contiguous();
  const int64_t images = xc.size(0), p = xc.size(2);
  at::Tensor y = at::empty({images, w.rows, p}, xc.options());
  if (images == 0 || p == 0) return y;
  with_index_type(cols, [&](auto* c) {
    csr_times_dense(w, c, xc.data_ptr<float>(), images, in_features, p, in_features * p, y.data_ptr<float>(),
                    w.rows * p, p, 1);
  });
  return y;
}

}  // namespace

#define SPARSEWISE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
SPARSEWISE_LIBRARY(SPARSEWISE_CPU_NS, m) {
  m.def("csr_linear(Tensor x, Tensor row_ptr, Tensor cols, Tensor values, Tensor? bias, int in_features) -> Tensor",
        &csr_linear);
  m.def("csr_conv1x1(Tensor x, Tensor row_ptr, Tensor cols, Tensor values, Tensor? bias, int in_features) -> Tensor",
        &csr_conv1x1);
}
