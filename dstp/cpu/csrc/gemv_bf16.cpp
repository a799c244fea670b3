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
#include <vector>

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

// -- gemm_few_bf16_fma: the same blocking with weights widened to fp32 in registers ---------
//
// Where vdpbf16ps issues at about half the fp32 FMA rate (a KVM Xeon without AMX: ~70 GFLOP/s
// one thread against ~140 for MKL's sgemm) the AVX2 build's plan at 512 bits can be faster
// (kernels.settle_few_rows measures which):
// x goes to fp32 once, each 32-column chunk of a row as its 16 even then its 16 odd elements
// (zero past K); each 32-bf16 weight load is widened in registers (even elements: 32-bit
// lanes shifted left 16; odd: lanes masked with 0xFFFF0000) and both halves meet x's with
// 512-bit fp32 FMAs. A group of MG x rows against R weight rows holds MG * R accumulators,
// 2 * R widened weight vectors and 2 x vectors in zmm registers (at most 32); groups of up to
// 8 x rows, as even as they go, so that the widening (2 ops per 2 * MG FMAs, on the FMA
// ports) costs little. Blocks of kFewBlock weight rows as gemm_few_bf16 above, but each group
// goes over a block kFmaChunk columns at a time (the group's x slice for them stays in L1; the
// sums in between wait as zmm in a small scratch). The first group reads the block from DRAM
// and prefetches the next R weight rows' line beside each it loads; the later groups, reading
// it from L2, bring the next block into L2 (NextBlock). One horizontal sum per output, bias
// and one rounding to bf16 as gemm_few_bf16: only how the fp32 sums are formed differs
// (products exact in fp32 both ways; the order of the additions is not).

constexpr int kFmaMaxGroup = 8;  // x rows per pass over a block

// weight rows per pass: MG * R + 2 * R + 2 registers, R dividing kFewBlock
constexpr int fma_rows_per_pass(int mg) { return mg == 1 ? 8 : (mg == 2 ? 6 : (mg <= 5 ? 4 : 3)); }

// M rows in passes of at most kFmaMaxGroup, as even as they go (16: 8 + 8, not 8 + 6 + 2)
inline int64_t fma_group(int64_t m_size, int64_t m0) {
  const int64_t passes = (m_size + kFmaMaxGroup - 1) / kFmaMaxGroup, base = m_size / passes;
  const int64_t extra = m_size % passes;  // the first `extra` passes take base + 1
  const int64_t index = m0 < extra * (base + 1) ? m0 / (base + 1) : extra + (m0 - extra * (base + 1)) / base;
  return index < extra ? base + 1 : base;
}

// One 32-column step: R weight vectors widened, then MG x rows' even and odd halves.
template <int MG, int R>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void fma_step(
    const float* xj, const __m512i* wv, __m512i high, __m512 (&acc)[MG][R]) {
  __m512 we[R], wo[R];
  for (int r = 0; r < R; ++r) {
    we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(wv[r], 16));
    wo[r] = _mm512_castsi512_ps(_mm512_and_si512(wv[r], high));
  }
  for (int m = 0; m < MG; ++m) {
    __m512 xe = _mm512_loadu_ps(xj + m * 32), xo = _mm512_loadu_ps(xj + m * 32 + 16);
    // in registers: else GCC folds each x load into every FMA that uses it, 2 * MG * R
    // loads a step where 2 * MG do, and the loads (two 512-bit a cycle) bound the FMAs
    __asm__("" : "+v"(xe), "+v"(xo));
    for (int r = 0; r < R; ++r) {
      acc[m][r] = _mm512_fmadd_ps(xe, we[r], acc[m][r]);
      acc[m][r] = _mm512_fmadd_ps(xo, wo[r], acc[m][r]);
    }
  }
}

// x rows [0, MG) packed (k_pad floats a row, chunk j of row m at (j * MG + m) * 32) against
// weight rows [0, R) (row stride k_size); out[m * n_size + r] = the sum (plus bias[r]).
// Lines of the next block brought into L2 by the passes that read this one from cache: one
// per weight row and step, so one such pass covers a whole block (the first pass of the next
// block then reads L2, not DRAM, from 16 rows up).
struct NextBlock {
  const char* next;
  const char* end;
};

