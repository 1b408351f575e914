#include "worker/runtime/dtype.h"

#include <gtest/gtest.h>

#include <cmath>

namespace shardserve {
namespace {

TEST(DType, SafetensorsNamesRoundTrip) {
  for (const char* name : {"F32", "F16", "BF16", "F8_E4M3", "I32", "I8", "U8"}) {
    auto d = dtype_from_name(name);
    ASSERT_TRUE(d.has_value()) << name;
    EXPECT_EQ(dtype_name(*d), name);
  }
  EXPECT_FALSE(dtype_from_name("F64").has_value());
  EXPECT_FALSE(dtype_from_name("bf16").has_value());
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF8E4M3), 1u);
}

TEST(DType, EveryFiniteHalfAndBfloat16RoundTripsExactly) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto b = static_cast<uint16_t>(bits);
    const float h = f16_to_f32(b);
    if (!std::isnan(h)) EXPECT_EQ(f32_to_f16(h), b) << std::hex << bits;
    const float bf = bf16_to_f32(b);
    if (!std::isnan(bf)) EXPECT_EQ(f32_to_bf16(bf), b) << std::hex << bits;
  }
}

TEST(DType, KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7C00)));
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3F80);  // halfway between 1 and the next bf16: to even
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3F82);  // halfway, rounds up to even
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);
  // OCP FP8 E4M3: max 448, min subnormal 2^-9, 0x7F is NaN.
  EXPECT_EQ(fp8e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0xB8), -1.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7F)));
}

TEST(DType, ConvertToF32HandlesIntegers) {
  const int8_t i8[] = {-128, 0, 127};
  float out[3];
  convert_to_f32(i8, DType::kI8, 3, out);
  EXPECT_EQ(out[0], -128.0f);
  EXPECT_EQ(out[2], 127.0f);
  const uint8_t u8[] = {0, 255};
  convert_to_f32(u8, DType::kU8, 2, out);
  EXPECT_EQ(out[1], 255.0f);
}

}  // namespace
}  // namespace shardserve
