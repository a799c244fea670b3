// The sampler's fused ops (issue 22): each one call where plain PyTorch runs many ops.
//
// * row_max_argmax: each row's max (NaN if it has one) and first argmax, like x.max(-1).
// * penalty_edit: the penalties and the stop-id mask of a batch as one edit: distinct flat
//   positions and their new values (dstp/engine/sampling/penalties.py states the rule).
// * sample_rows / filter_probs: temperature, top-k, top-p, min-p over whole rows and the
//   draw, one row per task (dstp/engine/sampling/filters.py states the cut rules; the
//   draw is draw.py's counter-keyed race). No sort: top-k by a k-heap, top-p by a two-pass
//   radix select over the scaled weights' bits with integer masses, as filters.py's.
//
// No ATen op is called inside (a dispatch mode would count each); every float operation
// rounds as ATen's does: x / t in float32, exp(z - max) in float32 (libm's expf: at most an
// ulp from ATen's vectorised exp), masses truncated to int32 and summed in int64.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <queue>
#include <tuple>
#include <vector>

#include "shared_ops.h"

// ATen's own vectorised exp on AVX2 (Sleef, from libtorch_cpu): the weights round as ATen's.
extern "C" __m256 Sleef_expf8_u10(__m256);

namespace {

constexpr int kMassBits = 30;
constexpr int32_t kOne = 0x3F800000;  // float32 1.0's bits: scaled weights below carry no mass
constexpr int32_t kTop = 0x4E800000;  // float32 2**30's bits
constexpr int kRadix = 14;
constexpr int32_t kLow = kOne >> kRadix;
constexpr int64_t kBins = ((kTop - kOne) >> kRadix) + 1;
constexpr int64_t kBlock = 256;  // the race's first level: blocks of this many tokens
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kInside = 1ULL << 32;  // the second level's noise indices start here

inline float no_contract(float v) {  // keeps a * b + c two roundings, as ATen's two ops
  asm volatile("" : "+x"(v));
  return v;
}

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Exp(1) noise number ``index`` of a draw keyed ``key``: -log(u), u in (0, 1) from 53 bits.
inline double noise(uint64_t key, uint64_t index) {
  const uint64_t bits = mix64(key + (index + 1) * kGolden) >> 11;
  return -std::log((static_cast<double>(bits) + 0.5) * 0x1.0p-53);
}

inline int32_t bits_of(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

void check_i64(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kLong && t.is_contiguous(), what,
              " must be a contiguous int64 CPU tensor");
}

// Lanes of 8 floats (as int32 bits) for which ``test`` holds, as a bit mask.
template <typename Test>
int lanes_where(const float* s, Test test) {
  return _mm256_movemask_ps(_mm256_castsi256_ps(test(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(s)))));
}

// The k-th largest of the row's values (top-k's threshold): a min-heap of the k largest,
// 8 values at a time skipped when none beats the heap's least.
float kth_largest(const float* z, int64_t n, int64_t k) {
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap;
  const auto offer = [&](float value) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push(value);
    } else if (value > heap.top()) {
      heap.pop();
      heap.push(value);
    }
  };
  int64_t v = 0;
  for (; v < n && static_cast<int64_t>(heap.size()) < k; ++v) offer(z[v]);
  for (; v + 8 <= n; v += 8) {
    const __m256 beats = _mm256_cmp_ps(_mm256_loadu_ps(z + v), _mm256_set1_ps(heap.top()),
                                       _CMP_GT_OQ);
    if (_mm256_movemask_ps(beats) == 0) continue;
    for (int64_t i = v; i < v + 8; ++i) offer(z[i]);
  }
  for (; v < n; ++v) offer(z[v]);
  return heap.top();
}

// Add each token's mass to its bin, for the tokens whose bits pass ``in`` (8 at a time,
// skipped when none does): ``bin_of`` maps bits to a bin.
template <typename In, typename BinOf>
void histogram(const float* s, int64_t n, std::vector<int64_t>& hist, In in, BinOf bin_of) {
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    int mask = lanes_where(s + v, in);
    while (mask) {
      const int i = __builtin_ctz(mask);
      mask &= mask - 1;
      hist[bin_of(bits_of(s[v + i]))] += static_cast<int32_t>(s[v + i]);
    }
  }
  for (; v < n; ++v) {
    const int32_t b = bits_of(s[v]);
    const __m256i one = _mm256_set1_epi32(b);
    if (_mm256_movemask_ps(_mm256_castsi256_ps(in(one))) != 0) {
      hist[bin_of(b)] += static_cast<int32_t>(s[v]);
    }
  }
}

