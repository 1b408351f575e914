// The OpenAI shapes of the HTTP door (coordinator/openai.h): request JSON -> GenerateRequest,
// deltas -> bodies and server-sent events, statuses -> HTTP errors. The server around them is
// tested end to end (tests/e2e/http_test.py).
#include "coordinator/openai.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace shardserve::openai {
namespace {

using json = nlohmann::json;

Request parse_ok(Endpoint e, const std::string& body) {
  auto r = parse_request(e, body);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : Request{};
}

// The HTTP error of a request that must not parse: its status and "param".
std::pair<int, json> parse_error(Endpoint e, const std::string& body) {
  auto r = parse_request(e, body);
  EXPECT_FALSE(r.ok()) << body;
  if (r.ok()) return {0, nullptr};
  const HttpError err = http_error(r.status());
  return {err.status, err.body["error"]["param"]};
}

TEST(OpenAIRequest, CompletionFieldsMapToTheGrpcRequest) {
  const Request r = parse_ok(Endpoint::kCompletions,
                             R"({"model": "m", "prompt": "Hello", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                                 "seed": 3, "stop": "\n", "presence_penalty": 0.1, "frequency_penalty": 0.2,
                                 "n": 1, "logprobs": 2, "stream": true, "stream_options": {"include_usage": true},
                                 "user": "ignored", "top_k": 5, "ignore_eos": true})");
  const v1::GenerateRequest& g = r.generate;
  EXPECT_EQ(g.model(), "m");
  EXPECT_EQ(g.text(), "Hello");
  EXPECT_EQ(g.max_tokens(), 7);
  EXPECT_TRUE(g.has_temperature());
  EXPECT_EQ(g.temperature(), 0.0);
  EXPECT_EQ(g.top_p(), 0.5);
  EXPECT_EQ(g.seed(), 3u);
  ASSERT_EQ(g.stop_size(), 1);
  EXPECT_EQ(g.stop(0), "\n");
  EXPECT_FLOAT_EQ(g.presence_penalty(), 0.1);
  EXPECT_FLOAT_EQ(g.frequency_penalty(), 0.2);
  EXPECT_EQ(g.logprobs(), 2);
  EXPECT_EQ(g.top_k(), 5);
  EXPECT_TRUE(g.ignore_eos());
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_TRUE(r.logprobs);
}

TEST(OpenAIRequest, UnsetFieldsStayUnset) {
  const Request r = parse_ok(Endpoint::kCompletions, R"({"prompt": "x", "temperature": null, "stop": null})");
  EXPECT_FALSE(r.generate.has_temperature());
  EXPECT_FALSE(r.generate.has_max_tokens());
  EXPECT_FALSE(r.generate.has_logprobs());
  EXPECT_EQ(r.generate.stop_size(), 0);
  EXPECT_FALSE(r.stream);
}

TEST(OpenAIRequest, PromptsAsTokenIds) {
  EXPECT_EQ(parse_ok(Endpoint::kCompletions, R"({"prompt": [1, 2, 3]})").generate.prompt_token_ids().ids_size(), 3);
  EXPECT_EQ(parse_ok(Endpoint::kCompletions, R"({"prompt": [[4, 5]]})").generate.prompt_token_ids().ids_size(), 2);
  EXPECT_EQ(parse_ok(Endpoint::kCompletions, R"({"prompt": ["one"]})").generate.text(), "one");
}

TEST(OpenAIRequest, ChatMessages) {
  const Request r = parse_ok(Endpoint::kChat, R"({"messages": [
      {"role": "developer", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": null}],
      "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 3})");
  const v1::ChatMessages& chat = r.generate.chat();
  ASSERT_EQ(chat.messages_size(), 3);
  EXPECT_EQ(chat.messages(0).role(), "system");
  EXPECT_EQ(chat.messages(1).content(), "Hi there");
  EXPECT_EQ(chat.messages(2).content(), "");
  EXPECT_EQ(r.generate.max_tokens(), 9);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.generate.logprobs(), 3);
}

TEST(OpenAIRequest, GenerateTakesTheGuidesBody) {
  const Request r = parse_ok(Endpoint::kGenerate, R"({"messages":[{"role":"user","content":"Hello"}]})");
  EXPECT_EQ(r.generate.chat().messages(0).content(), "Hello");
  EXPECT_EQ(parse_ok(Endpoint::kGenerate, R"({"prompt": "Hi"})").generate.text(), "Hi");
}

