#include "worker/runtime/dtype.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

namespace shardserve {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32: return 4;
    case DType::kF16:
    case DType::kBF16: return 2;
    case DType::kF8E4M3:
    case DType::kI8:
    case DType::kU8: return 1;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF8E4M3: return "F8_E4M3";
    case DType::kI32: return "I32";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kI32, DType::kI8,
                  DType::kU8}) {
    if (dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

bool is_float(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF8E4M3;
}

float bf16_to_f32(uint16_t bits) { return std::bit_cast<float>(uint32_t{bits} << 16); }

uint16_t f32_to_bf16(float value) {
  uint32_t u = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = uint32_t{bits & 0x8000u} << 16;
  const uint32_t exp = (bits >> 10) & 0x1F;
  const uint32_t man = bits & 0x3FF;
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (man << 13));
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
  // Subnormal half: man * 2^-24, exact in FP32.
  const float mag = std::ldexp(static_cast<float>(man), -24);
  return sign ? -mag : mag;
}

uint16_t f32_to_f16(float value) {
  const uint32_t u = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const float a = std::fabs(value);
  if (std::isnan(value)) return sign | 0x7E00;
  if (a >= 65520.0f) return sign | 0x7C00;  // rounds to inf
  if (a < std::ldexp(1.0f, -14)) {
    // Subnormal: quantum 2^-24; nearbyint rounds half to even in the default mode.
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));
  }
  const uint32_t ua = std::bit_cast<uint32_t>(a);
  uint32_t exp = (ua >> 23) - 112;
  uint32_t man = ua & 0x7FFFFF;
  uint32_t half = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return sign | static_cast<uint16_t>(half);
}

float fp8e4m3_to_f32(uint8_t bits) {
  const bool neg = bits & 0x80;
  const int exp = (bits >> 3) & 0xF;
  const int man = bits & 0x7;
  float mag;
  if (exp == 0xF && man == 0x7) {
    mag = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    mag = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    mag = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  }
  return neg ? -mag : mag;
}

uint8_t f32_to_fp8e4m3(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return sign | 0x7F;
  const float a = std::fabs(x);
  if (a >= 448.0f) return sign | 0x7E;  // saturate: 448 is the largest finite E4M3 value
  if (a == 0.0f) return sign;
  // a in [2^e, 2^(e+1)) has 3 fraction bits: quantum 2^(e - 3); below 2^-6 (subnormals) the
  // quantum stays 2^-9. Scaling by a power of two is exact, so nearbyint does the only rounding
  // (to nearest even in the default mode).
  int frexp_exp = 0;
  std::frexp(a, &frexp_exp);
  int e = std::max(frexp_exp - 1, -6);
  int m = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - e)));  // [8, 16] normal, [0, 8] subnormal
  if (m < 8) return sign | static_cast<uint8_t>(m);                // subnormal: exponent field 0
  if (m == 16) {
    m = 8;
    ++e;
  }
  const int code = ((e + 7) << 3) | (m - 8);
  return sign | static_cast<uint8_t>(std::min(code, 0x7E));
}


void convert_to_f32(const void* src, DType dtype, size_t n, float* dst) {
  // One loop per dtype: this runs on every downloaded logit row, so no per-element dispatch.
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16:
    case DType::kBF16: {
      const bool half = dtype == DType::kF16;
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = half ? f16_to_f32(v) : bf16_to_f32(v);
      }
      return;
    }
    case DType::kF8E4M3:
      for (size_t i = 0; i < n; ++i) dst[i] = fp8e4m3_to_f32(bytes[i]);
      return;
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, bytes + 4 * i, 4);
        dst[i] = static_cast<float>(v);
      }
      return;
    case DType::kI8:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<int8_t>(bytes[i]);
      return;
    case DType::kU8:
      for (size_t i = 0; i < n; ++i) dst[i] = bytes[i];
      return;
  }
}

}  // namespace shardserve
