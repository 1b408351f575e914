#!/usr/bin/python3
"""End-to-end: a whole cluster on synthetic weights, as the serving benchmarks run one on a GPU
machine (`shardserve serve --synthetic llama-3.1-70b --backend cuda`, then `shardserve bench`),
here with the shape of the tiny checkpoint's config.json on the CPU.

What it holds the path to:
- the served model answers token-id requests with exactly the tokens `shardserve generate
  --synthetic` (same shape, same seed: the same weights) gives in-process;
- text requests are refused with FAILED_PRECONDITION (no tokenizer), and the server stays healthy;
- `shardserve bench` against it completes with zero errors;
- a worker killed while serving (as a failed GPU step ends one) is started again by `serve`, and
  the model answers again with the same tokens;
- a cluster config that names both a checkpoint and synthetic weights is refused at start-up.
"""
import json
import os
import signal
import subprocess
import tempfile
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
SHARDSERVE = os.path.join(cl.BIN_DIR, "shardserve")
CONFIG = os.path.join(cl.TINY, "config.json")
NAME = "synthetic-tiny"
PROC = None
ADDRESS = None
LOG = None


def printed():
    with open(LOG.name) as f:
        return f.read()


def setUpModule():
    global PROC, ADDRESS, LOG
    port = cl.free_port()
    ADDRESS = f"127.0.0.1:{port}"
    LOG = tempfile.NamedTemporaryFile("w+", prefix="shardserve-synthetic-", suffix=".log")
    PROC = subprocess.Popen([SHARDSERVE, "serve", "--synthetic", CONFIG, "--served-model-name", NAME,
                             "--port", str(port), "--num-kv-blocks", "128", "--shutdown-timeout", "5"],
                            stdout=LOG, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "serving model" not in printed() and PROC.poll() is None:
        time.sleep(0.1)  # waiting for the server's "serving model" line
    if "serving model" not in printed():
        raise RuntimeError(f"shardserve serve --synthetic did not start:\n{printed()}")


def tearDownModule():
    if PROC:
        PROC.send_signal(signal.SIGTERM)
        try:
            PROC.wait(timeout=30)
        except subprocess.TimeoutExpired:
            PROC.kill()
            PROC.wait()
    if LOG:
        LOG.close()


def reference(prompts, max_tokens):
    """`shardserve generate --synthetic` on the same prompts, greedy, in one process."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in prompts:
            f.write(json.dumps({"prompt_ids": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}) + "\n")
    out = cl.run([SHARDSERVE, "generate", "--synthetic", CONFIG, "--prompts-jsonl", f.name, "--output", "json"])
    os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["token_ids"] for line in out.stdout.splitlines()]


class Synthetic(unittest.TestCase):
    def test_serves_the_tokens_of_generate_synthetic(self):
        prompts = [[5, 17, 99, 3], [120, 7, 33, 33, 81, 2, 44, 90, 100, 11, 12, 13, 127]]
        want = reference(prompts, 12)
        self.assertEqual(len(want), 2)
        self.assertNotEqual(want[0], want[1])  # not a constant output: the weights are random, not zero
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(ADDRESS))
        for p, w in zip(prompts, want):
            got = stub.Generate(pb.GenerateRequest(model=NAME, prompt_token_ids=pb.TokenIds(ids=p), max_tokens=12,
                                                   temperature=0, ignore_eos=True), timeout=60)
            self.assertEqual(list(got.token_ids), w)
            self.assertEqual(got.usage.completion_tokens, 12)

    def test_text_is_refused_and_the_server_stays_up(self):
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(ADDRESS))
        with self.assertRaises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(model=NAME, text="hello", max_tokens=4), timeout=30)
        self.assertEqual(e.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("synthetic", e.exception.details())
        got = stub.Generate(pb.GenerateRequest(model=NAME, prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=3,
                                               ignore_eos=True), timeout=30)
        self.assertEqual(len(got.token_ids), 3)

    def test_bench_runs_against_it_without_errors(self):
        p = subprocess.run([SHARDSERVE, "bench", "--target", ADDRESS, "--model", NAME, "--concurrency", "4",
                            "--num-requests", "12", "--input-len", "16", "--output-len", "8", "--output", "json"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        report = json.loads(p.stdout)
        self.assertEqual(report["errors"], 0)
        self.assertEqual(report["completed"], 12)
        self.assertEqual(report["total_output_tokens"], 12 * 8)


def worker_children():
    """The pids of serve's shardserve-worker children (read from /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == PROC.pid and b"shardserve-worker" in cmd:
            pids.append(int(d))
    return pids


class Restart(unittest.TestCase):
    def test_serve_restarts_a_worker_that_dies(self):
        workers = worker_children()
        self.assertEqual(len(workers), 1, printed())
        want = reference([[9, 8, 7]], 6)[0]
        os.kill(workers[0], signal.SIGKILL)
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(ADDRESS))
        deadline = time.monotonic() + 120
        got = None
        while time.monotonic() < deadline:
            try:
                got = stub.Generate(pb.GenerateRequest(model=NAME, prompt_token_ids=pb.TokenIds(ids=[9, 8, 7]),
                                                       max_tokens=6, temperature=0, ignore_eos=True), timeout=30)
                if "restarting the worker group" in printed():
                    break
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
            time.sleep(0.2)  # the new worker is loading
        self.assertIn("restarting the worker group (1 of at most 5)", printed())
        self.assertIsNotNone(got)
        self.assertEqual(list(got.token_ids), want)
        self.assertIsNone(PROC.poll())  # serve itself is still up
        after = worker_children()
        self.assertEqual(len(after), 1)
        self.assertNotEqual(after, workers)


class Config(unittest.TestCase):
    def test_checkpoint_and_synthetic_together_are_refused(self):
        d = tempfile.mkdtemp(prefix="shardserve-synthetic-config-")
        path = os.path.join(d, "cluster.yaml")
        with open(path, "w") as f:
            f.write(f"models:\n  - name: m\n    checkpoint: {cl.TINY}\n    synthetic: llama-3.1-8b\n"
                    "groups:\n  - name: g\n    model: m\n")
        p = subprocess.run([os.path.join(cl.BIN_DIR, "shardserve-coordinator"), "--config", path, "--port", "0"],
                           capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("needs one of checkpoint", p.stdout + p.stderr)


if __name__ == "__main__":
    unittest.main()
