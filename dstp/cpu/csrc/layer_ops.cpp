// The decoder layer's fused ops besides RMSNorm (issue 22), each one call where PyTorch runs
// several ops (dstp/model/fused_layers.py, dstp/worker/attention/backends/cpu.py):
//
//   rotary_bf16            half-split (neox) rotary of q and k together
//   write_kv_cache_bf16    the new K and V rows into the paged cache (vLLM's reshape_and_cache)
//   silu_mul_bf16          silu(gate) * up of the packed gate/up GEMM output
//   decode_attention_bf16  paged decode attention: scores, softmax and values in one pass
//
// AVX2 + FMA (both of dstp's builds compile this file with -mavx2 -mfma; the AVX512-BF16 build
// runs SiLU-mul's loop 16 lanes wide, bit for bit the same). Arithmetic is fp32;
// each op says where it rounds to bf16, which is where the PyTorch ops it replaces round.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "shared_ops.h"

namespace {

using dstp::bf16_to_float;
using dstp::float_to_bf16;

// -- vector helpers ----------------------------------------------------------------------

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

// silu_mul_bf16's vector loop 16 lanes at a time, each lane as the 8-lane loop computes it
// (1.7-1.9x its rate: 5.4 -> 2.8 ms for a [1024, 8192] gate/up, one thread; FINDINGS.md);
// returns how many of `width` it did
DSTP_AVX512 int64_t silu_mul_16(const uint16_t* gate, const uint16_t* up, uint16_t* dest,
                                int64_t width) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 16 <= width; i += 16) {
    const __m512 g = dstp::widen_bf16_avx512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gate + i)));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = round_to_bf16_16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    const __m512 u =
        dstp::widen_bf16_avx512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(up + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dest + i),
                        dstp::round_to_bf16_avx512(_mm512_mul_ps(silu, u)));
  }
  return i;
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

inline const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline uint16_t* bf16_ptr(torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check_bf16_rows(const torch::Tensor& t, int64_t dims, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dims &&
                  t.stride(dims - 1) == 1,
              what, " must be a bf16 CPU tensor of ", dims, " dims, its last one contiguous");
}

}  // namespace

// -- rotary --------------------------------------------------------------------------------

// x [B, T, N, d] (q and k heads of each token), cos and sin [B or 1, T, d] (sin with HF's
// rotate_half sign folded in: -sin over the first half) -> out [B, T, N, d] contiguous:
//   out[i] = bf16( bf16(x[i] * cos[i]) + x[(i + d/2) % d] * sin[i] )
// i.e. torch.addcmul(x * cos, torch.roll(x, d/2, -1), sin) on bf16 tensors, bit for bit (the
// product rounded as ATen's bf16 mul, then addcmul's fp32 fma rounded once). Rows (tokens) are
// split over threads.
torch::Tensor rotary_bf16(const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin) {
  RECORD_FUNCTION("dstp::rotary_bf16", std::vector<c10::IValue>({x}));
  check_bf16_rows(x, 4, "rotary: x");
  check_bf16_rows(cos, 3, "rotary: cos");
  check_bf16_rows(sin, 3, "rotary: sin");
  const int64_t batch = x.size(0), tokens = x.size(1), heads = x.size(2), dim = x.size(3);
  TORCH_CHECK(dim % 2 == 0, "rotary: odd head dim ", dim);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK((t->size(0) == batch || t->size(0) == 1) && t->size(1) == tokens &&
                    t->size(2) == dim,
                "rotary: cos and sin must be [B or 1, T, d] of x's [B, T, N, d]");
  }
  auto out = torch::empty({batch, tokens, heads, dim}, x.options());
  const uint16_t *xp = bf16_ptr(x), *cp = bf16_ptr(cos), *sp = bf16_ptr(sin);
  uint16_t* op = bf16_ptr(out);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), st = sin.stride(1);
  const int64_t half = dim / 2;
  at::parallel_for(0, batch * tokens, 1, [&](int64_t first, int64_t last) {
    std::vector<float> c(dim), s(dim);
    for (int64_t r = first; r < last; ++r) {
      const int64_t b = r / tokens, t = r % tokens;
      for (int64_t i = 0; i < dim; ++i) {
        c[i] = bf16_to_float(cp[b * cb + t * ct + i]);
        s[i] = bf16_to_float(sp[b * sb + t * st + i]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* in = xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        uint16_t* dest = op + (r * heads + h) * dim;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {  // both halves, 8 columns each
          const __m256 lo = widen8(in + i), hi = widen8(in + half + i);
          const __m256 lo_cos = round_to_bf16(_mm256_mul_ps(lo, _mm256_loadu_ps(&c[i])));
          const __m256 hi_cos = round_to_bf16(_mm256_mul_ps(hi, _mm256_loadu_ps(&c[half + i])));
          narrow8(_mm256_fmadd_ps(hi, _mm256_loadu_ps(&s[i]), lo_cos), dest + i);
          narrow8(_mm256_fmadd_ps(lo, _mm256_loadu_ps(&s[half + i]), hi_cos), dest + half + i);
        }
        for (; i < half; ++i) {
          for (const int64_t at : {i, half + i}) {
            const float rolled = bf16_to_float(in[at < half ? at + half : at - half]);
            const float scaled = bf16_to_float(float_to_bf16(bf16_to_float(in[at]) * c[at]));
            dest[at] = float_to_bf16(std::fma(rolled, s[at], scaled));
          }
        }
      }
    }
  });
  return out;
}

