// UTF-8 scanning shared by the encoder (input validation) and the decoders (lossy conversion).
//
// The lossy rules are those of Rust's String::from_utf8_lossy, which Hugging Face tokenizers uses
// to decode: each maximal invalid subpart (a byte that can start no character, or a valid prefix
// of a character cut short by a byte that cannot continue it) becomes one U+FFFD, and scanning
// resumes at the first byte not consumed. A valid prefix cut short by the end of the input is one
// U+FFFD too, but only when the input really ends there: streaming decoders hold it instead.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace shardserve::utf8 {

enum class Unit {
  kChar,       // `length` bytes form one valid character
  kInvalid,    // `length` bytes form one maximal invalid subpart (one U+FFFD)
  kTruncated,  // the rest of the input (`length` bytes) is a valid prefix of a character
};

struct Step {
  Unit unit;
  size_t length;
};

// The first unit of `bytes`, which must not be empty.
Step next_unit(std::string_view bytes);

// The byte offset of the first invalid or truncated unit, or nullopt when `text` is valid UTF-8.
std::optional<size_t> first_invalid_offset(std::string_view text);

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Appends `bytes` to `out` as valid UTF-8: kept where valid, U+FFFD per invalid subpart. When
// `final` is false a trailing truncated character is not converted: its length is returned so the
// caller can hold those bytes until more arrive; otherwise it becomes U+FFFD and 0 is returned.
size_t append_lossy(std::string_view bytes, bool final, std::string& out);

}  // namespace shardserve::utf8
