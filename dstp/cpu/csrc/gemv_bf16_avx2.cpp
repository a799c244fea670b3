// Single-row bf16 GEMV for CPUs with AVX2 + FMA (no native bf16 dot product):
// y = x W^T (+ b), x [1, K], W [N, K]. Built with -mavx2 -mfma as its own
// extension (dstp_cpu_kernels_avx2); dstp/cpu/kernels.py loads it only where
// /proc/cpuinfo lists avx2 and fma.
//
// Same plan as gemv_bf16.cpp (the AVX512-BF16 kernel): batch-1 decode reads
// every weight once per token, so what counts is the bandwidth one core pulls.
// Rows n, n + N/4, n + N/2, n + 3N/4 are dotted together (four streams far
// apart in memory for the hardware prefetchers). bf16 weights stay bf16 in
// memory: each 256-bit load holds 16 bf16, widened to fp32 in registers
// without shuffles -- the even elements are the 32-bit lanes shifted left by
// 16, the odd ones the lanes with their low half masked off. x is converted to
// fp32 once, split the same way (even, odd), so the FMAs line up. fp32
// accumulation, horizontal sums at the end, one rounding to bf16 (nearest
// even, as PyTorch rounds), bias included.
//
// gemm_few_bf16 does the same for a few rows of x (batched decode, below the
// row count where dstp/cpu/gemm.py's widened fp32 GEMM pays): each widened
// weight vector serves every x row, so the weights stream from memory once.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "bf16.h"
#include "gemv_call.h"
#include "shared_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Tuning knobs, for experiments only (-D at build time). Measured on an AVX2-only
// EPYC, one thread (2026-11-28): 2, 6 or 8 streams, or a software prefetch 512 or
// 2048 bytes ahead, were no faster than 4 streams without one, within that
// shared machine's noise; the hardware prefetchers keep up with 4 streams.
#ifndef DSTP_GEMV_STREAMS
#define DSTP_GEMV_STREAMS 4
#endif
#ifndef DSTP_GEMV_PREFETCH
#define DSTP_GEMV_PREFETCH 0
#endif
constexpr int kStreams = DSTP_GEMV_STREAMS;

using dstp::bf16_to_float;
using dstp::float_to_bf16;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x_even[i] = x[2i], x_odd[i] = x[2i + 1] for the first k_vec = 16 * floor(K / 16) values;
// x_tail the rest, as floats.
template <int S>
void dot_rows(const float* x_even, const float* x_odd, const float* x_tail, int64_t k_vec,
              int64_t k_size, const uint16_t* const* rows, float* out) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc_e[S], acc_o[S];
  for (int s = 0; s < S; ++s) acc_e[s] = acc_o[s] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_vec; k += 16) {
    const __m256 xe = _mm256_loadu_ps(x_even + k / 2);
    const __m256 xo = _mm256_loadu_ps(x_odd + k / 2);
    for (int s = 0; s < S; ++s) {
      if (DSTP_GEMV_PREFETCH && (k & 31) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(rows[s] + k) + DSTP_GEMV_PREFETCH, _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[s] + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, high));
      acc_e[s] = _mm256_fmadd_ps(xe, we, acc_e[s]);
      acc_o[s] = _mm256_fmadd_ps(xo, wo, acc_o[s]);
    }
  }
  for (int s = 0; s < S; ++s) {
    float sum = hsum(_mm256_add_ps(acc_e[s], acc_o[s]));
    for (int64_t k = k_vec; k < k_size; ++k) sum += x_tail[k - k_vec] * bf16_to_float(rows[s][k]);
    out[s] = sum;
  }
}

// x for the few-row GEMM, widened to fp32 and packed per group of up to kMaxGroup rows so the
// inner loop reads it sequentially: for each 16 columns j, for each row m of the group,
// 8 even then 8 odd elements (matching the widened weights). Columns past the last full 16
// go to a plain [rows, tail] array.
struct PackedRows {
  std::vector<float> body, tail;
  int64_t k_vec, tail_len;
};