TEST(OpenAIRequest, BadInputNamesTheField) {
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": "x", "n": 2})"), std::make_pair(400, json("n")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": ["a", "b"]})"), std::make_pair(400, json("prompt")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({})"), std::make_pair(400, json("prompt")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": "x", "temperature": "hot"})"),
            std::make_pair(400, json("temperature")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": [1, "a"]})"), std::make_pair(400, json("prompt[1]")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": "x", "echo": true})"), std::make_pair(400, json("echo")));
  EXPECT_EQ(parse_error(Endpoint::kChat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})"),
            std::make_pair(400, json("messages[0].content[0]")));
  // Found by fuzzing (tests/fuzz/openai_request_fuzz.cc): a "type" that is not a string threw
  // out of the parser (an HTTP 500) instead of a 400 naming the field.
  EXPECT_EQ(parse_error(Endpoint::kChat, R"({"messages": [{"role": "user", "content": [{"type": 1}]}]})"),
            std::make_pair(400, json("messages[0].content[0]")));
  EXPECT_EQ(parse_error(Endpoint::kCompletions, R"({"prompt": "x", "response_format": {"type": null}})"),
            std::make_pair(400, json("response_format")));
  EXPECT_EQ(parse_error(Endpoint::kChat, R"({"messages": [], "top_logprobs": 2})"),
            std::make_pair(400, json("top_logprobs")));
  EXPECT_EQ(parse_error(Endpoint::kChat, R"({"messages": [], "tools": [{"type": "function"}]})"),
            std::make_pair(400, json("tools")));
  EXPECT_EQ(parse_error(Endpoint::kGenerate, R"({"messages": [], "stream": true})"),
            std::make_pair(400, json("stream")));
  EXPECT_EQ(parse_error(Endpoint::kChat, R"({"messages": )"), std::make_pair(400, json(nullptr)));
  EXPECT_EQ(parse_error(Endpoint::kChat, "[1]"), std::make_pair(400, json(nullptr)));
  EXPECT_EQ(parse_error(Endpoint::kChat, "{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}"),
            std::make_pair(400, json(nullptr)));
}

TEST(OpenAIErrors, StatusesMapToHttpCodesAndOpenAIsBody) {
  const std::vector<std::pair<absl::Status, int>> cases = {
      {absl::InvalidArgumentError("temperature: -1"), 400}, {absl::FailedPreconditionError("no tokenizer"), 400},
      {absl::NotFoundError("unknown model 'x'"), 404},      {absl::ResourceExhaustedError("full"), 429},
      {absl::UnavailableError("no healthy group"), 503},    {absl::InternalError("bug"), 500}};
  for (const auto& [status, code] : cases) {
    const HttpError e = http_error(status);
    EXPECT_EQ(e.status, code) << status;
    EXPECT_EQ(e.body["error"]["message"], std::string(status.message()));
    EXPECT_TRUE(e.body["error"].contains("type"));
    EXPECT_TRUE(e.body["error"].contains("param"));
    EXPECT_TRUE(e.body["error"].contains("code"));
  }
  EXPECT_EQ(http_error(absl::NotFoundError("x")).body["error"]["code"], "not_found");
  EXPECT_EQ(http_error(absl::ResourceExhaustedError("x")).body["error"]["type"], "rate_limit_error");
  EXPECT_EQ(http_error(413, "too big").body["error"]["code"], "request_too_large");
}

v1::GenerateResponse delta(std::vector<int32_t> ids, std::string text,
                           v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED) {
  v1::GenerateResponse d;
  for (int32_t id : ids) {
    d.add_token_ids(id);
    v1::TokenLogprob* lp = d.add_logprobs();
    lp->set_token_id(id);
    lp->set_logprob(-0.5f);
    v1::TopLogprob* top = lp->add_top_logprobs();
    top->set_token_id(id);
    top->set_logprob(-0.5f);
  }
  d.set_text(std::move(text));
  if (finish != v1::FINISH_REASON_UNSPECIFIED) {
    d.set_finish_reason(finish);
    d.mutable_usage()->set_prompt_tokens(4);
    d.mutable_usage()->set_completion_tokens(static_cast<int64_t>(2));
  }
  return d;
}

// The JSON objects of "data: {...}\n\n" events, and whether the stream ended with [DONE].
std::vector<json> events(const std::string& sse, bool* done) {
  std::vector<json> out;
  *done = false;
  size_t at = 0;
  while (at < sse.size()) {
    const size_t end = sse.find("\n\n", at);
    EXPECT_NE(end, std::string::npos) << "an event without its blank line";
    if (end == std::string::npos) break;
    const std::string line = sse.substr(at, end - at);
    EXPECT_EQ(line.rfind("data: ", 0), 0u) << line;
    if (line == "data: [DONE]") {
      *done = true;
    } else {
      out.push_back(json::parse(line.substr(6)));
    }
    at = end + 2;
  }
  return out;
}

