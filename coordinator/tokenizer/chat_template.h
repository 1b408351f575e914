// The chat format: a conversation [{role, content}] rendered to the prompt text (render_chat) or
// straight to ids (encode_chat), byte for byte what the model's Jinja chat_template renders in
// Hugging Face transformers (apply_chat_template).
//
// Only the Llama 3.1 template is implemented, natively (no Jinja engine): load() recognises it by
// an exact fingerprint of the template text and answers any other template with UNIMPLEMENTED
// "unsupported chat template". Within that template, what is supported: roles system, user,
// assistant (content trimmed with Python's str.strip, as the template's `|trim` does), ipython and
// tool (both rendered as ipython, content JSON-quoted by the template's `tojson`, not trimmed), a
// leading system message (otherwise an empty one), the default system block with
// "Cutting Knowledge Date: December 2023" and ChatOptions::date_string, add_generation_prompt.
// Tools, builtin_tools and tool_calls are not (parse_chat_messages rejects tool_calls).
//
// Safety: render_chat() returns text in which a user's "<|eot_id|>" is indistinguishable from the
// template's own; encoding that text with parse_special (what apply_chat_template(tokenize=True)
// does) lets content inject turn boundaries. encode_chat() instead emits the template's structural
// tokens (BOS, <|start_header_id|>, <|end_header_id|>, <|eot_id|>) as ids and encodes every text
// run with parse_special = false. For content without special-token strings its ids equal
// Hugging Face's; with them, they differ on purpose.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer/tokenizer.h"

namespace shardserve {

struct ChatMessage {
  std::string role;     // system, user, assistant, ipython or tool
  std::string content;  // valid UTF-8
};

struct ChatOptions {
  // Append the assistant header so that the model answers (Hugging Face's default is false).
  bool add_generation_prompt = false;
  // The template's "Today Date:" line; its default when the caller passes no date_string.
  std::string date_string = "26 Jul 2024";
};

class ChatTemplate {
 public:
  // Reads the template of a model directory: chat_template.jinja if present, else the
  // chat_template of tokenizer_config.json (a string, or a list whose "default" entry is used),
  // and bos_token from tokenizer_config.json. NOT_FOUND when there is no template, UNIMPLEMENTED
  // when it is not the Llama 3.1 one.
  static absl::StatusOr<ChatTemplate> load(const std::string& dir);
  static absl::StatusOr<ChatTemplate> from_template(std::string_view template_text, std::string bos_token);

  // The prompt text. INVALID_ARGUMENT for no messages, an unknown role or invalid UTF-8.
  absl::StatusOr<std::string> render_chat(std::span<const ChatMessage> messages, const ChatOptions& options) const;
  // The prompt ids, structural tokens as ids and content never parsed for special tokens.
  absl::StatusOr<std::vector<int32_t>> encode_chat(const Tokenizer& tokenizer, std::span<const ChatMessage> messages,
                                                   const ChatOptions& options) const;

 private:
  // The rendering as alternating runs: structural special tokens and plain text.
  struct Segment {
    bool special;
    std::string text;
  };
  explicit ChatTemplate(std::string bos_token) : bos_token_(std::move(bos_token)) {}
  absl::StatusOr<std::vector<Segment>> segments(std::span<const ChatMessage> messages, const ChatOptions& options) const;

  std::string bos_token_;
};

// Messages from JSON [{"role": ..., "content": "..."}]. INVALID_ARGUMENT for anything the renderer
// does not support: tool_calls, non-string content, unknown roles.
absl::StatusOr<std::vector<ChatMessage>> parse_chat_messages(const nlohmann::json& messages);

}  // namespace shardserve
