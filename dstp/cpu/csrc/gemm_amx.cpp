// bf16 GEMM on AMX tiles that reads the weight in its plain [N, K] layout: y = x W^T (+ b).
//
// oneDNN's bf16 GEMM on AMX lays each weight out for its tiles on every call (a copy of W in
// the VNNI pair order its B operand wants); packing W once would need a second copy of every
// weight beside the plain one dstp's GEMV reads. Here the product is computed transposed,
// y^T = W x^T: W is the tiles' A operand, which AMX loads straight from W's rows (16 rows x
// 32 columns a tile, row stride K), and x^T the B operand, packed once per call into pairs of
// columns ([16-row block][K/2][16][2]; x is at most a few hundred rows, a small copy). Rows of
// x go in chunks that stay in L2 while each pair of 16-row weight blocks streams past them
// once; each pass keeps 2 x 2 accumulator tiles (32 weight rows x 32 x rows) over a K block,
// and while a chunk's passes run the next weight block is pulled into L2. The sums go to y
// through an in-register transpose (transposed_store.h: bias added, rounded to bf16 once, as
// oneDNN's bf16 GEMM rounds). Threads split the weight rows. Measurements:
// benchmarks/FINDINGS.md, "An AMX GEMM on the plain weights" and "The AMX GEMM past 128 rows".
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv_call.h"
#include "transposed_store.h"

#if defined(__x86_64__) && !defined(DSTP_AVX2_ONLY) && __has_include(<amxtileintrin.h>)
#define DSTP_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kBlock = 16;   // rows of a tile (weight rows, or x rows in B's columns)
constexpr int64_t kStep = 32;    // bf16 columns of K a tile holds
constexpr int64_t kTile = kBlock * kBlock;  // fp32 sums a C tile holds
constexpr int64_t kKC = 2048;    // K columns per pass: 32 weight rows + 32 x rows x 4 KB in L2
constexpr int64_t kChunkBytes = 1 << 20;  // packed x rows a thread keeps in L2 over a weight slab
constexpr int64_t kMaxChunk = 256;        // x rows of a chunk at most (their sums stay small)
constexpr int64_t kPullPasses = 2;        // passes of a chunk from which it pulls the next block

#ifdef DSTP_HAS_AMX
#define DSTP_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

// Linux hands out the tiles' 8 KB of register state only to a process that asks for it
// (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); oneDNN asks the same way.
bool tiles_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Tiles 0-7, each 16 rows of 64 bytes: A (0, 1: weight), B (2, 3: x), C (4-7: sums).
DSTP_AMX void configure_tiles() {
  TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kBlock;
    config.bytes_per_row[t] = 64;
  }
  // gcc 12 does not see ldtilecfg read the struct and drops the stores above without this
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

DSTP_AMX void release_tiles() { _tile_release(); }

// Pulls the next weight block into L2 while this one's passes compute, a few lines a step, in
// the order the next block's tile loads read them: its first pass would otherwise wait on 32
// strided rows from memory. Only where a chunk has kPullPasses passes or more: with one pass
// the pulls compete with that pass's own loads (FINDINGS.md).
struct NextPair {
  const char* rows = nullptr;  // the next pair's K block (nullptr: nothing to pull)
  int64_t row_bytes = 0;       // between weight rows
  int64_t row_lines = 0;       // cache lines of a row's K block
  int64_t row = 0, line = 0;   // the next line to pull: down the rows, then the next column
  int64_t per_step = 0;

  DSTP_AMX void pull() {
    for (int64_t i = 0; i < per_step && line < row_lines; ++i) {
      _mm_prefetch(rows + row * row_bytes + line * 64, _MM_HINT_T1);
      if (++row == 2 * kBlock) {
        row = 0;
        ++line;
      }
    }
  }
};

