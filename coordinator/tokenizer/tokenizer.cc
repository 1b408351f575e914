#include "coordinator/tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/hash/hash.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/tokenizer/utf8.h"

namespace shardserve {
namespace {

using json = nlohmann::json;

// Debian's Abseil has its own string_view type; this is the one place the two meet.
absl::string_view av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr uint8_t kKnown = 1;
constexpr uint8_t kSpecial = 2;

// A pre-token's ids are cached when it is at most this long; longer ones are rare and would only
// evict useful entries.
constexpr size_t kMaxCachedPieceBytes = 256;
constexpr size_t kCacheShards = 16;
constexpr size_t kCacheShardEntries = 8192;

// The regex the ByteLevel pre-tokenizer uses when use_regex is true (GPT-2's).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Unicode White_Space, which Oniguruma's `\s` matches. PCRE2's `\s` (with UCP) differs: it adds
// U+180E, so `\s` is spelled out instead of trusting the engine.
constexpr std::string_view kWhiteSpaceClassBody =
    R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes are
// shifted to U+0100.. in byte order, so every byte has a visible, non-space character.
std::array<char32_t, 256> make_byte_to_char() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

const std::array<int16_t, 512>& char_to_byte() {
  static const std::array<int16_t, 512> table = [] {
    std::array<int16_t, 512> t;
    t.fill(-1);
    const auto forward = make_byte_to_char();
    for (int b = 0; b < 256; ++b) t[forward[b]] = static_cast<int16_t>(b);
    return t;
  }();
  return table;
}

// Decodes one code point of valid UTF-8 at `s[i]`, advancing i.
char32_t next_code_point(std::string_view s, size_t& i) {
  const auto u = [&](size_t k) { return static_cast<char32_t>(static_cast<uint8_t>(s[k])); };
  const char32_t lead = u(i);
  if (lead < 0x80) return i += 1, lead;
  if (lead < 0xE0) return i += 2, ((lead & 0x1F) << 6) | (u(i - 1) & 0x3F);
  if (lead < 0xF0) return i += 3, ((lead & 0x0F) << 12) | ((u(i - 2) & 0x3F) << 6) | (u(i - 1) & 0x3F);
  i += 4;
  return ((lead & 0x07) << 18) | ((u(i - 3) & 0x3F) << 12) | ((u(i - 2) & 0x3F) << 6) | (u(i - 1) & 0x3F);
}

// The raw bytes of a token written in ByteLevel form ("Ġworld" -> " world"); nullopt when some
// character is outside the byte map (such a token can never come out of byte-level BPE).
std::optional<std::string> byte_level_to_bytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    const char32_t cp = next_code_point(token, i);
    if (cp >= 512 || char_to_byte()[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(char_to_byte()[cp]));
  }
  return out;
}

// What Hugging Face's ByteLevel decoder makes of a token string: its bytes when every character is
// in the byte map, else the string's own UTF-8.
std::string decoded_bytes(std::string_view token) {
  auto bytes = byte_level_to_bytes(token);
  return bytes ? *std::move(bytes) : std::string(token);
}

// Rewrites an Oniguruma pattern (tokenizer.json) for PCRE2: only `\s` / `\S` need it (see above).
absl::StatusOr<std::string> to_pcre2_pattern(std::string_view pattern) {
  std::string out;
  int class_depth = 0;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += class_depth > 0 ? std::string(kWhiteSpaceClassBody) : absl::StrCat("[", av(kWhiteSpaceClassBody), "]");
      } else if (e == 'S' && class_depth == 0) {
        absl::StrAppend(&out, "[^", av(kWhiteSpaceClassBody), "]");
      } else if (e == 'S') {
        return absl::UnimplementedError("pre-tokenizer regex uses \\S inside a character class");
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[') ++class_depth;
    if (c == ']' && class_depth > 0) --class_depth;
    out += c;
  }
  return out;
}

absl::StatusOr<pcre2_code*> compile_regex(std::string_view pattern, bool literal) {
  std::string translated(pattern);
  if (!literal) {
    auto rewritten = to_pcre2_pattern(pattern);
    if (!rewritten.ok()) return rewritten.status();
    translated = *std::move(rewritten);
  }
  int error = 0;
  PCRE2_SIZE offset = 0;
  const uint32_t flags = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(), flags,
                                   &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex does not compile at offset ", offset, ": ",
                                                   reinterpret_cast<const char*>(message)));
  }
  // JIT is an optimisation only: matching falls back to the interpreter when it is unavailable.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return code;
}

