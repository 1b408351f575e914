// The safetensors reader and the checkpoint directory loader, on files written here byte by byte:
// slices must equal the whole tensor's elements, and every kind of corrupt input must be rejected
// with a message naming the file and, where there is one, the tensor.
#include "worker/model/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>

#include "worker/model/checkpoint.h"

namespace shardserve {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("shardserve_st_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes [u64 header length][header][data]; `declared_len` overrides the length field.
  std::string write(const std::string& name, const std::string& header, const std::string& data,
                    int64_t declared_len = -1) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    uint64_t len = declared_len >= 0 ? uint64_t(declared_len) : header.size();
    for (int i = 0; i < 8; ++i) out.put(char((len >> (8 * i)) & 0xFF));
    out << header << data;
    return path;
  }
  // A valid file: "a" F32 [2, 3] = 0..5, "b" I8 [4] = 1..4.
  std::string write_valid(const std::string& name = "model.safetensors") {
    std::string data(24, '\0');
    for (int i = 0; i < 6; ++i) {
      const float f = float(i);
      std::memcpy(&data[4 * i], &f, 4);
    }
    data += std::string("\x01\x02\x03\x04", 4);
    return write(name,
                 R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                 R"("b":{"dtype":"I8","shape":[4],"data_offsets":[24,28]}})",
                 data);
  }
  void expect_rejected(const std::string& path, const std::string& fragment) {
    auto f = SafetensorsFile::open(path);
    ASSERT_FALSE(f.ok()) << "accepted " << path;
    const std::string msg(f.status().message());
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(fragment), std::string::npos) << "expected '" << fragment << "' in: " << msg;
  }

  fs::path dir_;
};