// The sums of NB blocks of 16 weight rows (w, row stride k_size) by MB blocks of 16 x rows
// (xt, blocks x_stride apart) over `steps` x 32 columns, into c [NB][MB][16 n][16 m] fp32,
// added to what c holds unless `first`; each step pulls its share of `next`. Tile 4 + 2 i + j
// holds weight block i x x block j.
template <int NB, int MB>
DSTP_AMX void pass(const uint16_t* w, int64_t k_size, const uint16_t* xt, int64_t x_stride,
                   int64_t steps, float* c, bool first, NextPair& next) {
  if (first) {
    _tile_zero(4);
    if (MB == 2) _tile_zero(5);
    if (NB == 2) _tile_zero(6);
    if (NB == 2 && MB == 2) _tile_zero(7);
  } else {
    _tile_loadd(4, c, 64);
    if (MB == 2) _tile_loadd(5, c + kTile, 64);
    if (NB == 2) _tile_loadd(6, c + 2 * kTile, 64);
    if (NB == 2 && MB == 2) _tile_loadd(7, c + 3 * kTile, 64);
  }
  const int64_t w_bytes = k_size * 2;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(0, w + s * kStep, w_bytes);
    _tile_loadd(2, xt + s * kStep * kBlock, 64);
    _tile_dpbf16ps(4, 0, 2);
    if (MB == 2) {
      _tile_loadd(3, xt + x_stride + s * kStep * kBlock, 64);
      _tile_dpbf16ps(5, 0, 3);
    }
    if (NB == 2) {
      _tile_loadd(1, w + kBlock * k_size + s * kStep, w_bytes);
      _tile_dpbf16ps(6, 1, 2);
      if (MB == 2) _tile_dpbf16ps(7, 1, 3);
    }
    next.pull();
  }
  _tile_stored(4, c, 64);
  if (MB == 2) _tile_stored(5, c + kTile, 64);
  if (NB == 2) _tile_stored(6, c + 2 * kTile, 64);
  if (NB == 2 && MB == 2) _tile_stored(7, c + 3 * kTile, 64);
}

template <int NB>
DSTP_AMX void pass_x_blocks(int mb, const uint16_t* w, int64_t k_size, const uint16_t* xt,
                            int64_t x_stride, int64_t steps, float* c, bool first,
                            NextPair& next) {
  if (mb == 2)
    pass<NB, 2>(w, k_size, xt, x_stride, steps, c, first, next);
  else
    pass<NB, 1>(w, k_size, xt, x_stride, steps, c, first, next);
}

// x [M, K] -> xt [blocks][K/2][16][2]: each 16-row block of x as AMX's B operand (its columns
// in pairs of K), zero past M.
void pack_x(const uint16_t* x, int64_t m_size, int64_t k_size, uint16_t* xt, int64_t blocks) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(xt + b * kBlock * k_size);
      for (int64_t i = 0; i < kBlock; ++i) {
        const int64_t row = b * kBlock + i;
        const uint32_t* src = reinterpret_cast<const uint32_t*>(x + row * k_size);
        for (int64_t pair = 0; pair < k_size / 2; ++pair)
          dst[pair * kBlock + i] = row < m_size ? src[pair] : 0;
      }
    }
  });
}

// Where c's tile for weight block i (0, 1) of a pair and x block b of a chunk starting at
// block m0 lies in the chunk's sums: [x pair][weight block][x block of the pair][16 n][16 m]
float* tile_sums(float* sums, int64_t b, int64_t m0, int64_t i) {
  return sums + ((b - m0) / 2 * 4 + 2 * i + (b - m0) % 2) * kTile;
}

// A tile row that straddles two cache lines costs both lines' loads: packed x and the sums
// live in 64-byte aligned buffers (torch's CPU allocator aligns to 64; malloc's are 16 bytes
// off a line), 15 % on a 128-row product in a standalone test (FINDINGS.md).
uint16_t* aligned_bf16(at::Tensor& buffer, int64_t count) {
  buffer = at::empty({count}, at::kBFloat16);
  return reinterpret_cast<uint16_t*>(buffer.data_ptr());
}

// The block the passes of pair `pair`'s K block from k0 pull: the pair's next K block, else
// the next pair's first (a whole pair of this thread's, up to `end`), spread over the chunk's
// `passes` so that the last pass ends it.
NextPair next_block(const dstp::FewCall& call, int64_t pair, int64_t end, int64_t k0,
                    int64_t passes) {
  NextPair next;
  int64_t next_k0 = k0 + kKC;
  if (next_k0 >= call.k_size) {
    ++pair;
    next_k0 = 0;
  }
  if (passes < kPullPasses || pair >= end || 2 * pair + 2 > call.n_size / kBlock) return next;
  next.rows = reinterpret_cast<const char*>(call.w + pair * 2 * kBlock * call.k_size + next_k0);
  next.row_bytes = call.k_size * 2;
  next.row_lines = (std::min(call.k_size, next_k0 + kKC) - next_k0) * 2 / 64;
  next.per_step = (2 * kBlock + passes - 1) / passes;
  return next;
}