PackedRows pack_rows(const uint16_t* xp, int64_t m_size, int64_t k_size, int group_size) {
  PackedRows x{{}, {}, k_size / 16 * 16, k_size % 16};
  x.body.resize(static_cast<size_t>(m_size * x.k_vec));
  x.tail.resize(static_cast<size_t>(m_size * x.tail_len));
  for (int64_t m0 = 0; m0 < m_size; m0 += group_size) {
    const int64_t group = std::min<int64_t>(group_size, m_size - m0);
    float* dst = x.body.data() + m0 * x.k_vec;
    for (int64_t j = 0; j < x.k_vec / 16; ++j)
      for (int64_t m = 0; m < group; ++m, dst += 16) {
        const uint16_t* src = xp + (m0 + m) * k_size + j * 16;
        for (int i = 0; i < 8; ++i) {
          dst[i] = bf16_to_float(src[2 * i]);
          dst[8 + i] = bf16_to_float(src[2 * i + 1]);
        }
      }
  }
  for (int64_t m = 0; m < m_size; ++m)
    for (int64_t t = 0; t < x.tail_len; ++t)
      x.tail[m * x.tail_len + t] = bf16_to_float(xp[m * k_size + x.k_vec + t]);
  return x;
}

// Streams the next block of weight rows (contiguous in memory) into cache a line at a time
// while the current block is computed: the block's rows are read in short column chunks,
// too short for the hardware prefetchers to follow from DRAM.
struct BlockPrefetch {
  const char* next;
  const char* end;
  inline void step() {
    if (next < end) {
      _mm_prefetch(next, _MM_HINT_T0);
      next += 64;
    }
  }
};

// M packed x rows against R consecutive weight rows over columns [k0, k1) (multiples of 16),
// added to out[m * out_stride + r]; the tail columns too when k1 is the last full column.
template <int M, int R>
void dot_few(const float* xg, const float* x_tail, int64_t tail_len, int64_t k_vec,
             int64_t k_size, int64_t k0, int64_t k1, const uint16_t* w, float* out,
             int64_t out_stride, BlockPrefetch& prefetch) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const float* xj = xg + (k / 16) * M * 16;
    prefetch.step();
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k_size + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      for (int m = 0; m < M; ++m) {
        acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xj + m * 16), we, acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xj + m * 16 + 8), wo, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      float sum = hsum(acc[m][r]);
      if (k1 == k_vec)
        for (int64_t t = 0; t < tail_len; ++t)
          sum += x_tail[m * tail_len + t] * bf16_to_float(w[r * k_size + k_vec + t]);
      out[m * out_stride + r] += sum;
    }
  }
}

// Weight rows [0, rows) against a group of M packed x rows, summed into out (zeroed by the
// caller). Columns go in chunks whose slice of x stays in L1 across the weight rows; rows go
// R at a time, then one at a time. M * R = 8 accumulators, 2 * M x vectors (the compiler
// keeps them in registers across the R weight rows) and the two widened weight halves fill
// 14 of the 16 AVX2 registers: with more accumulators some live on the stack (objdump).
template <int M>
void rows_few(const float* xg, const float* x_tail, int64_t tail_len, int64_t k_vec,
              int64_t k_size, const uint16_t* wp, int64_t rows, float* out,
              int64_t out_stride, BlockPrefetch& prefetch) {
  constexpr int R = 8 / M;
  constexpr int64_t kChunk = 4096 / M / 16 * 16;  // 16 KiB of x stays in L1
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(k_vec, k0 + kChunk);
    int64_t n = 0;
    for (; n + R <= rows; n += R)
      dot_few<M, R>(xg, x_tail, tail_len, k_vec, k_size, k0, k1, wp + n * k_size, out + n,
                    out_stride, prefetch);
    for (; n < rows; ++n)
      dot_few<M, 1>(xg, x_tail, tail_len, k_vec, k_size, k0, k1, wp + n * k_size, out + n,
                    out_stride, prefetch);
    k0 = k1;
  } while (k0 < k_vec);
}

using RowsFew = void (*)(const float*, const float*, int64_t, int64_t, int64_t, const uint16_t*,
                         int64_t, float*, int64_t, BlockPrefetch&);
constexpr int kMaxGroup = 2;  // x rows per pass over a block of weight rows
constexpr RowsFew kRowsFew[kMaxGroup] = {rows_few<1>, rows_few<2>};

}  // namespace

