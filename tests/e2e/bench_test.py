#!/usr/bin/python3
"""End-to-end tests of `shardserve bench` and its report scripts against a real CPU cluster on
loopback: model "tiny" (no tokenizer, vocab 512, max length 256) and model "text" (the Llama 3.1
tokenizer), one single-rank group each.

Each test runs the built binary as a user would and checks one promise of the tool: the JSON
report's keys and counts, closed and open loop, text prompts, errors by gRPC code with a
non-zero exit, deadlines, Ctrl-C, and the plots and docs/benchmarks.md-style report made from real
results (scripts/plot_bench.py, scripts/bench_report.py; Debian's python3-matplotlib).
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import cluster as cl

CLUSTER = None
BENCH = os.path.join(cl.BIN_DIR, "shardserve")
SCRIPTS = os.path.join(cl.SOURCE_DIR, "scripts")
METRICS = ("ttft", "itl", "tpot", "e2e")
# The keys the issue names, the settings, and what a report of vLLM's benchmark_serving carries.
REQUIRED_KEYS = {
    "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "output_tokens_per_s", "requests_per_s", "errors",
    "target", "model", "mode", "concurrency", "request_rate", "max_concurrency", "num_requests", "warmup",
    "input_len", "output_len", "seed", "timeout_s", "ignore_eos", "command", "date",
    "completed", "errors_by_code", "duration_s", "input_tokens_per_s", "total_input_tokens", "total_output_tokens",
    "requested_output_tokens", "output_tokens_mismatched", "interrupted", "total_cached_prompt_tokens",
} | {f"{m}_{s}" for m in METRICS for s in ("mean_s", "p50_s", "p90_s", "p99_s", "count")}


def setUpModule():
    global CLUSTER
    CLUSTER = cl.Cluster(
        models={"tiny": (cl.TINY, None), "text": (cl.TINY_TEXT, None)},
        groups=[{"name": "tiny", "model": "tiny", "num_kv_blocks": 256, "max_num_seqs": 64},
                {"name": "text", "model": "text", "num_kv_blocks": 128}])
    CLUSTER.start()


def tearDownModule():
    if CLUSTER:
        CLUSTER.stop()


def bench(*args, timeout=120):
    """Runs `shardserve bench --target CLUSTER ARGS --output json`: (exit status, report, stderr)."""
    p = subprocess.run([BENCH, "bench", "--target", CLUSTER.address, "--output", "json", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    report = json.loads(p.stdout) if p.stdout.strip() else None  # stdout is the JSON line and nothing else
    return p.returncode, report, p.stderr


def read_samples(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def max_overlap(samples):
    """The most requests in flight at once, from their [start, start + e2e] intervals."""
    events = sorted([(s["start_s"], 1) for s in samples] + [(s["start_s"] + s["e2e_s"], -1) for s in samples],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def coordinator_counts(model):
    text = cl.scrape(CLUSTER.metrics_address)
    return (cl.metric(text, "shardserve_requests_total", model=model, status="ok"),
            cl.metric(text, "shardserve_generation_tokens_total", model=model))


class Bench(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="shardserve-bench-test-")

    def assert_sound(self, r):
        """What holds for every successful report."""
        self.assertEqual(REQUIRED_KEYS - set(r), set(), "keys missing from the report")
        self.assertEqual(r["errors"], 0, r["errors_by_code"])
        self.assertEqual(r["completed"], r["num_requests"])
        self.assertEqual(r["output_tokens_mismatched"], 0)
        self.assertEqual(r["total_output_tokens"], r["requested_output_tokens"])
        self.assertGreater(r["output_tokens_per_s"], 0)
        self.assertGreater(r["requests_per_s"], 0)
        self.assertGreater(r["input_tokens_per_s"], 0)
        self.assertFalse(r["interrupted"])
        for m in METRICS:
            self.assertGreater(r[f"{m}_p50_s"], 0, m)
            self.assertLessEqual(r[f"{m}_p50_s"], r[f"{m}_p90_s"], m)
            self.assertLessEqual(r[f"{m}_p90_s"], r[f"{m}_p99_s"], m)
        # Throughput is over the measured window.
        self.assertAlmostEqual(r["output_tokens_per_s"] * r["duration_s"], r["total_output_tokens"], delta=1e-6)

    def test_closed_loop_counts_every_token_and_keeps_concurrency(self):
        samples = os.path.join(self.dir, "samples.jsonl")
        out_file = os.path.join(self.dir, "result.json")
        before = coordinator_counts("tiny")
        rc, r, err = bench("--model", "tiny", "--concurrency", 4, "--num-requests", 16, "--warmup", 4,
                           "--input-len", 16, "--output-len", 8, "--samples-file", samples, "--output-file", out_file)
        self.assertEqual(rc, 0, err)
        self.assert_sound(r)
        self.assertEqual((r["mode"], r["concurrency"], r["request_rate"]), ("closed", 4, None))
        self.assertEqual(r["total_output_tokens"], 16 * 8)
        self.assertEqual(r["total_input_tokens"], 16 * 16)
        self.assertEqual(r["ttft_count"], 16)
        self.assertEqual(r["itl_count"], 16 * 7)  # one gap fewer than tokens, per request
        self.assertEqual(r["token_id_range"], [100, 512])  # the model's vocab, from ListModels
        self.assertEqual(r["total_cached_prompt_tokens"], 0)  # fresh prompts: an unseeded run draws a new seed
        self.assertIn(f"--seed {r['seed']}", r["command"])
        with open(out_file) as f:
            self.assertEqual(json.load(f), r)
        self.assertIn("bench: measured 16/16 done, 0 errors", err)
        # The warm-up requests reached the server but not the report.
        after = coordinator_counts("tiny")
        self.assertEqual(after[0] - before[0], 16 + 4)
        self.assertEqual(after[1] - before[1], (16 + 4) * 8)

        rows = read_samples(samples)
        self.assertEqual(len(rows), 16)
        for s in rows:
            self.assertEqual((s["status"], s["output_tokens"], s["input_tokens"], len(s["itl_s"])), ("OK", 8, 16, 7))
            self.assertLessEqual(s["ttft_s"], s["e2e_s"])
        self.assertEqual(sorted(s["index"] for s in rows), list(range(4, 20)))  # after the 4 warm-up requests
        self.assertLessEqual(max_overlap(rows), 4)
        self.assertGreaterEqual(max_overlap(rows), 2)

    def test_open_loop_spaces_poisson_arrivals_and_follows_the_seed(self):
        samples = os.path.join(self.dir, "open.jsonl")
        args = ["--model", "tiny", "--request-rate", 40, "--num-requests", 16, "--input-len", "uniform:8:24",
                "--output-len", "normal:8:2", "--seed", 5]
        rc, r, err = bench(*args, "--samples-file", samples)
        self.assertEqual(rc, 0, err)
        self.assert_sound(r)
        self.assertEqual((r["mode"], r["concurrency"], r["request_rate"]), ("open", None, 40))
        self.assertEqual((r["input_len"], r["output_len"]), ("uniform:8:24", "normal:8:2"))
        rows = read_samples(samples)
        self.assertEqual(len(rows), 16)
        for s in rows:
            self.assertTrue(8 <= s["input_tokens"] <= 24, s)
        # 15 exponential gaps at 40/s take 0.375 s on average; under 0.05 s has odds of ~1e-9.
        self.assertGreater(max(s["start_s"] for s in rows), 0.05)
        self.assertGreater(len({s["input_tokens"] for s in rows}), 1)

        # The same seed draws the same lengths; --max-concurrency caps what is in flight.
        capped = os.path.join(self.dir, "capped.jsonl")
        rc, again, err = bench(*args, "--max-concurrency", 2, "--samples-file", capped)
        self.assertEqual(rc, 0, err)
        self.assert_sound(again)
        self.assertEqual(again["max_concurrency"], 2)
        self.assertEqual(again["total_input_tokens"], r["total_input_tokens"])
        self.assertEqual(again["requested_output_tokens"], r["requested_output_tokens"])
        # ... and the same prompts, which the server's prefix cache now holds: the report says so.
        self.assertEqual(r["total_cached_prompt_tokens"], 0)
        self.assertGreater(again["total_cached_prompt_tokens"], 0)
        self.assertLessEqual(max_overlap(read_samples(capped)), 2)

    def test_text_prompts_from_a_file(self):
        prompts = os.path.join(self.dir, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("The capital of France is\n\n{\"prompt\": \"Once upon a time\"}\n{\"prompt_token_ids\": [128000, 9906]}\n")
        rc, r, err = bench("--model", "text", "--concurrency", 2, "--num-requests", 6, "--prompt-file", prompts,
                           "--output-len", 4)
        self.assertEqual(rc, 0, err)
        self.assert_sound(r)
        self.assertEqual(r["total_output_tokens"], 24)
        self.assertIsNone(r["input_len"])
        # Cycled in order: each prompt twice. BOS + 5 tokens, BOS + 4, and the 2 ids as given.
        self.assertEqual(r["total_input_tokens"], 2 * (6 + 5 + 2))

    def test_unknown_model_counts_not_found_and_fails(self):
        rc, r, err = bench("--model", "no-such-model", "--concurrency", 2, "--num-requests", 5, "--input-len", 8,
                           "--output-len", 4)
        self.assertEqual(rc, 1)
        self.assertIn("does not serve a model 'no-such-model'", err)
        self.assertEqual((r["completed"], r["errors"], r["errors_by_code"]), (0, 5, {"NOT_FOUND": 5}))
        self.assertIn("no-such-model", r["error_messages"]["NOT_FOUND"])
        self.assertEqual((r["output_tokens_per_s"], r["ttft_p99_s"]), (0, 0))

    def test_deadline_counts_deadline_exceeded(self):
        # 230 tokens streamed one message each cannot finish in 5 ms.
        rc, r, err = bench("--model", "tiny", "--concurrency", 2, "--num-requests", 4, "--input-len", 16,
                           "--output-len", 230, "--timeout", 0.005)
        self.assertEqual(rc, 1, err)
        self.assertEqual(r["errors_by_code"], {"DEADLINE_EXCEEDED": 4})

    def test_bad_arguments_are_refused_before_any_request(self):
        for args in (["--input-len", "uniform:9:3"], ["--output-len", "zipf:1:2"], ["--num-requests", 0],
                     ["--prompt-file", os.path.join(self.dir, "missing.txt")]):
            rc, r, err = bench("--model", "tiny", *args)
            self.assertEqual(rc, 2, args)
            self.assertIsNone(r, args)
            self.assertIn("error:", err, args)
        rc, r, err = bench("--model", "tiny", "--concurrency", 2, "--request-rate", 3)  # CLI11's own refusal
        self.assertNotIn(rc, (0, 1))
        self.assertIsNone(r)
        # Nothing listening: no report, and not mistaken for failed requests.
        p = subprocess.run([BENCH, "bench", "--target", f"127.0.0.1:{cl.free_port()}", "--num-requests", "2",
                            "--output", "json"], capture_output=True, text=True, timeout=60)
        self.assertEqual((p.returncode, p.stdout), (2, ""), p.stderr)
        self.assertIn("cannot reach the server", p.stderr)

    def test_ctrl_c_cancels_and_reports_what_finished(self):
        args = ["--model", "tiny", "--concurrency", 2, "--num-requests", 1000000, "--input-len", 16, "--output-len", 32,
                "--output", "json", "--progress-interval", 0.2]
        p = subprocess.Popen([BENCH, "bench", "--target", CLUSTER.address, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until some measured requests are done
                line = p.stderr.readline()
                if line.startswith("bench: measured") and not line.startswith("bench: measured 0/"):
                    break
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.assertEqual(p.returncode, 130, err)
        r = json.loads(out)
        self.assertTrue(r["interrupted"])
        self.assertGreater(r["completed"], 0)
        self.assertLess(r["completed"], 1000000)
        self.assertEqual(r["errors"], 0, "requests cancelled by Ctrl-C are not errors")
        self.assertEqual(r["total_output_tokens"], r["completed"] * 32)


class Report(unittest.TestCase):
    def test_sweep_writes_results_plots_and_the_report(self):
        work = tempfile.mkdtemp(prefix="shardserve-bench-report-")
        # Relative paths, as from the repository root; the binary from elsewhere, as on a GPU machine.
        results, doc = "serving", "benchmarks.md"
        p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_report.py"), "sweep",
                            "--target", CLUSTER.address, "--model", "tiny", "--name", "cpu-test",
                            "--setup", "CPU backend, tiny checkpoint", "--note", "a test run",
                            "--server-command", "shardserve serve --model tests/data/tiny/llama3-gqa-bf16",
                            "--lengths", "16/8,32/16", "--concurrencies", "1,2",
                            "--rounds", "2", "--min-requests", "3", "--results-dir", results, "--doc", doc],
                           capture_output=True, text=True, timeout=300, cwd=work,
                           env=dict(os.environ, SHARDSERVE_BENCH=BENCH))
        self.assertEqual(p.returncode, 0, p.stderr)
        results, doc = os.path.join(work, results), os.path.join(work, doc)
        set_dir = os.path.join(results, "cpu-test")
        points = ["in16-out8-c1", "in16-out8-c2", "in32-out16-c1", "in32-out16-c2"]
        for name in points:
            with open(os.path.join(set_dir, name + ".json")) as f:
                r = json.load(f)
            self.assertEqual((r["errors"], r["completed"]), (0, max(3, 2 * r["concurrency"])), name)
            with gzip.open(os.path.join(set_dir, "samples", name + ".jsonl.gz"), "rt") as f:
                self.assertEqual(len(f.read().splitlines()), r["completed"], name)
        pngs = ["throughput_latency.png", "ttft_distribution.png", "itl_distribution.png"]
        for png in pngs:
            with open(os.path.join(set_dir, png), "rb") as f:
                data = f.read()
            self.assertTrue(data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10000, png)
        with open(doc) as f:
            text = f.read()
        for png in pngs:
            self.assertIn(f"(serving/cpu-test/{png})", text)
        self.assertIn("## cpu-test: CPU backend, tiny checkpoint", text)
        self.assertIn("> a test run", text)
        table_rows = [line for line in text.splitlines() if line.startswith("| 16 / 8 |") or line.startswith("| 32 / 16 |")]
        self.assertEqual(len(table_rows), 4)
        self.assertIn("shardserve serve --model tests/data/tiny/llama3-gqa-bf16", text)
        self.assertIn("shardserve bench --target", text)
        self.assertIn("| 3,378 | not measured |", text)  # no set claims the FP8 H100 deployment
        self.assertNotIn(work, text, "the report names paths relative to itself")
        self.assertNotIn(cl.BIN_DIR, text, "nor where the binary was")

        # render alone rebuilds the same report from the files.
        os.unlink(doc)
        p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_report.py"), "render",
                            "--results-dir", "serving", "--doc", "benchmarks.md"],
                           capture_output=True, text=True, timeout=300, cwd=work)
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(doc) as f:
            self.assertEqual(f.read(), text)

    def test_plot_script_makes_pngs_from_one_result(self):
        work = tempfile.mkdtemp(prefix="shardserve-bench-plot-")
        result = os.path.join(work, "r.json")
        rc, _, err = bench("--model", "tiny", "--concurrency", 2, "--num-requests", 4, "--input-len", 8,
                           "--output-len", 8, "--output-file", result, "--samples-file", os.path.join(work, "s.jsonl"))
        self.assertEqual(rc, 0, err)
        out = os.path.join(work, "plots")
        p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "plot_bench.py"), "--out-dir", out, result],
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        written = p.stdout.split()
        self.assertEqual([os.path.basename(w) for w in written],
                         ["throughput_latency.png", "ttft_distribution.png", "itl_distribution.png"])
        for path in written:
            self.assertGreater(os.path.getsize(path), 10000, path)


if __name__ == "__main__":
    unittest.main()
