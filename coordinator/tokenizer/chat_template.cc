#include "coordinator/tokenizer/chat_template.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/tokenizer/utf8.h"

namespace shardserve {
namespace {

using json = nlohmann::json;

// FNV-1a 64 and byte length of the chat_template published with Llama-3.1-{8,70,405}B-Instruct
// (tests/data/llama-3.1-tokenizer/tokenizer_config.json). The renderer below reproduces that exact
// text's output; any edit to the template could change it, so only an exact match is accepted.
constexpr uint64_t kLlama31TemplateFnv = 0x60848a05837ce656ULL;
constexpr size_t kLlama31TemplateBytes = 4614;

constexpr std::string_view kStartHeader = "<|start_header_id|>";
constexpr std::string_view kEndHeader = "<|end_header_id|>";
constexpr std::string_view kEndOfTurn = "<|eot_id|>";

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : s) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

// Python's str.isspace(), which Jinja's `trim` (str.strip) uses.
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

char32_t decode_at(std::string_view s, size_t i, size_t len) {
  const auto u = [&](size_t k) { return static_cast<char32_t>(static_cast<uint8_t>(s[i + k])); };
  switch (len) {
    case 1: return u(0);
    case 2: return ((u(0) & 0x1F) << 6) | (u(1) & 0x3F);
    case 3: return ((u(0) & 0x0F) << 12) | ((u(1) & 0x3F) << 6) | (u(2) & 0x3F);
    default: return ((u(0) & 0x07) << 18) | ((u(1) & 0x3F) << 12) | ((u(2) & 0x3F) << 6) | (u(3) & 0x3F);
  }
}

// str.strip() on valid UTF-8.
std::string_view python_strip(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    const size_t len = utf8::next_unit(s.substr(begin)).length;
    if (!is_python_space(decode_at(s, begin, len))) break;
    begin += len;
  }
  size_t end = s.size();
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    if (!is_python_space(decode_at(s, start, end - start))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

// transformers' `tojson` filter on a string: json.dumps(s, ensure_ascii=False).
std::string python_json_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<uint8_t>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<int>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

bool is_supported_role(std::string_view role) {
  return role == "system" || role == "user" || role == "assistant" || role == "ipython" || role == "tool";
}

absl::StatusOr<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::load(const std::string& dir) {
  const std::filesystem::path root(dir);
  auto config_text = read_file(root / "tokenizer_config.json");
  if (!config_text.ok()) return config_text.status();
  const json config = json::parse(*config_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat((root / "tokenizer_config.json").string(), " is not valid JSON"));
  }

  std::string bos_token;
  if (config.contains("bos_token")) {
    const json& bos = config["bos_token"];
    if (bos.is_string()) bos_token = bos.get<std::string>();
    if (bos.is_object() && bos.contains("content") && bos["content"].is_string()) bos_token = bos["content"].get<std::string>();
  }

  std::string template_text;
  std::error_code ec;
  if (std::filesystem::exists(root / "chat_template.jinja", ec)) {
    auto text = read_file(root / "chat_template.jinja");
    if (!text.ok()) return text.status();
    template_text = *std::move(text);
  } else if (config.contains("chat_template") && config["chat_template"].is_string()) {
    template_text = config["chat_template"].get<std::string>();
  } else if (config.contains("chat_template") && config["chat_template"].is_array()) {
    for (const json& entry : config["chat_template"]) {
      // == on the json value: json::value("name", "") would throw for a name that is not a string.
      if (entry.is_object() && entry.contains("name") && entry["name"] == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        template_text = entry["template"].get<std::string>();
      }
    }
  }
  if (template_text.empty()) return absl::NotFoundError(absl::StrCat(dir, " has no chat template"));
  return from_template(template_text, std::move(bos_token));
}

absl::StatusOr<ChatTemplate> ChatTemplate::from_template(std::string_view template_text, std::string bos_token) {
  if (template_text.size() != kLlama31TemplateBytes || fnv1a64(template_text) != kLlama31TemplateFnv) {
    return absl::UnimplementedError(absl::StrFormat(
        "unsupported chat template (%d bytes, fnv1a64 %016x): only the Llama 3.1 template is implemented",
        template_text.size(), fnv1a64(template_text)));
  }
  if (bos_token.empty()) return absl::InvalidArgumentError("tokenizer_config.json has no bos_token");
  return ChatTemplate(std::move(bos_token));
}

absl::StatusOr<std::vector<ChatTemplate::Segment>> ChatTemplate::segments(std::span<const ChatMessage> messages,
                                                                          const ChatOptions& options) const {
  if (messages.empty()) return absl::InvalidArgumentError("a chat needs at least one message");
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (!is_supported_role(m.role)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", i, ": role '", m.role, "' is not supported (system, user, assistant, ipython, tool)"));
    }
    if (auto offset = utf8::first_invalid_offset(m.content)) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": content is not valid UTF-8 at byte offset ", *offset));
    }
  }
  if (auto offset = utf8::first_invalid_offset(options.date_string)) {
    return absl::InvalidArgumentError("date_string is not valid UTF-8");
  }

  std::vector<Segment> out;
  const auto special = [&](std::string_view token) { out.push_back({true, std::string(token)}); };
  // Adjacent text joins into one run, so that it is encoded as Hugging Face encodes the text
  // between two special tokens.
  const auto text = [&](std::string_view s) {
    if (s.empty()) return;
    if (out.empty() || out.back().special) out.push_back({false, ""});
    out.back().text += s;
  };
  const auto header = [&](std::string_view role) {
    special(kStartHeader);
    text(role);
    special(kEndHeader);
    text("\n\n");
  };

  // The template in order: BOS, the system block (always present), then every remaining message.
  special(bos_token_);
  std::string_view system_message;
  if (messages.front().role == "system") {
    system_message = python_strip(messages.front().content);
    messages = messages.subspan(1);
  }
  header("system");
  text("Cutting Knowledge Date: December 2023\n");
  text(absl::StrCat("Today Date: ", options.date_string, "\n\n"));
  text(system_message);
  special(kEndOfTurn);

  for (const ChatMessage& m : messages) {
    if (m.role == "ipython" || m.role == "tool") {
      // The template's `content is iterable` test is true for a string, so it is JSON-quoted.
      header("ipython");
      text(python_json_string(m.content));
    } else {
      header(m.role);
      text(python_strip(m.content));
    }
    special(kEndOfTurn);
  }
  if (options.add_generation_prompt) header("assistant");
  return out;
}

