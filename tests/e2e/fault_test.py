#!/usr/bin/python3
"""Faults, end to end, each against a real cluster (coordinator + CPU workers) on loopback:

- a worker killed with SIGKILL mid-stream: its requests end UNAVAILABLE, the other group's finish,
  and the worker, started again, registers by itself and takes traffic (before the coordinator's
  dead_after would have freed its slot);
- the coordinator killed with SIGKILL and started again on the same port: the streams it carried
  end UNAVAILABLE, their workers free the KV blocks, the workers (not restarted) register with the
  new coordinator by themselves, and new requests succeed;
- a client that opens streams and never reads them (a raw HTTP/2 client that grants a 1 KiB
  window and never reads its socket): the coordinator reads only a few messages ahead of what the
  client accepted (gRPC flow control is its only buffer), its memory does not grow, and the
  client's deadline ends the requests, DEADLINE_EXCEEDED, their worker-side resources freed;
- a storm of requests far past --max-in-flight: every one ends OK or RESOURCE_EXHAUSTED, nothing
  crashes, and the server serves normally afterwards.

(failover_test.py covers the rest of a dying group: retries before the first token, drain.)
"""
import asyncio
import os
import signal
import socket
import struct
import threading
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
PROMPT = [128000, 791, 6864, 315, 9822, 374]
HEALTH_SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}


def reference(ids, max_tokens):
    import json
    out = cl.run([os.path.join(cl.BIN_DIR, "shardserve"), "generate", "--model", cl.TINY_TEXT, "--prompt-ids",
                  ",".join(map(str, ids)), "--max-tokens", str(max_tokens), "--ignore-eos", "--output", "json"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["token_ids"]


def health(address):
    try:
        return grpc.insecure_channel(address).unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
    except grpc.RpcError as e:
        return e.code()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)  # polling a process's observable state
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class StreamThread(threading.Thread):
    """One GenerateStream call on a thread: `first` is set at its first token; result is
    (status code, tokens, group that served it) once it ended."""

    def __init__(self, stub, max_tokens):
        super().__init__()
        self.stub, self.max_tokens = stub, max_tokens
        self.first = threading.Event()
        self.group = None
        self.result = None

    def run(self):
        tokens = []
        try:
            call = self.stub.GenerateStream(pb.GenerateRequest(
                model="tiny", prompt_token_ids=pb.TokenIds(ids=PROMPT), max_tokens=self.max_tokens, temperature=0,
                ignore_eos=True), timeout=120)
            for d in call:
                tokens += d.token_ids
                if not self.first.is_set():
                    self.group = dict(call.initial_metadata())["shardserve-group"].split("/")[0]
                    self.first.set()
            self.result = (grpc.StatusCode.OK, tokens)
        except grpc.RpcError as e:
            self.result = (e.code(), tokens)
        self.first.set()


class WorkerKilled(unittest.TestCase):
    """Two groups of one model. dead_after is a minute: the restarted worker must get its slot
    back long before the coordinator would give up on the dead one."""

    MAX_TOKENS = 300  # the 128256-row lm_head of this model makes streams slow enough to catch

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY_TEXT, None)},
                                  groups=[{"name": "a", "model": "tiny", "num_kv_blocks": 256},
                                          {"name": "b", "model": "tiny", "num_kv_blocks": 256}],
                                  coordinator_args=["--dead-after-ms", "60000"]).start()
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))

    def tearDown(self):
        for g in ("a", "b"):  # never leave a paused process behind
            try:
                os.kill(self.cluster.worker_pid(g), signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.cluster.stop()

    def healthy_groups(self):
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=5).models[0].num_healthy_groups

    def test_kill_mid_stream_then_restart_registers_again(self):
        want = reference(PROMPT, self.MAX_TOKENS)
        streams = [StreamThread(self.stub, self.MAX_TOKENS) for _ in range(6)]
        for s in streams:
            s.start()
        for s in streams:
            self.assertTrue(s.first.wait(30))
        # Both workers paused once every stream has tokens, so that they are all still in flight
        # when a is killed; b resumes right after.
        for g in ("a", "b"):
            os.kill(self.cluster.worker_pid(g), signal.SIGSTOP)
        running = [s for s in streams if s.result is None]
        on_a = [s for s in running if s.group == "a"]
        on_b = [s for s in running if s.group == "b"]
        self.assertTrue(on_a and on_b, f"routing did not spread the streams: {[s.group for s in streams]}")
        os.kill(self.cluster.worker_pid("a"), signal.SIGKILL)
        self.cluster.procs["worker-a"].wait(timeout=10)
        os.kill(self.cluster.worker_pid("b"), signal.SIGCONT)
        for s in on_a:
            s.join(timeout=10)
            code, tokens = s.result
            if code != grpc.StatusCode.OK:  # OK only if its last tokens were on the wire before the pause
                self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
                self.assertGreater(len(tokens), 0)
        self.assertTrue(any(s.result[0] == grpc.StatusCode.UNAVAILABLE for s in on_a))
        for s in on_b:
            s.join(timeout=60)
            self.assertEqual(s.result, (grpc.StatusCode.OK, want))

        # Started again: it registers by itself, its slot is still marked unhealthy (dead_after
        # is far off), and it takes traffic again.
        restarted_at = time.monotonic()
        self.cluster.start_worker("a")

        def serving():
            if self.cluster.procs["worker-a"].poll() is not None:
                raise AssertionError(f"the restarted worker exited\n{self.cluster.logs()}")
            return self.healthy_groups() == 2
        wait_for(serving, 30, "the restarted worker to serve")
        print(f"worker restart: serving again {time.monotonic() - restarted_at:.1f} s after it was started", flush=True)
        served_by = set()
        for _ in range(6):
            call = self.stub.Generate.with_call(pb.GenerateRequest(
                model="tiny", prompt_token_ids=pb.TokenIds(ids=PROMPT), max_tokens=8, temperature=0, ignore_eos=True),
                timeout=30)
            self.assertEqual(list(call[0].token_ids), want[:8])
            served_by.add(dict(call[1].initial_metadata())["shardserve-group"].split("/")[0])
        self.assertEqual(served_by, {"a", "b"})
        text = cl.scrape(self.cluster.metrics_address)
        self.assertEqual(cl.metric(text, "shardserve_group_healthy", group="a"), 1)


