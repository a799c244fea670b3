// bf16 GEMM for many rows (prefill, big batches) at the fp32 FMA rate: y = x W^T (+ b).
//
// Where oneDNN's bf16 GEMM is slow (no bf16 dot product, or one that issues at half the FMA
// rate under KVM) dstp computed in fp32 by widening each block of weight rows into a buffer
// and calling MKL's sgemm on it: every weight crossed memory three times (bf16 read, fp32
// written, fp32 read back and packed by MKL) and MKL repacked x for every block. Here the
// widening IS the packing, as a BLIS-style GEMM packs: a panel of kNR weight rows x kKC
// columns is widened once into L1, and every kMR-row tile of x meets it there.
//
// x is packed once per call, transposed in tiles of kMR rows ([tile][K][kMR] fp32, zero past
// M), so the micro-kernel's x operand is kMR/16 (or /8) vector loads per column and the
// weight operand one broadcast per row: kMR x kNR sums stay in registers over a kKC block.
// The sums of a block of kNC weight rows (C^T, [kNC][tiles * kMR]) stay in L2 across the K
// blocks, then go to y transposed, bias added, rounded to bf16 once (as oneDNN's bf16 GEMM and
// dstp's other kernels round). Threads split the weight rows. Measurements and the variants
// tried: benchmarks/FINDINGS.md, "dstp's widening GEMM".
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "bf16.h"
#include "gemv_call.h"
#include "transposed_store.h"

namespace {

constexpr int64_t kKC = 512;  // columns per K block (the panel: kNR x 512 x 4 B in L1)
constexpr int64_t kNC = 192;  // weight rows whose sums stay in L2 across the K blocks
constexpr int64_t kMC = 256;  // x rows per pass over the weights (bounds the scratch)

// The portable halves of packing x and storing y, one value at a time (the AVX2 build's).
struct Scalar {
  // rows [0, rows) of x (row stride k_size) into one tile [k_size][mr], zero past `rows`
  static void pack_tile(const uint16_t* x, int64_t rows, int64_t k_size, int64_t mr,
                        float* xt) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(xt);
    for (int64_t i = 0; i < mr; ++i) {
      const uint16_t* src = x + i * k_size;
      for (int64_t k = 0; k < k_size; ++k)
        dst[k * mr + i] = i < rows ? static_cast<uint32_t>(src[k]) << 16 : 0;
    }
  }

  static constexpr auto store = dstp::store_transposed;
};

// One instruction set's micro-kernel: kMR x rows (vector lanes) by NR weight rows (broadcasts).
struct Avx512 {
  static constexpr int kMR = 32;  // two zmm
  static constexpr int kNR = 12;  // 24 accumulators + 2 x vectors + a broadcast of 32 zmm

  // c[n * ldc + i] (+)= sum over k < kc of xt[k * 16V + i] * wp[n * kKC + k], i < 16V: a
  // tile of 32 x rows (V = 2) or, for the last few, 16 (V = 1)
  template <int NR, int V>
  __attribute__((target("avx512f"))) static void tile(const float* xt, const float* wp,
                                                      int64_t kc, float* c, int64_t ldc,
                                                      bool accumulate) {
    __m512 acc[NR][V];
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n)
      for (int v = 0; v < V; ++v)
        acc[n][v] = accumulate ? _mm512_loadu_ps(c + n * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; ++k, xt += 16 * V) {
      __m512 x[V];
      for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_ps(xt + 16 * v);
#pragma GCC unroll 16
      for (int n = 0; n < NR; ++n) {
        const __m512 w = _mm512_set1_ps(wp[n * kKC + k]);
        for (int v = 0; v < V; ++v) acc[n][v] = _mm512_fmadd_ps(x[v], w, acc[n][v]);
      }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + n * ldc + 16 * v, acc[n][v]);
  }

  // Scalar::pack_tile with gathers: one dword per row holds columns k and k + 1, widened by a
  // shift (k) and a mask (k + 1); 16 rows a gather, rows past `rows` masked to zero
  __attribute__((target("avx512f"))) static void pack_tile(const uint16_t* x, int64_t rows,
                                                           int64_t k_size, int64_t mr,
                                                           float* xt) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512i index = dstp::lane_offsets(k_size);
    for (int64_t r0 = 0; r0 < mr; r0 += 16) {
      const int64_t live = std::clamp<int64_t>(rows - r0, 0, 16);
      const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1);
      const uint16_t* base = x + std::min(r0, rows) * k_size;
      float* dst = xt + r0;
      int64_t k = 0;
      for (; k + 2 <= k_size; k += 2) {
        const __m512i v =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, index, base + k, 2);
        _mm512_storeu_si512(dst + k * mr, _mm512_slli_epi32(v, 16));
        _mm512_storeu_si512(dst + (k + 1) * mr, _mm512_and_si512(v, high));
      }
      if (k < k_size) {  // an odd K's last column: its dword would reach past the row
        uint32_t* last = reinterpret_cast<uint32_t*>(dst + k * mr);
        for (int64_t i = 0; i < 16; ++i)
          last[i] = i < live ? static_cast<uint32_t>(base[i * k_size + k]) << 16 : 0;
      }
    }
  }

  static constexpr auto store = dstp::store_transposed_avx512;
};