// x rows a chunk holds: as many as fit kChunkBytes at this K, in pairs of 16-row blocks. Each
// weight pair is read from memory once a chunk, so a larger chunk reads the weights fewer
// times; past L2 the x operand's tile loads would miss it.
int64_t chunk_rows(int64_t k_size) {
  return std::clamp<int64_t>(kChunkBytes / (2 * k_size) / 32 * 32, 32, kMaxChunk);
}

void gemm_amx(const dstp::FewCall& call) {
  const int64_t k_size = call.k_size;
  const int64_t x_blocks = (call.m_size + kBlock - 1) / kBlock;
  at::Tensor xt_buffer;
  uint16_t* const xt = aligned_bf16(xt_buffer, x_blocks * kBlock * k_size);
  pack_x(call.x, call.m_size, k_size, xt, x_blocks);
  const int64_t x_stride = kBlock * k_size;  // between packed x blocks
  const int64_t w_blocks = call.n_size / kBlock;
  const int64_t w_pairs = (w_blocks + 1) / 2;
  at::parallel_for(0, w_pairs, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    const int64_t chunk_blocks = chunk_rows(k_size) / kBlock;
    at::Tensor sums_buffer = at::empty({chunk_blocks * 2 * kTile}, at::kFloat);
    float* const sums = sums_buffer.data_ptr<float>();  // one chunk's, as tile_sums lays them
    for (int64_t m0 = 0; m0 < x_blocks; m0 += chunk_blocks) {
      const int64_t m1 = std::min(x_blocks, m0 + chunk_blocks);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int nb = std::min<int64_t>(2, w_blocks - 2 * pair);
        const uint16_t* w = call.w + pair * 2 * kBlock * k_size;
        for (int64_t k0 = 0; k0 < k_size; k0 += kKC) {
          const int64_t steps = (std::min(k_size, k0 + kKC) - k0) / kStep;
          NextPair next = next_block(call, pair, end, k0, (m1 - m0 + 1) / 2);
          for (int64_t b = m0; b < m1; b += 2) {
            const int mb = static_cast<int>(std::min<int64_t>(2, m1 - b));
            float* c = tile_sums(sums, b, m0, 0);
            const uint16_t* xt_b = xt + b * x_stride + k0 * kBlock;
            if (nb == 2)
              pass_x_blocks<2>(mb, w + k0, k_size, xt_b, x_stride, steps, c, k0 == 0, next);
            else
              pass_x_blocks<1>(mb, w + k0, k_size, xt_b, x_stride, steps, c, k0 == 0, next);
          }
        }
        for (int64_t b = m0; b < m1; ++b)
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t n0 = (2 * pair + i) * kBlock;
            const int64_t rows = std::min(kBlock, call.m_size - b * kBlock);
            dstp::store_tile_transposed_avx512(tile_sums(sums, b, m0, i), rows,
                                               call.bias ? call.bias + n0 : nullptr,
                                               call.out + b * kBlock * call.n_size + n0,
                                               call.n_size);
          }
      }
    }
    release_tiles();
  });
}
#endif  // DSTP_HAS_AMX

}  // namespace

// Whether this build has the AMX kernel and the OS lets this process use the tiles.
bool amx_tiles_ready() {
#ifdef DSTP_HAS_AMX
  return tiles_permitted();
#else
  return false;
#endif
}

// y = x W^T (+ b) for bf16 x [M, K] and W [N, K] (K a multiple of 32, N of 16) on AMX tiles.
torch::Tensor gemm_amx_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("dstp::gemm_amx_bf16", std::vector<c10::IValue>({x, weight}));
  const dstp::FewCall call(x, weight, bias, "gemm_amx_bf16");
  TORCH_CHECK(amx_tiles_ready(), "gemm_amx_bf16: no AMX tiles on this CPU, build or process");
  TORCH_CHECK(call.k_size % kStep == 0 && call.n_size % kBlock == 0, "gemm_amx_bf16: K (",
              call.k_size, ") must be a multiple of 32 and N (", call.n_size, ") of 16");
#ifdef DSTP_HAS_AMX
  if (call.m_size > 0) gemm_amx(call);
#endif
  return call.y;
}