// The smallest scaled-weight bits a top-p row keeps: filters.py's radix select, in one row.
int32_t top_p_cut(const float* s, int64_t n, int64_t total, int64_t budget,
                  std::vector<int64_t>& hist) {
  const int64_t over = total - budget;  // the kept set has the mass of bits >= cut
  hist.assign(kBins, 0);
  const __m256i below_one = _mm256_set1_epi32(kOne - 1);
  histogram(
      s, n, hist, [&](__m256i b) { return _mm256_cmpgt_epi32(b, below_one); },
      [](int32_t b) { return (b >> kRadix) - kLow; });  // tokens below 1.0 have no mass
  int64_t below = 0, bin = 0;
  while (bin < kBins - 1 && below + hist[bin] < over) below += hist[bin++];
  const int32_t base = static_cast<int32_t>((bin + kLow) << kRadix);
  hist.assign(int64_t{1} << kRadix, 0);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(bin + kLow));
  histogram(
      s, n, hist,
      [&](__m256i b) { return _mm256_cmpeq_epi32(_mm256_srai_epi32(b, kRadix), high); },
      [&](int32_t b) { return b - base; });
  int32_t cut = base;
  for (int64_t j = 0; j < (int64_t{1} << kRadix) && below + hist[j] < over; ++j) {
    below += hist[j];
    ++cut;
  }
  return cut;
}

struct RowParams {
  float temperature, top_p, min_p;
  int64_t top_k;
};

// One row's kept weights, scaled by 2**30 (0 outside the kept set); false when the row is
// broken (NaN, +inf) or every token is masked: the sampler reports it, nothing is drawn.
float hmax(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

// z = x / t over the row, and its max; false when a z is NaN.
bool scale_row(const float* x, int64_t n, float t, float* z, float& mx) {
  const __m256 vt = _mm256_set1_ps(t);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    const __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + v), vt);
    _mm256_storeu_ps(z + v, q);
    vmax = _mm256_max_ps(vmax, q);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(q, q, _CMP_UNORD_Q));
  }
  mx = hmax(vmax);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; v < n; ++v) {
    z[v] = x[v] / t;
    any_nan = any_nan || std::isnan(z[v]);
    mx = std::max(mx, z[v]);
  }
  return !any_nan;
}

// s = exp(z - mx) * 2**30 where z >= kth, else 0 (in place); returns the row's total mass.
int64_t scaled_weights(float* s, int64_t n, float mx, float kth) {
  const float scale = static_cast<float>(int64_t{1} << kMassBits);  // exact: a power of two
  const __m256 vmx = _mm256_set1_ps(mx), vkth = _mm256_set1_ps(kth), vscale = _mm256_set1_ps(scale);
  __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    const __m256 z = _mm256_loadu_ps(s + v);
    __m256 w = _mm256_mul_ps(Sleef_expf8_u10(_mm256_sub_ps(z, vmx)), vscale);
    w = _mm256_and_ps(w, _mm256_cmp_ps(z, vkth, _CMP_GE_OQ));
    _mm256_storeu_ps(s + v, w);
    const __m256i mass = _mm256_cvttps_epi32(w);
    lo = _mm256_add_epi64(lo, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(mass)));
    hi = _mm256_add_epi64(hi, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(mass, 1)));
  }
  int64_t lanes[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(lo, hi));
  int64_t total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  if (v < n) {  // the tail through the same vector exp, padded
    float z[8], w[8];
    std::fill(z, z + 8, -std::numeric_limits<float>::infinity());
    std::copy(s + v, s + n, z);
    _mm256_storeu_ps(w, _mm256_mul_ps(Sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(z), vmx)),
                                      vscale));
    for (int64_t i = v; i < n; ++i) {
      s[i] = z[i - v] < kth ? 0.0f : w[i - v];
      total += static_cast<int32_t>(s[i]);
    }
  }
  return total;
}

