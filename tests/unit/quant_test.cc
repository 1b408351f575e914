// Quantized checkpoints on the CPU backend, the oracle of the quantized CUDA kernels.
//
// Data (scripts/make_quant_checkpoints.py, tests/data/tiny-quant/):
// - pack-cases/: small layers in every packing variant with `<case>.expected`, W computed by the
//   script from the integers before it packed them: the loader's unpacking against an
//   independent reference, exactly.
// - at_load_reference.safetensors: what fp8 / int8 quantization at load must make of two layers,
//   computed by the script's own E4M3 (a nearest-value search) and rounding.
// - five tiny checkpoints (AWQ, GPTQ v1 act-order, GPTQ v2 asymmetric, FP8 per-tensor static, FP8
//   per-channel dynamic), each with dequantized/: the same model with every projection
//   dequantized to F32 by the script. The quantized model must give the twin's logits within
//   1e-6 relative (the CPU backend dequantizes exactly and runs the same dot products, so the
//   measured difference is 0), and, once scripts/make_golden.py has written
//   dequantized/golden.json with transformers, the same tokens and logits as transformers
//   (tolerance as in llama_golden_test.cc); without that file the golden test is skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "tests/unit/cli_util.h"
#include "tests/unit/tiny_quant.h"
#include "worker/engine/executor.h"
#include "worker/engine/greedy.h"
#include "worker/model/checkpoint.h"
#include "worker/model/config.h"
#include "worker/model/memory_plan.h"
#include "worker/model/quantization.h"
#include "worker/model/safetensors.h"
#include "worker/model/weight_source.h"
#include "worker/runtime/cpu_backend.h"

namespace shardserve {
namespace {

namespace fs = std::filesystem;
using testing::run_cli;

const std::string kQuantDir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny-quant";
const std::string kBf16Dir = std::string(SHARDSERVE_TEST_DATA_DIR) + "/tiny/llama3-gqa-bf16";

std::vector<float> f32_tensor(const SafetensorsFile& file, const std::string& name) {
  auto view = file.view(name);
  EXPECT_TRUE(view.ok()) << view.status();
  if (!view.ok()) return {};
  std::vector<float> out(static_cast<size_t>(view->numel()));
  convert_to_f32(view->data, view->dtype, out.size(), out.data());
  return out;
}

std::vector<uint8_t> raw_tensor(const SafetensorsFile& file, const std::string& name) {
  auto view = file.view(name);
  EXPECT_TRUE(view.ok()) << view.status();
  if (!view.ok()) return {};
  const auto* p = static_cast<const uint8_t*>(view->data);
  return {p, p + view->numel() * static_cast<int64_t>(dtype_size(view->dtype))};
}

std::vector<uint8_t> raw_tensor(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data);
  return {p, p + t.nbytes()};
}

// Rows [r0, r1) and columns [c0, c1) of a row-major [rows, cols] matrix.
std::vector<float> block(const std::vector<float>& m, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  std::vector<float> out;
  for (int64_t r = r0; r < r1; ++r) out.insert(out.end(), m.begin() + r * cols + c0, m.begin() + r * cols + c1);
  return out;
}

// Runs `shardserve ARGS` expecting it to fail; returns what it printed (stdout and stderr).
std::string run_cli_failing(const std::string& args) {
  const std::string cmd = std::string(SHARDSERVE_BIN_DIR) + "/shardserve " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string output;
  char buf[4096];
  while (pipe != nullptr && fgets(buf, sizeof(buf), pipe) != nullptr) output += buf;
  EXPECT_NE(pipe == nullptr ? 0 : pclose(pipe), 0) << cmd << " succeeded:\n" << output;
  return output;
}

// ---------------------------------------------------------------------------------------------
// FP8 E4M3 rounding and the quantization config.

TEST(Fp8E4M3, EveryFiniteCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;  // NaN
    EXPECT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(static_cast<uint8_t>(c))), c) << "code " << c;
  }
}