// -- the paged K/V cache write -------------------------------------------------------------

// key [KV, T, dk] and value [KV, T, dv] (any token and head strides) -> k_cache[h, slots[t]]
// and v_cache[h, slots[t]] ([KV, cache slots, dk or dv], contiguous), in place: the two
// index_copy_ calls of the PyTorch path in one, copying bf16 as it is. Tokens are written in
// order (one task per KV head), so a slot named twice (the decode buckets' padding rows all
// write the scratch block's first slot) ends with the last, as index_copy_ on a CPU does.
void write_kv_cache_bf16(const torch::Tensor& key, const torch::Tensor& value,
                         torch::Tensor k_cache, torch::Tensor v_cache,
                         const torch::Tensor& slots) {
  RECORD_FUNCTION("dstp::write_kv_cache_bf16", std::vector<c10::IValue>({key, value}));
  check_bf16_rows(key, 3, "kv cache write: key");
  check_bf16_rows(value, 3, "kv cache write: value");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kBFloat16 && c->dim() == 3 &&
                    c->is_contiguous(),
                "kv cache write: the caches must be contiguous bf16 [kv heads, slots, dim]");
  const int64_t kv = key.size(0), tokens = key.size(1);
  TORCH_CHECK(value.size(0) == kv && value.size(1) == tokens && k_cache.size(0) == kv &&
                  v_cache.size(0) == kv && k_cache.size(2) == key.size(2) &&
                  v_cache.size(2) == value.size(2) && k_cache.size(1) == v_cache.size(1),
              "kv cache write: key, value and the caches disagree in heads, tokens or dims");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() == tokens &&
                  slots.is_contiguous(),
              "kv cache write: one contiguous int64 slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "kv cache write: slot ", slot[t],
                " outside the cache's ", capacity);
  const uint16_t *kp = bf16_ptr(key), *vp = bf16_ptr(value);
  uint16_t *kc = bf16_ptr(k_cache), *vc = bf16_ptr(v_cache);
  const int64_t dk = key.size(2), dv = value.size(2);
  at::parallel_for(0, kv, 1, [&](int64_t first, int64_t last) {
    for (int64_t h = first; h < last; ++h) {
      for (int64_t t = 0; t < tokens; ++t) {
        std::memcpy(kc + (h * capacity + slot[t]) * dk,
                    kp + h * key.stride(0) + t * key.stride(1), dk * sizeof(uint16_t));
        std::memcpy(vc + (h * capacity + slot[t]) * dv,
                    vp + h * value.stride(0) + t * value.stride(1), dv * sizeof(uint16_t));
      }
    }
  });
}