// Zero the weights outside top-p's cut (bits below ``cut``) and below min-p's ``floor``.
void drop_below(float* s, int64_t n, int32_t cut, float floor) {
  const __m256i vcut = _mm256_set1_epi32(cut);
  const __m256 vfloor = _mm256_set1_ps(floor);
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    const __m256 w = _mm256_loadu_ps(s + v);
    const __m256 low = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vcut, _mm256_castps_si256(w)));
    const __m256 drop = _mm256_or_ps(low, _mm256_cmp_ps(w, vfloor, _CMP_LT_OQ));
    _mm256_storeu_ps(s + v, _mm256_andnot_ps(drop, w));
  }
  for (; v < n; ++v) {
    if (bits_of(s[v]) < cut || s[v] < floor) s[v] = 0.0f;
  }
}

// One row's kept weights, scaled by 2**30 (0 outside the kept set); false when the row is
// broken (NaN, +inf) or every token is masked: the sampler reports it, nothing is drawn.
bool kept_weights(const float* x, int64_t n, const RowParams& p, float* s,
                  std::vector<int64_t>& hist) {
  float mx;
  if (!scale_row(x, n, p.temperature, s, mx)) return false;
  if (!(mx > -std::numeric_limits<float>::infinity()) || std::isinf(mx)) return false;
  float kth = -std::numeric_limits<float>::infinity();
  if (p.top_k > 0 && p.top_k < n) kth = kth_largest(s, n, p.top_k);
  const int64_t total = scaled_weights(s, n, mx, kth);
  int32_t cut = std::numeric_limits<int32_t>::min();
  if (p.top_p < 1.0f) {
    const auto budget = static_cast<int64_t>(static_cast<double>(p.top_p) * total);
    cut = top_p_cut(s, n, total, budget, hist);
  }
  const float floor = p.min_p > 0.0f ? p.min_p * static_cast<float>(int64_t{1} << kMassBits) : 0.0f;
  if (p.top_p < 1.0f || p.min_p > 0.0f) drop_below(s, n, cut, floor);
  return true;
}

// Each block's summed weight (the race's first level).
void block_sums(const float* s, int64_t n, std::vector<double>& sums) {
  for (int64_t b = 0; b < static_cast<int64_t>(sums.size()); ++b) {
    const int64_t start = b * kBlock, end = std::min(n, start + kBlock);
    __m256 acc = _mm256_setzero_ps();
    int64_t v = start;
    for (; v + 8 <= end; v += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(s + v));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    for (; v < end; ++v) sum += s[v];
    sums[b] = sum;
  }
}

RowParams params_of(int64_t r, const float* temperature, const int64_t* top_k,
                    const float* top_p, const float* min_p) {
  return {temperature[r], top_p[r], min_p[r], top_k[r]};
}

// The token a draw keyed ``key`` picks from a row's kept weights: a race argmax(w / E) in
// two levels, a block by its summed weight, then a token inside it (draw.py's rule).
int64_t race(const float* s, const std::vector<double>& block_sums, int64_t n, uint64_t key) {
  int64_t block = 0;
  double best = -1.0;
  for (int64_t b = 0; b < static_cast<int64_t>(block_sums.size()); ++b) {
    const double score = block_sums[b] / noise(key, b);
    if (score > best) best = score, block = b;
  }
  int64_t token = block * kBlock;
  best = -1.0;
  for (int64_t v = block * kBlock; v < std::min(n, (block + 1) * kBlock); ++v) {
    if (s[v] <= 0.0f) continue;
    const double score = s[v] / noise(key, kInside + v);
    if (score > best) best = score, token = v;
  }
  return token;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> row_max_argmax(const torch::Tensor& x) {
  check_f32(x, "row_max_argmax: x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "row_max_argmax: x must be [rows, vocab]");
  const int64_t rows = x.size(0), n = x.size(1);
  auto maxes = torch::empty({rows}, x.options());
  auto index = torch::empty({rows}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  float* mp = maxes.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      // The max by blocks of kBlock (vectorised), the first block holding it, then the first
      // index in that block; a NaN anywhere makes the first NaN the answer (as x.max(-1)).
      float best = -std::numeric_limits<float>::infinity();
      int64_t best_block = 0;
      bool any_nan = false;
      for (int64_t start = 0; start < n && !any_nan; start += kBlock) {
        const int64_t stop = std::min(n, start + kBlock);
        __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 nan = _mm256_setzero_ps();
        int64_t v = start;
        for (; v + 8 <= stop; v += 8) {
          const __m256 q = _mm256_loadu_ps(row + v);
          vmax = _mm256_max_ps(vmax, q);
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(q, q, _CMP_UNORD_Q));
        }
        float m = hmax(vmax);
        any_nan = _mm256_movemask_ps(nan) != 0;
        for (; v < stop; ++v) any_nan = any_nan || std::isnan(row[v]), m = std::max(m, row[v]);
        if (m > best) best = m, best_block = start / kBlock;
      }
      int64_t at = best_block * kBlock;
      if (any_nan) {
        at = 0;
        while (!std::isnan(row[at])) ++at;
        best = row[at];
      } else {
        while (row[at] != best && at + 1 < n) ++at;  // -inf rows: index 0
      }
      mp[r] = best, ip[r] = at;
    }
  });
  return {maxes, index};
}

