// Storing a GEMM's transposed fp32 sums as bf16 rows: both of dstp's many-row GEMMs
// (gemm_widened.cpp, gemm_amx.cpp) keep y^T's sums and hand them to y here, the bias added
// and each value rounded to bf16 once (to nearest even, NaN kept a quiet NaN), as
// float_to_bf16 and oneDNN's bf16 GEMM round.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "bf16.h"

namespace dstp {

// the 16 lanes' offsets for a gather of one element a row, rows `stride` elements apart
__attribute__((target("avx512f"))) inline __m512i lane_offsets(int64_t stride) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(stride)));
}

// sums c [count][ldc] of rows [0, rows) -> out [rows][count] (row stride n_size), plus the
// bias (bf16 [count], or nullptr), rounded to bf16 once; one value at a time
inline void store_transposed(const float* c, int64_t ldc, int64_t rows, int64_t count,
                             const uint16_t* bias, uint16_t* out, int64_t n_size) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = 0; n < count; ++n) {
      const float v = c[n * ldc + i];
      out[i * n_size + n] = float_to_bf16(bias ? v + bf16_to_float(bias[n]) : v);
    }
}

// store_transposed, 16 outputs of a row at a time: a gather down c's column, the bias, bf16
// rounding
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_transposed_avx512(
    const float* c, int64_t ldc, int64_t rows, int64_t count, const uint16_t* bias,
    uint16_t* out, int64_t n_size) {
  const __m512i index = lane_offsets(ldc);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = 0; n < count; n += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, count - n)) - 1);
      __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index, c + n * ldc + i, 4);
      if (bias) v = _mm512_add_ps(v, widen_bf16_avx512(_mm256_maskz_loadu_epi16(mask, bias + n)));
      _mm256_mask_storeu_epi16(out + i * n_size + n, mask, round_to_bf16_avx512(v));
    }
}

// One round of a 16 x 16 transpose in registers: the off-diagonal S x S blocks of each
// 2S x 2S block trade places (r[i] lane j and r[i + S] lane j - S, for i with bit S clear and
// j with it set); rounds 8, 4, 2, 1 transpose the tile.
template <int S>
__attribute__((target("avx512f"), always_inline)) inline void swap_blocks(__m512 (&r)[16]) {
  __m512i low, high;  // lanes j: r[i]'s own, or r[i + S]'s j - S; r[i]'s j + S, or r[i + S]'s
  {
    alignas(64) int32_t l[16], h[16];
    for (int j = 0; j < 16; ++j) {
      l[j] = (j & S) ? 16 + j - S : j;
      h[j] = (j & S) ? 16 + j : j + S;
    }
    low = _mm512_load_si512(l);
    high = _mm512_load_si512(h);
  }
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const __m512 a = r[i], b = r[i + S];
    r[i] = _mm512_permutex2var_ps(a, low, b);
    r[i + S] = _mm512_permutex2var_ps(a, high, b);
  }
}

// One 16 x 16 tile of sums (c [16 n][16 m], as an AMX tile stores them) -> out's rows
// [0, rows) x 16 columns, the bias added, rounded as store_transposed_avx512 rounds. The tile
// is transposed in registers (four rounds of block swaps, 64 two-source permutes) rather
// than gathered a column at a time: the gathers took 13 % of a 1024-row AMX GEMM (FINDINGS.md).
__attribute__((target("avx512f,avx512bw,avx512vl"), flatten)) inline void
store_tile_transposed_avx512(const float* c, int64_t rows, const uint16_t* bias, uint16_t* out,
                             int64_t n_size) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(c + i * 16);
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
  const __m512 b =
      bias ? widen_bf16_avx512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias)))
           : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * n_size),
                        round_to_bf16_avx512(bias ? _mm512_add_ps(r[m], b) : r[m]));
}

}  // namespace dstp