// Per-thread PCRE2 match state: match data is not shareable between threads, and a JIT stack
// larger than the 32 KiB default keeps very long whitespace runs from failing.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(context, nullptr, jit_stack); }
  ~MatchScratch() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

MatchScratch& match_scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

bool is_null_or_absent(const json& j, const char* key) { return !j.contains(key) || j[key].is_null(); }

// Ids index dense tables (id -> bytes, flags), so an id far beyond any real vocabulary (the
// largest in use have ~256K tokens) would only make the load allocate gigabytes.
constexpr int64_t kMaxTokenId = (int64_t{1} << 21) - 1;

// A token id as tokenizer.json writes it: an integer in [0, kMaxTokenId]; nullopt for anything
// else (a float, a negative or absurd id, a string), which must be an error, not a cast.
std::optional<int32_t> token_id(const json& j) {
  if (!j.is_number_integer()) return std::nullopt;
  if (j.is_number_unsigned()) {
    if (j.get<uint64_t>() > static_cast<uint64_t>(kMaxTokenId)) return std::nullopt;
  } else if (j.get<int64_t>() < 0 || j.get<int64_t>() > kMaxTokenId) {
    return std::nullopt;
  }
  return static_cast<int32_t>(j.get<int64_t>());
}

absl::Status bad_id(std::string_view where, const json& id) {
  return absl::InvalidArgumentError(
      absl::StrCat(av(where), ": id ", id.dump(), " is not an integer in [0, ", kMaxTokenId, "]"));
}

}  // namespace

struct Tokenizer::PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  pcre2_code* regex = nullptr;  // null: no splitting in this step
  bool remove_matches = false;  // Split behaviour "Removed" (otherwise "Isolated")
  bool add_prefix_space = false;
  ~PreTokenizerStep() {
    if (regex != nullptr) pcre2_code_free(regex);
  }
};

struct Tokenizer::CacheShard {
  std::mutex mu;
  absl::flat_hash_map<std::string, std::vector<int32_t>> entries;
};