TEST_F(SafetensorsTest, ReadsTensorsMetadataAndSlices) {
  auto f = SafetensorsFile::open(write_valid());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  auto a = (*f)->view("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  // The data section need not be aligned for the dtype (here it starts at byte 170): copy to read.
  float last;
  std::memcpy(&last, static_cast<const uint8_t*>(a->data) + 5 * sizeof(float), sizeof(float));
  EXPECT_EQ(last, 5.0f);
  float rows[3];
  ASSERT_TRUE((*f)->read_slice("a", 0, 1, 2, rows).ok());
  EXPECT_EQ(std::vector<float>(rows, rows + 3), (std::vector<float>{3, 4, 5}));
  float cols[4];
  ASSERT_TRUE((*f)->read_slice("a", 1, 1, 3, cols).ok());
  EXPECT_EQ(std::vector<float>(cols, cols + 4), (std::vector<float>{1, 2, 4, 5}));
  EXPECT_FALSE((*f)->read_slice("a", 1, 2, 4, cols).ok());
  EXPECT_FALSE((*f)->read_slice("a", 2, 0, 1, cols).ok());
  EXPECT_EQ((*f)->view("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, RejectsCorruptFiles) {
  expect_rejected(write("short.safetensors", "", "", 0), "header does not start with");
  {
    const std::string path = (dir_ / "tiny.safetensors").string();
    std::ofstream(path) << "abc";
    expect_rejected(path, "shorter than the 8-byte header length");
  }
  expect_rejected(write("huge.safetensors", "{}", "", int64_t{1} << 40), "exceeds the limit");
  expect_rejected(write("past.safetensors", "{}", "", 4096), "runs past the end");
  expect_rejected(write("json.safetensors", "{\"a\": [1,", ""), "not valid JSON");
  expect_rejected(write("dtype.safetensors", R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')),
                  "tensor 'a': unsupported dtype F64");
  expect_rejected(write("neg.safetensors", R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0')),
                  "tensor 'a': shape entries must be non-negative");
  expect_rejected(write("size.safetensors", R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", std::string(12, '\0')),
                  "tensor 'a': holds 12 bytes but dtype F32 x shape [2, 2] needs 16");
  expect_rejected(write("trunc.safetensors", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(10, '\0')),
                  "past the 10-byte data section");
  expect_rejected(write("overlap.safetensors",
                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        std::string(12, '\0')),
                  "tensor 'b' starts at byte 4 but the previous tensor ends at 8");
  expect_rejected(write("gap.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')),
                  "tensor 'a' starts at byte 4");
  expect_rejected(write("tail.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(8, '\0')),
                  "tensors cover 4 bytes of a 8-byte data section");
  expect_rejected(write("offsets.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", std::string(4, '\0')),
                  "data_offsets must be [begin, end]");
  expect_rejected(write("overflow.safetensors",
                        R"({"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,4]}})",
                        std::string(4, '\0')),
                  "shape is too large");
  // Empty, but numel() would overflow on the way to 0 (found by fuzzing).
  expect_rejected(write("empty-overflow.safetensors",
                        R"({"a":{"dtype":"U8","shape":[4611686018427387904,2,0],"data_offsets":[0,0]}})", ""),
                  "shape is too large");
  expect_rejected((dir_ / "absent.safetensors").string(), "cannot open");
}

// Found by fuzzing (tests/fuzz/safetensors_fuzz.cc): an empty tensor with a huge dimension is
// valid, and slicing it must copy nothing at once, not loop 2^40 times or memcpy to a null dst.
TEST_F(SafetensorsTest, EmptySlicesCopyNothing) {
  auto f = SafetensorsFile::open(
      write("empty.safetensors", R"({"e":{"dtype":"U8","shape":[1099511627776,0],"data_offsets":[0,0]}})", ""));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->read_slice("e", 1, 0, 0, nullptr).ok());
  EXPECT_TRUE((*f)->read_slice("e", 0, 0, int64_t{1} << 40, nullptr).ok());
}

// from_memory (tests and fuzzing) runs the checks of open on bytes in memory.
TEST_F(SafetensorsTest, FromMemoryChecksLikeOpen) {
  std::ifstream in(write_valid(), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto f = SafetensorsFile::from_memory(bytes, "mem.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  float row[3];
  ASSERT_TRUE((*f)->read_slice("a", 0, 1, 2, row).ok());
  EXPECT_EQ(row[2], 5.0f);
  EXPECT_FALSE(SafetensorsFile::from_memory(bytes.substr(0, 7), "mem.safetensors").ok());
  auto truncated = SafetensorsFile::from_memory(bytes.substr(0, bytes.size() - 1), "mem.safetensors");
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("mem.safetensors"), std::string::npos) << truncated.status();
}

TEST_F(SafetensorsTest, CheckpointChecksShapesAndNamesTheTensor) {
  write_valid();
  auto ckpt = Checkpoint::open(dir_.string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto whole = (*ckpt)->read("a", {2, 3});
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->bytes.size(), 24u);
  auto slice = (*ckpt)->read("a", {2, 3}, 1, 2, 3);
  ASSERT_TRUE(slice.ok());
  EXPECT_EQ(slice->shape, (std::vector<int64_t>{2, 1}));
  auto wrong = (*ckpt)->read("a", {3, 2});
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("tensor 'a' has shape [2, 3] but the model config implies [3, 2]"), std::string::npos)
      << wrong.status();
  auto missing = (*ckpt)->read("lm_head.weight", {1});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("no tensor 'lm_head.weight'"), std::string::npos);
}

TEST_F(SafetensorsTest, ShardedCheckpointThroughTheIndex) {
  write_valid("part-1.safetensors");
  std::ofstream(dir_ / "model.safetensors.index.json") << R"({"weight_map":{"a":"part-1.safetensors","b":"part-1.safetensors"}})";
  auto ckpt = Checkpoint::open(dir_.string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->contains("b"));

  std::ofstream(dir_ / "model.safetensors.index.json", std::ios::trunc) << R"({"weight_map":{"c":"part-1.safetensors"}})";
  auto absent = Checkpoint::open(dir_.string());
  ASSERT_FALSE(absent.ok());
  EXPECT_NE(absent.status().message().find("places tensor 'c' in"), std::string::npos) << absent.status();

  std::ofstream(dir_ / "model.safetensors.index.json", std::ios::trunc) << R"({"weight_map":{"a":"../etc/passwd"}})";
  EXPECT_FALSE(Checkpoint::open(dir_.string()).ok());
  std::ofstream(dir_ / "model.safetensors.index.json", std::ios::trunc) << R"({"weight_map":{"a":"missing.safetensors"}})";
  auto no_file = Checkpoint::open(dir_.string());
  ASSERT_FALSE(no_file.ok());
  EXPECT_NE(no_file.status().message().find("missing.safetensors"), std::string::npos);
  std::ofstream(dir_ / "model.safetensors.index.json", std::ios::trunc) << "[]";
  EXPECT_FALSE(Checkpoint::open(dir_.string()).ok());
}

TEST_F(SafetensorsTest, EmptyDirectoryIsNotFound) {
  auto ckpt = Checkpoint::open(dir_.string());
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace shardserve