absl::StatusOr<std::string> ChatTemplate::render_chat(std::span<const ChatMessage> messages,
                                                      const ChatOptions& options) const {
  auto segs = segments(messages, options);
  if (!segs.ok()) return segs.status();
  std::string rendered;
  for (const Segment& s : *segs) rendered += s.text;
  return rendered;
}

absl::StatusOr<std::vector<int32_t>> ChatTemplate::encode_chat(const Tokenizer& tokenizer,
                                                               std::span<const ChatMessage> messages,
                                                               const ChatOptions& options) const {
  auto segs = segments(messages, options);
  if (!segs.ok()) return segs.status();
  std::vector<int32_t> ids;
  EncodeOptions plain;  // content is untrusted: never parse special-token strings in it
  for (const Segment& s : *segs) {
    if (s.special) {
      const std::optional<int32_t> id = tokenizer.token_to_id(s.text);
      if (!id) return absl::FailedPreconditionError(absl::StrCat("the tokenizer has no token ", s.text));
      ids.push_back(*id);
      continue;
    }
    auto run = tokenizer.encode(s.text, plain);
    if (!run.ok()) return run.status();
    ids.insert(ids.end(), run->begin(), run->end());
  }
  return ids;
}

absl::StatusOr<std::vector<ChatMessage>> parse_chat_messages(const json& messages) {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a JSON array");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    if (!m.is_object()) return absl::InvalidArgumentError(absl::StrCat("message ", i, " is not an object"));
    if (m.contains("tool_calls")) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": tool_calls are not supported"));
    }
    if (!m.contains("role") || !m["role"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, " has no string 'role'"));
    }
    if (!m.contains("content") || !m["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": 'content' must be a string"));
    }
    ChatMessage message{m["role"].get<std::string>(), m["content"].get<std::string>()};
    if (!is_supported_role(message.role)) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": role '", message.role,
                                                     "' is not supported (system, user, assistant, ipython, tool)"));
    }
    out.push_back(std::move(message));
  }
  return out;
}

}  // namespace shardserve