// Penalties of ``rows`` (batch rows, one per penalised sequence) then -inf at ``stops`` (flat
// positions): each seen id's logit divided (positive) or multiplied by the repetition
// penalty, then ids of the output less frequency * count + presence. Seen ids: the row's
// distinct prompt ids and its output ids, pool[start : start + size]. Returns the distinct
// flat positions and their new values.
std::tuple<torch::Tensor, torch::Tensor> penalty_edit(
    const torch::Tensor& x, const std::vector<torch::Tensor>& prompts, const torch::Tensor& rows,
    const torch::Tensor& pool, const torch::Tensor& output_start,
    const torch::Tensor& output_sizes, const torch::Tensor& repetition,
    const torch::Tensor& frequency, const torch::Tensor& presence, const torch::Tensor& stops) {
  check_f32(x, "penalty_edit: x");
  for (const auto* t : {&rows, &pool, &output_start, &output_sizes, &stops}) {
    check_i64(*t, "penalty_edit: the ids");
  }
  for (const auto* t : {&repetition, &frequency, &presence}) check_f32(*t, "penalty_edit: penalties");
  const int64_t n = x.size(1);
  const int64_t count = rows.numel();
  TORCH_CHECK(static_cast<int64_t>(prompts.size()) == count, "penalty_edit: a prompt per row");
  const float* xp = x.data_ptr<float>();
  const int64_t* pp = pool.data_ptr<int64_t>();
  std::vector<int64_t> flat;
  std::vector<float> values;
  std::vector<int64_t> output;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = rows.data_ptr<int64_t>()[j];
    const int64_t start = output_start.data_ptr<int64_t>()[j];
    output.assign(pp + start, pp + start + output_sizes.data_ptr<int64_t>()[j]);
    std::sort(output.begin(), output.end());
    check_i64(prompts[j], "penalty_edit: prompt ids");
    const int64_t* prompt = prompts[j].data_ptr<int64_t>();  // distinct, ascending
    const int64_t prompt_size = prompts[j].numel();
    const float rep = repetition.data_ptr<float>()[row];
    const float freq = frequency.data_ptr<float>()[row];
    const float pres = presence.data_ptr<float>()[row];
    int64_t a = 0, b = 0;
    while (a < prompt_size || b < static_cast<int64_t>(output.size())) {
      const int64_t id = b == static_cast<int64_t>(output.size()) ? prompt[a]
                         : a == prompt_size                       ? output[b]
                                                                  : std::min(prompt[a], output[b]);
      TORCH_CHECK(0 <= id && id < n, "penalty_edit: a seen id outside the vocabulary");
      if (a < prompt_size && prompt[a] == id) ++a;
      int64_t times = 0;
      while (b < static_cast<int64_t>(output.size()) && output[b] == id) ++b, ++times;
      float v = xp[row * n + id];
      v = v > 0.0f ? v / rep : v * rep;
      if (times > 0) v = v - (no_contract(freq * static_cast<float>(times)) + pres);
      flat.push_back(row * n + id);
      values.push_back(v);
    }
  }
  const int64_t* sp = stops.data_ptr<int64_t>();
  for (int64_t i = 0; i < stops.numel(); ++i) {
    flat.push_back(sp[i]);
    values.push_back(-std::numeric_limits<float>::infinity());
  }
  // One value per position, the last written winning (a stop id over its penalty): an
  // indexed write with repeated positions has no defined order.
  std::vector<int64_t> order(flat.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return flat[a] < flat[b]; });
  std::vector<int64_t> kept;
  for (size_t i = 0; i < order.size(); ++i) {
    if (i + 1 < order.size() && flat[order[i + 1]] == flat[order[i]]) continue;
    kept.push_back(order[i]);
  }
  const auto size = static_cast<int64_t>(kept.size());
  auto flat_out = torch::empty({size}, rows.options());
  auto values_out = torch::empty({size}, x.options());
  for (int64_t i = 0; i < size; ++i) {
    flat_out.data_ptr<int64_t>()[i] = flat[kept[i]];
    values_out.data_ptr<float>()[i] = values[kept[i]];
  }
  return {flat_out, values_out};
}

