// bf16 <-> fp32 conversions shared by dstp's CPU kernels, with PyTorch's rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dstp {

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, as PyTorch does
  if (std::isnan(v)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace dstp
