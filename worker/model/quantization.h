// Quantization: which published format a checkpoint's linear layers are stored in, as parsed from
// config.json's `quantization_config` (or AutoAWQ's older quant_config.json), what a
// `--quantization` request turns it into, and the exact arithmetic of quantizing at load.
//
// Formats as published, with N output and K input features, G the group size
// (worker/model/quant_reader.h turns each into the one LinearWeight layout of
// worker/runtime/backend.h; every format dequantizes as W = (q - z) * s or W = q * s):
//   awq   AutoAWQ GEMM. qweight I32 [K, N/8]: nibble i (bits 4i..4i+3) of word [k][c] holds
//         output feature 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; qzeros I32 [K/G, N/8] packed the same
//         way; scales F16 [K/G, N].
//   gptq  AutoGPTQ / GPTQModel. qweight I32 [K/8, N]: nibble j of word [r][n] holds input
//         feature 8r + j; qzeros I32 [groups, N/8]: nibble j of word [g][c] holds output feature
//         8c + j, storing z - 1 (checkpoint_format gptq, "v1") or z (gptq_v2); scales [groups, N];
//         g_idx I32 [K], the group of each input feature (k / G, or a permutation's groups with
//         act-order, desc_act). group_size -1 is one group over all of K.
//   fp8   compressed-tensors `float-quantized` (or the older quant_method fp8): weight F8_E4M3
//         [N, K]; weight_scale one element (per tensor) or N ([N] / [N, 1], per channel);
//         input_scale one element when activations are quantized statically, none when each
//         token's scale is computed on the fly (dynamic).
//   fp8 / int8 at load: a 16-bit checkpoint quantized per output channel while it loads.
// Embeddings, norms and the LM head stay 16-bit in every format (as the published tools leave
// them); a layer the checkpoint keeps dense (modules_to_not_convert, ignore) loads dense.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "worker/runtime/dtype.h"  // f32_to_fp8e4m3

namespace shardserve {

enum class QuantMethod : uint8_t { kNone, kAwq, kGptq, kFp8, kInt8 };

struct QuantizationConfig {
  QuantMethod method = QuantMethod::kNone;
  // fp8 / int8 made from a 16-bit checkpoint while loading (the checkpoint itself is dense).
  bool at_load = false;
  // awq / gptq: input features per group; 0 = one group over all of K (GPTQ's group_size -1).
  int64_t group_size = 0;
  bool desc_act = false;  // gptq: act-order (what config.json says; g_idx is what counts)
  bool sym = true;        // gptq
  bool gptq_v2 = false;   // gptq: zeros stored as they are (v1 stores z - 1)
  // fp8 checkpoints: activations quantized with each layer's static input_scale (else dynamic,
  // per token).
  bool static_activations = false;
  // Where this was read from, for messages ("config.json quantization_config").
  std::string source;

  bool quantized() const { return method != QuantMethod::kNone; }
  // The name a user types (--quantization, cluster config): none, awq, gptq, fp8, int8.
  std::string name() const;
  // One line for logs and errors, e.g. "gptq (4-bit, group_size 128, act-order, v1 zeros)".
  std::string describe() const;
};

std::string quant_method_name(QuantMethod method);

// Parses a `quantization_config` object (JSON text). `source` names it in messages.
// INVALID_ARGUMENT naming the field for anything this code cannot run exactly: an unknown
// quant_method, bits other than 4 (awq, gptq), AWQ versions other than GEMM or without zero
// points, GPTQ Marlin-packed checkpoints, compressed-tensors schemes other than FP8 W8A8.
absl::StatusOr<QuantizationConfig> parse_quantization_config(const std::string& json_text, const std::string& source);

// What a model loads with, from the checkpoint's quantization and a request (--quantization,
// cluster config `quantization:`):
//   "", "none"      the checkpoint as published, whatever its format (nothing quantized at load);
//   awq, gptq, fp8  must be the checkpoint's own format (a check, as in a cluster config) ...
//   fp8, int8       ... or, on a 16-bit checkpoint, quantize it at load (per output channel).
// INVALID_ARGUMENT for anything else, e.g. fp8 on an AWQ checkpoint, awq on a 16-bit one.
absl::StatusOr<QuantizationConfig> resolve_quantization(const QuantizationConfig& checkpoint,
                                                        const std::string& requested);

// The quantization of synthetic weights (no checkpoint): awq / gptq (INT4, group_size 128,
// symmetric), fp8 (dynamic activations), int8; "" or "none" for 16-bit.
absl::StatusOr<QuantizationConfig> synthetic_quantization(const std::string& requested);

// Whether a checkpoint tensor is one of the decoder's projection weights, the layers that
// synthetic and at-load quantization quantize (embeddings and the LM head stay 16-bit).
bool is_decoder_projection(const std::string& weight_name);


// Symmetric per-output-channel quantization at load:
//   fp8:  scale = max|w| / 448, q = E4M3(w / scale), round to nearest even, saturating (vLLM
//         clamps to +-448 before its round-to-nearest-even cast; compressed-tensors' channel
//         strategy has the same scale);
//   int8: scale = max|w| / 127, q = w / scale rounded half to even, clamped to [-127, 127]
//         (vLLM's int8 weight quantization: torch.round, then clamp).
// All in FP32 (vLLM divides in the checkpoint's 16-bit dtype), divisions as written, so an
// independent implementation gets the same bits. A row of zeros gets scale 1. `max_abs` is the
// row's max |w| over all of K, so every tensor-parallel shard quantizes a row alike.
float quantization_scale(QuantMethod method, float max_abs);
uint8_t quantize_fp8(float w, float scale);
int8_t quantize_int8(float w, float scale);

}  // namespace shardserve
