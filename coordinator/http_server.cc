#include "coordinator/http_server.h"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <ctime>
#include <exception>
#include <thread>

#include "absl/strings/str_cat.h"
#include "coordinator/api_key.h"
#include "coordinator/openai.h"

namespace shardserve {
namespace {

using json = nlohmann::json;

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(openai::dump(body), "application/json");
}

void send_error(httplib::Response& res, const openai::HttpError& e) { send_json(res, e.status, e.body); }

}  // namespace

struct HttpServer::Impl {
  Frontend* frontend = nullptr;
  HttpOptions options;
  std::unique_ptr<httplib::Server> server;  // an httplib::SSLServer with TLS
  std::thread thread;
  int port = 0;
  int64_t started = 0;

  void generate(openai::Endpoint endpoint, const httplib::Request& hreq, httplib::Response& res) {
    auto request = openai::parse_request(endpoint, hreq.body);
    if (!request.ok()) return send_error(res, openai::http_error(request.status()));
    if (const std::string id = hreq.get_header_value("X-Request-Id"); !id.empty()) request->generate.set_request_id(id);
    AdmitOptions admit_options;
    // OpenAI's chat default (and the guide's): as long as the context allows, until EOS.
    admit_options.max_tokens_to_context_end = endpoint != openai::Endpoint::kCompletions;
    auto admitted = frontend->admit(request->generate, admit_options);
    if (!admitted.ok()) return send_error(res, openai::http_error(admitted.status()));
    std::shared_ptr<AdmittedRequest> call = std::move(*admitted);
    res.set_header("X-Request-Id", call->request_id());
    const std::string id =
        absl::StrCat(endpoint == openai::Endpoint::kChat ? "chatcmpl-" : "cmpl-", call->request_id());
    auto builder = std::make_shared<openai::ResponseBuilder>(*request, id, call->model(), call->tokenizer(),
                                                             static_cast<int64_t>(std::time(nullptr)));
    if (!request->stream) {
      const absl::Status st = call->run([&](const v1::GenerateResponse& delta) {
        builder->add(delta);
        return true;
      });
      if (!st.ok()) return send_error(res, openai::http_error(st));
      return send_json(res, 200, builder->body());
    }
    // Headers go out when this handler returns; the provider then runs the request on this
    // connection's thread, one event per delta.
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");  // proxies (nginx): pass the events on at once
    res.set_chunked_content_provider("text/event-stream", [call, builder](size_t, httplib::DataSink& sink) {
      bool client_gone = false;
      absl::Status st = call->run([&](const v1::GenerateResponse& delta) {
        const std::string events = builder->stream_event(delta);
        client_gone = !events.empty() && !sink.write(events.data(), events.size());
        return !client_gone;
      });
      if (client_gone) return false;  // close the connection
      if (absl::IsCancelled(st)) {
        st = absl::UnavailableError("the server stopped before the request finished; retry the request");
      }
      const std::string end = st.ok() ? builder->stream_end() : openai::ResponseBuilder::stream_error(st);
      sink.write(end.data(), end.size());
      sink.done();
      return true;
    });
  }

  json model_json(const v1::Model& m) const {
    return {{"id", m.name()},
            {"object", "model"},
            {"created", started},
            {"owned_by", "shardserve"},
            {"max_model_len", m.max_model_len()}};
  }

  void models(httplib::Response& res) {
    json data = json::array();
    const v1::ListModelsResponse list = frontend->list_models();
    for (const v1::Model& m : list.models()) data.push_back(model_json(m));
    send_json(res, 200, {{"object", "list"}, {"data", std::move(data)}});
  }

  void model(const std::string& name, httplib::Response& res) {
    const v1::ListModelsResponse list = frontend->list_models();
    for (const v1::Model& m : list.models()) {
      if (m.name() == name) return send_json(res, 200, model_json(m));
    }
    send_error(res, openai::http_error(absl::NotFoundError(absl::StrCat("unknown model '", name, "'"))));
  }

  void ready(httplib::Response& res) {
    bool ready = frontend->serving();
    json models = json::object();
    const v1::ListModelsResponse list = frontend->list_models();
    for (const v1::Model& m : list.models()) {
      models[m.name()] = {{"groups", m.num_groups()}, {"healthy_groups", m.num_healthy_groups()}};
      if (m.num_healthy_groups() == 0) ready = false;
    }
    send_json(res, ready ? 200 : 503, {{"status", ready ? "ready" : "not ready"}, {"models", std::move(models)}});
  }

