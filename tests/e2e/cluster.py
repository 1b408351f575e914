"""A shardserve cluster on loopback for end-to-end tests: a coordinator and its workers as child
processes, the Python stubs generated from proto/ with grpc_tools, and helpers to read /metrics.

Every process started here is killed by Cluster.stop(), which the tests call in tearDown paths.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN_DIR = os.environ.get("SHARDSERVE_BIN_DIR", "")
SOURCE_DIR = os.environ.get("SHARDSERVE_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DATA = os.path.join(SOURCE_DIR, "tests", "data", "tiny")
TINY = os.path.join(DATA, "llama3-gqa-bf16")               # vocab 512, no tokenizer
TINY_TEXT = os.path.join(DATA, "llama3-tokenizer-bf16")    # the Llama 3.1 tokenizer, vocab 128256


def load_stubs():
    """Generates the Python stubs of our .proto files (grpc_tools) and imports them."""
    out = tempfile.mkdtemp(prefix="shardserve-stubs-")
    proto = os.path.join(SOURCE_DIR, "proto")
    from grpc_tools import protoc  # Debian's python3-grpc-tools
    rc = protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.join(proto, "shardserve/v1/generation.proto"),
                      os.path.join(proto, "shardserve/worker/v1/worker.proto")])
    if rc != 0:
        raise RuntimeError("grpc_tools.protoc failed")
    sys.path.insert(0, out)
    from shardserve.v1 import generation_pb2, generation_pb2_grpc
    return generation_pb2, generation_pb2_grpc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address):
    """The text of http://ADDRESS/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text, name, **labels):
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


class Cluster:
    """models: {name: (checkpoint, tokenizer or None)}; groups: [dict of the YAML group keys].
    http: also serve the HTTP API (--http-port 0); its address is then http_address."""

    def __init__(self, models, groups, coordinator_args=(), health_interval_ms=200, http=False):
        self.dir = tempfile.mkdtemp(prefix="shardserve-e2e-")
        self.procs = {}
        lines = ["models:"]
        for name, (ckpt, tok) in models.items():
            lines += [f"  - name: {name}", f"    checkpoint: {ckpt}"] + ([f"    tokenizer: {tok}"] if tok else [])
        lines.append("groups:")
        for g in groups:
            lines.append(f"  - name: {g['name']}")
            lines += [f"    {k}: {v}" for k, v in g.items() if k != "name"]
        self.config = os.path.join(self.dir, "cluster.yaml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.groups = groups
        self.coordinator_args = list(coordinator_args)
        self.health_interval_ms = health_interval_ms
        self.http = http

    def start(self, timeout=120):
        ready = os.path.join(self.dir, "ready.json")
        for attempt in range(3):
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            self._spawn("coordinator", [os.path.join(BIN_DIR, "shardserve-coordinator"), "--config", self.config,
                                        "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(free_port()),
                                        "--ready-file", ready, "--health-interval-ms", str(self.health_interval_ms),
                                        "--health-timeout-ms", "1000", "--shutdown-timeout", "10"]
                        + (["--http-port", "0"] if self.http else []) + self.coordinator_args)
            for g in self.groups:
                self._spawn(f"worker-{g['name']}", [os.path.join(BIN_DIR, "shardserve-worker"),
                                                    "--coordinator", self.address, "--group", g["name"],
                                                    "--metrics-port", str(free_port()), "--shutdown-timeout", "10"])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if os.path.exists(ready):
                    with open(ready) as f:
                        self.ready = json.load(f)
                    self.metrics_address = self.ready["metrics_address"]
                    self.http_address = self.ready.get("http_address", "")
                    self.workers = {g["group"]: g for g in self.ready["groups"]}
                    return self
                dead = [n for n, p in self.procs.items() if p.poll() is not None]
                if dead:
                    break
                time.sleep(0.05)  # polling for the ready file the coordinator writes
            logs = self.logs()
            self.stop()
            # A port picked free can be taken before the process binds it: start again.
            if "in use" in logs or "binding to port" in logs:
                continue
            raise RuntimeError(f"cluster did not become ready (exited: {dead})\n{logs}")
        raise RuntimeError("no free port for the coordinator")

    def _spawn(self, name, args):
        with open(os.path.join(self.dir, f"{name}.log"), "w") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def logs(self):
        out = []
        for name in self.procs:
            path = os.path.join(self.dir, f"{name}.log")
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- {name} ---\n{f.read()[-4000:]}")
        return "\n".join(out)

    def worker_pid(self, group):
        return self.procs[f"worker-{group}"].pid

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
