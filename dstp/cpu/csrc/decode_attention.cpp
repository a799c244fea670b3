// Paged decode attention (vLLM's paged_attention for a CPU): each decoding sequence's query
// heads against its keys and values where they lie in the paged cache, through its block
// table; scores, softmax and values in one call, nothing gathered or padded.
//
// One path a build, one result up to fp32 rounding: the AVX2 build's (fp32 FMAs over widened
// bf16, 8 lanes) and the AVX512-BF16 build's (scores by vdpbf16ps, bf16 pairs multiplied
// exactly and summed in fp32, for 16 keys at a time; softmax and values 16 lanes wide). The
// output is rounded to bf16 once, as the PyTorch path's fp32 attention then `.to(bf16)`.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "shared_ops.h"
#include "vec_math.h"

namespace {

using dstp::bf16_to_float;

constexpr int kMaxGroup = 16;  // query heads per KV head the kernel takes

struct Paged {  // one KV head of one cache, addressed through a sequence's block table
  const uint16_t* head;
  const int64_t* blocks;
  int64_t block_size, dim;
};

// Keys from <= j < len lie in runs, one block's part each, contiguous in the cache: the run
// from key j ends before key `end`, its first row at `row`. One table lookup (and division)
// a block, not a key: a division per key cost more than the key's arithmetic. Walked as
//   for (int64_t j = from; j < len;) for (Run r = run_at(p, j, len); j < r.end; ++j, ...)
struct Run {
  int64_t end;
  const uint16_t* row;
};

inline Run run_at(const Paged& p, int64_t j, int64_t len) {
  const int64_t block = j / p.block_size;
  return {std::min(len, (block + 1) * p.block_size),
          p.head + (p.blocks[block] * p.block_size + j - block * p.block_size) * p.dim};
}

// Asks for the run of rows from key j (one block's part) to be brought into cache: blocks lie
// scattered, so the hardware prefetcher starts cold at each one.
inline void prefetch_run(const Paged& p, int64_t j, int64_t len) {
  if (j >= len) return;
  const Run r = run_at(p, j, len);
  const char* first = reinterpret_cast<const char*>(r.row);
  const int64_t bytes = (r.end - j) * p.dim * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(first + at, _MM_HINT_T0);
}

// One (KV head, sequence) pair's work: its G query heads (bf16, each `dk` contiguous values,
// head g at query + g * query_head), its keys and values, and where its G output rows go.
struct Job {
  const uint16_t* query;
  int64_t query_head, dk, dv;
  Paged keys, values;
  int64_t from, len;
  float scaling, softcap;
  uint16_t* out;
  int64_t out_head;
};

struct Scratch {  // per thread, reused across jobs
  std::vector<float> query, scores;  // the AVX2 path's query is widened to fp32
  std::vector<uint16_t> query_bf16;  // the AVX512-BF16 path's, zero-padded
};

#ifdef DSTP_AVX2_ONLY  // the AVX2 build's path; the AVX512-BF16 build's is below

// The group size G is a template argument: with a run-time count GCC keeps the accumulator
// array on the stack (a load and a store around every FMA); with G known, in registers.

// scores[g, j - from] = scaling * q[g] . k[j] for keys from <= j < len, fp32 throughout.
template <int G>
void scores_one(const float* q, int64_t dim, const Paged& keys, const Paged& values,
                int64_t from, int64_t len, float scaling, float* scores) {
  const int64_t n = len - from;
  for (int64_t j = from; j < len;) {
    Run r = run_at(keys, j, len);
    prefetch_run(keys, r.end, len);  // the next block's keys
    prefetch_run(values, j, len);    // this block's values, for values_one after the softmax
    for (; j < r.end; ++j, r.row += dim) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; c += 8) {
        const __m256 kv = widen8(r.row + c);
        for (int g = 0; g < G; ++g)
          acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + c), kv, acc[g]);
      }
      for (int g = 0; g < G; ++g) scores[g * n + j - from] = hsum(acc[g]) * scaling;
    }
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
    for (int64_t j = from; j < len;)
      for (Run r = run_at(values, j, len); j < r.end; ++j, r.row += dim) {
        const __m256 v = widen8(r.row + c);
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

// The AVX2 path: the query widened to fp32, then scores, softmax and values.
template <int G>
void attend(const Job& job, Scratch& scratch) {
  scratch.query.resize(static_cast<size_t>(G * job.dk));
  for (int g = 0; g < G; ++g)
    for (int64_t c = 0; c < job.dk; ++c)
      scratch.query[g * job.dk + c] = bf16_to_float(job.query[g * job.query_head + c]);
  scratch.scores.resize(static_cast<size_t>(G * (job.len - job.from)));
  float* scores = scratch.scores.data();
  scores_one<G>(scratch.query.data(), job.dk, job.keys, job.values, job.from, job.len,
                job.scaling, scores);
  softmax_rows(scores, G, job.len - job.from, job.softcap);
  values_one<G>(scores, job.dv, job.values, job.from, job.len, job.out, job.out_head);
}

#else  // the AVX512-BF16 build, which runs on AVX512-BF16 CPUs only
#define DSTP_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Lane i of the result = the sum of v[i]'s 16 lanes: pairs, then quads, then halves of the
// vectors added across (45 operations for 16 sums, not 16 horizontal sums of ~6 each).
DSTP_AVX512 inline __m512 sum_each_16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit quarter: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per quarter: vectors 4i..4i+3, each that quarter's sum
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  for (int i = 0; i < 2; ++i)  // quarters added in pairs
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], kEven),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], kOdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], kEven),
                       _mm512_shuffle_f32x4(c[0], c[1], kOdd));
}

