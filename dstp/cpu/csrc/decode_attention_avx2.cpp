// Batched single-token (decode) attention over the paged bf16 KV cache, for CPUs with
// AVX2 + FMA. Linked into both of dstp's CPU extensions (shared_ops.h binds it): AVX512-BF16
// CPUs have AVX2 + FMA too.
//
// Why: a decode step's attention is G query heads per KV head against each sequence's
// keys, tiny matrices ([G, d] x [d, ctx]) that PyTorch runs as hundreds of small bf16
// matmuls at ~1 GFLOP/s on a CPU without bf16 dot products, after copying every
// sequence's blocks out of the cache. Here each (KV head, sequence) pair reads its keys
// and values straight from the cache through its block table, once, widening bf16 to
// fp32 in registers, so the step is bound by reading the cache.
//
// Two passes, with the softmax between them left to PyTorch (softcap and windows too):
//   decode_scores_bf16: scores[kv, s, g, j] = scaling * q[kv*G + g, s] . k[slot(s, j)]
//                       for j < len[s]; -inf beyond
//   decode_values_bf16: out[kv*G + g, s] = sum_j probs[kv, s, g, j] * v[slot(s, j)]
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head the kernels take

inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 fp32, in order
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Paged {  // one KV head of one cache, addressed through a sequence's block table
  const uint16_t* head;
  const int64_t* blocks;
  int64_t block_size, dim;
  inline const uint16_t* row(int64_t j) const {
    return head + (blocks[j / block_size] * block_size + j % block_size) * dim;
  }
};

void check_inputs(const torch::Tensor& q, const torch::Tensor& cache,
                  const torch::Tensor& block_tables, const torch::Tensor& lens, int64_t dim,
                  int64_t block_size, int64_t max_len) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3,
              "decode attention: q must be contiguous fp32 [heads, seqs, dim]");
  TORCH_CHECK(cache.scalar_type() == at::kBFloat16 && cache.is_contiguous() && cache.dim() == 3,
              "decode attention: the cache must be contiguous bf16 [kv heads, slots, dim]");
  TORCH_CHECK(dim % 8 == 0 && cache.size(2) == dim, "decode attention: head dim ", dim,
              " must be a multiple of 8 and match the cache");
  TORCH_CHECK(cache.size(0) > 0 && q.size(0) > 0 && q.size(0) % cache.size(0) == 0 &&
                  q.size(0) / cache.size(0) <= kMaxGroup,
              "decode attention: 1 to ", kMaxGroup, " query heads per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(1),
              "decode attention: block tables must be contiguous int64 [seqs, blocks]");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.numel() == q.size(1),
              "decode attention: one int64 length per sequence");
  TORCH_CHECK(block_size > 0 && max_len <= block_tables.size(1) * block_size,
              "decode attention: ", max_len, " keys do not fit the block tables");
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < lens.numel(); ++s)
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= max_len, "decode attention: sequence ", s, " has ",
                lp[s], " keys, outside [1, ", max_len, "]");
}

// The group size G is a template argument: with a run-time count GCC keeps the accumulator
// array on the stack (a load and a store around every FMA); with G known, in registers.

// scores[g, j] for one (KV head, sequence): G dot products per key row.
template <int G>
void scores_one(const float* q, int64_t dim, const Paged& keys, int64_t len, float scaling,
                float* scores, int64_t max_len) {
  for (int64_t j = 0; j < len; ++j) {
    const uint16_t* k = keys.row(j);
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
      const __m256 kv = widen8(k + c);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + c), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g * max_len + j] = hsum(acc[g]) * scaling;
  }
  const float masked = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g)
    for (int64_t j = len; j < max_len; ++j) scores[g * max_len + j] = masked;
}

// out[g, :] for one (KV head, sequence): the probability-weighted sum of its value rows,
// 8 columns of every head at a time so the accumulators stay in registers.
template <int G>
void values_one(const float* probs, int64_t dim, const Paged& values, int64_t len,
                int64_t max_len, float* out, int64_t out_stride) {
  for (int64_t c = 0; c < dim; c += 8) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const __m256 v = widen8(values.row(j) + c);
      for (int g = 0; g < G; ++g)
        acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(probs[g * max_len + j]), v, acc[g]);
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(out + g * out_stride + c, acc[g]);
  }
}