TEST(Fp8E4M3, RoundsToNearestEvenAndSaturates) {
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = fp8e4m3_to_f32(static_cast<uint8_t>(c));
    const float hi = fp8e4m3_to_f32(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact: the codes' values have few significant bits
    EXPECT_EQ(f32_to_fp8e4m3(mid), c % 2 == 0 ? c : c + 1) << "tie between codes " << c << " and " << c + 1;
    EXPECT_EQ(f32_to_fp8e4m3(std::nextafter(mid, 0.0f)), c) << "just below the midpoint of " << c;
    EXPECT_EQ(f32_to_fp8e4m3(std::nextafter(mid, 1e9f)), c + 1) << "just above the midpoint of " << c;
    EXPECT_EQ(f32_to_fp8e4m3(-mid), (c % 2 == 0 ? c : c + 1) | 0x80);
  }
  EXPECT_EQ(f32_to_fp8e4m3(448.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8e4m3(470.0f), 0x7E);  // would round to 480, which E4M3 does not have
  EXPECT_EQ(f32_to_fp8e4m3(INFINITY), 0x7E);
  EXPECT_EQ(f32_to_fp8e4m3(-1e30f), 0xFE);
  EXPECT_EQ(f32_to_fp8e4m3(NAN) & 0x7F, 0x7F);
  EXPECT_EQ(f32_to_fp8e4m3(std::ldexp(1.0f, -11)), 0x00);  // a quarter of the smallest subnormal
  EXPECT_EQ(f32_to_fp8e4m3(-0.0f), 0x80);
}

// The CUDA backend's W8A8 as the CPU oracle computes it when asked: from kW8A8MinTokens tokens,
// each token's activations become E4M3 codes at scale max|x| / 448 (or the static input_scale),
// y = scale * (codes . W); below it, and with emulation off, the dequantized model on FP32.
TEST(Fp8E4M3, CpuBackendEmulatesW8A8FromItsTokenThreshold) {
  CpuBackend backend(1);
  const int64_t n = 16, k = 32;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  std::vector<uint8_t> codes(static_cast<size_t>(n * k));
  for (auto& c : codes) c = f32_to_fp8e4m3(u(rng));
  std::vector<float> scales(static_cast<size_t>(n));
  for (auto& s : scales) s = 0.01f + std::fabs(u(rng)) / 100.0f;
  LinearWeight w;
  w.format = WeightFormat::kFp8;
  w.weight = backend.upload(HostTensor{codes.data(), DType::kF8E4M3, {n, k}}, DType::kF8E4M3);
  w.scales = backend.upload(HostTensor{scales.data(), DType::kF32, {n}}, DType::kF32);
  for (const bool static_scale : {false, true}) {
    const float input_scale = 0.02f;
    if (static_scale) w.input_scale = backend.upload(HostTensor{&input_scale, DType::kF32, {1}}, DType::kF32);
    for (const int64_t tokens : {kW8A8MinTokens - 1, kW8A8MinTokens}) {
      std::vector<float> x(static_cast<size_t>(tokens * k));
      for (auto& v : x) v = u(rng);
      Tensor xt = backend.upload(HostTensor{x.data(), DType::kF32, {tokens, k}}, DType::kF32);
      for (const bool emulate : {false, true}) {
        backend.emulate_w8a8(emulate);
        Tensor y = backend.empty({tokens, n}, DType::kF32);
        backend.linear(xt, w, y);
        const bool w8a8 = emulate && tokens >= kW8A8MinTokens;
        for (int64_t t = 0; t < tokens; ++t) {
          float amax = 0.0f;
          for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[t * k + i]));
          const float s = static_scale ? input_scale : amax / 448.0f;
          for (int64_t j = 0; j < n; ++j) {
            double want = 0.0;
            for (int64_t i = 0; i < k; ++i) {
              const float xv = w8a8 ? fp8e4m3_to_f32(f32_to_fp8e4m3(x[t * k + i] * (1.0f / s))) * s : x[t * k + i];
              want += double(xv) * fp8e4m3_to_f32(codes[j * k + i]) * scales[j];
            }
            EXPECT_NEAR(y.as<float>()[t * n + j], want, 1e-4 * (1.0 + std::fabs(want)))
                << "tokens " << tokens << " emulate " << emulate << " static " << static_scale;
          }
        }
      }
    }
  }
  // The static scale saturates what lies beyond 448 * scale: the emulation must differ there.
  backend.emulate_w8a8(true);
  std::vector<float> big(static_cast<size_t>(kW8A8MinTokens * k), 100.0f);
  Tensor xt = backend.upload(HostTensor{big.data(), DType::kF32, {kW8A8MinTokens, k}}, DType::kF32);
  Tensor y = backend.empty({kW8A8MinTokens, n}, DType::kF32);
  backend.linear(xt, w, y);
  double exact = 0.0;
  for (int64_t i = 0; i < k; ++i) exact += 100.0 * fp8e4m3_to_f32(codes[i]) * scales[0];
  double clipped = 0.0;
  for (int64_t i = 0; i < k; ++i) clipped += 448.0 * 0.02 * fp8e4m3_to_f32(codes[i]) * scales[0];
  EXPECT_NEAR(y.as<float>()[0], clipped, 1e-4 * (1.0 + std::fabs(clipped)));
  EXPECT_GT(std::fabs(exact - clipped), 1.0);
}

TEST(QuantizationAtLoad, Int8RoundsHalfToEvenAndClamps) {
  EXPECT_EQ(quantize_int8(2.5f, 1.0f), 2);
  EXPECT_EQ(quantize_int8(3.5f, 1.0f), 4);
  EXPECT_EQ(quantize_int8(-2.5f, 1.0f), -2);
  EXPECT_EQ(quantize_int8(-300.0f, 1.0f), -127);
  EXPECT_FLOAT_EQ(quantization_scale(QuantMethod::kInt8, 254.0f), 2.0f);
  EXPECT_FLOAT_EQ(quantization_scale(QuantMethod::kFp8, 896.0f), 2.0f);
  EXPECT_FLOAT_EQ(quantization_scale(QuantMethod::kFp8, 0.0f), 1.0f);  // a row of zeros
}

