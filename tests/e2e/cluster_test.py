#!/usr/bin/python3
"""End-to-end tests of a shardserve cluster over loopback, with a real Python gRPC client.

One cluster for the module: model "tiny" (no tokenizer) served by a TP=2 CPU group and a
single-rank group; model "text" (the Llama 3.1 tokenizer) served by one group. Each test checks
one behaviour the public API promises; after the bad-input tests the server must still be healthy
and every KV block free.
"""
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
CLUSTER = None
TP_SIZE = 2  # CPU ranks as threads of the group's one worker process


def setUpModule():
    global CLUSTER
    CLUSTER = cl.Cluster(
        models={"tiny": (cl.TINY, None), "text": (cl.TINY_TEXT, None)},
        groups=[{"name": "tp2", "model": "tiny", "tp_size": TP_SIZE, "num_kv_blocks": 256, "max_num_seqs": 64},
                {"name": "single", "model": "tiny", "tp_size": 1, "num_kv_blocks": 256, "max_num_seqs": 64},
                {"name": "text", "model": "text", "num_kv_blocks": 128}])
    CLUSTER.start()


def tearDownModule():
    if CLUSTER:
        CLUSTER.stop()


def stub():
    return pb_grpc.GenerationStub(grpc.insecure_channel(CLUSTER.address))