// The scores of up to 16 keys (rows[0..count), the rest repeating a real row) for G heads:
// scores[g * n + k] = scaling * q[g] . key k. vdpbf16ps multiplies bf16 pairs exactly and
// adds them in fp32 (q zero-padded to `chunks` x 32 values a head; a key's last chunk loaded
// under `tail`, so nothing past its row is read).
template <int G>
DSTP_AVX512_BF16 void scores_of_16(const uint16_t* q, int64_t chunks, __mmask32 tail,
                                   const uint16_t* const* rows, int count, float scaling,
                                   float* scores, int64_t n) {
  for (int g = 0; g < G; ++g) {
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + (g * chunks + c) * 32);
      const __mmask32 lanes = c + 1 == chunks ? tail : ~__mmask32{0};
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k)
        acc[k] = _mm512_dpbf16_ps(
            acc[k], (__m512bh)_mm512_maskz_loadu_epi16(lanes, rows[k] + c * 32), qv);
    }
    _mm512_mask_storeu_ps(scores + g * n, first_lanes(count),
                          _mm512_mul_ps(sum_each_16(acc), _mm512_set1_ps(scaling)));
  }
}

// The scores of keys from <= j < len as the AVX2 path's scores_one, 16 keys at a time
// (scores_of_16)
template <int G>
DSTP_AVX512_BF16 void scores_16(const uint16_t* q, int64_t chunks, __mmask32 tail,
                                const Paged& keys, const Paged& values, int64_t from,
                                int64_t len, float scaling, float* scores) {
  const int64_t n = len - from;
  const uint16_t* rows[16];
  int count = 0;
  for (int64_t j = from; j < len;) {
    Run r = run_at(keys, j, len);
    prefetch_run(keys, r.end, len);  // the next block's keys
    prefetch_run(values, j, len);    // this block's values, for values_16
    for (; j < r.end; ++j, r.row += keys.dim) {
      rows[count++] = r.row;
      if (count == 16 || j + 1 == len) {
        for (int k = count; k < 16; ++k) rows[k] = rows[0];
        scores_of_16<G>(q, chunks, tail, rows, count, scaling, scores + j + 1 - count - from, n);
        count = 0;
      }
    }
  }
}

// The AVX2 path's values_one 16 lanes wide: out[g, :] = sum_j probs[g, j - from] * v[j] in
// fp32, each lane summed in the same order; W vectors of every head per pass (G * W <= 16
// accumulators), the row's last columns loaded and stored under a mask.
template <int G>
DSTP_AVX512 void values_16(const float* probs, int64_t dim, const Paged& values, int64_t from,
                           int64_t len, uint16_t* out, int64_t out_head) {
  constexpr int W = G <= 4 ? 4 : G <= 8 ? 2 : 1;
  const int64_t n = len - from;
  for (int64_t c = 0; c < dim; c += 16 * W) {
    __mmask16 lanes[W];
    for (int w = 0; w < W; ++w) lanes[w] = first_lanes(std::max<int64_t>(0, dim - c - 16 * w));
    __m512 acc[G][W];
    for (int g = 0; g < G; ++g)
      for (int w = 0; w < W; ++w) acc[g][w] = _mm512_setzero_ps();
    for (int64_t j = from; j < len;)
      for (Run r = run_at(values, j, len); j < r.end; ++j, r.row += dim) {
        __m512 v[W];
        for (int w = 0; w < W; ++w)
          v[w] = dstp::widen_bf16_avx512(_mm256_maskz_loadu_epi16(lanes[w], r.row + c + 16 * w));
        for (int g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(probs[g * n + j - from]);
          for (int w = 0; w < W; ++w) acc[g][w] = _mm512_fmadd_ps(p, v[w], acc[g][w]);
        }
      }
    for (int g = 0; g < G; ++g)
      for (int w = 0; w < W; ++w)
        _mm256_mask_storeu_epi16(out + g * out_head + c + 16 * w, lanes[w],
                                 dstp::round_to_bf16_avx512(acc[g][w]));
  }
}