// Columns of K per pass over a block's rows: the group's x slice for them (at most 8 rows x 512
// x 4 bytes = 16 KiB) stays in L1 while every weight row of the block meets it. All of K at
// once read the x slice (64 KiB at K = 2048: past L1) from L2 for every R weight rows, 1 KiB
// per 48 FMAs. 256 columns ran ~10 % slower on the KVM Xeon; 1024 (32 KiB) ~3 % faster there
// but past a 32 KiB L1d.
constexpr int64_t kFmaChunk = 512;  // a multiple of 32

// x rows [0, MG) packed (chunk j of row m at (j * MG + m) * 32; xj: column k0's) against
// weight rows [0, R) (row stride k_size) over columns [k0, k_end). The sums so far are R * MG
// zmm at part (none when k0 == 0); at k_end == k_size out[m * n_size + r] = the sum (plus
// bias[r]), else they go back to part. kPrefetch: the call is the first group's (DRAM).
template <int MG, int R, bool kPrefetch>
__attribute__((target("avx512f,avx512bw"))) inline void dot_few_fma(
    const float* xj, const uint16_t* w, int64_t k0, int64_t k_end, int64_t k_size, float* part,
    const uint16_t* bias, uint16_t* out, int64_t n_size, NextBlock& ahead) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MG][R];
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r)
      acc[m][r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(part + (r * MG + m) * 16);
  int64_t k = k0;
  for (; k + 32 <= k_end; k += 32, xj += MG * 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      if (kPrefetch) {  // the line of the next R rows (the next call's) at this column:
        // 1 KiB ahead in the same row, as before the K chunks, lands a chunk too late
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * k_size + k), _MM_HINT_T0);
      } else if (ahead.next < ahead.end) {
        _mm_prefetch(ahead.next, _MM_HINT_T1);
        ahead.next += 64;
      }
      wv[r] = _mm512_loadu_si512(w + r * k_size + k);
    }
    fma_step<MG, R>(xj, wv, high, acc);
  }
  if (k < k_end) {  // the tail: masked loads read zeros past the end (x is zero there too)
    const __mmask32 mask = static_cast<__mmask32>((1ull << (k_end - k)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * k_size + k);
    fma_step<MG, R>(xj, wv, high, acc);
  }
  if (k_end < k_size) {
    for (int m = 0; m < MG; ++m)
      for (int r = 0; r < R; ++r) _mm512_store_ps(part + (r * MG + m) * 16, acc[m][r]);
    return;
  }
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) {
      const float v = _mm512_reduce_add_ps(acc[m][r]);
      out[m * n_size + r] = float_to_bf16(bias ? v + bf16_to_float(bias[r]) : v);
    }
}

// x rows [0, MG) against weight rows [0, rows) of one block, kFmaChunk columns at a time: R
// rows at a time, then one; part holds rows * MG partial sums (zmm) between chunks.
template <int MG>
__attribute__((target("avx512f,avx512bw"))) void block_few_fma(
    const float* xg, const uint16_t* w, int64_t rows, int64_t k_size, const uint16_t* bias,
    uint16_t* out, int64_t n_size, bool stream, NextBlock& ahead, float* part) {
  constexpr int R = fma_rows_per_pass(MG);
  int64_t k0 = 0;
  do {  // once even at K = 0 (the outputs are then the bias)
    const int64_t k_end = std::min(k_size, k0 + kFmaChunk);
    const float* xj = xg + k0 * MG;
    int64_t n = 0;
    for (; n + R <= rows; n += R) {
      const uint16_t* b = bias ? bias + n : nullptr;
      float* p = part + n * MG * 16;
      if (stream)
        dot_few_fma<MG, R, true>(xj, w + n * k_size, k0, k_end, k_size, p, b, out + n, n_size,
                                 ahead);
      else
        dot_few_fma<MG, R, false>(xj, w + n * k_size, k0, k_end, k_size, p, b, out + n, n_size,
                                  ahead);
    }
    for (; n < rows; ++n)
      dot_few_fma<MG, 1, false>(xj, w + n * k_size, k0, k_end, k_size, part + n * MG * 16,
                                bias ? bias + n : nullptr, out + n, n_size, ahead);
  } while ((k0 += kFmaChunk) < k_size);
}

using BlockFewFma = void (*)(const float*, const uint16_t*, int64_t, int64_t, const uint16_t*,
                             uint16_t*, int64_t, bool, NextBlock&, float*);