// Draw the slots of the sampled ``rows``: row j's slots are slots[starts[j] : starts[j + 1]],
// each written into picked[slot] with the token its key draws (rows the sampler reports
// broken or masked are left as they are). Per-row parameters are indexed by batch row.
void sample_rows(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& starts,
                 const torch::Tensor& slots, const torch::Tensor& keys,
                 const torch::Tensor& temperature, const torch::Tensor& top_k,
                 const torch::Tensor& top_p, const torch::Tensor& min_p, torch::Tensor& picked) {
  check_f32(x, "sample_rows: x");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{
           &rows, &starts, &slots, &keys, &top_k, &picked}) {
    check_i64(*t, "sample_rows: rows, starts, slots, keys, top_k and picked");
  }
  for (const auto* t : {&temperature, &top_p, &min_p}) check_f32(*t, "sample_rows: parameters");
  const int64_t n = x.size(1);
  const float* xp = x.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* out = picked.data_ptr<int64_t>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(n);
    std::vector<int64_t> hist;
    std::vector<double> sums(blocks);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = rp[j];
      const RowParams p = params_of(r, temperature.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                                    top_p.data_ptr<float>(), min_p.data_ptr<float>());
      if (!kept_weights(xp + r * n, n, p, s.data(), hist)) continue;
      block_sums(s.data(), n, sums);
      for (int64_t k = st[j]; k < st[j + 1]; ++k) {
        out[sl[k]] = race(s.data(), sums, n, static_cast<uint64_t>(kp[k]));
      }
    }
  });
}

// The filtered distribution of each of ``rows`` [G, V] (what sample_rows draws from), for
// tests; rows that cannot be sampled are all zero.
torch::Tensor filter_probs(const torch::Tensor& x, const torch::Tensor& rows,
                           const torch::Tensor& temperature, const torch::Tensor& top_k,
                           const torch::Tensor& top_p, const torch::Tensor& min_p) {
  check_f32(x, "filter_probs: x");
  const int64_t n = x.size(1);
  auto probs = torch::zeros({rows.numel(), n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* pp = probs.data_ptr<float>();
  at::parallel_for(0, rows.numel(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hist;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = rp[j];
      float* s = pp + j * n;
      const RowParams p = params_of(r, temperature.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                                    top_p.data_ptr<float>(), min_p.data_ptr<float>());
      if (!kept_weights(xp + r * n, n, p, s, hist)) {
        std::fill(s, s + n, 0.0f);
        continue;
      }
      double total = 0.0;
      for (int64_t v = 0; v < n; ++v) total += s[v];
      for (int64_t v = 0; v < n; ++v) s[v] = static_cast<float>(s[v] / total);
    }
  });
  return probs;
}

void bind_sampler_ops(pybind11::module& m) {
  m.def("row_max_argmax", &row_max_argmax, "each row's max (NaN first) and first argmax");
  m.def("penalty_edit", &penalty_edit, "penalties and stop ids as one edit of the logits");
  m.def("sample_rows", &sample_rows, "top-k, top-p, min-p over whole rows and a keyed draw");
  m.def("filter_probs", &filter_probs, "sample_rows' filtered distributions, for tests");
}