// -- SiLU-mul ------------------------------------------------------------------------------

// gate_up [..., 2I] contiguous (gate first, then up) -> out [..., I]:
//   out = bf16( bf16(g / (1 + exp(-g))) * u )
// as F.silu(gate) * up on bf16 tensors: silu in fp32 rounded once, the product rounded once.
// exp is exp8's (not ATen's Sleef), so a rare output can differ from ATen's by one bf16 ulp.
torch::Tensor silu_mul_bf16(const torch::Tensor& gate_up) {
  RECORD_FUNCTION("dstp::silu_mul_bf16", std::vector<c10::IValue>({gate_up}));
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.scalar_type() == at::kBFloat16 &&
                  gate_up.is_contiguous() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "silu_mul: gate_up must be contiguous bf16 [..., 2 * inner]");
  const int64_t width = gate_up.size(-1) / 2, rows = width ? gate_up.numel() / (2 * width) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, gate_up.options());
  const uint16_t* in = bf16_ptr(gate_up);
  uint16_t* op = bf16_ptr(out);
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = first; r < last; ++r) {
      const uint16_t *gate = in + r * 2 * width, *up = gate + width;
      uint16_t* dest = op + r * width;
      int64_t i = 0;
#ifndef DSTP_AVX2_ONLY
      i = silu_mul_16(gate, up, dest, width);  // this build runs on AVX512-BF16 CPUs only
#endif
      for (; i + 8 <= width; i += 8) {
        const __m256 g = widen8(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = round_to_bf16(_mm256_div_ps(g, _mm256_add_ps(one, e)));
        narrow8(_mm256_mul_ps(silu, widen8(up + i)), dest + i);
      }
      for (; i < width; ++i) {
        const float g = bf16_to_float(gate[i]);
        const float silu = bf16_to_float(float_to_bf16(g / (1.0f + exp1(-g))));
        dest[i] = float_to_bf16(silu * bf16_to_float(up[i]));
      }
    }
  });
  return out;
}

// -- paged decode attention ----------------------------------------------------------------

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head the kernel takes

struct Paged {  // one KV head of one cache, addressed through a sequence's block table
  const uint16_t* head;
  const int64_t* blocks;
  int64_t block_size, dim;
  inline const uint16_t* row(int64_t j) const {
    return head + (blocks[j / block_size] * block_size + j % block_size) * dim;
  }
};

// The group size G is a template argument: with a run-time count GCC keeps the accumulator
// array on the stack (a load and a store around every FMA); with G known, in registers.

// scores[g, j - from] = scaling * q[g] . k[j] for keys from <= j < len, fp32 throughout.
template <int G>
void scores_one(const float* q, int64_t dim, const Paged& keys, int64_t from, int64_t len,
                float scaling, float* scores) {
  const int64_t n = len - from;
  for (int64_t j = from; j < len; ++j) {
    const uint16_t* k = keys.row(j);
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
      const __m256 kv = widen8(k + c);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + c), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g * n + j - from] = hsum(acc[g]) * scaling;
  }
}

// out[g, :] = sum_j probs[g, j - from] * v[j], fp32, for 8 columns of every head at a time
// so the accumulators stay in registers; rounded to bf16 once, into out + g * out_head.
template <int G>
void values_one(const float* probs, int64_t dim, const Paged& values, int64_t from,
                int64_t len, uint16_t* out, int64_t out_head) {
  const int64_t n = len - from;
  for (int64_t c = 0; c < dim; c += 8) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = from; j < len; ++j) {
      const __m256 v = widen8(values.row(j) + c);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(probs[g * n + j - from]), v, acc[g]);
    }
    for (int g = 0; g < G; ++g) narrow8(acc[g], out + g * out_head + c);
  }
}