// y = x W^T (+ b) for a few bf16 rows (batched decode): the weights are read from memory
// once, each block of weight rows serving every pair of x rows from cache while
// the next block streams in.
torch::Tensor gemm_few_bf16(const torch::Tensor& x_in, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_few_bf16_avx2", std::vector<c10::IValue>({x_in, weight}));
  const dstp::FewCall call(x_in, weight, bias, "gemm_few_bf16");
  const int64_t m_size = call.m_size, n_size = call.n_size, k_size = call.k_size;
  const uint16_t* bp = call.bias;
  const auto x = pack_rows(call.x,
                           m_size, k_size, kMaxGroup);
  const uint16_t* wp = call.w;
  uint16_t* yp = call.out;
  constexpr int64_t kBlock = 48;  // weight rows kept in cache across the groups of x rows
                                  // (a multiple of every R: no row left to the 1-row path)
  at::parallel_for(0, (n_size + kBlock - 1) / kBlock, 1, [&](int64_t first, int64_t last) {
    std::vector<float> out(static_cast<size_t>(kMaxGroup * kBlock));
    for (int64_t block = first; block < last; ++block) {
      const int64_t begin = block * kBlock, end = std::min(n_size, begin + kBlock);
      const int64_t next_end = std::min(n_size, end + kBlock);
      BlockPrefetch prefetch{reinterpret_cast<const char*>(wp + end * k_size),
                             reinterpret_cast<const char*>(wp + next_end * k_size)};
      for (int64_t m0 = 0; m0 < m_size; m0 += kMaxGroup) {
        const int group = static_cast<int>(std::min<int64_t>(kMaxGroup, m_size - m0));
        std::fill(out.begin(), out.end(), 0.0f);
        kRowsFew[group - 1](x.body.data() + m0 * x.k_vec, x.tail.data() + m0 * x.tail_len,
                            x.tail_len, x.k_vec, k_size, wp + begin * k_size, end - begin,
                            out.data(), kBlock, prefetch);
        for (int m = 0; m < group; ++m)
          for (int64_t n = begin; n < end; ++n) {
            const float v = out[m * kBlock + (n - begin)];
            yp[(m0 + m) * n_size + n] = float_to_bf16(bp ? v + bf16_to_float(bp[n]) : v);
          }
      }
    }
  });
  return call.y;
}

torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                        const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemv_bf16_avx2", std::vector<c10::IValue>({x, weight}));
  const dstp::GemvCall call(x, weight, bias);
  const int64_t n_size = call.n_size, k_size = call.k_size;
  const uint16_t *xp = call.x, *wp = call.w;
  auto store = [&](int64_t n, float v) { call.store(n, v); };

  // x to fp32 once: even and odd elements apart, matching the widened weights.
  const int64_t k_vec = k_size / 16 * 16;
  std::vector<float> xf(static_cast<size_t>(k_size));
  float* x_even = xf.data();
  float* x_odd = x_even + k_vec / 2;
  float* x_tail = x_even + k_vec;
  for (int64_t i = 0; i < k_vec / 2; ++i) {
    x_even[i] = bf16_to_float(xp[2 * i]);
    x_odd[i] = bf16_to_float(xp[2 * i + 1]);
  }
  for (int64_t k = k_vec; k < k_size; ++k) x_tail[k - k_vec] = bf16_to_float(xp[k]);

  const int64_t part = n_size / kStreams;
  at::parallel_for(0, part, 16, [&](int64_t begin, int64_t end) {
    const uint16_t* rows[kStreams];
    float out[kStreams];
    for (int64_t n = begin; n < end; ++n) {
      for (int s = 0; s < kStreams; ++s) rows[s] = wp + (n + s * part) * k_size;
      dot_rows<kStreams>(x_even, x_odd, x_tail, k_vec, k_size, rows, out);
      for (int s = 0; s < kStreams; ++s) store(n + s * part, out[s]);
    }
  });
  for (int64_t n = kStreams * part; n < n_size; ++n) {  // the last N % 4 rows
    const uint16_t* row[1] = {wp + n * k_size};
    float out[1];
    dot_rows<1>(x_even, x_odd, x_tail, k_vec, k_size, row, out);
    store(n, out[0]);
  }
  return call.y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x W^T (+ b) for one bf16 row (AVX2 + FMA)");
  m.def("gemm_few_bf16", &gemm_few_bf16, "y = x W^T (+ b) for a few bf16 rows (AVX2 + FMA)");
  bind_shared_ops(m);
}