class CoordinatorRestarted(unittest.TestCase):
    MAX_TOKENS = 300

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY_TEXT, None)},
                                  groups=[{"name": "g", "model": "tiny", "num_kv_blocks": 256}]).start()

    def tearDown(self):
        self.cluster.stop()

    def test_workers_register_again_and_traffic_resumes(self):
        want = reference(PROMPT, 16)
        worker = self.cluster.procs["worker-g"]
        worker_metrics = self.cluster.workers["g"]["metrics_address"]
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        stream = StreamThread(stub, self.MAX_TOKENS)
        stream.start()
        self.assertTrue(stream.first.wait(30))

        restarted_at = time.monotonic()
        self.cluster.restart_coordinator(signal.SIGKILL)  # returns once every group serves again
        took = time.monotonic() - restarted_at
        print(f"coordinator restart: every group serving again {took:.1f} s after the kill", flush=True)
        stream.join(timeout=10)
        self.assertEqual(stream.result[0], grpc.StatusCode.UNAVAILABLE)
        self.assertLess(len(stream.result[1]), self.MAX_TOKENS)
        # The worker noticed its caller was gone and freed the request.
        self.assertIsNone(worker.poll())
        self.assertIs(self.cluster.procs["worker-g"], worker, "the worker must not have been restarted")
        wait_for(lambda: cl.metric(cl.scrape(worker_metrics), "shardserve_worker_requests_finished_total",
                                   finish_reason="abort") == 1, 10, "the worker to abort the orphaned request")
        text = cl.scrape(worker_metrics)
        self.assertEqual(cl.metric(text, "shardserve_worker_requests_in_flight"), 0)
        self.assertLess(took, 20, "the workers took too long to register with the new coordinator")

        stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        r = stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=PROMPT), max_tokens=16,
                                             temperature=0, ignore_eos=True), timeout=30)
        self.assertEqual(list(r.token_ids), want)
        self.assertEqual(health(self.cluster.address), HEALTH_SERVING)