def generate_reference(model_dir, requests, tp_size=1):
    """`shardserve generate` on the same requests, in one in-process engine."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in requests:
            f.write(json.dumps(r) + "\n")
    out = cl.run([os.path.join(cl.BIN_DIR, "shardserve"), "generate", "--model", model_dir, "--prompts-jsonl", f.name,
                  "--output", "json", "--tp-size", str(tp_size)])
    os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def prompt(i):
    return [(7 * i + k * 13) % 500 + 4 for k in range(3 + i % 9)]


def all_blocks_free(timeout=10.0):
    """True once every worker reports all its KV blocks free (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [cl.scrape(w["metrics_address"]) for w in CLUSTER.workers.values()]
        if all(cl.metric(t, "shardserve_kv_cache_free_blocks") == cl.metric(t, "shardserve_kv_cache_blocks") > 0
               for t in texts):
            return True
        time.sleep(0.05)  # the gauges update after the engine's next iteration
    return False


def health_status():
    """grpc.health.v1.Health/Check for the whole server, by hand: 1 is SERVING."""
    check = grpc.insecure_channel(CLUSTER.address).unary_unary("/grpc.health.v1.Health/Check")
    reply = check(b"", timeout=5)
    return reply[1] if len(reply) == 2 and reply[0] == 0x08 else 0


class Generation(unittest.TestCase):
    def test_python_client_gets_the_tokens_of_shardserve_generate(self):
        reqs = [{"prompt_ids": prompt(i), "max_tokens": 24, "temperature": 0, "ignore_eos": True} for i in range(6)]
        expected = generate_reference(cl.TINY, reqs)
        s = stub()
        for _ in range(2):  # enough requests that both groups of the model serve some
            for r, want in zip(reqs, expected):
                req = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=r["prompt_ids"]),
                                         max_tokens=24, temperature=0, ignore_eos=True)
                unary = s.Generate(req, timeout=30)
                self.assertEqual(list(unary.token_ids), want["token_ids"])
                self.assertEqual(unary.finish_reason, pb.FINISH_REASON_LENGTH)
                self.assertEqual(unary.usage.prompt_tokens, len(r["prompt_ids"]))
                self.assertEqual(unary.usage.completion_tokens, 24)
                streamed = [t for d in s.GenerateStream(req, timeout=30) for t in d.token_ids]
                self.assertEqual(streamed, want["token_ids"])
        # Both groups took part (routing by load spreads an idle cluster's requests).
        for group in ("tp2", "single"):
            text = cl.scrape(CLUSTER.workers[group]["metrics_address"])
            self.assertGreater(cl.metric(text, "shardserve_request_queue_time_seconds_count"), 0, group)

    def test_tp2_group_equals_tp1(self):
        reqs = [{"prompt_ids": prompt(i), "max_tokens": 16, "temperature": 0, "ignore_eos": True} for i in range(3)]
        self.assertEqual(generate_reference(cl.TINY, reqs, tp_size=TP_SIZE), generate_reference(cl.TINY, reqs))

    def test_64_concurrent_streams_are_all_correct(self):
        reqs = []
        for i in range(64):
            r = {"prompt_ids": prompt(i), "max_tokens": 20 + i % 13, "ignore_eos": True}
            r.update({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": 1000 + i, "top_k": 50})
            reqs.append(r)
        expected = generate_reference(cl.TINY, reqs)
        results = [None] * 64
        s = stub()

        def one(i):
            r = reqs[i]
            req = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=r["prompt_ids"]),
                                     max_tokens=r["max_tokens"], temperature=r["temperature"], ignore_eos=True)
            if "seed" in r:
                req.seed, req.top_k = r["seed"], r["top_k"]
            try:
                results[i] = [t for d in s.GenerateStream(req, timeout=60) for t in d.token_ids]
            except grpc.RpcError as e:
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i in range(64):
            self.assertEqual(results[i], expected[i]["token_ids"], f"stream {i}")

    def test_text_in_text_out_with_stop_strings(self):
        s = stub()
        full = s.Generate(pb.GenerateRequest(model="text", text="Hello", max_tokens=12, temperature=0, ignore_eos=True),
                          timeout=30)
        self.assertEqual(len(full.token_ids), 12)
        tok = s.Tokenize(pb.TokenizeRequest(model="text", text="Hello"), timeout=10)
        self.assertEqual(tok.token_ids[0], 128000)  # BOS added to text prompts
        want = generate_reference(cl.TINY_TEXT, [{"prompt_ids": list(tok.token_ids), "max_tokens": 12,
                                                   "temperature": 0, "ignore_eos": True}])[0]
        self.assertEqual(list(full.token_ids), want["token_ids"])
        streamed = "".join(d.text for d in s.GenerateStream(
            pb.GenerateRequest(model="text", text="Hello", max_tokens=12, temperature=0, ignore_eos=True), timeout=30))
        self.assertEqual(streamed, full.text)
        self.assertTrue(full.text)
        # A stop string taken from the middle of the text ends it right before.
        stop = full.text[len(full.text) // 2:][:3]
        if stop.strip():
            cut = s.Generate(pb.GenerateRequest(model="text", text="Hello", max_tokens=12, temperature=0,
                                                ignore_eos=True, stop=[stop]), timeout=30)
            self.assertEqual(cut.text, full.text[:full.text.index(stop)])
            self.assertEqual(cut.stop, stop)
            self.assertEqual(cut.finish_reason, pb.FINISH_REASON_STOP)
        chat = s.Generate(pb.GenerateRequest(model="text", chat=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="Hi")]), max_tokens=4, temperature=0), timeout=30)
        self.assertGreater(chat.usage.prompt_tokens, 10)  # the template's header and system block

    def test_cancel_mid_stream_aborts_and_frees_the_blocks(self):
        # The text model (vocab 128256) takes a while for 480 tokens: the cancel lands mid-generation.
        worker = CLUSTER.workers["text"]["metrics_address"]
        finished = lambda reason: cl.metric(cl.scrape(worker), "shardserve_worker_requests_finished_total",
                                             finish_reason=reason)
        cancelled = lambda: cl.metric(cl.scrape(CLUSTER.metrics_address), "shardserve_requests_total",
                                      status="cancelled")
        before = (finished("abort"), finished("length"), cancelled())
        call = stub().GenerateStream(pb.GenerateRequest(model="text", text="Once upon a time", max_tokens=480,
                                                        temperature=0, ignore_eos=True), timeout=60)
        next(call)
        call.cancel()
        self.assertTrue(all_blocks_free(), "KV blocks still in use after the cancel")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (finished("abort") == before[0] or cancelled() == before[2]):
            time.sleep(0.05)  # the counters move when the abort reaches the engine
        self.assertEqual(finished("abort"), before[0] + 1, "the worker did not abort the request")
        self.assertEqual(finished("length"), before[1], "the request ran to the end instead")
        self.assertEqual(cancelled(), before[2] + 1)

    def test_list_models_health_and_reflection(self):
        models = {m.name: m for m in stub().ListModels(pb.ListModelsRequest(), timeout=10).models}
        self.assertEqual(models["tiny"].num_groups, 2)
        self.assertEqual(models["tiny"].num_healthy_groups, 2)
        self.assertEqual(models["tiny"].vocab_size, 512)
        self.assertFalse(models["tiny"].has_tokenizer)
        self.assertTrue(models["text"].has_tokenizer)
        self.assertEqual(health_status(), 1)
        # grpc.reflection.v1alpha: ListServices (field 7 of the request) names our service.
        info = grpc.insecure_channel(CLUSTER.address).stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        replies = list(info(iter([b"\x3a\x00"]), timeout=10))
        self.assertIn(b"shardserve.v1.Generation", replies[0])

    def test_a_second_server_on_a_taken_port_exits_saying_so(self):
        """gRPC lets servers share a port (SO_REUSEPORT) unless told not to; shared, a worker's
        Register could reach another process and fail with UNIMPLEMENTED. Ours refuse the port."""
        coordinator = cl.run([os.path.join(cl.BIN_DIR, "shardserve-coordinator"), "--config", CLUSTER.config,
                              "--host", "127.0.0.1", "--port", str(CLUSTER.port), "--metrics-port", "0"])
        self.assertNotEqual(coordinator.returncode, 0)
        self.assertIn("in use", coordinator.stderr + coordinator.stdout)
        worker = cl.run([os.path.join(cl.BIN_DIR, "shardserve-worker"), "--coordinator", CLUSTER.address,
                         "--group", "single", "--host", "127.0.0.1", "--port", str(CLUSTER.port),
                         "--metrics-port", "-1"])
        self.assertNotEqual(worker.returncode, 0)
        self.assertIn("in use", worker.stderr + worker.stdout)
        self.assertEqual(health_status(), 1)