TEST(QuantizationConfig, ParsesThePublishedFormats) {
  auto awq = parse_quantization_config(
      R"({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"})", "t");
  ASSERT_TRUE(awq.ok()) << awq.status();
  EXPECT_EQ(awq->method, QuantMethod::kAwq);
  EXPECT_EQ(awq->group_size, 128);
  // AutoAWQ's older quant_config.json: no quant_method, other spellings.
  auto old_awq = parse_quantization_config(R"({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})",
                                           "quant_config.json");
  ASSERT_TRUE(old_awq.ok()) << old_awq.status();
  EXPECT_EQ(old_awq->method, QuantMethod::kAwq);
  EXPECT_EQ(old_awq->group_size, 64);

  auto gptq = parse_quantization_config(
      R"({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": true, "sym": false})", "t");
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  EXPECT_EQ(gptq->method, QuantMethod::kGptq);
  EXPECT_EQ(gptq->group_size, 0);
  EXPECT_TRUE(gptq->desc_act);
  EXPECT_FALSE(gptq->sym);
  EXPECT_FALSE(gptq->gptq_v2);
  auto v2 = parse_quantization_config(R"({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"})", "t");
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_TRUE(v2->gptq_v2);

  for (const std::string dir : {"fp8-per-tensor-static", "fp8-per-channel-dynamic"}) {
    auto config = load_model_config(kQuantDir + "/" + dir);
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->quantization.method, QuantMethod::kFp8);
    EXPECT_EQ(config->quantization.static_activations, dir == "fp8-per-tensor-static") << dir;
  }
  auto legacy = parse_quantization_config(R"({"quant_method": "fp8", "activation_scheme": "static"})", "t");
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  EXPECT_EQ(legacy->method, QuantMethod::kFp8);
  EXPECT_TRUE(legacy->static_activations);
}

TEST(QuantizationConfig, RejectsWhatItCannotRunExactly) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"})", "bits 8 is not supported"},
      {R"({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})", "version 'gemv'"},
      {R"({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false})", "zero_point"},
      {R"({"quant_method": "gptq", "bits": 3, "group_size": 128})", "bits 3 is not supported"},
      {R"({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"})", "'marlin'"},
      {R"({"quant_method": "gptq", "bits": 4, "group_size": 0})", "group_size"},
      {R"({"quant_method": "bitsandbytes", "load_in_4bit": true})", "quant_method 'bitsandbytes' is not supported"},
      {R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}})", "'pack-quantized'"},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights":
          {"num_bits": 8, "type": "float", "strategy": "channel"}, "input_activations": null}}})", "weight-only FP8"},
      {R"({"quant_method": "fp8", "weight_block_size": [128, 128]})", "block-wise"},
  };
  for (const auto& [json, message] : cases) {
    auto q = parse_quantization_config(json, "config.json quantization_config");
    ASSERT_FALSE(q.ok()) << json;
    EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(q.status().message().find(message), std::string::npos) << q.status();
    EXPECT_NE(q.status().message().find("config.json quantization_config"), std::string::npos) << q.status();
  }
}

TEST(QuantizationConfig, ResolvesRequestsAgainstTheCheckpoint) {
  const QuantizationConfig dense;
  auto fp8 = resolve_quantization(dense, "fp8");
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->method, QuantMethod::kFp8);
  EXPECT_TRUE(fp8->at_load);
  auto int8 = resolve_quantization(dense, "int8");
  ASSERT_TRUE(int8.ok()) << int8.status();
  EXPECT_EQ(int8->method, QuantMethod::kInt8);
  EXPECT_FALSE(resolve_quantization(dense, "none")->quantized());
  auto awq_on_dense = resolve_quantization(dense, "awq");
  ASSERT_FALSE(awq_on_dense.ok());
  EXPECT_NE(awq_on_dense.status().message().find("cannot be made at load"), std::string::npos) << awq_on_dense.status();

  auto awq = load_model_config(kQuantDir + "/awq-gemm-g32");
  ASSERT_TRUE(awq.ok()) << awq.status();
  for (const std::string as_published : {"", "none", "awq"}) {
    auto q = resolve_quantization(awq->quantization, as_published);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_EQ(q->method, QuantMethod::kAwq);
    EXPECT_FALSE(q->at_load);
  }
  for (const std::string conflicting : {"fp8", "int8", "gptq"}) {
    auto q = resolve_quantization(awq->quantization, conflicting);
    ASSERT_FALSE(q.ok()) << conflicting;
    EXPECT_NE(q.status().message().find("already quantized as awq"), std::string::npos) << q.status();
  }
  EXPECT_FALSE(resolve_quantization(dense, "int4").ok());
}

// ---------------------------------------------------------------------------------------------
// The loader's unpacking against the script's integers, layer by layer.

class PackCaseTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::ifstream in(kQuantDir + "/pack-cases/cases.json");
    ASSERT_TRUE(in) << "missing pack-cases (run scripts/make_quant_checkpoints.py)";
    const auto cases = nlohmann::json::parse(in);
    ASSERT_TRUE(cases.contains(GetParam()));
    case_ = cases[GetParam()];
    auto q = parse_quantization_config(case_["quantization_config"].dump(), "cases.json");
    ASSERT_TRUE(q.ok()) << q.status();
    quant_ = *q;
    auto ckpt = Checkpoint::open(kQuantDir + "/pack-cases");
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
    auto file = SafetensorsFile::open(kQuantDir + "/pack-cases/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    expected_ = f32_tensor(**file, GetParam() + ".expected");
    rows_ = case_["rows"].get<int64_t>();
    cols_ = case_["cols"].get<int64_t>();
  }

  absl::StatusOr<std::vector<float>> load(int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    CheckpointSource source(*ckpt_, quant_);
    auto w = source.linear({{GetParam() + ".weight", rows_, r0, r1}}, cols_, c0, c1, backend_);
    if (!w.ok()) return w.status();
    EXPECT_NE(w->format, WeightFormat::kDense);
    EXPECT_EQ(w->out_features(), r1 - r0);
    EXPECT_EQ(w->in_features(), c1 - c0);
    return dequantize(*w);
  }

  nlohmann::json case_;
  QuantizationConfig quant_;
  std::unique_ptr<Checkpoint> ckpt_;
  CpuBackend backend_{1};
  std::vector<float> expected_;
  int64_t rows_ = 0, cols_ = 0;
};

TEST_P(PackCaseTest, LoaderDequantizesExactlyToTheReference) {
  auto w = load(0, rows_, 0, cols_);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->size(), expected_.size());
  for (size_t i = 0; i < expected_.size(); ++i) {
    ASSERT_EQ((*w)[i], expected_[i]) << "element [" << i / cols_ << ", " << i % cols_ << "]";
  }
}

// Tensor-parallel shards read only their slices; they must be exactly the reference's slices.
TEST_P(PackCaseTest, ShardsAreSlicesOfTheReference) {
  auto rows = load(8, 16, 0, cols_);  // a column-parallel shard: the second half of the rows
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ(*rows, block(expected_, cols_, 8, 16, 0, cols_));
  // A row-parallel shard: two whole groups of 16, or with act-order (g_idx) any 8-aligned slice.
  const int64_t c0 = case_["act_order"].get<bool>() ? 8 : 16;
  auto cols = load(0, rows_, c0, c0 + 32);
  ASSERT_TRUE(cols.ok()) << cols.status();
  EXPECT_EQ(*cols, block(expected_, cols_, 0, rows_, c0, c0 + 32));
}

INSTANTIATE_TEST_SUITE_P(Packings, PackCaseTest,
                         ::testing::Values("awq", "gptq_v1_sym_actorder", "gptq_v1_asym", "gptq_v2_asym",
                                           "gptq_v1_one_group", "fp8_scalar", "fp8_channel"));

// A v1 zero point stored as 15 means 16: not a 4-bit value (AutoGPTQ's v1 packing damages a zero
// point of 0 this way). Refused, naming the tensor's group and feature.
TEST(PackCases, DamagedGptqV1ZeroPointIsAnError) {
  auto ckpt = Checkpoint::open(kQuantDir + "/pack-cases");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto q = parse_quantization_config(R"({"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": false})", "t");
  ASSERT_TRUE(q.ok());
  CpuBackend backend(1);
  CheckpointSource source(**ckpt, *q);
  auto w = source.linear({{"gptq_v1_damaged_zero.weight", 16, 0, 16}}, 64, 0, 64, backend);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("group 2, output feature 5 stores 15"), std::string::npos) << w.status();
  EXPECT_NE(w.status().message().find("gptq_v2"), std::string::npos) << w.status();
}

TEST(PackCases, AKSliceThatSplitsAGroupIsAnErrorWithoutActOrder) {
  auto ckpt = Checkpoint::open(kQuantDir + "/pack-cases");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto q = parse_quantization_config(R"({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm"})", "t");
  ASSERT_TRUE(q.ok());
  CpuBackend backend(1);
  CheckpointSource source(**ckpt, *q);
  auto w = source.linear({{"awq.weight", 16, 0, 16}}, 64, 8, 40, backend);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("group_size 16"), std::string::npos) << w.status();
}

TEST(PackCases, FusedPartsWithDifferentActOrderAreAnError) {
  auto ckpt = Checkpoint::open(kQuantDir + "/pack-cases");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto q = parse_quantization_config(R"({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": true})", "t");
  ASSERT_TRUE(q.ok());
  CpuBackend backend(1);
  CheckpointSource source(**ckpt, *q);
  // The act-order case's g_idx is a permutation's; the v1 asymmetric case's is k / 16.
  auto w = source.linear({{"gptq_v1_sym_actorder.weight", 16, 0, 16}, {"gptq_v1_asym.weight", 16, 0, 16}}, 64, 0, 64,
                         backend);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("different g_idx"), std::string::npos) << w.status();
}

// ---------------------------------------------------------------------------------------------
// Quantization at load against the script's reference.