constexpr BlockFewFma kBlockFewFma[kFmaMaxGroup] = {
    block_few_fma<1>, block_few_fma<2>, block_few_fma<3>, block_few_fma<4>,
    block_few_fma<5>, block_few_fma<6>, block_few_fma<7>, block_few_fma<8>};

// x [M, K] bf16 to fp32 in groups of kFmaMaxGroup rows: group g's chunk j of row m (32
// columns: the 16 even elements, then the 16 odd, widened as the weights are) at
// m0 * k_pad + (j * group + m) * 32, zero past K.
__attribute__((target("avx512f,avx512bw"))) std::vector<float> pack_x_fma(
    const uint16_t* xp, int64_t m_size, int64_t k_size, int64_t k_pad) {
  std::vector<float> packed(static_cast<size_t>(m_size * k_pad));
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t m0 = 0, group; m0 < m_size; m0 += group) {
    group = fma_group(m_size, m0);
    float* base = packed.data() + m0 * k_pad;
    for (int64_t m = 0; m < group; ++m) {
      const uint16_t* src = xp + (m0 + m) * k_size;
      for (int64_t k = 0; k < k_size; k += 32) {
        const int64_t left = k_size - k;
        const __mmask32 mask = left >= 32 ? ~0u : static_cast<__mmask32>((1u << left) - 1);
        const __m512i v = _mm512_maskz_loadu_epi16(mask, src + k);
        float* dst = base + (k / 32 * group + m) * 32;
        _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        _mm512_storeu_ps(dst + 16, _mm512_castsi512_ps(_mm512_and_si512(v, high)));
      }
    }
  }
  return packed;
}

}  // namespace

// y = x W^T (+ b) for a few bf16 rows x [M, K] (batched decode): see above.
torch::Tensor gemm_few_bf16(const torch::Tensor& x_in, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_few_bf16", std::vector<c10::IValue>({x_in, weight}));
  const dstp::FewCall call(x_in, weight, bias, "gemm_few_bf16");
  const int64_t m_size = call.m_size, n_size = call.n_size, k_size = call.k_size;
  const uint16_t* bp = call.bias;
  const uint16_t* xp = call.x;
  const uint16_t* wp = call.w;
  uint16_t* yp = call.out;
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
  return call.y;
}

// gemm_few_bf16's result with fp32 FMAs on weights widened in registers: see above.
torch::Tensor gemm_few_bf16_fma(const torch::Tensor& x_in, const torch::Tensor& weight,
                                const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_few_bf16_fma", std::vector<c10::IValue>({x_in, weight}));
  const dstp::FewCall call(x_in, weight, bias, "gemm_few_bf16_fma");
  const int64_t m_size = call.m_size, n_size = call.n_size, k_size = call.k_size;
  const uint16_t* bp = call.bias;
  const int64_t k_pad = (k_size + 31) / 32 * 32;
  const auto xf = pack_x_fma(call.x,
                             m_size, k_size, k_pad);
  const uint16_t* wp = call.w;
  uint16_t* yp = call.out;
  at::parallel_for(0, (n_size + kFewBlock - 1) / kFewBlock, 1, [&](int64_t first, int64_t last) {
    alignas(64) float part[kFewBlock * kFmaMaxGroup * 16];  // partial sums between chunks
    for (int64_t block = first; block < last; ++block) {
      const int64_t begin = block * kFewBlock, end = std::min(n_size, begin + kFewBlock);
      const int64_t next_end = block + 1 < last ? std::min(n_size, end + kFewBlock) : end;
      NextBlock ahead{reinterpret_cast<const char*>(wp + end * k_size),
                      reinterpret_cast<const char*>(wp + next_end * k_size)};
      for (int64_t m0 = 0, group; m0 < m_size; m0 += group) {
        group = fma_group(m_size, m0);
        kBlockFewFma[group - 1](xf.data() + m0 * k_pad, wp + begin * k_size, end - begin, k_size,
                                bp ? bp + begin : nullptr, yp + m0 * n_size + begin, n_size,
                                m0 == 0, ahead, part);
      }
    }
  });
  return call.y;
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
  m.def("gemm_few_bf16_fma", &gemm_few_bf16_fma,
        "y = x W^T (+ b) for a few bf16 rows (AVX512F: fp32 FMAs on weights widened in registers)");
  bind_shared_ops(m);
}