# ---- a raw HTTP/2 client: gRPC framing by hand, so that nothing reads on the client's behalf ----

def h2_frame(kind, flags, stream_id, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def hpack_literal(name, value):
    """A header as 'literal without indexing, new name' (RFC 7541 6.2.2), no Huffman coding."""
    def string(s):
        b = s.encode()
        assert len(b) < 127
        return bytes([len(b)]) + b
    return b"\x00" + string(name) + string(value)


class NeverReadingClient:
    """One HTTP/2 connection that announces a `window`-byte stream window, acknowledges the
    server's settings, sends its requests, and never reads from its socket again (whose receive
    buffer is kept small, so that the kernel does not read for it either)."""

    def __init__(self, port, window):
        self.port = port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        settings = struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, window)  # ENABLE_PUSH 0, INITIAL_WINDOW_SIZE
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, settings))
        while True:  # up to the server's SETTINGS, which we acknowledge
            kind, flags, _ = self._read_frame()
            if kind == 4 and not flags & 1:
                self.sock.sendall(h2_frame(4, 1, 0))
                break
        self.next_stream = 1

    def _read_frame(self):
        def exactly(n):
            data = b""
            while len(data) < n:
                chunk = self.sock.recv(n - len(data))
                if not chunk:
                    raise EOFError("the server closed the connection")
                data += chunk
            return data
        head = exactly(9)
        body = exactly(int.from_bytes(head[:3], "big"))
        return head[3], head[4], body

    def generate_stream(self, request, timeout_s=None):
        """timeout_s None: no deadline at all (no grpc-timeout header)."""
        message = request.SerializeToString()
        headers = b"".join(hpack_literal(k, v) for k, v in [
            (":method", "POST"), (":scheme", "http"), (":path", "/shardserve.v1.Generation/GenerateStream"),
            (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"), ("te", "trailers")]
            + ([("grpc-timeout", f"{timeout_s}S")] if timeout_s is not None else []))
        sid = self.next_stream
        self.next_stream += 2
        self.sock.sendall(h2_frame(1, 0x4, sid, headers)  # END_HEADERS
                          + h2_frame(0, 0x1, sid, b"\x00" + struct.pack(">I", len(message)) + message))  # END_STREAM

    def close(self):
        self.sock.close()


class SlowClient(unittest.TestCase):
    CONNECTIONS, STREAMS_PER_CONNECTION = 4, 4
    MAX_TOKENS = 240  # the model's context is 256
    DEADLINE_S = 6

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY, None)},
                                  groups=[{"name": "g", "model": "tiny", "num_kv_blocks": 512}]).start()

    def tearDown(self):
        self.cluster.stop()

    def test_never_reading_streams_are_bounded_and_end_at_their_deadline(self):
        coordinator = self.cluster.procs["coordinator"].pid
        metrics = self.cluster.metrics_address
        n = self.CONNECTIONS * self.STREAMS_PER_CONNECTION
        # logprobs make each message ~250 bytes: 240 of them are ~60 KB a stream, against the
        # 1 KiB window the client grants.
        request = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     max_tokens=self.MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=20)
        clients = [NeverReadingClient(self.cluster.port, window=1024) for _ in range(self.CONNECTIONS)]
        try:
            started = time.monotonic()
            for c in clients:
                for _ in range(self.STREAMS_PER_CONNECTION):
                    c.generate_stream(request, self.DEADLINE_S)
            wait_for(lambda: cl.metric(cl.scrape(metrics), "shardserve_requests_in_flight") == n, 5,
                     "every stream to be in flight")
            # The worker generates all 240 tokens of each stream in well under a second; the
            # coordinator must read from it only as far as its client accepts.
            samples = []
            while time.monotonic() - started < self.DEADLINE_S - 1.5:
                text = cl.scrape(metrics)
                samples.append((cl.metric(text, "shardserve_generation_tokens_total"),
                                cl.vm_kib(coordinator, "VmRSS")))
                time.sleep(0.25)  # sampling the coordinator while the streams are stalled
            read, rss = zip(*samples[len(samples) // 3:])
            print(f"slow clients: {n} streams of {self.MAX_TOKENS} tokens; the coordinator read {max(read) / n:.1f} "
                  f"messages a stream from the worker; its RSS {min(rss)}-{max(rss)} KiB while stalled", flush=True)
            # Read ahead: the 1 KiB window holds ~4 messages, and one more waits in the handler.
            self.assertLessEqual(max(read), n * 8, "the coordinator reads the worker's output ahead of its client")
            self.assertEqual(read[0], read[-1], "the coordinator kept reading while its client read nothing")
            self.assertLess(max(rss) - min(rss), 4096, f"the coordinator's memory grew while stalled: {rss} KiB")

            wait_for(lambda: cl.metric(cl.scrape(metrics), "shardserve_requests_in_flight") == 0,
                     self.DEADLINE_S + 5 - (time.monotonic() - started), "the deadline to end the streams")
            self.assertGreaterEqual(time.monotonic() - started, self.DEADLINE_S - 0.5)
            text = cl.scrape(metrics)
            self.assertEqual(cl.metric(text, "shardserve_requests_total", status="deadline_exceeded"), n)
        finally:
            for c in clients:
                c.close()
        # The worker's side is over too: nothing in flight, every KV block free (or cached).
        worker_metrics = self.cluster.workers["g"]["metrics_address"]
        wait_for(lambda: cl.metric(cl.scrape(worker_metrics), "shardserve_worker_requests_in_flight") == 0, 5,
                 "the worker to end the requests")
        text = cl.scrape(worker_metrics)
        self.assertEqual(cl.metric(text, "shardserve_kv_cache_free_blocks"),
                         cl.metric(text, "shardserve_kv_cache_blocks"))
        # And a client that reads is served as usual.
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        self.assertEqual(len(stub.Generate(request, timeout=30).token_ids), self.MAX_TOKENS)


class StalledClient(unittest.TestCase):
    """A client that sets no deadline and stops reading: the coordinator's --stream-stall-timeout-ms
    ends its streams (cancelled), frees their slots and the worker's KV blocks, and serves others."""
    STALL_MS = 2000
    STREAMS = 6

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY, None)},
                                  groups=[{"name": "g", "model": "tiny", "num_kv_blocks": 512}],
                                  coordinator_args=["--stream-stall-timeout-ms", str(self.STALL_MS)]).start()

    def tearDown(self):
        self.cluster.stop()

    def test_a_stream_nobody_reads_is_cancelled_after_the_stall_timeout(self):
        metrics = self.cluster.metrics_address
        request = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=240,
                                     temperature=0, ignore_eos=True, logprobs=20)
        client = NeverReadingClient(self.cluster.port, window=1024)
        try:
            started = time.monotonic()
            for _ in range(self.STREAMS):
                client.generate_stream(request)  # no deadline
            wait_for(lambda: cl.metric(cl.scrape(metrics), "shardserve_requests_in_flight") == self.STREAMS, 5,
                     "every stream to be in flight")
            # Stalled at once (the 1 KiB window fills within a few messages), then cancelled after
            # the limit, within the guard's check period (a quarter of the limit here).
            wait_for(lambda: cl.metric(cl.scrape(metrics), "shardserve_requests_in_flight") == 0,
                     self.STALL_MS / 1000 + 5, "the stall timeout to end the streams")
            took = time.monotonic() - started
            self.assertGreaterEqual(took, self.STALL_MS / 1000 - 0.2, "ended before the stall timeout")
            print(f"stalled client: {self.STREAMS} streams without a deadline ended after {took:.1f} s "
                  f"(--stream-stall-timeout-ms {self.STALL_MS})", flush=True)
            self.assertEqual(cl.metric(cl.scrape(metrics), "shardserve_requests_total", status="cancelled"),
                             self.STREAMS)
            self.assertIn("has taken no message for", self.cluster.logs())
        finally:
            client.close()
        worker_metrics = self.cluster.workers["g"]["metrics_address"]
        wait_for(lambda: cl.metric(cl.scrape(worker_metrics), "shardserve_worker_requests_in_flight") == 0, 5,
                 "the worker to end the requests")
        # A client that reads is served as usual, however long it takes.
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        self.assertEqual(len(stub.Generate(request, timeout=30).token_ids), 240)