class BadInput(unittest.TestCase):
    """Each bad request gets its status and a message naming the problem; nothing leaks."""

    def expect(self, code, words, **fields):
        with self.assertRaises(grpc.RpcError) as e:
            stub().Generate(pb.GenerateRequest(**fields), timeout=30)
        self.assertEqual(e.exception.code(), code, e.exception.details())
        for w in words:
            self.assertIn(w, e.exception.details())

    def expect_invalid(self, words, **fields):
        fields.setdefault("model", "tiny")
        self.expect(grpc.StatusCode.INVALID_ARGUMENT, words, **fields)

    def tearDown(self):
        self.assertEqual(health_status(), 1)
        self.assertTrue(all_blocks_free())

    def ids(self, ids):
        return pb.TokenIds(ids=ids)

    def test_unknown_model(self):
        self.expect(grpc.StatusCode.NOT_FOUND, ["nope", "tiny"], model="nope", prompt_token_ids=self.ids([1, 2]))

    def test_empty_prompt(self):
        self.expect_invalid(["empty"], prompt_token_ids=self.ids([]))
        self.expect_invalid(["empty"], model="text", text="")
        self.expect_invalid(["no prompt"])

    def test_prompt_over_the_model_length(self):
        self.expect_invalid(["300", "256"], prompt_token_ids=self.ids([5] * 300), max_tokens=1)

    def test_invalid_sampling_values(self):
        p = self.ids([1, 2, 3])
        self.expect_invalid(["temperature"], prompt_token_ids=p, temperature=-1)
        self.expect_invalid(["top_p"], prompt_token_ids=p, top_p=0)
        self.expect_invalid(["top_k"], prompt_token_ids=p, top_k=-5)
        self.expect_invalid(["min_p"], prompt_token_ids=p, min_p=1.5)
        self.expect_invalid(["presence_penalty"], prompt_token_ids=p, presence_penalty=3)
        self.expect_invalid(["frequency_penalty"], prompt_token_ids=p, frequency_penalty=-2.5)
        self.expect_invalid(["repetition_penalty"], prompt_token_ids=p, repetition_penalty=0)
        self.expect_invalid(["logprobs"], prompt_token_ids=p, logprobs=21)
        self.expect_invalid(["max_tokens"], prompt_token_ids=p, max_tokens=0)
        self.expect_invalid(["stop_token_ids"], prompt_token_ids=p, stop_token_ids=[600])
        self.expect_invalid(["stop"], model="text", text="hi", stop=[""])

    def test_invalid_utf8(self):
        # Python's protobuf will not put invalid UTF-8 in a string field; write the bytes by hand:
        # field 1 (model) = "text", field 2 (text) = b"ab\xff".
        raw = b"\x0a\x04text" + b"\x12\x03ab\xff"
        call = grpc.insecure_channel(CLUSTER.address).unary_unary("/shardserve.v1.Generation/Generate")
        with self.assertRaises(grpc.RpcError) as e:
            call(raw, timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, e.exception.details())
        self.assertIn("UTF-8", e.exception.details())

    def test_token_ids_outside_the_vocab(self):
        self.expect_invalid(["512", "vocabulary"], prompt_token_ids=self.ids([1, 512]))
        self.expect_invalid(["-1", "vocabulary"], prompt_token_ids=self.ids([-1]))

    def test_absurd_max_tokens(self):
        self.expect_invalid(["max_tokens"], prompt_token_ids=self.ids([1, 2]), max_tokens=10**15)
        self.expect_invalid(["max_tokens", "256"], prompt_token_ids=self.ids([1, 2]), max_tokens=10**6)

    def test_oversized_message(self):
        self.expect_invalid(["bytes", "limit"], model="text", text="a" * (2 << 20))

    def test_text_without_tokenizer_is_failed_precondition(self):
        self.expect(grpc.StatusCode.FAILED_PRECONDITION, ["tokenizer", "prompt_token_ids"], model="tiny", text="hi")


