// fp32 vector math on bf16 data, shared by the decoder layer's ops (layer_ops.cpp) and paged
// decode attention (decode_attention.cpp): exact widening, PyTorch's rounding, expf at 8 lanes
// (AVX2 + FMA, both builds) and at 16 (AVX512, the AVX512-BF16 build only), lane for lane the
// same. Each .cpp that includes it gets its own copies (an unnamed namespace).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "bf16.h"

namespace {

inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 fp32, exact
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// 8 fp32 -> 8 bf16, round to nearest even (PyTorch's rounding); any NaN -> 0x7FC0
inline void narrow8(__m256 v, uint16_t* p) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  r = _mm256_srli_epi32(r, 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather qwords 0 and 2
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// v rounded to the nearest bf16 (ties to even), kept as fp32: narrow8 then widen8 in registers
// (a NaN from a widened bf16 stays NaN: its low 16 bits are 0, the add cannot carry out)
inline __m256 round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm256_castsi256_ps(_mm256_and_si256(r, high));
}

// exp(x) in fp32, Cephes' expf (2^n * a degree-5 polynomial on |r| <= ln2/2): within ~2 ulp
// of the true value, as ATen's vectorised exp is; inf past fp32's range (so silu(x) of a very
// negative x is -0, as ATen's), 0 below its normal range (where exp is < 2^-126). exp8 and
// exp16 apply these constants in the same order, so their lanes agree bit for bit.
namespace expf_consts {
constexpr float kOver = 88.72283935546875f;   // exp overflows fp32 past this
constexpr float kLow = -87.33654022216797f;   // exp(kLow) = 2^-126
constexpr float kClamp = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 in two parts
constexpr float kPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                           4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_consts

inline __m256 exp8(__m256 x) {
  using namespace expf_consts;
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(kOver), _CMP_GT_OQ);
  const __m256 low = _mm256_set1_ps(kLow);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  // operands in this order, a NaN x passes (max/min return their second operand on NaN)
  x = _mm256_min_ps(_mm256_set1_ps(kClamp), _mm256_max_ps(low, x));
  const __m256 n =
      _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), x);
  __m256 y = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
  return _mm256_andnot_ps(under, y);  // a NaN stays NaN (neither compare holds for it)
}

#ifndef DSTP_AVX2_ONLY
#define DSTP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

DSTP_AVX512 inline __m512 exp16(__m512 x) {  // exp8 on 16 lanes
  using namespace expf_consts;
  const __mmask16 over = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kOver), _CMP_GT_OQ);
  const __m512 low = _mm512_set1_ps(kLow);
  const __mmask16 under = _mm512_cmp_ps_mask(x, low, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(kClamp), _mm512_max_ps(low, x));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), x);
  __m512 y = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  y = _mm512_mask_blend_ps(over, y, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);  // as exp8's andnot
}

// round_to_bf16 on 16 lanes
DSTP_AVX512 inline __m512 round_to_bf16_16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm512_castsi512_ps(_mm512_and_si512(r, high));
}

// The first min(k, 16) lanes of 16 (k >= 0): a row's tail under a mask
inline __mmask16 first_lanes(int64_t k) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(k, 16)) - 1);
}
#endif  // DSTP_AVX2_ONLY

inline float exp1(float x) {  // exp8 of one value (the same rounding as the vector lanes)
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, exp8(_mm256_set1_ps(x)));
  return lanes[0];
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// -- bf16 tensors -----------------------------------------------------------------------

inline const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline uint16_t* bf16_ptr(torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline void check_bf16_rows(const torch::Tensor& t, int64_t dims, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dims &&
                  t.stride(dims - 1) == 1,
              what, " must be a bf16 CPU tensor of ", dims, " dims, its last one contiguous");
}

}  // namespace
