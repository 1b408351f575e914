#include "worker/engine/step_message.h"

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"

namespace shardserve {
namespace {

constexpr size_t kHeaderBytes = 5 * 4;

void put_u32(std::string& out, uint32_t v) {
  const char bytes[4] = {static_cast<char>(v & 0xff), static_cast<char>((v >> 8) & 0xff),
                         static_cast<char>((v >> 16) & 0xff), static_cast<char>((v >> 24) & 0xff)};
  out.append(bytes, 4);
}
void put_i32(std::string& out, int32_t v) { put_u32(out, static_cast<uint32_t>(v)); }

// Reads little-endian words from a message whose size was checked up front.
class Reader {
 public:
  explicit Reader(std::string_view bytes) : bytes_(bytes) {}
  uint32_t u32() {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes_.data()) + pos_;
    pos_ += 4;
    return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
  }
  int32_t i32() { return static_cast<int32_t>(u32()); }

 private:
  std::string_view bytes_;
  size_t pos_ = 0;
};

absl::Status bad(const std::string& what) { return absl::InvalidArgumentError("step message: " + what); }

}  // namespace

std::string pack(const Batch& batch) {
  uint32_t num_tokens = 0;
  uint32_t num_block_ids = 0;
  for (const SequenceStep& s : batch.seqs) {
    num_tokens += static_cast<uint32_t>(s.token_ids.size());
    num_block_ids += static_cast<uint32_t>(s.block_table.size());
  }
  const auto num_seqs = static_cast<uint32_t>(batch.seqs.size());
  std::string out;
  out.reserve(kHeaderBytes + 4 * (4 * size_t{num_seqs} + num_tokens + num_block_ids));
  put_u32(out, kStepMessageMagic);
  put_u32(out, kStepMessageVersion);
  put_u32(out, num_seqs);
  put_u32(out, num_tokens);
  put_u32(out, num_block_ids);
  for (const SequenceStep& s : batch.seqs) put_i32(out, static_cast<int32_t>(s.token_ids.size()));
  for (const SequenceStep& s : batch.seqs) put_i32(out, s.num_cached);
  for (const SequenceStep& s : batch.seqs) put_i32(out, static_cast<int32_t>(s.block_table.size()));
  for (const SequenceStep& s : batch.seqs) put_i32(out, s.sample ? 1 : 0);
  for (const SequenceStep& s : batch.seqs) {
    for (int32_t id : s.token_ids) put_i32(out, id);
  }
  for (const SequenceStep& s : batch.seqs) {
    for (int32_t block : s.block_table) put_i32(out, block);
  }
  return out;
}

absl::StatusOr<Batch> unpack(std::string_view message) {
  if (message.size() < kHeaderBytes) {
    return bad(absl::StrCat("truncated: ", message.size(), " bytes, the header alone takes ", kHeaderBytes));
  }
  Reader in(message);
  const uint32_t magic = in.u32();
  if (magic != kStepMessageMagic) return bad(absl::StrCat("bad magic 0x", absl::Hex(magic), ", not a step message"));
  const uint32_t version = in.u32();
  if (version != kStepMessageVersion) {
    return bad(absl::StrCat("version ", version, " is not supported (this build reads version ", kStepMessageVersion, ")"));
  }
  const uint32_t num_seqs = in.u32();
  const uint32_t num_tokens = in.u32();
  const uint32_t num_block_ids = in.u32();
  // 64-bit: three u32 counts cannot overflow it, so a huge claimed count just fails the size check.
  const uint64_t expected = kHeaderBytes + 4 * (4 * uint64_t{num_seqs} + num_tokens + num_block_ids);
  if (message.size() != expected) {
    return bad(absl::StrCat(message.size() < expected ? "truncated" : "trailing bytes", ": ", message.size(),
                            " bytes, but ", num_seqs, " sequences, ", num_tokens, " tokens and ", num_block_ids,
                            " block ids take ", expected));
  }

  // Counts are now bounded by the message size, so these allocations are too.
  Batch batch;
  batch.seqs.resize(num_seqs);
  std::vector<uint32_t> query_len(num_seqs), table_len(num_seqs);
  uint64_t tokens_claimed = 0;
  uint64_t blocks_claimed = 0;
  for (uint32_t& len : query_len) {
    const int32_t v = in.i32();
    if (v < 0) return bad(absl::StrCat("negative query length ", v));
    len = static_cast<uint32_t>(v);
    tokens_claimed += len;
  }
  for (SequenceStep& s : batch.seqs) {
    s.num_cached = in.i32();
    if (s.num_cached < 0) return bad(absl::StrCat("negative num_cached ", s.num_cached));
  }
  for (uint32_t& len : table_len) {
    const int32_t v = in.i32();
    if (v < 0) return bad(absl::StrCat("negative block table length ", v));
    len = static_cast<uint32_t>(v);
    blocks_claimed += len;
  }
  for (SequenceStep& s : batch.seqs) {
    const int32_t flag = in.i32();
    if (flag != 0 && flag != 1) return bad(absl::StrCat("sample flag ", flag, " is not 0 or 1"));
    s.sample = flag == 1;
  }
  if (tokens_claimed != num_tokens || blocks_claimed != num_block_ids) {
    return bad(absl::StrCat("per-sequence lengths add up to ", tokens_claimed, " tokens and ", blocks_claimed,
                            " block ids, the header says ", num_tokens, " and ", num_block_ids));
  }
  for (uint32_t i = 0; i < num_seqs; ++i) {
    batch.seqs[i].token_ids.resize(query_len[i]);
    for (int32_t& id : batch.seqs[i].token_ids) id = in.i32();
  }
  for (uint32_t i = 0; i < num_seqs; ++i) {
    batch.seqs[i].block_table.resize(table_len[i]);
    for (int32_t& block : batch.seqs[i].block_table) block = in.i32();
  }
  return batch;
}

}  // namespace shardserve