TEST(QuantizationAtLoad, MatchesTheIndependentReference) {
  auto ckpt = Checkpoint::open(kBf16Dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto ref = SafetensorsFile::open(kQuantDir + "/at_load_reference.safetensors");
  ASSERT_TRUE(ref.ok()) << ref.status();
  CpuBackend backend(1);
  for (const std::string method : {"fp8", "int8"}) {
    auto q = resolve_quantization(QuantizationConfig{}, method);
    ASSERT_TRUE(q.ok());
    CheckpointSource source(**ckpt, *q);
    const std::string q_proj = "model.layers.0.self_attn.q_proj.weight";
    auto w = source.linear({{q_proj, 64, 0, 64}}, 64, 0, 64, backend);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->format, method == "fp8" ? WeightFormat::kFp8 : WeightFormat::kInt8);
    EXPECT_EQ(raw_tensor(w->weight), raw_tensor(**ref, method + "." + q_proj)) << method;
    EXPECT_EQ(raw_tensor(w->scales), raw_tensor(**ref, method + "." + q_proj + "_scale")) << method;

    // The second rank of a row-parallel down_proj: its K half, with each row's scale from the
    // whole row, so the ranks together hold exactly the tp_size 1 quantization.
    const std::string down = "model.layers.0.mlp.down_proj.weight";
    auto shard = source.linear({{down, 64, 0, 64}}, 160, 80, 160, backend);
    ASSERT_TRUE(shard.ok()) << shard.status();
    const std::vector<uint8_t> full = raw_tensor(**ref, method + "." + down);
    std::vector<uint8_t> half;
    for (int64_t r = 0; r < 64; ++r) half.insert(half.end(), full.begin() + r * 160 + 80, full.begin() + r * 160 + 160);
    EXPECT_EQ(raw_tensor(shard->weight), half) << method;
    EXPECT_EQ(raw_tensor(shard->scales), raw_tensor(**ref, method + "." + down + "_scale")) << method;
  }
}

// ---------------------------------------------------------------------------------------------
// The tiny quantized checkpoints: every projection, the whole model, goldens, tensor parallelism.

using tiny_quant::greedy;
using tiny_quant::kCheckpoints;
using tiny_quant::kPrompts;
using tiny_quant::logit_error;

ExecutorOptions options_for(const std::string& dir, const std::string& quantization = "") {
  ExecutorOptions o;
  o.model_dir = dir;
  o.quantization = quantization;
  o.num_kv_blocks = 32;
  return o;
}

struct Run {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
};

absl::StatusOr<std::vector<Run>> run_prompts(const std::string& dir, int tp_size, const std::string& quantization = "",
                                             int64_t max_tokens = 8) {
  ExecutorOptions o = options_for(dir, quantization);
  o.tp_size = tp_size;
  auto loaded = load_model(o);
  if (!loaded.ok()) return loaded.status();
  std::vector<Run> runs;
  for (const auto& prompt : kPrompts) {
    auto out = generate_greedy(*loaded->executor, prompt, greedy(max_tokens));
    if (!out.ok()) return out.status();
    runs.push_back({out->token_ids, out->logits});
  }
  return runs;
}

class QuantCheckpointTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string dir() const { return kQuantDir + "/" + GetParam(); }
};

TEST_P(QuantCheckpointTest, EveryProjectionDequantizesToItsTwinBitForBit) {
  auto config = load_model_config(dir());
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->quantization.quantized());
  auto ckpt = Checkpoint::open(dir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto twin = SafetensorsFile::open(dir() + "/dequantized/model.safetensors");
  ASSERT_TRUE(twin.ok()) << twin.status();
  CpuBackend backend(1);
  CheckpointSource source(**ckpt, config->quantization);
  int checked = 0;
  for (int64_t layer = 0; layer < config->num_hidden_layers; ++layer) {
    for (const char* proj : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      const std::string name = "model.layers." + std::to_string(layer) + "." + proj + ".weight";
      const TensorInfo* info = (*twin)->find(name);
      ASSERT_NE(info, nullptr) << name;
      const int64_t n = info->shape[0], k = info->shape[1];
      auto w = source.linear({{name, n, 0, n}}, k, 0, k, backend);
      ASSERT_TRUE(w.ok()) << w.status();
      EXPECT_NE(w->format, WeightFormat::kDense) << name;
      EXPECT_EQ(dequantize(*w), f32_tensor(**twin, name)) << name;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 14);
}

TEST_P(QuantCheckpointTest, ForwardMatchesTheDequantizedTwin) {
  auto quantized = run_prompts(dir(), 1);
  ASSERT_TRUE(quantized.ok()) << quantized.status();
  auto twin = run_prompts(dir() + "/dequantized", 1);
  ASSERT_TRUE(twin.ok()) << twin.status();
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ((*quantized)[i].tokens, (*twin)[i].tokens) << "prompt " << i;
    const double err = logit_error((*quantized)[i].logits, (*twin)[i].logits);
    std::printf("[ twin ] %s prompt %zu: max relative logit error %.3g\n", GetParam().c_str(), i, err);
    EXPECT_LE(err, 1e-6) << "prompt " << i;
  }
}

