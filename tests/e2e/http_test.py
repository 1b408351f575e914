#!/usr/bin/python3
"""End-to-end tests of the coordinator's HTTP API (OpenAI-compatible, and the guide's /generate),
with curl and with the official OpenAI SDK for Node.js, over loopback.

One cluster for the module, with --http-port: model "text" (the Llama 3.1 tokenizer) and model
"tiny" (no tokenizer), one group each, and --max-in-flight 2 so that back-pressure is reachable.
Answers are checked against the gRPC API of the same cluster: one engine behind two doors.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
CLUSTER = None
MAX_IN_FLIGHT = 2
HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.environ.get("SHARDSERVE_NODE_DIR") or os.path.join(tempfile.gettempdir(), "shardserve-e2e-node")


def setUpModule():
    global CLUSTER
    CLUSTER = cl.Cluster(models={"text": (cl.TINY_TEXT, None), "tiny": (cl.TINY, None)},
                         groups=[{"name": "text", "model": "text", "num_kv_blocks": 128},
                                 {"name": "tiny", "model": "tiny", "num_kv_blocks": 64}],
                         coordinator_args=["--max-in-flight", str(MAX_IN_FLIGHT)], http=True)
    CLUSTER.start()


def tearDownModule():
    if CLUSTER:
        CLUSTER.stop()


def url(path):
    return f"http://{CLUSTER.http_address}{path}"


def curl(path, body=None, raw=None, method=None):
    """(HTTP status, response headers in lower case, body text) of one curl call."""
    with tempfile.TemporaryDirectory() as d:
        headers, out = os.path.join(d, "headers"), os.path.join(d, "body")
        args = ["curl", "-sS", "-N", "--max-time", "60", "-D", headers, "-o", out, "-w", "%{http_code}"]
        if method:
            args += ["-X", method]
        if body is not None or raw is not None:
            data = os.path.join(d, "data")
            with open(data, "wb") as f:
                f.write(raw if raw is not None else json.dumps(body).encode())
            args += ["-H", "Content-Type: application/json", "--data-binary", f"@{data}"]
        r = subprocess.run(args + [url(path)], capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        with open(headers) as f:
            head = f.read().lower()
        with open(out, encoding="utf-8") as f:
            return int(r.stdout), head, f.read()


def sse_events(text):
    """The JSON objects of a server-sent event stream, checking its framing: every event is one
    "data: ..." line and a blank line, and the last one is [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "the stream ends with a blank line"
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        events.append(json.loads(block[len("data: "):]))
    return events


def grpc_generate(**fields):
    return pb_grpc.GenerationStub(grpc.insecure_channel(CLUSTER.address)).Generate(pb.GenerateRequest(**fields),
                                                                                    timeout=60)


def worker_metric(group, name, **labels):
    return cl.metric(cl.scrape(CLUSTER.workers[group]["metrics_address"]), name, **labels)


def all_blocks_free(timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [cl.scrape(w["metrics_address"]) for w in CLUSTER.workers.values()]
        if all(cl.metric(t, "shardserve_kv_cache_free_blocks") == cl.metric(t, "shardserve_kv_cache_blocks") > 0
               for t in texts):
            return True
        time.sleep(0.05)  # the gauges update after the engine's next iteration
    return False


def in_flight():
    return cl.metric(cl.scrape(CLUSTER.metrics_address), "shardserve_requests_in_flight")


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)  # polling the server's view
    return False


def open_stream(body):
    """A raw streaming request on its own socket, read up to its first event (the request is then
    in flight, generating). The caller closes the socket: a client that goes away."""
    s = socket.create_connection(("127.0.0.1", int(CLUSTER.http_address.rsplit(":", 1)[1])), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError(f"the stream ended before its first event: {got!r}")
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return s


def hang_up(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
    s.close()


LONG = {"model": "text", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
        "stream": True}


class Curl(unittest.TestCase):
    def test_completion_equals_the_grpc_answer(self):
        status, head, body = curl("/v1/completions", {"model": "text", "prompt": "Hello", "max_tokens": 12,
                                                      "temperature": 0, "ignore_eos": True})
        self.assertEqual(status, 200, body)
        self.assertIn("content-type: application/json", head)
        r = json.loads(body)
        want = grpc_generate(model="text", text="Hello", max_tokens=12, temperature=0, ignore_eos=True)
        self.assertEqual(r["object"], "text_completion")
        self.assertEqual(r["model"], "text")
        self.assertTrue(r["id"].startswith("cmpl-"))
        self.assertEqual(r["choices"][0]["text"], want.text)
        self.assertEqual(r["choices"][0]["finish_reason"], "length")
        self.assertEqual(r["usage"]["prompt_tokens"], want.usage.prompt_tokens)
        self.assertEqual(r["usage"]["completion_tokens"], 12)
        self.assertEqual(r["usage"]["total_tokens"], want.usage.prompt_tokens + 12)

    def test_chat_equals_the_grpc_answer(self):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        status, _, body = curl("/v1/chat/completions", {"model": "text", "messages": messages, "max_tokens": 10,
                                                        "temperature": 0, "ignore_eos": True})
        self.assertEqual(status, 200, body)
        r = json.loads(body)
        want = grpc_generate(model="text", chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
                             max_tokens=10, temperature=0, ignore_eos=True)
        self.assertEqual(r["object"], "chat.completion")
        self.assertEqual(r["choices"][0]["message"], {"role": "assistant", "content": want.text})
        self.assertEqual(r["usage"]["prompt_tokens"], want.usage.prompt_tokens)

    def test_streams_are_sse_and_add_up_to_the_unary_answer(self):
        base = {"model": "text", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        chat = dict(base, messages=[{"role": "user", "content": "Hello"}])
        _, _, unary = curl("/v1/chat/completions", chat)
        status, head, text = curl("/v1/chat/completions", dict(chat, stream=True,
                                                                stream_options={"include_usage": True}))
        self.assertEqual(status, 200, text)
        self.assertIn("content-type: text/event-stream", head)
        self.assertIn("transfer-encoding: chunked", head)
        events = sse_events(text)
        self.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertTrue(all(e["object"] == "chat.completion.chunk" for e in events))
        self.assertEqual(len({e["id"] for e in events}), 1)
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        self.assertEqual(content, json.loads(unary)["choices"][0]["message"]["content"])
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "length")
        self.assertEqual(events[-1]["choices"], [])
        self.assertEqual(events[-1]["usage"]["completion_tokens"], 12)
        self.assertGreater(len(events), 4)  # deltas as they come, not one piece

        cmpl = dict(base, prompt="Hello")
        _, _, unary = curl("/v1/completions", cmpl)
        status, _, text = curl("/v1/completions", dict(cmpl, stream=True))
        self.assertEqual(status, 200, text)
        events = sse_events(text)
        self.assertEqual("".join(e["choices"][0]["text"] for e in events), json.loads(unary)["choices"][0]["text"])
        self.assertNotIn("usage", events[-1])

    def test_generate_takes_the_guides_body(self):
        status, _, body = curl("/generate", {"model": "text", "messages": [{"role": "user", "content": "Hello"}],
                                             "max_tokens": 5})
        self.assertEqual(status, 200, body)
        r = json.loads(body)
        self.assertEqual(set(r), {"text", "tokens", "finish_reason"})
        self.assertEqual(r["tokens"], 5)
        # Several models: the model must be named.
        self.assertEqual(curl("/generate", {"messages": [{"role": "user", "content": "Hello"}]})[0], 400)

    def test_token_id_prompts_and_logprobs(self):
        status, _, body = curl("/v1/completions", {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 6,
                                                   "temperature": 0, "ignore_eos": True, "logprobs": 2})
        self.assertEqual(status, 200, body)
        r = json.loads(body)
        want = grpc_generate(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=6, temperature=0,
                             ignore_eos=True)
        lp = r["choices"][0]["logprobs"]
        self.assertEqual(lp["tokens"], [f"token_id:{t}" for t in want.token_ids])
        self.assertEqual(len(lp["token_logprobs"]), 6)
        self.assertTrue(all(len(top) <= 2 and top for top in lp["top_logprobs"]))

    def test_models_health_ready(self):
        status, _, body = curl("/v1/models")
        self.assertEqual(status, 200)
        r = json.loads(body)
        self.assertEqual(r["object"], "list")
        self.assertEqual(sorted(m["id"] for m in r["data"]), ["text", "tiny"])
        self.assertEqual(json.loads(curl("/v1/models/text")[2])["id"], "text")
        self.assertEqual(curl("/v1/models/nope")[0], 404)
        self.assertEqual(curl("/health")[:1], (200,))
        status, _, body = curl("/ready")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["models"]["text"], {"groups": 1, "healthy_groups": 1})


class Errors(unittest.TestCase):
    """gRPC's validation, as HTTP codes with OpenAI's error body; nothing leaks."""

    def expect(self, code, words, path="/v1/completions", param=None, **kw):
        status, head, body = curl(path, **kw)
        self.assertEqual(status, code, body)
        self.assertIn("content-type: application/json", head)
        err = json.loads(body)["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"})
        for w in words:
            self.assertIn(w, err["message"])
        if param:
            self.assertEqual(err["param"], param)
        return err

    def tearDown(self):
        self.assertEqual(curl("/health")[0], 200)
        self.assertTrue(all_blocks_free())

    def test_400_bad_input(self):
        p = {"model": "text", "prompt": "Hi"}
        self.expect(400, ["temperature"], body=dict(p, temperature=-1))
        self.expect(400, ["top_p"], body=dict(p, top_p=0))
        self.expect(400, ["max_tokens"], body=dict(p, max_tokens=0))
        self.expect(400, ["n=1"], body=dict(p, n=2), param="n")
        self.expect(400, ["temperature"], body=dict(p, temperature="hot"), param="temperature")
        self.expect(400, ["prompt"], body={"model": "text"}, param="prompt")
        self.expect(400, ["JSON"], raw=b'{"model": "text", "prompt": ')
        self.expect(400, ["empty"], body=dict(p, prompt=""))
        self.expect(400, ["messages"], path="/v1/chat/completions", body={"model": "text"}, param="messages")
        self.expect(400, ["300", "256"], body={"model": "tiny", "prompt": [5] * 300, "max_tokens": 1})
        # FAILED_PRECONDITION: text to a model served without a tokenizer.
        err = self.expect(400, ["tokenizer"], body={"model": "tiny", "prompt": "Hi"})
        self.assertEqual(err["code"], "failed_precondition")

    def test_404_unknown_model_and_path(self):
        err = self.expect(404, ["nope", "text"], body={"model": "nope", "prompt": "Hi"})
        self.assertEqual(err["code"], "not_found")
        self.expect(404, ["/v1/nothing"], path="/v1/nothing")

    def test_413_body_too_large(self):
        err = self.expect(413, ["larger"], raw=json.dumps({"model": "text", "prompt": "a" * (2 << 20)}).encode())
        self.assertEqual(err["code"], "request_too_large")

    def test_429_when_the_server_is_full_and_hang_ups_free_it(self):
        streams = [open_stream(LONG) for _ in range(MAX_IN_FLIGHT)]
        try:
            self.assertEqual(in_flight(), MAX_IN_FLIGHT)
            err = self.expect(429, ["max-in-flight"], body={"model": "text", "prompt": "Hi"})
            self.assertEqual(err["type"], "rate_limit_error")
        finally:
            for s in streams:
                hang_up(s)
        self.assertTrue(wait_for(lambda: in_flight() == 0), "the hung-up streams are still in flight")

    def test_503_when_no_healthy_group(self):
        pid = CLUSTER.worker_pid("text")
        os.kill(pid, signal.SIGSTOP)  # health checks time out: the group is unhealthy
        try:
            self.assertTrue(wait_for(lambda: curl("/ready")[0] == 503), "/ready did not notice")
            err = self.expect(503, ["healthy", "text"], path="/v1/chat/completions",
                              body={"model": "text", "messages": [{"role": "user", "content": "Hi"}]})
            self.assertEqual(err["type"], "server_error")
            self.assertEqual(curl("/health")[0], 200)  # alive, just not ready
            self.assertEqual(json.loads(curl("/ready")[2])["models"]["tiny"]["healthy_groups"], 1)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertTrue(wait_for(lambda: curl("/ready")[0] == 200), "/ready did not recover")


class Disconnect(unittest.TestCase):
    def test_client_hang_up_mid_stream_aborts_and_frees_the_blocks(self):
        finished = lambda reason: worker_metric("text", "shardserve_worker_requests_finished_total",
                                                finish_reason=reason)
        before = (finished("abort"), finished("length"))
        hang_up(open_stream(LONG))
        self.assertTrue(all_blocks_free(), "KV blocks still in use after the hang-up")
        self.assertTrue(wait_for(lambda: finished("abort") == before[0] + 1), "the worker did not abort the request")
        self.assertEqual(finished("length"), before[1], "the request ran to the end instead")
        self.assertTrue(wait_for(lambda: in_flight() == 0))


class Serve(unittest.TestCase):
    def test_serve_with_http_port_answers_the_guides_curl_verbatim(self):
        """`shardserve serve --http-port` (one model, the default one), and the deployment guide's
        test as its readers type it: curl -X POST .../generate -d '{"messages": [...]}'."""
        port, http_port = cl.free_port(), cl.free_port()
        log = tempfile.NamedTemporaryFile("w+", prefix="shardserve-serve-", suffix=".log")
        proc = subprocess.Popen([os.path.join(cl.BIN_DIR, "shardserve"), "serve", "--port", str(port),
                                 "--http-port", str(http_port), "--shutdown-timeout", "5",
                                 "--max-model-len", "64"],  # "until the end of the context" stays short
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            def printed():
                with open(log.name) as f:
                    return f.read()

            self.assertTrue(wait_for(lambda: "serving model" in printed() or proc.poll() is not None, timeout=120))
            self.assertIn(f"OpenAI-compatible HTTP API at http://127.0.0.1:{http_port}/v1", printed())
            r = subprocess.run(["curl", "-sS", "--max-time", "120", "-X", "POST", f"http://127.0.0.1:{http_port}/generate",
                                "-d", '{"messages":[{"role":"user","content":"Hello"}]}'],
                               capture_output=True, text=True, timeout=150)
            self.assertEqual(r.returncode, 0, r.stderr)
            got = json.loads(r.stdout)
            self.assertEqual(set(got), {"text", "tokens", "finish_reason"})
            self.assertGreater(got["tokens"], 0)
            self.assertLessEqual(got["tokens"], 64 - 30)  # until EOS or the end of the context
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


class OpenAINodeClient(unittest.TestCase):
    """The official OpenAI SDK for Node.js (npm "openai"), installed from package-lock.json."""

    @classmethod
    def setUpClass(cls):
        node, npm = shutil.which("node"), shutil.which("npm")
        if not (node and npm):
            raise AssertionError("node and npm are needed (scripts/setup.sh installs them)")
        os.makedirs(NODE_DIR, exist_ok=True)
        lock = os.path.join(HERE, "node", "package-lock.json")
        stamp = os.path.join(NODE_DIR, "node_modules", ".shardserve-lock")
        with open(lock) as f:
            want = f.read()
        installed = None
        if os.path.exists(stamp):
            with open(stamp) as f:
                installed = f.read()
        if installed != want:
            for name in ("package.json", "package-lock.json"):
                shutil.copy(os.path.join(HERE, "node", name), NODE_DIR)
            r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise AssertionError(f"npm ci failed:\n{r.stdout}{r.stderr}")
            with open(stamp, "w") as f:
                f.write(want)
        cls.node = node

    def test_unary_and_streaming_completions_and_chat(self):
        env = dict(os.environ, NODE_PATH=os.path.join(NODE_DIR, "node_modules"))
        r = subprocess.run([self.node, os.path.join(HERE, "node", "openai_client.cjs"), url("/v1"), "text"],
                           capture_output=True, text=True, timeout=180, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        got = json.loads(r.stdout)
        want = grpc_generate(model="text", text="Hello", max_tokens=12, temperature=0, ignore_eos=True)
        chat = grpc_generate(model="text", chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hello")]),
                             max_tokens=12, temperature=0, ignore_eos=True)
        self.assertEqual(sorted(got["models"]), ["text", "tiny"])
        self.assertEqual(got["completion"]["object"], "text_completion")
        self.assertEqual(got["completion"]["text"], want.text)
        self.assertEqual(got["completion"]["finish_reason"], "length")
        self.assertEqual(got["completion"]["usage"]["completion_tokens"], 12)
        self.assertEqual(got["completion_stream"]["text"], want.text)
        self.assertGreater(got["completion_stream"]["chunks"], 2)
        self.assertEqual(got["chat"]["content"], chat.text)
        self.assertEqual(got["chat"]["role"], "assistant")
        self.assertEqual(got["chat"]["usage"]["prompt_tokens"], chat.usage.prompt_tokens)
        self.assertEqual(got["chat"]["logprobs"], 12)
        self.assertEqual(got["chat"]["top_logprobs"], 2)
        self.assertEqual(got["chat_stream"]["content"], chat.text)
        self.assertEqual(got["chat_stream"]["finish_reason"], "length")
        self.assertEqual(got["chat_stream"]["usage"]["completion_tokens"], 12)
        errors = got["errors"]
        self.assertEqual((errors["unknown_model"]["status"], errors["unknown_model"]["class"]), (404, "NotFoundError"))
        self.assertIn("nope", errors["unknown_model"]["message"])
        self.assertEqual((errors["n_2"]["status"], errors["n_2"]["class"]), (400, "BadRequestError"))
        self.assertEqual(errors["bad_temperature"]["status"], 400)
        self.assertTrue(all_blocks_free())


if __name__ == "__main__":
    unittest.main()
