#!/usr/bin/python3
"""Failure of a worker group, end to end: two single-rank groups serve one model; one worker is
killed (SIGKILL) while requests stream from both. Its in-flight requests must end UNAVAILABLE
within seconds, the other group's requests must finish correctly, and new requests must go to the
surviving group. Also: drain on SIGTERM lets an in-flight request finish.

To hold requests in flight deterministically, both workers are paused (SIGSTOP) once every stream
has its first token. The model is the tiny one with the Llama 3.1 vocabulary (128256 rows of lm_head
per token): slow enough on the CPU backend that streams are still running when the pause lands.
"""
import os
import signal
import threading
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
MAX_TOKENS = 300
PROMPT = [128000, 791, 6864, 315, 9822, 374]
MAX_IN_FLIGHT = 8


def reference(ids):
    out = cl.run([os.path.join(cl.BIN_DIR, "shardserve"), "generate", "--model", cl.TINY_TEXT, "--prompt-ids",
                  ",".join(map(str, ids)), "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--output", "json"])
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout)["token_ids"]


class Failover(unittest.TestCase):
    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY_TEXT, None)},
                                  groups=[{"name": "a", "model": "tiny", "num_kv_blocks": 256},
                                          {"name": "b", "model": "tiny", "num_kv_blocks": 256}],
                                  coordinator_args=["--max-in-flight", str(MAX_IN_FLIGHT)]).start()
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))

    def tearDown(self):
        for g in ("a", "b"):  # never leave a paused process behind
            try:
                os.kill(self.cluster.worker_pid(g), signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.cluster.stop()

    def wait_healthy(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            models = self.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
            if models[0].num_healthy_groups == n:
                return True
            time.sleep(0.05)  # polling the coordinator's view of its groups
        return False

    def test_killed_group_fails_its_requests_fast_and_new_ones_go_elsewhere(self):
        prompt = PROMPT
        want = reference(prompt)
        n = 8
        first = [threading.Event() for _ in range(n)]
        results = [None] * n  # (status code, tokens, time it ended)
        group = [None] * n  # the group that served it (initial metadata)

        def stream(i):
            tokens = []
            req = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                                     temperature=0, ignore_eos=True)
            try:
                call = self.stub.GenerateStream(req, timeout=60)
                for d in call:
                    tokens += d.token_ids
                    if not first[i].is_set():
                        group[i] = dict(call.initial_metadata())["shardserve-group"].split("/")[0]
                        first[i].set()
                results[i] = (grpc.StatusCode.OK, tokens, time.monotonic())
            except grpc.RpcError as e:
                results[i] = (e.code(), tokens, time.monotonic())
            first[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for e in first:
            self.assertTrue(e.wait(30))
        for g in ("a", "b"):
            os.kill(self.cluster.worker_pid(g), signal.SIGSTOP)
        running = [i for i in range(n) if results[i] is None]
        self.assertGreaterEqual(len(running), 2, "the streams finished before the workers were paused")

        on_a = [i for i in running if group[i] == "a"]
        on_b = [i for i in running if group[i] == "b"]
        self.assertTrue(on_a and on_b, f"routing did not spread the requests: {group}")
        os.kill(self.cluster.worker_pid("a"), signal.SIGKILL)
        killed_at = time.monotonic()
        unavailable = 0
        for i in on_a:
            threads[i].join(timeout=10)
            self.assertIsNotNone(results[i], "a request of the killed group is still open")
            code, tokens, ended = results[i]
            if code == grpc.StatusCode.OK:  # its last tokens were on the wire before the pause
                self.assertEqual(tokens, want)
                continue
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
            self.assertGreater(len(tokens), 0)
            self.assertLess(ended - killed_at, 5.0)
            unavailable += 1
        self.assertGreater(unavailable, 0)
        survivors = on_b
        os.kill(self.cluster.worker_pid("b"), signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
        for i in survivors:
            code, tokens, _ = results[i]
            self.assertEqual(code, grpc.StatusCode.OK)
            self.assertEqual(tokens, want)
        # b's health checks timed out while it was paused: wait until it is serving again.
        self.assertTrue(self.wait_healthy(1), "group b did not come back")
        # New requests all go to b.
        for _ in range(6):
            r = self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt),
                                                      max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                                   timeout=30)
            self.assertEqual(list(r.token_ids), want)
        text = cl.scrape(self.cluster.metrics_address)
        self.assertEqual(cl.metric(text, "shardserve_group_healthy", group="a"), 0)
        self.assertEqual(cl.metric(text, "shardserve_group_healthy", group="b"), 1)

    def test_sigterm_drains_in_flight_requests(self):
        prompt = PROMPT
        want = reference(prompt)
        got = {}
        started = threading.Event()

        def stream():
            tokens = []
            try:
                for d in self.stub.GenerateStream(pb.GenerateRequest(
                        model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt), max_tokens=MAX_TOKENS,
                        temperature=0, ignore_eos=True), timeout=60):
                    tokens += d.token_ids
                    started.set()
                got["result"] = (grpc.StatusCode.OK, tokens)
            except grpc.RpcError as e:
                got["result"] = (e.code(), tokens)
            started.set()

        t = threading.Thread(target=stream)
        t.start()
        self.assertTrue(started.wait(30))
        for g in ("a", "b"):
            os.kill(self.cluster.worker_pid(g), signal.SIGSTOP)
        if "result" in got:
            self.skipTest("the request finished before the workers were paused")
        coordinator = self.cluster.procs["coordinator"]
        coordinator.send_signal(signal.SIGTERM)
        # Draining: health says NOT_SERVING and new requests are refused...
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                reply = grpc.insecure_channel(self.cluster.address).unary_unary("/grpc.health.v1.Health/Check")(
                    b"", timeout=2)
                status = reply[1] if len(reply) == 2 else 0
            except grpc.RpcError:
                status = None
            if status == 2:  # NOT_SERVING
                break
            time.sleep(0.02)
        self.assertEqual(status, 2)
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt)), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        # ...while the request in flight completes once its worker runs again.
        for g in ("a", "b"):
            os.kill(self.cluster.worker_pid(g), signal.SIGCONT)
        t.join(timeout=60)
        self.assertEqual(got["result"], (grpc.StatusCode.OK, want))
        self.assertEqual(coordinator.wait(timeout=15), 0)

    def test_back_pressure_past_max_in_flight(self):
        prompt = PROMPT
        want = reference(prompt)
        for g in ("a", "b"):  # hold every request in flight
            os.kill(self.cluster.worker_pid(g), signal.SIGSTOP)
        results = [None] * MAX_IN_FLIGHT

        def stream(i):
            try:
                r = self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt),
                                                          max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                                       timeout=60)
                results[i] = list(r.token_ids)
            except grpc.RpcError as e:
                results[i] = e.code()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(MAX_IN_FLIGHT)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if cl.metric(cl.scrape(self.cluster.metrics_address), "shardserve_requests_in_flight") == MAX_IN_FLIGHT:
                break
            time.sleep(0.02)  # polling the coordinator's gauge
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=prompt)), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("max-in-flight", e.exception.details())
        for g in ("a", "b"):
            os.kill(self.cluster.worker_pid(g), signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
        self.assertEqual(results, [want] * MAX_IN_FLIGHT)


class Retry(unittest.TestCase):
    """A replica that died before a request's first token: the request moves to another one.

    Health checks are slowed to once a minute, so that only the requests themselves can find out
    that group a is gone."""

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY, None)},
                                  groups=[{"name": "a", "model": "tiny", "num_kv_blocks": 64},
                                          {"name": "b", "model": "tiny", "num_kv_blocks": 64}],
                                  health_interval_ms=60000).start()
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))

    def tearDown(self):
        self.cluster.stop()

    def test_request_is_retried_on_another_group_before_its_first_token(self):
        metrics = self.cluster.metrics_address
        self.assertEqual(cl.metric(cl.scrape(metrics), "shardserve_request_retries_total"), 0)
        os.kill(self.cluster.worker_pid("a"), signal.SIGKILL)
        self.cluster.procs["worker-a"].wait(timeout=10)
        # Idle replicas take turns, so among these requests some are first sent to the dead a.
        for _ in range(4):
            r = self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                                      max_tokens=8, temperature=0), timeout=30)
            self.assertEqual(len(r.token_ids) > 0, True)
        text = cl.scrape(metrics)
        self.assertGreaterEqual(cl.metric(text, "shardserve_request_retries_total"), 1)
        self.assertEqual(cl.metric(text, "shardserve_requests_total", status="ok"), 4)
        self.assertEqual(cl.metric(text, "shardserve_group_healthy", group="a"), 0)


if __name__ == "__main__":
    unittest.main()