// transformers (LlamaForCausalLM, FP32) on the dequantized twin: scripts/make_golden.py.
TEST_P(QuantCheckpointTest, MatchesTransformersGolden) {
  const std::string golden_dir = dir() + "/dequantized";
  if (!fs::exists(golden_dir + "/golden.json")) {
    GTEST_SKIP() << "no " << golden_dir << "/golden.json yet: run scripts/make_golden.py "
                 << "tests/data/tiny-quant/*/dequantized on a machine with transformers";
  }
  std::ifstream in(golden_dir + "/golden.json");
  const auto golden = nlohmann::json::parse(in);
  const int64_t steps = golden["steps"].get<int64_t>();
  auto logits_file = SafetensorsFile::open(golden_dir + "/golden_logits.safetensors");
  ASSERT_TRUE(logits_file.ok()) << logits_file.status();
  auto loaded = load_model(options_for(dir()));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const int64_t vocab = loaded->config.vocab_size;
  ASSERT_FALSE(golden["prompts"].empty());
  for (size_t i = 0; i < golden["prompts"].size(); ++i) {
    const auto prompt = golden["prompts"][i]["prompt_ids"].get<std::vector<int32_t>>();
    const auto tokens = golden["prompts"][i]["token_ids"].get<std::vector<int32_t>>();
    const std::vector<float> flat = f32_tensor(**logits_file, "prompt" + std::to_string(i));
    ASSERT_EQ(static_cast<int64_t>(flat.size()), steps * vocab);
    std::vector<std::vector<float>> expected;
    for (int64_t s = 0; s < steps; ++s) expected.emplace_back(flat.begin() + s * vocab, flat.begin() + (s + 1) * vocab);
    auto out = generate_greedy(*loaded->executor, prompt, greedy(steps));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->token_ids, tokens) << "prompt " << i;
    // As in llama_golden_test.cc: FP32 on both sides from identical weights.
    EXPECT_LT(logit_error(out->logits, expected), 1e-4) << "prompt " << i;
  }
}

// Row-parallel layers take a K slice: fine with act-order (g_idx) or FP8; with groups of 32 over
// the FFN's 160 features, tp_size 2 (80 each) would cut a group, which is a clear error.
TEST_P(QuantCheckpointTest, TensorParallelismWhereTheGroupsAllow) {
  const bool groups_split = GetParam() == "awq-gemm-g32" || GetParam() == "gptq-v2-g32-asym";
  auto tp2 = run_prompts(dir(), 2);
  if (groups_split) {
    ASSERT_FALSE(tp2.ok());
    EXPECT_EQ(tp2.status().code(), absl::StatusCode::kInvalidArgument);
    for (const char* part : {"mlp.down_proj", "tp_size 2", "group_size 32", "160"}) {
      EXPECT_NE(tp2.status().message().find(part), std::string::npos) << part << " in: " << tp2.status();
    }
    return;
  }
  ASSERT_TRUE(tp2.ok()) << tp2.status();
  auto tp1 = run_prompts(dir(), 1);
  ASSERT_TRUE(tp1.ok()) << tp1.status();
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ((*tp2)[i].tokens, (*tp1)[i].tokens) << "prompt " << i;
    // The all-reduce sums the two K halves in another order: FP32 rounding only.
    EXPECT_LE(logit_error((*tp2)[i].logits, (*tp1)[i].logits), 1e-5) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(TinyQuant, QuantCheckpointTest, ::testing::ValuesIn(kCheckpoints),
                         [](const auto& info) { return tiny_quant::test_name(info.param); });

// ---------------------------------------------------------------------------------------------
// Older config spellings, errors at start-up, and the command line.

// A checkpoint directory made of another's weights and a config.json of our own.
class TempCheckpoint {
 public:
  TempCheckpoint(const std::string& name, const std::string& weights_from, const nlohmann::json& config)
      : dir_(::testing::TempDir() + "/quant_" + name) {
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    fs::create_symlink(fs::absolute(weights_from + "/model.safetensors"), dir_ + "/model.safetensors");
    std::ofstream(dir_ + "/config.json") << config.dump(2);
  }
  ~TempCheckpoint() { fs::remove_all(dir_); }
  const std::string& dir() const { return dir_; }
  void write(const std::string& file, const nlohmann::json& j) const { std::ofstream(dir_ + "/" + file) << j.dump(2); }

 private:
  std::string dir_;
};

nlohmann::json config_of(const std::string& dir) {
  std::ifstream in(dir + "/config.json");
  return nlohmann::json::parse(in);
}

TEST(QuantCheckpoints, OlderAwqQuantConfigJsonLoadsTheSame) {
  const std::string awq = kQuantDir + "/awq-gemm-g32";
  nlohmann::json config = config_of(awq);
  config.erase("quantization_config");
  TempCheckpoint ckpt("old_awq", awq, config);
  ckpt.write("quant_config.json", {{"zero_point", true}, {"q_group_size", 32}, {"w_bit", 4}, {"version", "GEMM"}});
  auto old_format = run_prompts(ckpt.dir(), 1);
  ASSERT_TRUE(old_format.ok()) << old_format.status();
  auto current = run_prompts(awq, 1);
  ASSERT_TRUE(current.ok()) << current.status();
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ((*old_format)[i].logits, (*current)[i].logits) << "prompt " << i;
  }
}

TEST(QuantCheckpoints, OlderFp8QuantMethodLoadsTheSame) {
  const std::string fp8 = kQuantDir + "/fp8-per-tensor-static";
  nlohmann::json config = config_of(fp8);
  config["quantization_config"] = {{"quant_method", "fp8"}, {"activation_scheme", "static"}};
  TempCheckpoint ckpt("old_fp8", fp8, config);
  auto old_format = run_prompts(ckpt.dir(), 1);
  ASSERT_TRUE(old_format.ok()) << old_format.status();
  auto current = run_prompts(fp8, 1);
  ASSERT_TRUE(current.ok()) << current.status();
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ((*old_format)[i].logits, (*current)[i].logits) << "prompt " << i;
  }
}