// Each score row (n keys) in place: softcap * tanh(score / softcap) when softcap > 0, then
// softmax in fp32 (exp(s - max), times 1 / sum, as ATen's softmax).
void softmax_rows(float* scores, int rows, int64_t n, float softcap) {
  for (int g = 0; g < rows; ++g) {
    float* s = scores + g * n;
    if (softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) s[j] = std::tanh(s[j] / softcap) * softcap;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
    const __m256 shift = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
      _mm256_storeu_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; j < n; ++j) sum += (s[j] = exp1(s[j] - top));
    const float inverse = 1.0f / sum;
    for (j = 0; j < n; ++j) s[j] *= inverse;
  }
}

using OneFn = void (*)(const float*, int64_t, int64_t, const Paged&, const Paged&, int64_t,
                       int64_t, float, float, float*, uint16_t*, int64_t);

// One (KV head, sequence): its G query heads' scores, softmax and values.
template <int G>
void attend_one(const float* q, int64_t dk, int64_t dv, const Paged& keys, const Paged& values,
                int64_t from, int64_t len, float scaling, float softcap, float* scores,
                uint16_t* out, int64_t out_head) {
  scores_one<G>(q, dk, keys, from, len, scaling, scores);
  softmax_rows(scores, G, len - from, softcap);
  values_one<G>(scores, dv, values, from, len, out, out_head);
}

// kAttend[G - 1]: the kernel for G query heads per KV head, 1..kMaxGroup.
template <int... I>
constexpr std::array<OneFn, sizeof...(I)> attend_kernels(std::integer_sequence<int, I...>) {
  return {{attend_one<I + 1>...}};
}
constexpr auto kAttend = attend_kernels(std::make_integer_sequence<int, kMaxGroup>{});

void check_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& rows,
                     const torch::Tensor& tables, const torch::Tensor& lens,
                     int64_t block_size) {
  check_bf16_rows(q, 3, "decode attention: query");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == at::kBFloat16 && c->is_contiguous() && c->dim() == 3,
                "decode attention: the caches must be contiguous bf16 [kv heads, slots, dim]");
  const int64_t kv = k_cache.size(0), heads = q.size(0);
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(2) % 8 == 0 && v_cache.size(2) % 8 == 0,
              "decode attention: head dims must be multiples of 8, the query's the keys'");
  TORCH_CHECK(v_cache.size(0) == kv && v_cache.size(1) == k_cache.size(1),
              "decode attention: the K and V caches differ in heads or slots");
  TORCH_CHECK(kv > 0 && heads > 0 && heads % kv == 0 && heads / kv <= kMaxGroup,
              "decode attention: 1 to ", kMaxGroup, " query heads per KV head");
  const int64_t seqs = rows.numel();
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1,
              "decode attention: rows must be contiguous int64");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() &&
                  tables.dim() == 2 && tables.size(0) == seqs,
              "decode attention: block tables must be contiguous int64 [seqs, blocks]");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == seqs,
              "decode attention: one int64 length per sequence");
  TORCH_CHECK(block_size > 0, "decode attention: block size ", block_size);
  const int64_t width = tables.size(1), max_len = width * block_size;
  const int64_t blocks = k_cache.size(1) / block_size;
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  const int64_t* bt = tables.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= max_len, "decode attention: sequence ", s, " has ",
                lp[s], " keys, outside [1, ", max_len, "]");
    TORCH_CHECK(rp[s] >= 0 && rp[s] < q.size(1), "decode attention: row ", rp[s],
                " outside the query's ", q.size(1), " tokens");
    for (int64_t b = 0; b < (lp[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(bt[s * width + b] >= 0 && bt[s * width + b] < blocks,
                  "decode attention: block ", bt[s * width + b], " outside the cache's ", blocks);
  }
}

}  // namespace

