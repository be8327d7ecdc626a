// Shared by the kernels of this folder.

#pragma once

#include <cstdint>

namespace sparkgrid_common {

// exp(x) for x <= 0 in float32, written so that the compiler vectorizes a loop of it: range
// reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n from the
// exponent bits. Relative error about 2e-7 (std::exp is not vectorized without -ffast-math).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace sparkgrid_common