TEST(QuantCheckpoints, UnsupportedConfigsFailAtStartUpNamingTheField) {
  const std::string awq = kQuantDir + "/awq-gemm-g32";
  nlohmann::json eight_bit = config_of(awq);
  eight_bit["quantization_config"]["bits"] = 8;
  TempCheckpoint bits("awq_bits8", awq, eight_bit);
  auto loaded = load_model(options_for(bits.dir()));
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(loaded.status().message().find("quantization_config: bits 8 is not supported"), std::string::npos)
      << loaded.status();

  nlohmann::json unknown = config_of(awq);
  unknown["quantization_config"] = {{"quant_method", "hqq"}, {"nbits", 4}};
  TempCheckpoint hqq("hqq", awq, unknown);
  loaded = load_model(options_for(hqq.dir()));
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find("quant_method 'hqq' is not supported"), std::string::npos) << loaded.status();

  // Packed INT4 tensors with no quantization_config: refused, not read as something else.
  nlohmann::json none = config_of(awq);
  none.erase("quantization_config");
  TempCheckpoint bare("bare", awq, none);
  loaded = load_model(options_for(bare.dir()));
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find("q_proj.qweight' is a packed INT4 tensor"), std::string::npos)
      << loaded.status();
}

TEST(QuantCheckpoints, Fp8RequestedOnAnAwqCheckpointIsAnError) {
  auto loaded = load_model(options_for(kQuantDir + "/awq-gemm-g32", "fp8"));
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(loaded.status().message().find("'fp8' was requested, but the checkpoint is already quantized as awq"),
            std::string::npos)
      << loaded.status();
}

// fp8 / int8 at load change the weights by at most half a quantization step per element:
// logits stay close to the 16-bit model's but are not equal. Measured on the prompt's logits
// (later steps may follow different tokens): FP8 keeps 3 fraction bits (relative rounding up to
// 1/16 per weight), INT8 steps of max|w| / 127.
TEST(QuantCheckpoints, QuantizedAtLoadStaysCloseToThe16BitModel) {
  auto dense = run_prompts(kBf16Dir, 1, "", 1);
  ASSERT_TRUE(dense.ok()) << dense.status();
  for (const auto& [method, tolerance] : {std::pair<std::string, double>{"fp8", 0.1}, {"int8", 0.02}}) {
    auto quantized = run_prompts(kBf16Dir, 1, method, 1);
    ASSERT_TRUE(quantized.ok()) << quantized.status();
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      const double err = logit_error((*quantized)[i].logits, (*dense)[i].logits);
      std::printf("[ at load ] %s prompt %zu: max relative logit error %.3g\n", method.c_str(), i, err);
      EXPECT_GT(err, 0.0) << method << " changed nothing";
      EXPECT_LT(err, tolerance) << method;
    }
  }
  auto tp2 = run_prompts(kBf16Dir, 2, "fp8", 4);  // every rank quantizes its slice of a row alike
  ASSERT_TRUE(tp2.ok()) << tp2.status();
  auto tp1 = run_prompts(kBf16Dir, 1, "fp8", 4);
  ASSERT_TRUE(tp1.ok()) << tp1.status();
  EXPECT_LE(logit_error((*tp2)[1].logits, (*tp1)[1].logits), 1e-5);
}

