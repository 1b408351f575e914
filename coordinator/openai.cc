#include "coordinator/openai.h"

#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "coordinator/metrics.h"
#include "coordinator/tokenizer/tokenizer.h"

namespace shardserve::openai {
namespace {

using json = nlohmann::json;

// The request field an INVALID_ARGUMENT is about, carried to the error body's "param".
constexpr char kParamPayload[] = "type.shardserve.dev/openai.param";

absl::Status bad_field(const std::string& param, const std::string& message) {
  absl::Status s = absl::InvalidArgumentError(absl::StrCat(param, ": ", message));
  s.SetPayload(kParamPayload, absl::Cord(param));
  return s;
}

// The string at `key` of an object; "" when it is absent or not a string (json::value would throw).
std::string string_or_empty(const json& object, const char* key) {
  const auto it = object.find(key);
  return it != object.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// Reads the fields of a request body, keeping the first error. null counts as absent (OpenAI's
// SDKs send it for unset fields).
class Fields {
 public:
  explicit Fields(const json& body) : body_(body) {}
  const absl::Status& status() const { return status_; }

  const json* get(const char* key) const {
    const auto it = body_.find(key);
    return it == body_.end() || it->is_null() ? nullptr : &*it;
  }
  void fail(const std::string& param, const std::string& message) {
    if (status_.ok()) status_ = bad_field(param, message);
  }
  std::optional<double> number(const char* key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) return fail(key, "must be a number"), std::nullopt;
    return v->get<double>();
  }
  std::optional<int64_t> integer(const char* key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) return fail(key, "must be an integer"), std::nullopt;
    if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t{std::numeric_limits<int64_t>::max()}) {
      return fail(key, "is too large"), std::nullopt;
    }
    return v->get<int64_t>();
  }
  std::optional<bool> boolean(const char* key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) return fail(key, "must be true or false"), std::nullopt;
    return v->get<bool>();
  }
  std::optional<std::string> string(const char* key) {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) return fail(key, "must be a string"), std::nullopt;
    return v->get<std::string>();
  }

 private:
  const json& body_;
  absl::Status status_;
};