class Storm(unittest.TestCase):
    MAX_IN_FLIGHT = 16
    REQUESTS = 2000

    def setUp(self):
        self.cluster = cl.Cluster(models={"tiny": (cl.TINY, None)},
                                  groups=[{"name": "g", "model": "tiny", "num_kv_blocks": 256}],
                                  coordinator_args=["--max-in-flight", str(self.MAX_IN_FLIGHT)]).start()

    def tearDown(self):
        self.cluster.stop()

    async def storm(self):
        async with grpc.aio.insecure_channel(self.cluster.address) as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def one(i):
                try:
                    r = await stub.Generate(pb.GenerateRequest(
                        model="tiny", prompt_token_ids=pb.TokenIds(ids=[1 + i % 500, 2, 3]), max_tokens=16,
                        temperature=0, ignore_eos=True), timeout=60)
                    return grpc.StatusCode.OK, len(r.token_ids)
                except grpc.RpcError as e:
                    return e.code(), e.details()

            return await asyncio.gather(*[one(i) for i in range(self.REQUESTS)])

    def test_storm_past_max_in_flight_gets_resource_exhausted_and_no_crash(self):
        coordinator = self.cluster.procs["coordinator"]
        started = time.monotonic()
        results = asyncio.run(self.storm())
        took = time.monotonic() - started
        ok = [r for r in results if r[0] == grpc.StatusCode.OK]
        refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        print(f"storm: {self.REQUESTS} requests in {took:.1f} s against --max-in-flight {self.MAX_IN_FLIGHT}: "
              f"{len(ok)} OK, {len(refused)} RESOURCE_EXHAUSTED; coordinator peak RSS "
              f"{cl.vm_kib(coordinator.pid, 'VmHWM') / 1024:.0f} MiB", flush=True)
        self.assertEqual(len(ok) + len(refused), self.REQUESTS,
                         f"other outcomes: {[r for r in results if r not in ok and r not in refused][:5]}")
        self.assertTrue(all(n == 16 for _, n in ok))
        self.assertGreaterEqual(len(ok), self.MAX_IN_FLIGHT)
        self.assertGreater(len(refused), self.REQUESTS // 4)  # most: 2,000 arrive within a second or two
        self.assertTrue(all("--max-in-flight" in details for _, details in refused))

        for name, p in self.cluster.procs.items():
            self.assertIsNone(p.poll(), f"{name} exited")
        self.assertEqual(health(self.cluster.address), HEALTH_SERVING)
        text = cl.scrape(self.cluster.metrics_address)
        self.assertEqual(cl.metric(text, "shardserve_requests_total", status="resource_exhausted"), len(refused))
        self.assertEqual(cl.metric(text, "shardserve_requests_in_flight"), 0)
        self.assertLess(cl.vm_kib(coordinator.pid, "VmHWM"), 256 * 1024)
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        r = stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=16,
                                             temperature=0, ignore_eos=True), timeout=30)
        self.assertEqual(len(r.token_ids), 16)


if __name__ == "__main__":
    unittest.main()