Tokenizer::Tokenizer() : cache_(std::make_unique<CacheShard[]>(kCacheShards)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::load(const std::string& path) {
  std::filesystem::path file(path);
  std::error_code ec;
  if (std::filesystem::is_directory(file, ec)) file /= "tokenizer.json";
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", file.string()));
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto tokenizer = from_json(buffer.str());
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(), absl::StrCat(file.string(), ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::from_json(std::string_view text) {
  const json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) return absl::InvalidArgumentError("tokenizer.json is not valid JSON");
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  try {
    if (!is_null_or_absent(root, "normalizer")) {
      return absl::UnimplementedError(
          absl::StrCat("normalizer ", root["normalizer"].value("type", "?"), " is not supported"));
    }

    // Model: byte-level BPE.
    const json& model = root.at("model");
    if (model.value("type", "BPE") != "BPE") {
      return absl::UnimplementedError(absl::StrCat("model type ", model.value("type", ""), " is not supported (BPE only)"));
    }
    const auto empty_or_null = [&](const char* key) {
      return is_null_or_absent(model, key) || model[key] == json("");
    };
    if (!is_null_or_absent(model, "dropout") || model.value("byte_fallback", false) ||
        !empty_or_null("continuing_subword_prefix") || !empty_or_null("end_of_word_suffix")) {
      return absl::UnimplementedError("BPE dropout, byte_fallback and subword prefixes/suffixes are not supported");
    }
    tok->ignore_merges_ = model.value("ignore_merges", false);

    const json& vocab = model.at("vocab");
    absl::flat_hash_map<std::string_view, int32_t> token_ids;  // ByteLevel form -> id, for the merges
    token_ids.reserve(vocab.size());
    int32_t max_id = -1;
    for (const auto& [token, id_json] : vocab.items()) {
      const std::optional<int32_t> id = token_id(id_json);
      if (!id) return bad_id(absl::StrCat("vocab token ", token), id_json);
      max_id = std::max(max_id, *id);
    }
    for (const json& added : root.value("added_tokens", json::array())) {
      const std::optional<int32_t> id = token_id(added.at("id"));
      if (!id) return bad_id("added token", added.at("id"));
      max_id = std::max(max_id, *id);
    }
    if (max_id < 0) return absl::InvalidArgumentError("empty vocab");
    tok->id_to_bytes_.assign(max_id + 1, std::string());
    tok->id_flags_.assign(max_id + 1, 0);
    tok->bytes_to_id_.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const int32_t id = *token_id(it.value());  // checked above
      token_ids.emplace(it.key(), id);
      tok->id_to_bytes_[id] = decoded_bytes(it.key());
      tok->id_flags_[id] |= kKnown;
      if (auto bytes = byte_level_to_bytes(it.key())) tok->bytes_to_id_.emplace(*std::move(bytes), id);
    }
    const auto byte_to_char = make_byte_to_char();
    for (int b = 0; b < 256; ++b) {
      auto it = tok->bytes_to_id_.find(std::string(1, static_cast<char>(b)));
      if (it == tok->bytes_to_id_.end()) {
        return absl::UnimplementedError(absl::StrFormat(
            "not a byte-level vocab: no token for byte 0x%02X (U+%04X)", b, static_cast<uint32_t>(byte_to_char[b])));
      }
      tok->byte_ids_[b] = it->second;
    }

    const json& merges = model.at("merges");
    tok->merges_.reserve(merges.size());
    int32_t rank = 0;
    for (const json& merge : merges) {
      std::string left, right;
      if (merge.is_string()) {
        const std::string& s = merge.get_ref<const std::string&>();
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat("merge '", s, "' is not two tokens separated by a space"));
        }
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2) {
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat("merge ", merge.dump(), " is neither \"a b\" nor [\"a\", \"b\"]"));
      }
      auto l = token_ids.find(left), r = token_ids.find(right), m = token_ids.find(left + right);
      if (l == token_ids.end() || r == token_ids.end() || m == token_ids.end()) {
        return absl::InvalidArgumentError(absl::StrCat("merge '", left, " ", right, "' uses a token not in the vocab"));
      }
      const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(l->second)) << 32) | static_cast<uint32_t>(r->second);
      // Later duplicates win, as in Hugging Face's map construction.
      tok->merges_[key] = Merge{rank++, m->second};
    }

    // Added tokens. Their decoded form goes through the ByteLevel decoder like any token.
    for (const json& added : root.value("added_tokens", json::array())) {
      if (added.value("lstrip", false) || added.value("rstrip", false) || added.value("single_word", false)) {
        return absl::UnimplementedError(
            absl::StrCat("added token ", added.value("content", ""), ": lstrip/rstrip/single_word are not supported"));
      }
      AddedToken t{added.at("content").get<std::string>(), *token_id(added.at("id")), added.value("special", false)};
      if (t.content.empty()) return absl::InvalidArgumentError("added token with empty content");
      tok->id_to_bytes_[t.id] = decoded_bytes(t.content);
      tok->id_flags_[t.id] |= kKnown | (t.special ? kSpecial : 0);
      tok->has_plain_added_ |= !t.special;
      tok->added_first_byte_[static_cast<uint8_t>(t.content[0])] = true;
      tok->added_.push_back(std::move(t));
    }
    std::stable_sort(tok->added_.begin(), tok->added_.end(),
                     [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });

    // Pre-tokenizer: a tree of Sequence / Split / ByteLevel, flattened into steps.
    std::function<absl::Status(const json&)> add_step = [&](const json& pt) -> absl::Status {
      if (pt.is_null()) return absl::OkStatus();
      const std::string type = pt.at("type").get<std::string>();
      if (type == "Sequence") {
        for (const json& child : pt.at("pretokenizers")) {
          if (absl::Status s = add_step(child); !s.ok()) return s;
        }
        return absl::OkStatus();
      }
      auto step = std::make_unique<PreTokenizerStep>();
      if (type == "Split") {
        const std::string behavior = pt.at("behavior").get<std::string>();
        if (pt.value("invert", false) || (behavior != "Isolated" && behavior != "Removed")) {
          return absl::UnimplementedError(absl::StrCat("Split behavior ", behavior, " (invert ",
                                                       pt.value("invert", false), ") is not supported"));
        }
        step->remove_matches = behavior == "Removed";
        const json& pattern = pt.at("pattern");
        const bool literal = pattern.contains("String");
        auto code = compile_regex(pattern.at(literal ? "String" : "Regex").get<std::string>(), literal);
        if (!code.ok()) return code.status();
        step->regex = *code;
      } else if (type == "ByteLevel") {
        step->kind = PreTokenizerStep::Kind::kByteLevel;
        step->add_prefix_space = pt.value("add_prefix_space", false);
        if (pt.value("use_regex", true)) {
          auto code = compile_regex(kGpt2Pattern, false);
          if (!code.ok()) return code.status();
          step->regex = *code;
        }
      } else {
        return absl::UnimplementedError(absl::StrCat("pre-tokenizer ", type, " is not supported"));
      }
      tok->pre_tokenizer_.push_back(std::move(step));
      return absl::OkStatus();
    };
    if (absl::Status s = add_step(root.value("pre_tokenizer", json())); !s.ok()) return s;

    // Post-processor: only what add_special_tokens puts around a single sequence matters here.
    std::function<absl::Status(const json&)> add_post = [&](const json& pp) -> absl::Status {
      if (pp.is_null()) return absl::OkStatus();
      const std::string type = pp.at("type").get<std::string>();
      if (type == "ByteLevel") return absl::OkStatus();  // offsets only
      if (type == "Sequence") {
        for (const json& child : pp.at("processors")) {
          if (absl::Status s = add_post(child); !s.ok()) return s;
        }
        return absl::OkStatus();
      }
      if (type != "TemplateProcessing") {
        return absl::UnimplementedError(absl::StrCat("post-processor ", type, " is not supported"));
      }
      bool after_sequence = false;
      for (const json& piece : pp.at("single")) {
        if (piece.contains("Sequence")) {
          after_sequence = true;
          continue;
        }
        const std::string name = piece.at("SpecialToken").at("id").get<std::string>();
        for (const json& id : pp.at("special_tokens").at(name).at("ids")) {
          const std::optional<int32_t> checked = token_id(id);
          if (!checked) return bad_id("post-processor", id);
          (after_sequence ? tok->suffix_ids_ : tok->prefix_ids_).push_back(*checked);
        }
      }
      return absl::OkStatus();
    };
    if (absl::Status s = add_post(root.value("post_processor", json())); !s.ok()) return s;
    for (int32_t id : tok->prefix_ids_) {
      if (!tok->token_bytes(id)) return absl::InvalidArgumentError(absl::StrCat("post-processor id ", id, " is unknown"));
    }
    for (int32_t id : tok->suffix_ids_) {
      if (!tok->token_bytes(id)) return absl::InvalidArgumentError(absl::StrCat("post-processor id ", id, " is unknown"));
    }

    const json decoder = root.value("decoder", json());
    if (decoder.is_null() || decoder.value("type", "") != "ByteLevel") {
      return absl::UnimplementedError(
          absl::StrCat("decoder ", decoder.is_null() ? "null" : decoder.value("type", "?"), " is not supported (ByteLevel only)"));
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed tokenizer.json: ", e.what()));
  }
  return tok;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  if (auto offset = utf8::first_invalid_offset(text)) {
    return absl::InvalidArgumentError(absl::StrFormat("text is not valid UTF-8: byte 0x%02X at byte offset %d",
                                                      static_cast<uint8_t>(text[*offset]), *offset));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + prefix_ids_.size() + suffix_ids_.size() + 1);
  if (options.add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());

  if (options.parse_special || has_plain_added_) {
    size_t run_start = 0;
    size_t i = 0;
    while (i < text.size()) {
      const AddedToken* match = nullptr;
      if (!added_first_byte_[static_cast<uint8_t>(text[i])]) {
        ++i;
        continue;
      }
      for (const AddedToken& t : added_) {  // longest first: the first hit is the longest
        if ((options.parse_special || !t.special) && text.substr(i).starts_with(t.content)) {
          match = &t;
          break;
        }
      }
      if (match == nullptr) {
        ++i;
        continue;
      }
      if (absl::Status s = append_text_ids(text.substr(run_start, i - run_start), ids); !s.ok()) return s;
      ids.push_back(match->id);
      i += match->content.size();
      run_start = i;
    }
    if (absl::Status s = append_text_ids(text.substr(run_start), ids); !s.ok()) return s;
  } else {
    if (absl::Status s = append_text_ids(text, ids); !s.ok()) return s;
  }

  if (options.add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

absl::Status Tokenizer::append_text_ids(std::string_view text, std::vector<int32_t>& ids) const {
  if (text.empty()) return absl::OkStatus();
  MatchScratch& scratch = match_scratch();
  // Runs pre-tokenizer steps [step, end) on one piece; the last step hands pieces to BPE.
  std::function<absl::Status(size_t, std::string_view)> run = [&](size_t step_index,
                                                                   std::string_view piece) -> absl::Status {
    if (step_index == pre_tokenizer_.size()) {
      append_piece_ids(piece, ids);
      return absl::OkStatus();
    }
    const PreTokenizerStep& step = *pre_tokenizer_[step_index];
    std::string prefixed;
    if (step.add_prefix_space && !piece.starts_with(' ')) {
      prefixed = absl::StrCat(" ", av(piece));
      piece = prefixed;
    }
    if (step.regex == nullptr) return run(step_index + 1, piece);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
    PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
    size_t pos = 0, gap_start = 0;
    while (pos < piece.size()) {
      const int rc = pcre2_match(step.regex, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK, scratch.data, scratch.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        return absl::InternalError(absl::StrCat("pre-tokenizer regex failed: ", reinterpret_cast<const char*>(message)));
      }
      const size_t start = ovector[0], end = ovector[1];
      if (end == start) {  // an empty match splits nothing; step over one character
        size_t next = start;
        if (next >= piece.size()) break;
        next_code_point(piece, next);
        pos = next;
        continue;
      }
      if (start > gap_start) {
        if (absl::Status s = run(step_index + 1, piece.substr(gap_start, start - gap_start)); !s.ok()) return s;
      }
      if (!step.remove_matches) {
        if (absl::Status s = run(step_index + 1, piece.substr(start, end - start)); !s.ok()) return s;
      }
      pos = gap_start = end;
    }
    if (gap_start < piece.size()) return run(step_index + 1, piece.substr(gap_start));
    return absl::OkStatus();
  };
  return run(0, text);
}

void Tokenizer::append_piece_ids(std::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.size() == 1) {
    ids.push_back(byte_ids_[static_cast<uint8_t>(piece[0])]);
    return;
  }
  if (ignore_merges_) {
    if (auto it = bytes_to_id_.find(av(piece)); it != bytes_to_id_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  if (piece.size() > kMaxCachedPieceBytes) {
    bpe(piece, ids);
    return;
  }
  CacheShard& shard = cache_[absl::Hash<absl::string_view>()(av(piece)) % kCacheShards];
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    if (auto it = shard.entries.find(av(piece)); it != shard.entries.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids.size();
  bpe(piece, ids);
  std::vector<int32_t> piece_ids(ids.begin() + first, ids.end());
  std::lock_guard<std::mutex> lock(shard.mu);
  if (shard.entries.size() >= kCacheShardEntries) shard.entries.clear();
  shard.entries.emplace(std::string(piece), std::move(piece_ids));
}

void Tokenizer::bpe(std::string_view piece, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    // Lowest rank first; for equal ranks (the same pair twice) the leftmost first.
    bool operator<(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Candidate> heap;
  symbols.clear();
  heap.clear();
  const int32_t n = static_cast<int32_t>(piece.size());
  for (int32_t i = 0; i < n; ++i) symbols.push_back({byte_ids_[static_cast<uint8_t>(piece[i])], i - 1, i + 1 < n ? i + 1 : -1, true});

  const auto find_merge = [&](int32_t left, int32_t right) -> const Merge* {
    auto it = merges_.find((static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right));
    return it == merges_.end() ? nullptr : &it->second;
  };
  const auto push_candidate = [&](int32_t pos) {
    if (pos < 0 || symbols[pos].next < 0) return;
    if (const Merge* m = find_merge(symbols[pos].id, symbols[symbols[pos].next].id)) {
      heap.push_back({m->rank, pos, m->new_id});
      std::push_heap(heap.begin(), heap.end());
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_candidate(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    // The entry is stale when either side has merged since it was queued.
    const Merge* current = find_merge(left.id, symbols[left.next].id);
    if (current == nullptr || current->new_id != top.new_id) continue;
    Symbol& right = symbols[left.next];
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push_candidate(left.prev);
    push_candidate(top.pos);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[i].next) ids.push_back(symbols[i].id);
}

absl::StatusOr<std::string> Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    const std::optional<std::string_view> token = token_bytes(id);
    if (!token) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is not in the vocabulary (size ", vocab_size(), ")"));
    }
    if (skip_special_tokens && is_special(id)) continue;
    bytes.append(*token);
  }
  std::string text;
  text.reserve(bytes.size());
  utf8::append_lossy(bytes, /*final=*/true, text);
  return text;
}

std::optional<std::string_view> Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size() || !(id_flags_[id] & kKnown)) return std::nullopt;
  return id_to_bytes_[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && (id_flags_[id] & kSpecial);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  for (const AddedToken& t : added_) {
    if (t.content == token) return t.id;
  }
  if (utf8::first_invalid_offset(token)) return std::nullopt;
  if (auto bytes = byte_level_to_bytes(token)) {
    if (auto it = bytes_to_id_.find(*bytes); it != bytes_to_id_.end()) return it->second;
  }
  return std::nullopt;
}

}  // namespace shardserve