// The sampling fields every endpoint takes.
void read_sampling(Fields& f, Request& out) {
  v1::GenerateRequest& g = out.generate;
  if (auto v = f.string("model")) g.set_model(*v);
  if (auto v = f.integer("n"); v && *v != 1)
    f.fail("n", absl::StrCat("only n=1 is supported, got ", *v, "; send one request per completion"));
  if (auto v = f.integer("best_of"); v && *v != 1) f.fail("best_of", "only best_of=1 is supported");
  if (auto v = f.number("temperature")) g.set_temperature(*v);
  if (auto v = f.number("top_p")) g.set_top_p(*v);
  if (auto v = f.number("presence_penalty")) g.set_presence_penalty(*v);
  if (auto v = f.number("frequency_penalty")) g.set_frequency_penalty(*v);
  if (const json* v = f.get("seed")) {
    if (!v->is_number_integer()) {
      f.fail("seed", "must be an integer");
    } else {
      g.set_seed(v->is_number_unsigned() ? v->get<uint64_t>() : static_cast<uint64_t>(v->get<int64_t>()));
    }
  }
  if (const json* v = f.get("stop")) {
    if (v->is_string()) {
      g.add_stop(v->get<std::string>());
    } else if (v->is_array()) {
      for (size_t i = 0; i < v->size(); ++i) {
        if (!(*v)[i].is_string()) {
          f.fail(absl::StrCat("stop[", i, "]"), "must be a string");
          break;
        }
        g.add_stop((*v)[i].get<std::string>());
      }
    } else {
      f.fail("stop", "must be a string or a list of strings");
    }
  }
  if (auto v = f.boolean("stream")) out.stream = *v;
  if (const json* v = f.get("stream_options")) {
    if (!v->is_object()) {
      f.fail("stream_options", "must be an object");
    } else if (auto it = v->find("include_usage"); it != v->end() && !it->is_null()) {
      if (!it->is_boolean())
        f.fail("stream_options.include_usage", "must be true or false");
      else
        out.include_usage = it->get<bool>();
    }
  }
  if (const json* v = f.get("logit_bias"); v && !(v->is_object() && v->empty())) {
    f.fail("logit_bias", "is not supported");
  }
  for (const char* key : {"tools", "functions"}) {
    if (const json* v = f.get(key); v && !(v->is_array() && v->empty())) f.fail(key, "tool calls are not supported");
  }
  if (const json* v = f.get("response_format")) {
    if (!v->is_object() || string_or_empty(*v, "type") != "text") {
      f.fail("response_format", "only {\"type\": \"text\"} is supported");
    }
  }
  // vLLM's extensions, with the gRPC API's names.
  if (auto v = f.integer("top_k")) g.set_top_k(*v);
  if (auto v = f.number("min_p")) g.set_min_p(*v);
  if (auto v = f.number("repetition_penalty")) g.set_repetition_penalty(*v);
  if (auto v = f.boolean("ignore_eos")) g.set_ignore_eos(*v);
  if (auto v = f.boolean("skip_special_tokens")) g.set_skip_special_tokens(*v);
  if (const json* v = f.get("stop_token_ids")) {
    if (!v->is_array()) {
      f.fail("stop_token_ids", "must be a list of token ids");
    } else {
      for (size_t i = 0; i < v->size(); ++i) {
        const json& id = (*v)[i];
        if (!id.is_number_integer() || id.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
            id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
          f.fail(absl::StrCat("stop_token_ids[", i, "]"), "must be a token id");
          break;
        }
        g.add_stop_token_ids(id.get<int32_t>());
      }
    }
  }
}

// A list of token ids; false (and an error) if it is not one.
bool read_ids(Fields& f, const json& v, const std::string& param, v1::TokenIds* out) {
  for (size_t i = 0; i < v.size(); ++i) {
    const json& id = v[i];
    if (!id.is_number_integer() || id.get<int64_t>() < std::numeric_limits<int32_t>::min() ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      f.fail(absl::StrCat(param, "[", i, "]"), "must be a token id (an integer)");
      return false;
    }
    out->add_ids(id.get<int32_t>());
  }
  return true;
}

// prompt: "text", ["text"], [ids...] or [[ids...]]; one prompt per request.
void read_prompt(Fields& f, Request& out) {
  v1::GenerateRequest& g = out.generate;
  const json* p = f.get("prompt");
  if (!p) return f.fail("prompt", "is required");
  if (p->is_string()) return g.set_text(p->get<std::string>());
  if (!p->is_array()) return f.fail("prompt", "must be a string, a list of token ids, or a list of one of them");
  if (p->empty()) return f.fail("prompt", "the prompt is empty");
  if ((*p)[0].is_number()) {
    read_ids(f, *p, "prompt", g.mutable_prompt_token_ids());
    return;
  }
  if (p->size() > 1) {
    return f.fail("prompt",
                  absl::StrCat("a batch of ", p->size(), " prompts is not supported; send one prompt per request"));
  }
  const json& one = (*p)[0];
  if (one.is_string()) return g.set_text(one.get<std::string>());
  if (one.is_array()) {
    read_ids(f, one, "prompt[0]", g.mutable_prompt_token_ids());
    return;
  }
  f.fail("prompt[0]", "must be a string or a list of token ids");
}

