// The ops both of dstp's CPU extensions link in and bind beside their own GEMV (every csrc/*.cpp
// that is not a GEMV, dstp/cpu/kernels.py's SHARED_SOURCES): RMSNorm and add+RMSNorm
// (rms_norm.cpp), the many-row GEMM on weights widened as they are packed (gemm_widened.cpp),
// the GEMM on AMX tiles over the plain weights (gemm_amx.cpp),
// the decoder layer's other fused ops (layer_ops.cpp, bound by bind_layer_ops), paged decode
// attention (decode_attention.cpp, bind_decode_attention) and the sampler's (sampler_ops.cpp,
// bound by bind_sampler_ops).
#pragma once

#include <torch/extension.h>

torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_bf16(const torch::Tensor& x,
                                                           const torch::Tensor& residual,
                                                           const torch::Tensor& weight,
                                                           double eps, double alpha);

torch::Tensor gemm_widened_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                                const c10::optional<torch::Tensor>& bias);

bool amx_tiles_ready();
torch::Tensor gemm_amx_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias);

void bind_layer_ops(pybind11::module& m);
void bind_decode_attention(pybind11::module& m);
void bind_sampler_ops(pybind11::module& m);

// Binds the shared ops into an extension module.
inline void bind_shared_ops(pybind11::module& m) {
  m.def("rms_norm_bf16", &rms_norm_bf16, "Llama's RMSNorm over bf16 rows, HF's rounding");
  m.def("add_rms_norm_bf16", &add_rms_norm_bf16,
        "(RMSNorm(residual + alpha * x), residual + alpha * x) over bf16 rows, ATen's rounding");
  m.def("gemm_widened_bf16", &gemm_widened_bf16,
        "y = x W^T (+ b) for many bf16 rows, in fp32 on weights widened as they are packed");
  m.def("amx_tiles_ready", &amx_tiles_ready,
        "whether this build has the AMX GEMM and the OS lets this process use the tiles");
  m.def("gemm_amx_bf16", &gemm_amx_bf16,
        "y = x W^T (+ b) for bf16 rows on AMX tiles, reading W in its plain layout");
  bind_layer_ops(m);
  bind_decode_attention(m);
  bind_sampler_ops(m);
}
