// Llama's RMSNorm over bf16 rows in one call, rounding as HF's module does.
//
// HF's LlamaRMSNorm runs eight ATen ops per call (cast, pow, mean, add, rsqrt, mul,
// cast, mul); in a decode step each of them starts cold after a long GEMV
// (benchmarks/FINDINGS.md). Here: the mean of squares in fp32, x * rsqrt(mean + eps)
// in fp32 rounded to bf16 (HF's `.to(input_dtype)`), then times the bf16 weight in
// fp32 rounded to bf16 again (a bf16 * bf16 ATen multiply). Only the summation order
// of the mean differs from ATen's, so an output may rarely differ by one bf16 ulp.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kLanes = 16;  // independent partial sums: vectorised, and a shorter chain
constexpr int64_t kRowsPerTask = 16;  // prefill's thousands of rows split over torch's threads

float mean_of_squares(const c10::BFloat16* x, int64_t n) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const float v = static_cast<float>(x[i + lane]);
      partial[lane] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    partial[i % kLanes] += v * v;
  }
  float sum = 0.0f;
  for (float p : partial) sum += p;
  return sum / static_cast<float>(n);
}

}  // namespace

torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
              "rms_norm_bf16: x must be a contiguous bf16 CPU tensor");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() &&
                  weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "rms_norm_bf16: weight must be a contiguous bf16 vector of x's last size");
  const int64_t width = weight.size(0);
  TORCH_CHECK(width > 0, "rms_norm_bf16: empty rows");
  const int64_t rows = x.numel() / width;
  auto out = torch::empty_like(x);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = weight.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);  // ATen adds a Python float to fp32 as fp32
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const c10::BFloat16* row = xp + r * width;
      c10::BFloat16* dest = op + r * width;
      const float scale = 1.0f / std::sqrt(mean_of_squares(row, width) + epsilon);
      for (int64_t i = 0; i < width; ++i) {
        const c10::BFloat16 normed(static_cast<float>(row[i]) * scale);
        dest[i] = c10::BFloat16(static_cast<float>(wp[i]) * static_cast<float>(normed));
      }
    }
  });
  return out;
}

// The residual add before a decoder layer's RMSNorm, in the same pass over the row (dstp's
// fused layers, dstp/model/fused_layers.py): sum = residual + alpha * x rounded to bf16 as
// ATen's bf16 add rounds it (in fp32, once), then sum's RMSNorm exactly as rms_norm_bf16.
// Returns (normed, sum): one call where the add and the norm were two.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_bf16(const torch::Tensor& x,
                                                           const torch::Tensor& residual,
                                                           const torch::Tensor& weight,
                                                           double eps, double alpha) {
  for (const auto* t : {&x, &residual}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 && t->is_contiguous(),
                "add_rms_norm_bf16: x and residual must be contiguous bf16 CPU tensors");
  }
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm_bf16: x and residual differ in shape");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() &&
                  weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "add_rms_norm_bf16: weight must be a contiguous bf16 vector of x's last size");
  const int64_t width = weight.size(0);
  TORCH_CHECK(width > 0, "add_rms_norm_bf16: empty rows");
  const int64_t rows = x.numel() / width;
  auto out = torch::empty_like(x);
  auto sum = torch::empty_like(x);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* rp = residual.data_ptr<c10::BFloat16>();
  const auto* wp = weight.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  auto* sp = sum.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);
  const float scale_x = static_cast<float>(alpha);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t at = r * width;
      for (int64_t i = 0; i < width; ++i) {
        sp[at + i] = c10::BFloat16(static_cast<float>(rp[at + i]) +
                                   scale_x * static_cast<float>(xp[at + i]));
      }
      const float scale = 1.0f / std::sqrt(mean_of_squares(sp + at, width) + epsilon);
      for (int64_t i = 0; i < width; ++i) {
        const c10::BFloat16 normed(static_cast<float>(sp[at + i]) * scale);
        op[at + i] = c10::BFloat16(static_cast<float>(wp[i]) * static_cast<float>(normed));
      }
    }
  });
  return {out, sum};
}