std::string prompt_ids() {
  std::string ids;
  for (int32_t id : kPrompts[1]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  return ids;
}

TEST(QuantCli, GenerateRunsQuantizedCheckpoints) {
  const std::string args = " --prompt-ids " + prompt_ids() + " --max-tokens 8 --ignore-eos --backend cpu --output json";
  const auto twin = nlohmann::json::parse(run_cli("generate --model " + kQuantDir + "/awq-gemm-g32/dequantized" + args));
  const auto awq = nlohmann::json::parse(run_cli("generate --model " + kQuantDir + "/awq-gemm-g32" + args));
  EXPECT_EQ(awq["token_ids"], twin["token_ids"]);
  const auto checked = nlohmann::json::parse(run_cli("generate --model " + kQuantDir + "/awq-gemm-g32 --quantization awq" + args));
  EXPECT_EQ(checked["token_ids"], twin["token_ids"]);
  const std::string gptq = kQuantDir + "/gptq-g32-sym-actorder";
  const auto tp1 = nlohmann::json::parse(run_cli("generate --model " + gptq + args));
  const auto tp2 = nlohmann::json::parse(run_cli("generate --model " + gptq + " --tp-size 2" + args));
  EXPECT_EQ(tp2["token_ids"], tp1["token_ids"]);
  EXPECT_EQ(tp1["token_ids"].size(), 8u);
}

TEST(QuantCli, GenerateReportsConflictsAndSplitGroups) {
  const std::string args = " --prompt-ids 1,2,3 --max-tokens 2 --backend cpu";
  const std::string split = run_cli_failing("generate --model " + kQuantDir + "/awq-gemm-g32 --tp-size 2" + args);
  EXPECT_NE(split.find("tp_size 2 splits its 160 input features into shards of 80"), std::string::npos) << split;
  const std::string conflict = run_cli_failing("generate --model " + kQuantDir + "/awq-gemm-g32 --quantization fp8" + args);
  EXPECT_NE(conflict.find("already quantized as awq"), std::string::npos) << conflict;
}

// ---------------------------------------------------------------------------------------------
// Synthetic quantized weights and the planner.

TEST(SyntheticQuantized, WeightsHaveTheVarianceOfDenseSyntheticWeights) {
  CpuBackend backend(2);
  const int64_t n = 256, k = 1024;
  for (const std::string method : {"awq", "gptq", "fp8", "int8"}) {
    auto q = synthetic_quantization(method);
    ASSERT_TRUE(q.ok()) << q.status();
    SyntheticSource source(7, *q);
    auto w = source.linear({{"model.layers.3.mlp.down_proj.weight", n, 0, n}}, k, 0, k, backend);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_NE(w->format, WeightFormat::kDense) << method;
    const std::vector<float> values = dequantize(*w);
    double sum = 0, sum_sq = 0;
    for (float v : values) {
      ASSERT_TRUE(std::isfinite(v)) << method;
      sum += v;
      sum_sq += double(v) * v;
    }
    const double mean_square = sum_sq / double(values.size());
    EXPECT_NEAR(mean_square * k, 1.0, 0.05) << method;
    EXPECT_LT(std::fabs(sum / double(values.size())) * std::sqrt(double(k)), 0.1) << method;
  }
  // The LM head and embeddings stay dense.
  SyntheticSource source(7, *synthetic_quantization("awq"));
  auto head = source.linear({{"lm_head.weight", 64, 0, 64}}, 128, 0, 128, backend);
  ASSERT_TRUE(head.ok());
  EXPECT_EQ(head->format, WeightFormat::kDense);
}

// --synthetic with --quantization reaches the weights: a model of random INT4 / FP8 / INT8 codes
// runs (finite logits) and differs from the dense synthetic model of the same seed.
TEST(SyntheticQuantized, LoadModelMakesQuantizedSyntheticWeights) {
  const std::string config = ::testing::TempDir() + "/quant_synthetic_config.json";
  std::ofstream(config) << R"({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 64, "torch_dtype": "bfloat16"})";
  auto run = [&](const std::string& quantization) -> std::vector<float> {
    ExecutorOptions o = options_for("", quantization);
    o.synthetic = config;
    auto loaded = load_model(o);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    if (!loaded.ok()) return {};
    auto out = generate_greedy(*loaded->executor, kPrompts[0], greedy(1));
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->logits[0] : std::vector<float>{};
  };
  const std::vector<float> dense = run("");
  ASSERT_EQ(dense.size(), 256u);
  for (const std::string method : {"awq", "gptq", "fp8", "int8"}) {
    const std::vector<float> logits = run(method);
    ASSERT_EQ(logits.size(), dense.size()) << method;
    for (float v : logits) ASSERT_TRUE(std::isfinite(v)) << method;
    EXPECT_NE(logits, dense) << method << " made the same weights as 16-bit";
    EXPECT_EQ(run(method), logits) << method << " is not deterministic";
  }
}

TEST(SyntheticQuantized, CpuFillRandomBitsIsTheDefinitionsBits) {
  CpuBackend backend(1);
  for (DType dtype : {DType::kI32, DType::kF8E4M3}) {
    Tensor a = backend.empty({33, 7}, dtype);
    Tensor b = backend.empty({33, 7}, dtype);
    backend.fill_random_bits(a, 11);
    backend.Backend::fill_random_bits(b, 11);  // the default: host bytes + copy_from_host
    EXPECT_EQ(raw_tensor(a), raw_tensor(b));
    const std::vector<uint8_t> bytes = raw_tensor(a);
    for (size_t j = 0; j < bytes.size(); ++j) {
      ASSERT_EQ(bytes[j], synthetic_random_byte(11, j, dtype == DType::kF8E4M3));
      if (dtype == DType::kF8E4M3) {
        ASSERT_EQ(bytes[j] & 0x40, 0);
      }
    }
  }
}

TEST(QuantMemoryPlan, Int4CountsTheWorkersU8ZeroPointsAndF16Scales) {
  // llama3-gqa-bf16 shaped, awq with group 32: every linear N x K has N K / 2 bytes of words and
  // N K / 32 x (2 + 1) bytes of scales and zero points, as read_int4_shard allocates them.
  auto config = load_model_config(kQuantDir + "/awq-gemm-g32");
  ASSERT_TRUE(config.ok());
  PlanOptions o;
  o.quantization = "awq";
  o.group_size = 32;
  o.max_model_len = 64;
  auto plan = plan_memory(*config, GpuSpec{"test", int64_t{1} << 30, 132}, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int64_t params = 2 * (128 * 64 + 64 * 64 + 320 * 64 + 64 * 160);
  EXPECT_EQ(plan->weights.linear, params / 2);
  EXPECT_EQ(plan->weights.linear_meta, params / 32 * 3);
}

}  // namespace
}  // namespace shardserve