class Prometheus(unittest.TestCase):
    def test_real_prometheus_scrapes_and_promtool_accepts(self):
        prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
        self.assertTrue(prometheus and promtool, "install Debian's prometheus (scripts/setup.sh does)")
        stub().Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=4),
                        timeout=30)
        targets = [CLUSTER.metrics_address] + [w["metrics_address"] for w in CLUSTER.workers.values()]
        for t in targets:
            check = subprocess.run([promtool, "check", "metrics"], input=cl.scrape(t), capture_output=True,
                                   text=True, timeout=30)
            self.assertEqual(check.returncode, 0, f"{t}: {check.stdout}{check.stderr}")
        d = tempfile.mkdtemp(prefix="shardserve-prom-")
        port = cl.free_port()
        with open(os.path.join(d, "prometheus.yml"), "w") as f:
            f.write("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: shardserve\n"
                    f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
        proc = subprocess.Popen([prometheus, f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            up = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with cl.urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=5) as r:
                        result = json.load(r)["data"]["result"]
                    up = {s["metric"]["instance"]: s["value"][1] for s in result}
                    if len(up) == len(targets) and all(v == "1" for v in up.values()):
                        break
                except OSError:
                    pass
                time.sleep(0.2)  # waiting for Prometheus' first scrape of every target
            self.assertEqual(up, {t: "1" for t in targets})
            with cl.urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/query?query=shardserve_requests_total", timeout=5) as r:
                self.assertTrue(json.load(r)["data"]["result"])
        finally:
            proc.kill()
            proc.wait()
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