struct Avx2 : Scalar {
  static constexpr int kMR = 16;  // two ymm
  static constexpr int kNR = 6;   // 12 accumulators + 2 x vectors + a broadcast of 16 ymm

  // Avx512::tile at 256 bits: 16 x rows (V = 2) or 8 (V = 1)
  template <int NR, int V>
  __attribute__((target("avx2,fma"))) static void tile(const float* xt, const float* wp,
                                                      int64_t kc, float* c, int64_t ldc,
                                                      bool accumulate) {
    __m256 acc[NR][V];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n)
      for (int v = 0; v < V; ++v)
        acc[n][v] = accumulate ? _mm256_loadu_ps(c + n * ldc + 8 * v) : _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; ++k, xt += 8 * V) {
      __m256 x[V];
      for (int v = 0; v < V; ++v) x[v] = _mm256_loadu_ps(xt + 8 * v);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        const __m256 w = _mm256_broadcast_ss(wp + n * kKC + k);
        for (int v = 0; v < V; ++v) acc[n][v] = _mm256_fmadd_ps(x[v], w, acc[n][v]);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n)
      for (int v = 0; v < V; ++v) _mm256_storeu_ps(c + n * ldc + 8 * v, acc[n][v]);
  }
};

using TileFn = void (*)(const float*, const float*, int64_t, float*, int64_t, bool);

// Isa::tile<1, V>, ..., Isa::tile<kNR, V>: the last panel of a block may have fewer rows
template <class Isa, int V, int... NR>
constexpr std::array<TileFn, sizeof...(NR)> tiles_of(std::integer_sequence<int, NR...>) {
  return {&Isa::template tile<NR + 1, V>...};
}

// Weight rows [0, rows) x columns [0, kc) of w (row stride k_size), widened into wp [rows][kKC].
void widen_panel(const uint16_t* w, int64_t rows, int64_t kc, int64_t k_size, float* wp) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* src = w + r * k_size;
    uint32_t* dst = reinterpret_cast<uint32_t*>(wp + r * kKC);
    for (int64_t k = 0; k < kc; ++k) dst[k] = static_cast<uint32_t>(src[k]) << 16;
  }
}

template <class Isa>
void gemm_widened(const dstp::FewCall& call) {
  constexpr int64_t mr = Isa::kMR, nr = Isa::kNR;
  static constexpr auto kFull = tiles_of<Isa, 2>(std::make_integer_sequence<int, Isa::kNR>{});
  static constexpr auto kHalf = tiles_of<Isa, 1>(std::make_integer_sequence<int, Isa::kNR>{});
  const int64_t m_size = call.m_size, n_size = call.n_size, k_size = call.k_size;
  const std::unique_ptr<float[]> xt(new float[static_cast<size_t>(
      ((std::min(m_size, kMC) + mr - 1) / mr) * mr * k_size)]);
  for (int64_t m0 = 0; m0 < m_size; m0 += kMC) {
    // tiles of mr rows; the last of mr / 2 where the rows left fit in it
    const int64_t rows = std::min(kMC, m_size - m0), tiles = (rows + mr - 1) / mr;
    const int64_t left = rows - (tiles - 1) * mr, last = left <= mr / 2 ? mr / 2 : mr;
    const int64_t ldc = (tiles - 1) * mr + last;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        Isa::pack_tile(call.x + (m0 + t * mr) * k_size, rows - t * mr, k_size,
                       t + 1 < tiles ? mr : last, xt.get() + t * k_size * mr);
    });
    at::parallel_for(0, (n_size + kNC - 1) / kNC, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> wp(static_cast<size_t>(nr * kKC));
      std::vector<float> c(static_cast<size_t>(kNC * ldc), 0.0f);  // zero: the sums at K = 0
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kNC, n1 = std::min(n_size, n0 + kNC);
        for (int64_t k0 = 0; k0 < k_size; k0 += kKC) {
          const int64_t kc = std::min(kKC, k_size - k0);
          for (int64_t p = n0; p < n1; p += nr) {
            const int64_t prow = std::min(nr, n1 - p);
            widen_panel(call.w + p * k_size + k0, prow, kc, k_size, wp.data());
            for (int64_t t = 0; t < tiles; ++t) {
              const auto& run = t + 1 < tiles || last == mr ? kFull : kHalf;
              const int64_t width = t + 1 < tiles ? mr : last;
              run[prow - 1](xt.get() + t * k_size * mr + k0 * width, wp.data(), kc,
                            c.data() + (p - n0) * ldc + t * mr, ldc, k0 > 0);
            }
          }
        }
        Isa::store(c.data(), ldc, rows, n1 - n0, call.bias ? call.bias + n0 : nullptr,
                   call.out + m0 * n_size + n0, n_size);
      }
    });
  }
}

}  // namespace

// y = x W^T (+ b) for bf16 x [M, K] and W [N, K], in fp32 on weights widened as they are packed.
torch::Tensor gemm_widened_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                                const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_widened_bf16", std::vector<c10::IValue>({x, weight}));
  const dstp::FewCall call(x, weight, bias, "gemm_widened_bf16");
  if (call.m_size == 0) return call.y;
#ifndef DSTP_AVX2_ONLY  // the AVX2 build: 256-bit even on an AVX512 CPU (it stands in for one)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    gemm_widened<Avx512>(call);
    return call.y;
  }
#endif
  gemm_widened<Avx2>(call);
  return call.y;
}
