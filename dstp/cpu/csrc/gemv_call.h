// What the GEMV and few-row kernels of both builds check and set up the same way: y = x W^T (+ b).
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "bf16.h"

namespace dstp {

// The bias as bf16 bits, or nullptr without one; checked to be a contiguous bf16 [n_size].
inline const uint16_t* bias_bits(const c10::optional<torch::Tensor>& bias, int64_t n_size,
                                 const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                  bias->numel() == n_size,
              op, ": bias must be a contiguous bf16 vector of ", n_size);
  return reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
}

// One bf16 row x [1, K] against W [N, K]: checked inputs, raw pointers and the output.
struct GemvCall {
  int64_t n_size, k_size;
  const uint16_t* x;
  const uint16_t* w;
  const uint16_t* bias;  // nullptr without one
  torch::Tensor y;       // [1, N] bf16
  uint16_t* out;

  GemvCall(const torch::Tensor& x_in, const torch::Tensor& weight,
           const c10::optional<torch::Tensor>& b) {
    TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
                "gemv_bf16: bf16 inputs only");
    TORCH_CHECK(x_in.is_contiguous() && weight.is_contiguous() && weight.dim() == 2,
                "gemv_bf16: contiguous x and 2-D weight only");
    n_size = weight.size(0);
    k_size = weight.size(1);
    TORCH_CHECK(x_in.numel() == k_size, "gemv_bf16: x has ", x_in.numel(),
                " values, weight wants ", k_size);
    x = reinterpret_cast<const uint16_t*>(x_in.data_ptr<at::BFloat16>());
    w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    bias = bias_bits(b, n_size, "gemv_bf16");
    y = torch::empty({1, n_size}, x_in.options());
    out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  }

  // Row n's fp32 dot product, plus the bias, rounded to bf16 once.
  void store(int64_t n, float v) const {
    out[n] = float_to_bf16(bias ? v + bf16_to_float(bias[n]) : v);
  }
};

// A few bf16 rows x [M, K] against W [N, K] (the few-row kernels): checked inputs, raw
// pointers and the output [M, N]; ``op`` names the kernel in each error.
struct FewCall {
  int64_t m_size, n_size, k_size;
  const uint16_t* x;
  const uint16_t* w;
  const uint16_t* bias;  // nullptr without one
  torch::Tensor y;       // [M, N] bf16
  uint16_t* out;

  FewCall(const torch::Tensor& x_in, const torch::Tensor& weight,
          const c10::optional<torch::Tensor>& b, const char* op) {
    TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
                op, ": bf16 inputs only");
    TORCH_CHECK(x_in.is_contiguous() && x_in.dim() == 2 && weight.is_contiguous() &&
                    weight.dim() == 2,
                op, ": contiguous 2-D x and weight only");
    m_size = x_in.size(0);
    n_size = weight.size(0);
    k_size = weight.size(1);
    TORCH_CHECK(x_in.size(1) == k_size, op, ": x has ", x_in.size(1), " columns, weight wants ",
                k_size);
    x = reinterpret_cast<const uint16_t*>(x_in.data_ptr<at::BFloat16>());
    w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    bias = bias_bits(b, n_size, op);
    y = torch::empty({m_size, n_size}, x_in.options());
    out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  }
};

}  // namespace dstp