// messages: [{"role", "content": "text" | [{"type": "text", "text"}...] | null}...]
void read_messages(Fields& f, Request& out) {
  const json* m = f.get("messages");
  if (!m) return f.fail("messages", "is required");
  if (!m->is_array()) return f.fail("messages", "must be a list of messages");
  v1::ChatMessages* chat = out.generate.mutable_chat();
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!msg.is_object()) return f.fail(at, "must be an object with role and content");
    const auto role = msg.find("role");
    if (role == msg.end() || !role->is_string()) return f.fail(at + ".role", "must be a string");
    v1::ChatMessage* out_msg = chat->add_messages();
    // OpenAI's newer name for the system prompt of reasoning models.
    out_msg->set_role(*role == "developer" ? std::string("system") : role->get<std::string>());
    const auto content = msg.find("content");
    if (content == msg.end() || content->is_null()) continue;
    if (content->is_string()) {
      out_msg->set_content(content->get<std::string>());
    } else if (content->is_array()) {
      std::string text;
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        const std::string pat = absl::StrCat(at, ".content[", j, "]");
        if (!part.is_object() || string_or_empty(part, "type") != "text") {
          return f.fail(pat, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported");
        }
        const auto t = part.find("text");
        if (t == part.end() || !t->is_string()) return f.fail(pat + ".text", "must be a string");
        text += t->get<std::string>();
      }
      out_msg->set_content(std::move(text));
    } else {
      return f.fail(at + ".content", "must be a string or a list of text parts");
    }
  }
}

const char* finish_reason_name(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return nullptr;
  }
}

json finish_reason_json(v1::FinishReason r) {
  const char* name = finish_reason_name(r);
  return name ? json(name) : json(nullptr);
}

}  // namespace

