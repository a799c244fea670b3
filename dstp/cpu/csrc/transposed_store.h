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
  const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i quiet_nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t n = 0; n < count; n += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, count - n)) - 1);
      __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index, c + n * ldc + i, 4);
      if (bias) {
        const __m256i b = _mm256_maskz_loadu_epi16(mask, bias + n);
        const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(widened));
      }
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(round, lsb)), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan);
      _mm256_mask_storeu_epi16(out + i * n_size + n, mask, _mm512_cvtepi32_epi16(r));
    }
}

}  // namespace dstp