  void routes() {
    using openai::Endpoint;
    server->Post("/v1/completions",
                 [this](const httplib::Request& q, httplib::Response& r) { generate(Endpoint::kCompletions, q, r); });
    server->Post("/v1/chat/completions",
                 [this](const httplib::Request& q, httplib::Response& r) { generate(Endpoint::kChat, q, r); });
    server->Post("/generate",
                 [this](const httplib::Request& q, httplib::Response& r) { generate(Endpoint::kGenerate, q, r); });
    server->Get("/v1/models", [this](const httplib::Request&, httplib::Response& r) { models(r); });
    server->Get(R"(/v1/models/(.+))",
                [this](const httplib::Request& q, httplib::Response& r) { model(q.matches[1], r); });
    server->Get("/health", [this](const httplib::Request&, httplib::Response& r) {
      const bool serving = frontend->serving();
      send_json(r, serving ? 200 : 503, {{"status", serving ? "SERVING" : "NOT_SERVING"}});
    });
    server->Get("/ready", [this](const httplib::Request&, httplib::Response& r) { ready(r); });
    if (!options.api_key.empty()) {
      // Before routing, so that no route can be reached without the key; probes need none.
      server->set_pre_routing_handler([this](const httplib::Request& q, httplib::Response& r) {
        if (q.path == "/health" || q.path == "/ready") return httplib::Server::HandlerResponse::Unhandled;
        const absl::Status st = check_api_key(options.api_key, q.get_header_value("Authorization"));
        if (st.ok()) return httplib::Server::HandlerResponse::Unhandled;
        openai::HttpError e = openai::http_error(401, std::string(st.message()));
        e.body["error"]["code"] = "invalid_api_key";  // OpenAI's code for it
        r.set_header("WWW-Authenticate", "Bearer");
        send_error(r, e);
        return httplib::Server::HandlerResponse::Handled;
      });
    }
    // httplib's own errors (no route, body over the limit, a malformed request) in OpenAI's shape.
    server->set_error_handler(
        httplib::Server::HandlerWithResponse([this](const httplib::Request& q, httplib::Response& r) {
          if (!r.body.empty() || r.is_chunked_content_provider_) return httplib::Server::HandlerResponse::Unhandled;
          std::string message;
          switch (r.status) {
            case 404:
              message = absl::StrCat("no such endpoint: ", q.method, " ", q.path);
              break;
            case 413:
              // httplib caps form-encoded bodies (what curl -d sends unless told otherwise) at 8 KiB.
              message = q.get_header_value("Content-Type").starts_with("application/x-www-form-urlencoded")
                            ? std::string(
                                  "the body is sent as a form (application/x-www-form-urlencoded, at most 8192 "
                                  "bytes); send it as JSON: -H 'Content-Type: application/json'")
                            : absl::StrCat("the request body is larger than ", options.max_body_bytes,
                                           " bytes (--max-request-bytes)");
              break;
            default:
              message = absl::StrCat("the request could not be served (HTTP ", r.status, ")");
          }
          send_error(r, openai::http_error(r.status, message));
          return httplib::Server::HandlerResponse::Handled;
        }));
    server->set_exception_handler([](const httplib::Request&, httplib::Response& r, std::exception_ptr ep) {
      std::string what = "unknown";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      spdlog::error("HTTP handler failed: {}", what);
      send_error(r, openai::http_error(500, absl::StrCat("internal error: ", what)));
    });
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { stop(); }

int HttpServer::port() const { return impl_->port; }

void HttpServer::stop() {
  if (!impl_->thread.joinable()) return;
  impl_->server->stop();
  impl_->thread.join();
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::start(Frontend* frontend, const HttpOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->frontend = frontend;
  impl->options = options;
  impl->started = static_cast<int64_t>(std::time(nullptr));
  if (options.tls_cert.empty()) {
    impl->server = std::make_unique<httplib::Server>();
  } else {
    auto ssl = std::make_unique<httplib::SSLServer>(
        options.tls_cert.c_str(), options.tls_key.c_str(),
        options.tls_client_ca.empty() ? nullptr : options.tls_client_ca.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "HTTPS: cannot use the certificate ", options.tls_cert, " and key ", options.tls_key,
          options.tls_client_ca.empty() ? "" : " and client CA ", options.tls_client_ca,
          " (unreadable, not PEM, or not a pair)"));
    }
    impl->server = std::move(ssl);
  }
  httplib::Server& s = *impl->server;
  const int threads = std::max(options.threads, 1);
  s.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  s.set_payload_max_length(static_cast<size_t>(std::max<int64_t>(options.max_body_bytes, 0)));
  s.set_tcp_nodelay(true);  // one small event per token: do not wait to fill a segment
  impl->routes();
  if (options.port == 0) {
    impl->port = s.bind_to_any_port(options.host);
  } else if (s.bind_to_port(options.host, options.port)) {
    impl->port = options.port;
  }
  if (impl->port <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve HTTP on ", options.host, ":", options.port, " (is the port in use?)"));
  }
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->server->listen_after_bind(); });
  // stop() before the loop runs would be lost, and the thread never joined.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!s.is_running() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // waiting for the accept loop
  }
  if (!s.is_running()) {
    s.stop();
    impl->thread.join();
    return absl::InternalError("the HTTP server did not start");
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

}  // namespace shardserve
