// Element types that cross the checkpoint/runtime boundary, and exact scalar conversions.
//
// The CPU reference backend computes in FP32; every conversion into FP32 here is exact (BF16, FP16
// and FP8 E4M3 are all subsets of FP32), so the reference sees exactly the checkpoint's values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace shardserve {

enum class DType : uint8_t { kF32, kF16, kBF16, kF8E4M3, kI32, kI8, kU8 };

size_t dtype_size(DType dtype);
// The safetensors spelling ("F32", "BF16", ...).
std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
bool is_float(DType dtype);

float bf16_to_f32(uint16_t bits);
uint16_t f32_to_bf16(float value);  // round to nearest even, NaN stays NaN
float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);   // round to nearest even, overflow to inf
float fp8e4m3_to_f32(uint8_t bits); // OCP E4M3 (fn): no infinities, S.1111.111 is NaN
// OCP FP8 E4M3 (fn) of x: round to nearest, ties to even; magnitudes beyond 448 saturate to
// +-448 (no infinities in E4M3); NaN stays NaN (0x7F with x's sign).
uint8_t f32_to_fp8e4m3(float x);

// Converts n elements of a floating or integer dtype to FP32.
void convert_to_f32(const void* src, DType dtype, size_t n, float* dst);

}  // namespace shardserve