// The AVX2 path's softmax_rows 16 lanes wide: the same max, the same exp (exp16, lane for
// lane exp8's), the sum in another order, the same scaling by 1 / sum.
DSTP_AVX512 void softmax_rows_16(float* scores, int rows, int64_t n, float softcap) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int g = 0; g < rows; ++g) {
    float* s = scores + g * n;
    if (softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) s[j] = std::tanh(s[j] / softcap) * softcap;
    __m512 top = _mm512_set1_ps(-inf);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 lanes = first_lanes(n - j);
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-inf), lanes, s + j));
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 lanes = first_lanes(n - j);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), shift));
      _mm512_mask_storeu_ps(s + j, lanes, e);
      total = _mm512_mask_add_ps(total, lanes, total, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 lanes = first_lanes(n - j);
      const __m512 e = _mm512_maskz_loadu_ps(lanes, s + j);
      _mm512_mask_storeu_ps(s + j, lanes, _mm512_mul_ps(e, inverse));
    }
  }
}

// The AVX512-BF16 path: the query kept bf16 (zero-padded per head), then scores, softmax
// and values as the AVX2 path's.
template <int G>
DSTP_AVX512_BF16 void attend(const Job& job, Scratch& scratch) {
  const int64_t chunks = (job.dk + 31) / 32, rest = job.dk - (chunks - 1) * 32;
  scratch.query_bf16.assign(static_cast<size_t>(G * chunks * 32), 0);
  for (int g = 0; g < G; ++g)
    std::copy_n(job.query + g * job.query_head, job.dk,
                scratch.query_bf16.data() + g * chunks * 32);
  const __mmask32 tail = rest == 32 ? ~__mmask32{0} : (__mmask32{1} << rest) - 1;
  scratch.scores.resize(static_cast<size_t>(G * (job.len - job.from)));
  float* scores = scratch.scores.data();
  scores_16<G>(scratch.query_bf16.data(), chunks, tail, job.keys, job.values, job.from,
               job.len, job.scaling, scores);
  softmax_rows_16(scores, G, job.len - job.from, job.softcap);
  values_16<G>(scores, job.dv, job.values, job.from, job.len, job.out, job.out_head);
}
#endif  // DSTP_AVX2_ONLY

using AttendFn = void (*)(const Job&, Scratch&);

// kAttend[G - 1]: this build's kernel for G query heads per KV head, 1..kMaxGroup.
template <int... I>
constexpr std::array<AttendFn, sizeof...(I)> attend_kernels(std::integer_sequence<int, I...>) {
  return {{attend<I + 1>...}};
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
// softcap * tanh(x / softcap) when softcap > 0. fp32 arithmetic on exact bf16 values (the
// products of bf16 pairs are exact in fp32, so the two paths differ only in the order of
// their sums, and in vdpbf16ps flushing denormals to zero), the output rounded to bf16 once:
// the PyTorch path's fp32 attention then `.to(bf16)`.
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
    Scratch scratch;
    for (int64_t i = first; i < last; ++i) {
      const int64_t h = i / seqs, s = i % seqs, len = lp[s];
      const Job job{qp + h * group * qh + rp[s] * qt,
                    qh,
                    dk,
                    dv,
                    Paged{kc + h * slots * dk, bt + s * width, block_size, dk},
                    Paged{vc + h * slots * dv, bt + s * width, block_size, dv},
                    window > 0 ? std::max<int64_t>(0, len - window) : 0,
                    len,
                    static_cast<float>(scaling),
                    static_cast<float>(softcap),
                    op + (rp[s] * heads + h * group) * dv,
                    dv};
      kAttend[group - 1](job, scratch);
    }
  });
  return out;
}

void bind_decode_attention(pybind11::module& m) {
  m.def("decode_attention_bf16", &decode_attention_bf16,
        "paged decode attention over a bf16 cache in one call (fp32 softmax)");
}
