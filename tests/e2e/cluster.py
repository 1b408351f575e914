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


def vm_kib(pid, field):
    """A /proc/PID/status field in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Cluster:
    """models: {name: (checkpoint, tokenizer or None)}; groups: [dict of the YAML group keys].
    http: also serve the HTTP API (--http-port 0); its address is then http_address.
    worker_port: workers register on a port of their own (--worker-port), as TLS and API keys need.
    coordinator_env: extra environment of the coordinator.
    health_timeout_ms: the coordinator's --health-timeout-ms."""

    def __init__(self, models, groups, coordinator_args=(), health_interval_ms=200, http=False,
                 worker_port=False, coordinator_env=None, health_timeout_ms=1000):
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
        self.worker_port = worker_port
        self.coordinator_env = coordinator_env
        self.health_timeout_ms = health_timeout_ms

    def start(self, timeout=120):
        ready = os.path.join(self.dir, "ready.json")
        for attempt in range(3):
            self.procs = {}
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.worker_address = f"127.0.0.1:{free_port()}" if self.worker_port else self.address
            self.coordinator_cmd = ([os.path.join(BIN_DIR, "shardserve-coordinator"), "--config", self.config,
                                     "--host", "127.0.0.1", "--port", str(self.port),
                                     "--metrics-port", str(free_port()),
                                     "--ready-file", ready, "--health-interval-ms", str(self.health_interval_ms),
                                     "--health-timeout-ms", str(self.health_timeout_ms), "--shutdown-timeout", "10"]
                                    + (["--http-port", "0"] if self.http else [])
                                    + (["--worker-port", self.worker_address.split(":")[1]] if self.worker_port else [])
                                    + self.coordinator_args)
            self._spawn("coordinator", self.coordinator_cmd, self.coordinator_env)
            for g in self.groups:
                self.start_worker(g["name"])
            if self._wait_ready(ready, timeout):
                return self
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            logs = self.logs()
            self.stop()
            # A port picked free can be taken before the process binds it: start again.
            if "in use" in logs or "binding to port" in logs:
                continue
            raise RuntimeError(f"cluster did not become ready (exited: {dead})\n{logs}")
        raise RuntimeError("no free port for the coordinator")

    def _wait_ready(self, ready, timeout):
        """True once the coordinator wrote its ready file (every group serving); False when a process
        died or the time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(ready):
                with open(ready) as f:
                    self.ready = json.load(f)
                self.metrics_address = self.ready["metrics_address"]
                self.http_address = self.ready.get("http_address", "")
                self.workers = {g["group"]: g for g in self.ready["groups"]}
                return True
            if any(p.poll() is not None for p in self.procs.values()):
                return False
            time.sleep(0.05)  # polling for the ready file the coordinator writes
        return False

    def start_worker(self, group):
        """Starts the worker of `group` (again, after it died: it must register by itself)."""
        name = f"worker-{group}"
        self._spawn(name, [os.path.join(BIN_DIR, "shardserve-worker"), "--coordinator", self.worker_address,
                           "--group", group, "--metrics-port", str(free_port()), "--shutdown-timeout", "10"],
                    append=name in self.procs)

    def restart_coordinator(self, sig=signal.SIGKILL, timeout=60):
        """Stops the coordinator with `sig` and starts it again with the same command line (the same
        ports). The workers are not touched: the new coordinator's registry is empty until they
        register again. Returns once every group serves again."""
        old = self.procs["coordinator"]
        old.send_signal(sig)
        old.wait(timeout=30)
        ready = os.path.join(self.dir, "ready.json")
        os.remove(ready)
        self._spawn("coordinator", self.coordinator_cmd, self.coordinator_env, append=True)
        if not self._wait_ready(ready, timeout):
            raise RuntimeError(f"the restarted coordinator did not get every group back\n{self.logs()}")
        return self

    def _spawn(self, name, args, env=None, append=False):
        path = os.path.join(self.dir, f"{name}.log")
        with open(path, "a" if append else "w") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                env=None if env is None else {**os.environ, **env})

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
