// The decoder layer's fused ops besides RMSNorm (issue 22), each one call where PyTorch runs
// several ops (dstp/model/fused_layers.py, dstp/worker/attention/backends/cpu.py):
//
//   rotary_bf16            half-split (neox) rotary of q and k together
//   write_kv_cache_bf16    the new K and V rows into the paged cache (vLLM's reshape_and_cache)
//   silu_mul_bf16          silu(gate) * up of the packed gate/up GEMM output
//
// (paged decode attention is decode_attention.cpp's)
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
#include "vec_math.h"

namespace {

using dstp::bf16_to_float;
using dstp::float_to_bf16;

#ifndef DSTP_AVX2_ONLY
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

void bind_layer_ops(pybind11::module& m) {
  m.def("rotary_bf16", &rotary_bf16, "half-split rotary of bf16 q/k heads, addcmul's rounding");
  m.def("write_kv_cache_bf16", &write_kv_cache_bf16,
        "new bf16 K/V rows into the paged cache at their slots, in place");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of a bf16 gate/up output");
}
