// Quantized linear layers out of a checkpoint: each published format (worker/model/quantization.h)
// read as this rank's shard and turned, on the host, into the one LinearWeight layout of
// worker/runtime/backend.h, then uploaded.
//
// A shard is rows [row_begin, row_end) of a part's N output features (column-parallel) or input
// features [col_begin, col_end) of its K (row-parallel), never both. Only those slices are read:
//   INT4 column shard: packed words of its rows (a multiple of 8 rows: zeros are packed along N),
//        every group; INT4 row shard: its K slice of qweight and g_idx and the groups that slice
//        uses; without act-order the slice must be a whole number of groups (INVALID_ARGUMENT
//        naming the layer, the tp_size and the group size otherwise).
//   FP8: rows or columns of weight, the matching per-channel scales (a per-tensor scale is
//        expanded to every row, which is exact).
// Repacking into the canonical layout is exact: it moves bits and widens scales (F16 kept, BF16
// widened to F32), so W dequantizes to the checkpoint's values bit for bit.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/checkpoint.h"
#include "worker/model/quantization.h"
#include "worker/runtime/backend.h"

namespace shardserve {

// A LinearWeight on the host: the same fields as bytes (HostBuffer dtype/shape as in backend.h).
struct HostLinearWeight {
  WeightFormat format = WeightFormat::kDense;
  HostBuffer weight;
  HostBuffer scales;
  HostBuffer zeros;
  HostBuffer g_idx;  // no bytes: group = k / group_size
  int64_t group_size = 0;
  HostBuffer input_scale;  // no bytes: dynamic
};

// How one linear part's tensors are stored in a checkpoint: INT4 (PREFIX.qweight present), FP8
// (PREFIX.weight is F8_E4M3) or dense, where PREFIX is the part's name less ".weight".
// INVALID_ARGUMENT when what is stored contradicts `quant` (e.g. packed INT4 tensors but no
// quantization_config, or AWQ tensors in a GPTQ checkpoint).
absl::StatusOr<WeightFormat> stored_format(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                           const std::string& weight_name);

// One part's shard, stored as `quant` says (format from stored_format).
struct PartShard {
  std::string weight_name;  // "model.layers.0.self_attn.q_proj.weight"
  int64_t rows = 0;         // N of the part
  int64_t cols = 0;         // K
  int64_t row_begin = 0, row_end = 0;
  int64_t col_begin = 0, col_end = 0;
};
absl::StatusOr<HostLinearWeight> read_int4_shard(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                 const PartShard& shard);
absl::StatusOr<HostLinearWeight> read_fp8_shard(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                const PartShard& shard);
// A dense part quantized per output channel while loading (quant.at_load: fp8 or int8); each
// row's scale comes from the whole row, so every tensor-parallel layout quantizes alike.
absl::StatusOr<HostLinearWeight> quantize_shard_at_load(const Checkpoint& ckpt, const QuantizationConfig& quant,
                                                        const PartShard& shard);

// Parts of a fused layer stacked along N. INVALID_ARGUMENT when they cannot share one weight
// (different formats, groups, scale dtypes, or act-order g_idx). FP8 static input scales: the
// largest of the parts' (activations quantized with it never saturate; vLLM does the same).
absl::StatusOr<HostLinearWeight> concat_rows(std::vector<HostLinearWeight> parts, const std::vector<std::string>& names);

LinearWeight upload_linear(const HostLinearWeight& host, Backend& backend);

}  // namespace shardserve