// query [H, T, dk] bf16 (any token and head strides); k_cache [KV, slots, dk] and v_cache
// [KV, slots, dv] bf16; for each decoding sequence s: its token's row rows[s] in the query,
// its block table tables[s] and its length lens[s] (keys in the cache, its new one included)
// -> out [T, H, dv] bf16 with row rows[s] of each s written (other rows left unset, for the
// caller's prefill):
//   out[rows[s], h] = sum_j p_j v[slot(s, j)],  p = softmax_j(cap(scaling * q[h, rows[s]] . k[slot(s, j)]))
// over keys max(0, len - window) <= j < len (window > 0: a sliding window), cap(x) =
// softcap * tanh(x / softcap) when softcap > 0. fp32 throughout (bf16 widened exactly), the
// output rounded to bf16 once: the PyTorch path's fp32 attention then `.to(bf16)`.
torch::Tensor decode_attention_bf16(const torch::Tensor& query, const torch::Tensor& k_cache,
                                    const torch::Tensor& v_cache, const torch::Tensor& rows,
                                    const torch::Tensor& tables, const torch::Tensor& lens,
                                    int64_t block_size, double scaling, double softcap,
                                    int64_t window) {
  RECORD_FUNCTION("dstp::decode_attention_bf16", std::vector<c10::IValue>({query, k_cache}));
  check_attention(query, k_cache, v_cache, rows, tables, lens, block_size);
  const int64_t heads = query.size(0), tokens = query.size(1), dk = query.size(2);
  const int64_t kv = k_cache.size(0), dv = v_cache.size(2), slots = k_cache.size(1);
  const int64_t seqs = rows.numel(), width = tables.size(1);
  const int group = static_cast<int>(heads / kv);
  auto out = torch::empty({tokens, heads, dv}, query.options());
  const uint16_t *qp = bf16_ptr(query), *kc = bf16_ptr(k_cache), *vc = bf16_ptr(v_cache);
  uint16_t* op = bf16_ptr(out);
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  const int64_t* bt = tables.data_ptr<int64_t>();
  const int64_t qh = query.stride(0), qt = query.stride(1);
  at::parallel_for(0, kv * seqs, 1, [&](int64_t first, int64_t last) {
    std::vector<float> qg(static_cast<size_t>(group * dk)), scores;
    for (int64_t i = first; i < last; ++i) {
      const int64_t h = i / seqs, s = i % seqs, len = lp[s];
      const int64_t from = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      for (int g = 0; g < group; ++g) {  // this pair's query heads, widened, contiguous
        const uint16_t* src = qp + (h * group + g) * qh + rp[s] * qt;
        for (int64_t c = 0; c < dk; ++c) qg[g * dk + c] = bf16_to_float(src[c]);
      }
      scores.resize(static_cast<size_t>(group * (len - from)));
      const Paged keys{kc + h * slots * dk, bt + s * width, block_size, dk};
      const Paged values{vc + h * slots * dv, bt + s * width, block_size, dv};
      kAttend[group - 1](qg.data(), dk, dv, keys, values, from, len, static_cast<float>(scaling),
                         static_cast<float>(softcap), scores.data(),
                         op + (rp[s] * heads + h * group) * dv, dv);
    }
  });
  return out;
}

void bind_layer_ops(pybind11::module& m) {
  m.def("rotary_bf16", &rotary_bf16, "half-split rotary of bf16 q/k heads, addcmul's rounding");
  m.def("write_kv_cache_bf16", &write_kv_cache_bf16,
        "new bf16 K/V rows into the paged cache at their slots, in place");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of a bf16 gate/up output");
  m.def("decode_attention_bf16", &decode_attention_bf16,
        "paged decode attention over a bf16 cache in one call (fp32 softmax)");
}
