// bf16 GEMV and few-row GEMM for CPUs with AVX512-BF16: y = x W^T (+ b), W [N, K].
//
// Batch-1 decode streams every weight once per token, so its speed is the
// memory bandwidth one core can pull. One core pulls more with several
// independent streams: rows n, n + N/4, n + N/2, n + 3N/4 are dotted together,
// so the hardware prefetchers run four streams far apart in memory. On a
// Zen 4 core this reads ~28 GB/s against ~21 GB/s for ATen's GEMV (one row
// at a time) and ~11 GB/s for oneDNN's. Products accumulate in fp32
// (vdpbf16ps); the result is rounded to bf16 once, bias included.
//
// gemm_few_bf16 (below) does the same for a few rows of x (batched decode): each
// weight is read from memory once and serves every x row from registers.
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

namespace {

constexpr int kStreams = 4;

using dstp::bf16_to_float;
using dstp::float_to_bf16;

template <int S>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_rows(
    const uint16_t* x, const uint16_t* const* rows, int64_t k_size, float* out) {
  __m512 acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_size; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int s = 0; s < S; ++s)
      acc[s] = _mm512_dpbf16_ps(acc[s], xv, (__m512bh)_mm512_loadu_si512(rows[s] + k));
  }
  if (k < k_size) {  // the tail: masked loads read zeros past the end
    const __mmask32 mask = static_cast<__mmask32>((1ull << (k_size - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
    for (int s = 0; s < S; ++s)
      acc[s] = _mm512_dpbf16_ps(acc[s], xv, (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[s] + k));
  }
  for (int s = 0; s < S; ++s) out[s] = _mm512_reduce_add_ps(acc[s]);
}

// -- gemm_few_bf16: a few rows of x (batched decode, 2..55 rows) ---------------------------
//
// Each block of kFewBlock weight rows is read from memory once: the first group of x rows
// streams it from DRAM (software prefetch kFewAhead bytes ahead in every row), the later
// groups find it in L2 (48 rows x K = 4096 is 384 KiB). A group of MG x rows against R weight
// rows keeps MG * R accumulators in zmm registers (at most 24 of the 32) over the whole of K,
// each 32-column weight vector serving every x row of the group and each x vector every
// weight row; one horizontal sum per output at the end. vdpbf16ps adds bf16 pair products
// exactly into fp32, so this is fp32 accumulation as in the GEMV; bias and one rounding to
// bf16 as the AVX2 build's kernel does them.

#ifndef DSTP_FEW_AHEAD
#define DSTP_FEW_AHEAD 1024
#endif
constexpr int64_t kFewBlock = 48;  // a multiple of every R below: no row left over in a block
constexpr int kFewMaxGroup = 6;    // x rows per pass over a block
constexpr int64_t kFewAhead = DSTP_FEW_AHEAD;  // bytes; 0: no software prefetch

constexpr int few_rows_per_pass(int mg) { return mg <= 3 ? 8 : (mg == 4 ? 6 : 4); }

// x rows [0, MG) (row stride k_size) against weight rows [0, R) (row stride k_size), all of
// K; out[m * n_size + r] = the sum (plus bias[r]), rounded to bf16 once.
template <int MG, int R, bool kPrefetch>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void dot_few(
    const uint16_t* x, const uint16_t* w, int64_t k_size, const uint16_t* bias, uint16_t* out,
    int64_t n_size) {
  __m512 acc[MG][R];
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_size; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      if (kPrefetch)  // one 64-byte line per row and step
        _mm_prefetch(reinterpret_cast<const char*>(w + r * k_size + k) + kFewAhead, _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * k_size + k);
    }
    for (int m = 0; m < MG; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k_size + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < k_size) {  // the tail: masked loads read zeros past the end
    const __mmask32 mask = static_cast<__mmask32>((1ull << (k_size - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k_size + k);
    for (int m = 0; m < MG; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * k_size + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      out[m * n_size + r] = float_to_bf16(bias ? v + bf16_to_float(bias[r]) : v);
    }
}

// x rows [0, MG) against weight rows [0, rows) of one block: R rows at a time, then one.
template <int MG>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void block_few(
    const uint16_t* x, const uint16_t* w, int64_t rows, int64_t k_size, const uint16_t* bias,
    uint16_t* out, int64_t n_size, bool stream) {
  constexpr int R = few_rows_per_pass(MG);
  int64_t n = 0;
  for (; n + R <= rows; n += R) {
    const uint16_t* b = bias ? bias + n : nullptr;
    if (stream && kFewAhead > 0)
      dot_few<MG, R, true>(x, w + n * k_size, k_size, b, out + n, n_size);
    else
      dot_few<MG, R, false>(x, w + n * k_size, k_size, b, out + n, n_size);
  }
  for (; n < rows; ++n)
    dot_few<MG, 1, false>(x, w + n * k_size, k_size, bias ? bias + n : nullptr, out + n, n_size);
}

using BlockFew = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, const uint16_t*,
                          uint16_t*, int64_t, bool);
constexpr BlockFew kBlockFew[kFewMaxGroup] = {block_few<1>, block_few<2>, block_few<3>,
                                              block_few<4>, block_few<5>, block_few<6>};

}  // namespace

// y = x W^T (+ b) for a few bf16 rows x [M, K] (batched decode): see above.
torch::Tensor gemm_few_bf16(const torch::Tensor& x_in, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_few_bf16", std::vector<c10::IValue>({x_in, weight}));
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "gemm_few_bf16: bf16 inputs only");
  TORCH_CHECK(x_in.is_contiguous() && x_in.dim() == 2 && weight.is_contiguous() &&
                  weight.dim() == 2,
              "gemm_few_bf16: contiguous 2-D x and weight only");
  const int64_t m_size = x_in.size(0), n_size = weight.size(0), k_size = weight.size(1);
  TORCH_CHECK(x_in.size(1) == k_size, "gemm_few_bf16: x has ", x_in.size(1),
              " columns, weight wants ", k_size);
  const uint16_t* bp = dstp::bias_bits(bias, n_size, "gemm_few_bf16");
  const auto* xp = reinterpret_cast<const uint16_t*>(x_in.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto y = torch::empty({m_size, n_size}, x_in.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, (n_size + kFewBlock - 1) / kFewBlock, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const int64_t begin = block * kFewBlock, end = std::min(n_size, begin + kFewBlock);
      for (int64_t m0 = 0; m0 < m_size; m0 += kFewMaxGroup) {
        const int group = static_cast<int>(std::min<int64_t>(kFewMaxGroup, m_size - m0));
        kBlockFew[group - 1](xp + m0 * k_size, wp + begin * k_size, end - begin, k_size,
                             bp ? bp + begin : nullptr, yp + m0 * n_size + begin, n_size,
                             m0 == 0);
      }
    }
  });
  return y;
}

torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                        const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemv_bf16", std::vector<c10::IValue>({x, weight}));
  const dstp::GemvCall call(x, weight, bias);
  const int64_t n_size = call.n_size, k_size = call.k_size;
  const uint16_t *xp = call.x, *wp = call.w;
  auto store = [&](int64_t n, float v) { call.store(n, v); };

  const int64_t part = n_size / kStreams;
  at::parallel_for(0, part, 16, [&](int64_t begin, int64_t end) {
    const uint16_t* rows[kStreams];
    float out[kStreams];
    for (int64_t n = begin; n < end; ++n) {
      for (int s = 0; s < kStreams; ++s) rows[s] = wp + (n + s * part) * k_size;
      dot_rows<kStreams>(xp, rows, k_size, out);
      for (int s = 0; s < kStreams; ++s) store(n + s * part, out[s]);
    }
  });
  for (int64_t n = kStreams * part; n < n_size; ++n) {  // the last N % 4 rows
    const uint16_t* row[1] = {wp + n * k_size};
    float out[1];
    dot_rows<1>(xp, row, k_size, out);
    store(n, out[0]);
  }
  return call.y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x W^T (+ b) for one bf16 row (AVX512-BF16)");
  m.def("gemm_few_bf16", &gemm_few_bf16, "y = x W^T (+ b) for a few bf16 rows (AVX512-BF16)");
  bind_shared_ops(m);
}