absl::StatusOr<Request> parse_request(Endpoint endpoint, std::string_view body) {
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("the body is not valid JSON (UTF-8)");
  if (!j.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  Request out;
  out.endpoint = endpoint;
  Fields f(j);
  read_sampling(f, out);
  switch (endpoint) {
    case Endpoint::kCompletions:
      read_prompt(f, out);
      if (auto v = f.integer("max_tokens")) out.generate.set_max_tokens(*v);
      if (auto v = f.integer("logprobs")) {
        out.logprobs = true;
        out.generate.set_logprobs(static_cast<int32_t>(std::clamp<int64_t>(*v, -1, 1 << 20)));
      }
      if (auto v = f.boolean("echo"); v && *v) f.fail("echo", "is not supported");
      if (auto v = f.string("suffix"); v && !v->empty()) f.fail("suffix", "is not supported");
      if (auto v = f.boolean("add_special_tokens")) out.generate.set_add_special_tokens(*v);
      break;
    case Endpoint::kChat:
    case Endpoint::kGenerate: {
      if (endpoint == Endpoint::kGenerate && !f.get("messages") && f.get("prompt")) {
        read_prompt(f, out);
      } else {
        read_messages(f, out);
      }
      if (auto v = f.integer("max_tokens")) out.generate.set_max_tokens(*v);
      if (auto v = f.integer("max_completion_tokens")) out.generate.set_max_tokens(*v);
      const auto want = f.boolean("logprobs");
      const auto top = f.integer("top_logprobs");
      if (top && !(want && *want)) f.fail("top_logprobs", "needs \"logprobs\": true");
      if (want && *want) {
        out.logprobs = true;
        out.generate.set_logprobs(static_cast<int32_t>(std::clamp<int64_t>(top.value_or(0), -1, 1 << 20)));
      }
      if (endpoint == Endpoint::kGenerate && out.stream) {
        f.fail("stream", "/generate answers in one piece; stream from /v1/chat/completions");
      }
      break;
    }
  }
  if (!f.status().ok()) return f.status();
  return out;
}

HttpError http_error(int http_status, const std::string& message) {
  const char* type = http_status == 429   ? "rate_limit_error"
                     : http_status >= 500 ? "server_error"
                                          : "invalid_request_error";
  const char* code = http_status == 404   ? "not_found"
                     : http_status == 413 ? "request_too_large"
                     : http_status == 429 ? "resource_exhausted"
                     : http_status >= 500 ? "unavailable"
                                          : "invalid_argument";
  return {http_status, json{{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", code}}}}};
}

HttpError http_error(const absl::Status& status) {
  int http = 500;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      http = 400;
      break;
    case absl::StatusCode::kNotFound:
      http = 404;
      break;
    case absl::StatusCode::kResourceExhausted:
      http = 429;
      break;
    case absl::StatusCode::kUnavailable:
      http = 503;
      break;
    case absl::StatusCode::kDeadlineExceeded:
      http = 504;
      break;
    case absl::StatusCode::kCancelled:
      http = 499;  // nginx's "client closed request": no one reads it
      break;
    default:
      break;
  }
  HttpError e = http_error(http, std::string(status.message()));
  json& err = e.body["error"];
  err["code"] = status_label(static_cast<int>(status.code()));
  if (auto param = status.GetPayload(kParamPayload)) err["param"] = std::string(*param);
  return e;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

ResponseBuilder::ResponseBuilder(const Request& request, std::string id, std::string model, const Tokenizer* tokenizer,
                                 int64_t created)
    : endpoint_(request.endpoint),
      include_usage_(request.include_usage),
      logprobs_(request.logprobs),
      id_(std::move(id)),
      model_(std::move(model)),
      tokenizer_(tokenizer),
      created_(created) {}

std::string ResponseBuilder::token_name(int32_t id) const {
  if (tokenizer_) {
    if (auto bytes = tokenizer_->token_bytes(id)) return std::string(*bytes);
  }
  return absl::StrCat("token_id:", id);
}

json ResponseBuilder::logprobs_json(const v1::GenerateResponse& delta) {
  if (!logprobs_ || delta.logprobs_size() == 0) return nullptr;
  auto bytes_of = [](const std::string& s) {
    json b = json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  };
  if (endpoint_ == Endpoint::kCompletions) {
    json out = {{"tokens", json::array()},
                {"token_logprobs", json::array()},
                {"top_logprobs", json::array()},
                {"text_offset", json::array()}};
    for (const v1::TokenLogprob& lp : delta.logprobs()) {
      const std::string name = token_name(lp.token_id());
      json top = json::object();
      for (const v1::TopLogprob& t : lp.top_logprobs()) top[token_name(t.token_id())] = t.logprob();
      out["tokens"].push_back(name);
      out["token_logprobs"].push_back(lp.logprob());
      out["top_logprobs"].push_back(std::move(top));
      out["text_offset"].push_back(text_offset_);
      text_offset_ += static_cast<int64_t>(name.size());
    }
    return out;
  }
  json content = json::array();
  for (const v1::TokenLogprob& lp : delta.logprobs()) {
    const std::string name = token_name(lp.token_id());
    json top = json::array();
    for (const v1::TopLogprob& t : lp.top_logprobs()) {
      const std::string tn = token_name(t.token_id());
      top.push_back({{"token", tn}, {"logprob", t.logprob()}, {"bytes", bytes_of(tn)}});
    }
    content.push_back({{"token", name}, {"logprob", lp.logprob()}, {"bytes", bytes_of(name)}, {"top_logprobs", top}});
  }
  return json{{"content", std::move(content)}};
}

json ResponseBuilder::usage_json() const {
  return {{"prompt_tokens", usage_.prompt_tokens()},
          {"completion_tokens", usage_.completion_tokens()},
          {"total_tokens", usage_.prompt_tokens() + usage_.completion_tokens()},
          {"prompt_tokens_details", {{"cached_tokens", usage_.cached_prompt_tokens()}}}};
}

void ResponseBuilder::add(const v1::GenerateResponse& delta) {
  text_ += delta.text();
  json lp = logprobs_json(delta);
  if (!lp.is_null()) {
    if (all_logprobs_.is_null()) {
      all_logprobs_ = std::move(lp);
    } else {
      for (auto& [key, values] : lp.items()) {
        for (auto& v : values) all_logprobs_[key].push_back(std::move(v));
      }
    }
  }
  if (delta.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
    finish_reason_ = delta.finish_reason();
    usage_ = delta.usage();
  }
}

json ResponseBuilder::body() const {
  json logprobs = logprobs_ && all_logprobs_.is_null()
                      ? (endpoint_ == Endpoint::kCompletions ? json{{"tokens", json::array()},
                                                                    {"token_logprobs", json::array()},
                                                                    {"top_logprobs", json::array()},
                                                                    {"text_offset", json::array()}}
                                                             : json{{"content", json::array()}})
                      : all_logprobs_;
  switch (endpoint_) {
    case Endpoint::kCompletions:
      return {{"id", id_},
              {"object", "text_completion"},
              {"created", created_},
              {"model", model_},
              {"choices", json::array({json{{"index", 0},
                                            {"text", text_},
                                            {"logprobs", logprobs},
                                            {"finish_reason", finish_reason_json(finish_reason_)}}})},
              {"usage", usage_json()}};
    case Endpoint::kChat:
      return {{"id", id_},
              {"object", "chat.completion"},
              {"created", created_},
              {"model", model_},
              {"choices", json::array({json{{"index", 0},
                                            {"message", {{"role", "assistant"}, {"content", text_}}},
                                            {"logprobs", logprobs},
                                            {"finish_reason", finish_reason_json(finish_reason_)}}})},
              {"usage", usage_json()}};
    case Endpoint::kGenerate:
      return {{"text", text_},
              {"tokens", usage_.completion_tokens()},
              {"finish_reason", finish_reason_json(finish_reason_)}};
  }
  return nullptr;
}

json ResponseBuilder::chunk(json choice) const {
  json c = {{"id", id_},
            {"object", endpoint_ == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", model_},
            {"choices", json::array({std::move(choice)})}};
  if (include_usage_) c["usage"] = nullptr;  // OpenAI: null on every chunk but the last
  return c;
}

std::string ResponseBuilder::stream_event(const v1::GenerateResponse& delta) {
  std::string events;
  auto event = [&](const json& j) { absl::StrAppend(&events, "data: ", dump(j), "\n\n"); };
  const bool chat = endpoint_ == Endpoint::kChat;
  if (chat && !sent_role_) {
    event(chunk({{"index", 0},
                 {"delta", {{"role", "assistant"}, {"content", ""}}},
                 {"logprobs", nullptr},
                 {"finish_reason", nullptr}}));
    sent_role_ = true;
  }
  json lp = logprobs_json(delta);
  if (!delta.text().empty() || !lp.is_null()) {
    json choice =
        chat ? json{{"index", 0}, {"delta", {{"content", delta.text()}}}} : json{{"index", 0}, {"text", delta.text()}};
    choice["logprobs"] = std::move(lp);
    choice["finish_reason"] = nullptr;
    event(chunk(std::move(choice)));
  }
  if (delta.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
    finish_reason_ = delta.finish_reason();
    usage_ = delta.usage();
    json choice = chat ? json{{"index", 0}, {"delta", json::object()}} : json{{"index", 0}, {"text", ""}};
    choice["logprobs"] = nullptr;
    choice["finish_reason"] = finish_reason_json(finish_reason_);
    event(chunk(std::move(choice)));
  }
  return events;
}

std::string ResponseBuilder::stream_end() const {
  std::string events;
  if (include_usage_) {
    json c = chunk(nullptr);
    c["choices"] = json::array();
    c["usage"] = usage_json();
    absl::StrAppend(&events, "data: ", dump(c), "\n\n");
  }
  absl::StrAppend(&events, "data: [DONE]\n\n");
  return events;
}

std::string ResponseBuilder::stream_error(const absl::Status& status) {
  return absl::StrCat("data: ", dump(http_error(status).body), "\n\n");
}

}  // namespace shardserve::openai