TEST(OpenAIResponse, ChatStreamFraming) {
  Request r =
      parse_ok(Endpoint::kChat, R"({"messages": [], "stream": true, "stream_options": {"include_usage": true}})");
  ResponseBuilder b(r, "chatcmpl-1", "m", nullptr, 100);
  std::string sse = b.stream_event(delta({7}, "Hel"));
  sse += b.stream_event(delta({8}, "lo", v1::FINISH_REASON_LENGTH));
  sse += b.stream_end();
  bool done = false;
  const std::vector<json> ev = events(sse, &done);
  EXPECT_TRUE(done);
  ASSERT_EQ(ev.size(), 5u);  // role, "Hel", "lo", finish, usage
  EXPECT_EQ(ev[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(ev[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(ev[1]["choices"][0]["delta"]["content"], "Hel");
  EXPECT_EQ(ev[2]["choices"][0]["delta"]["content"], "lo");
  EXPECT_TRUE(ev[2]["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(ev[2]["usage"].is_null());
  EXPECT_EQ(ev[3]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(ev[4]["choices"].empty());
  EXPECT_EQ(ev[4]["usage"]["total_tokens"], 6);
  EXPECT_TRUE(ev[1]["choices"][0]["logprobs"].is_null());  // not asked for
}

TEST(OpenAIResponse, CompletionStreamWithoutUsageEndsWithDone) {
  Request r = parse_ok(Endpoint::kCompletions, R"({"prompt": "x", "stream": true})");
  ResponseBuilder b(r, "cmpl-1", "m", nullptr, 100);
  std::string sse = b.stream_event(delta({7}, ""));  // nothing to show yet: no event
  EXPECT_EQ(sse, "");
  sse += b.stream_event(delta({8}, "ab", v1::FINISH_REASON_STOP));
  sse += b.stream_end();
  bool done = false;
  const std::vector<json> ev = events(sse, &done);
  EXPECT_TRUE(done);
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0]["object"], "text_completion");
  EXPECT_EQ(ev[0]["choices"][0]["text"], "ab");
  EXPECT_FALSE(ev[0].contains("usage"));
  EXPECT_EQ(ev[1]["choices"][0]["finish_reason"], "stop");
  EXPECT_NE(ResponseBuilder::stream_error(absl::UnavailableError("gone")).find("\"error\""), std::string::npos);
}

TEST(OpenAIResponse, UnaryBodiesWithLogprobs) {
  Request chat = parse_ok(Endpoint::kChat, R"({"messages": [], "logprobs": true, "top_logprobs": 1})");
  ResponseBuilder c(chat, "chatcmpl-1", "m", nullptr, 100);
  c.add(delta({7}, "Hel"));
  c.add(delta({8}, "lo", v1::FINISH_REASON_STOP));
  const json body = c.body();
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  ASSERT_EQ(body["choices"][0]["logprobs"]["content"].size(), 2u);
  EXPECT_EQ(body["choices"][0]["logprobs"]["content"][1]["token"], "token_id:8");
  EXPECT_EQ(body["choices"][0]["logprobs"]["content"][1]["top_logprobs"].size(), 1u);
  EXPECT_EQ(body["usage"]["prompt_tokens"], 4);

  Request cmpl = parse_ok(Endpoint::kCompletions, R"({"prompt": "x", "logprobs": 1})");
  ResponseBuilder p(cmpl, "cmpl-1", "m", nullptr, 100);
  p.add(delta({7, 9}, "Hel"));
  p.add(delta({8}, "lo", v1::FINISH_REASON_LENGTH));
  const json lp = p.body()["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json({"token_id:7", "token_id:9", "token_id:8"}));
  EXPECT_EQ(lp["token_logprobs"].size(), 3u);
  EXPECT_EQ(lp["text_offset"][1], 10);  // after "token_id:7"

  Request guide = parse_ok(Endpoint::kGenerate, R"({"messages": [{"role": "user", "content": "Hello"}]})");
  ResponseBuilder g(guide, "cmpl-1", "m", nullptr, 100);
  g.add(delta({7, 8}, "Hi!", v1::FINISH_REASON_STOP));
  EXPECT_EQ(g.body(), json({{"text", "Hi!"}, {"tokens", 2}, {"finish_reason", "stop"}}));
}

}  // namespace
}  // namespace shardserve::openai
