#include "coordinator/tokenizer/utf8.h"

#include <cstdint>

namespace shardserve::utf8 {

Step next_unit(std::string_view bytes) {
  const auto b = [&](size_t i) { return static_cast<uint8_t>(bytes[i]); };
  const uint8_t lead = b(0);
  if (lead < 0x80) return {Unit::kChar, 1};
  size_t need = 0;
  // The range allowed for the second byte excludes overlong forms and surrogates (Unicode 3-7).
  uint8_t lo = 0x80, hi = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 1;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 2;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 3;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    return {Unit::kInvalid, 1};
  }
  for (size_t i = 1; i <= need; ++i) {
    if (i >= bytes.size()) return {Unit::kTruncated, i};
    const uint8_t c = b(i);
    const bool ok = i == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) return {Unit::kInvalid, i};
  }
  return {Unit::kChar, need + 1};
}

std::optional<size_t> first_invalid_offset(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const Step step = next_unit(text.substr(i));
    if (step.unit != Unit::kChar) return i;
    i += step.length;
  }
  return std::nullopt;
}

size_t append_lossy(std::string_view bytes, bool final, std::string& out) {
  size_t i = 0;
  size_t run = 0;  // start of the current run of valid bytes, appended in one go
  while (i < bytes.size()) {
    if (static_cast<uint8_t>(bytes[i]) < 0x80) {
      ++i;
      continue;
    }
    const Step step = next_unit(bytes.substr(i));
    if (step.unit == Unit::kChar) {
      i += step.length;
      continue;
    }
    out.append(bytes.substr(run, i - run));
    if (step.unit == Unit::kTruncated && !final) return step.length;
    out.append(kReplacementChar);
    i += step.length;
    run = i;
  }
  out.append(bytes.substr(run));
  return 0;
}

}  // namespace shardserve::utf8
