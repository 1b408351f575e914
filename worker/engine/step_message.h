// Step message: one Batch packed into bytes, as rank 0 of a tensor-parallel group sends it to its
// followers each step (to threads in this process today, to other processes over any byte
// channel later). The layout is fixed little-endian and does not depend on the host:
//
//   header   u32 magic "SSTP" (0x50545353), u32 version (1),
//            u32 num_seqs S, u32 num_tokens T, u32 num_block_ids B
//   arrays   i32 query_len[S], i32 num_cached[S], i32 block_table_len[S], i32 sample[S] (0 or 1),
//            i32 token_ids[T]   (every sequence's query tokens, in batch order),
//            i32 block_ids[B]   (every sequence's block table, in batch order)
//
// 20 + 4 * (4S + T + B) bytes: for a decode step of 64 sequences of 1,000 tokens, ~5 KB.
// unpack() validates everything it reads (size, magic, version, counts against the size, the
// per-sequence lengths against T and B, flags) and returns INVALID_ARGUMENT naming the problem;
// it never reads out of bounds or allocates from an unchecked count. It checks the encoding, not
// the batch's meaning (block ids in range and the like stay ModelRunner's invariant).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "worker/engine/batch.h"

namespace shardserve {

inline constexpr uint32_t kStepMessageMagic = 0x50545353;  // "SSTP" in little-endian bytes
inline constexpr uint32_t kStepMessageVersion = 1;

std::string pack(const Batch& batch);
absl::StatusOr<Batch> unpack(std::string_view message);

}  // namespace shardserve