struct GroupKernels {  // both passes for one group size
  void (*scores)(const float*, int64_t, const Paged&, int64_t, float, float*, int64_t);
  void (*values)(const float*, int64_t, const Paged&, int64_t, int64_t, float*, int64_t);
};

// kKernels[G - 1]: the kernels for G query heads per KV head, 1..kMaxGroup.
template <int... I>
constexpr std::array<GroupKernels, sizeof...(I)> group_kernels(std::integer_sequence<int, I...>) {
  return {{{scores_one<I + 1>, values_one<I + 1>}...}};
}
constexpr auto kKernels = group_kernels(std::make_integer_sequence<int, kMaxGroup>{});

}  // namespace

// q [H, S, d] fp32; k_cache [KV, slots, d] bf16; block_tables [S, B]; lens [S] ->
// scores [KV, S, H/KV, max_len] fp32, scaled, -inf past each sequence's length.
torch::Tensor decode_scores_bf16(const torch::Tensor& q, const torch::Tensor& k_cache,
                                 const torch::Tensor& block_tables, const torch::Tensor& lens,
                                 int64_t block_size, int64_t max_len, double scaling) {
  RECORD_FUNCTION("dstp::decode_scores_bf16_avx2", std::vector<c10::IValue>({q, k_cache}));
  const int64_t heads = q.size(0), seqs = q.size(1), dim = q.size(2), kv = k_cache.size(0);
  check_inputs(q, k_cache, block_tables, lens, dim, block_size, max_len);
  const int group = static_cast<int>(heads / kv);
  auto scores = torch::empty({kv, seqs, group, max_len}, q.options());
  const float* qp = q.data_ptr<float>();
  const auto* cp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const int64_t slots = k_cache.size(1), width = block_tables.size(1);
  at::parallel_for(0, kv * seqs, 1, [&](int64_t first, int64_t last) {
    std::vector<float> qg(static_cast<size_t>(group * dim));
    for (int64_t i = first; i < last; ++i) {
      const int64_t h = i / seqs, s = i % seqs;
      for (int g = 0; g < group; ++g)  // this pair's query heads, contiguous
        std::copy_n(qp + ((h * group + g) * seqs + s) * dim, dim, qg.data() + g * dim);
      const Paged keys{cp + h * slots * dim, bt + s * width, block_size, dim};
      kKernels[group - 1].scores(qg.data(), dim, keys, lp[s], static_cast<float>(scaling),
                         sp + i * group * max_len, max_len);
    }
  });
  return scores;
}

// probs [KV, S, H/KV, max_len] fp32; v_cache [KV, slots, d] bf16 -> out [H, S, d] fp32.
torch::Tensor decode_values_bf16(const torch::Tensor& probs, const torch::Tensor& v_cache,
                                 const torch::Tensor& block_tables, const torch::Tensor& lens,
                                 int64_t block_size) {
  RECORD_FUNCTION("dstp::decode_values_bf16_avx2", std::vector<c10::IValue>({probs, v_cache}));
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.is_contiguous() && probs.dim() == 4,
              "decode attention: probs must be contiguous fp32 [kv heads, seqs, group, len]");
  const int64_t kv = probs.size(0), seqs = probs.size(1), group = probs.size(2);
  const int64_t max_len = probs.size(3), dim = v_cache.size(2);
  auto out = torch::empty({kv * group, seqs, dim}, probs.options());
  check_inputs(out, v_cache, block_tables, lens, dim, block_size, max_len);
  const float* pp = probs.data_ptr<float>();
  const auto* cp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t slots = v_cache.size(1), width = block_tables.size(1);
  at::parallel_for(0, kv * seqs, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t h = i / seqs, s = i % seqs;
      const Paged values{cp + h * slots * dim, bt + s * width, block_size, dim};
      kKernels[group - 1].values(pp + i * group * max_len, dim, values, lp[s], max_len,
                         op + (h * group * seqs + s) * dim, seqs * dim);
    }
  });
  return out;
}
