#!/usr/bin/python3
"""Security basics, end to end:

- TLS on the coordinator's gRPC and HTTP ports (a CA and certificates made at test time with the
  openssl CLI): a client that trusts the CA is served, a plaintext one is refused, and
  `shardserve client --tls-ca` works; with --tls-client-ca, a client without a certificate the CA
  signed is refused. Workers register on the plaintext --worker-port, which serves nothing else.
- An API key: calls without it or with a wrong one get UNAUTHENTICATED (HTTP 401, OpenAI's
  `invalid_api_key`), health endpoints answer without it, the server stays healthy, and the right
  key (flag, or SHARDSERVE_API_KEY) is served, from Python, curl-like HTTP and `shardserve client`.
- Size limits: a request over --max-request-bytes gets INVALID_ARGUMENT naming the flag, one over
  gRPC's receive limit RESOURCE_EXHAUSTED, an HTTP body over the limit 413; the server is healthy
  after each.
- Nothing in a request names a file: a model given as a path (the real checkpoint's, a FIFO's,
  a relative one) is NOT_FOUND, and the FIFO shows that nobody opened it.
- Start-up refuses contradictory or unreadable TLS settings with a message that says which.
- The Kubernetes manifests run every container as non-root, without privilege escalation, on a
  read-only root filesystem, with every capability dropped.
"""
import json
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
import unittest
import urllib.error
import urllib.request

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
HEALTH_SERVING = b"\x08\x01"
PKI = None  # the test's CA and certificates (setUpModule)


def openssl(*args):
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


def setUpModule():
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it."""
    global PKI
    PKI = tempfile.mkdtemp(prefix="shardserve-pki-")
    path = lambda name: os.path.join(PKI, name)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", path("ca.key"), "-out", path("ca.pem"), "-days", "2",
            "-subj", "/CN=shardserve test CA")
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")]:
        openssl("req", *ec, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"), "-subj", f"/CN={name}")
        with open(path(f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
                "-CAcreateserial", "-out", path(f"{name}.pem"), "-days", "2", "-extfile", path(f"{name}.ext"))
    # Another CA that signed nothing here: trusting it must not be enough.
    openssl("req", "-x509", *ec, "-keyout", path("other-ca.key"), "-out", path("other-ca.pem"), "-days", "2",
            "-subj", "/CN=another CA")


def tearDownModule():
    shutil.rmtree(PKI, ignore_errors=True)


def pki(name):
    return os.path.join(PKI, name)


def read(name):
    with open(pki(name), "rb") as f:
        return f.read()


def request(max_tokens=4):
    return pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=max_tokens,
                              temperature=0, ignore_eos=True)


def health(channel):
    try:
        return channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
    except grpc.RpcError as e:
        return e.code()


def http(url, body=None, headers=None, context=None):
    """(status, parsed JSON body) of one HTTP(S) request."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client_cli(address, *args, env=None):
    return subprocess.run([os.path.join(cl.BIN_DIR, "shardserve"), "client", "--address", address, "--prompt-ids",
                           "1,2,3", "--max-tokens", "4", "--output", "json", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


TINY = {"tiny": (cl.TINY, None)}
GROUPS = [{"name": "g", "model": "tiny", "num_kv_blocks": 64}]


class Tls(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = cl.Cluster(TINY, GROUPS, http=True, worker_port=True,
                                 coordinator_args=["--tls-cert", pki("server.pem"), "--tls-key", pki("server.key")])
        cls.cluster.start()
        cls.creds = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_grpc_client_with_the_ca_is_served_and_plaintext_is_refused(self):
        secure = grpc.secure_channel(self.cluster.address, self.creds)
        self.assertEqual(len(pb_grpc.GenerationStub(secure).Generate(request(), timeout=30).token_ids), 4)
        self.assertEqual(health(secure), HEALTH_SERVING)
        with self.assertRaises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address)).Generate(request(), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        # A client that trusts another CA does not accept this server.
        other = grpc.secure_channel(self.cluster.address,
                                    grpc.ssl_channel_credentials(root_certificates=read("other-ca.pem")))
        with self.assertRaises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(other).Generate(request(), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(health(secure), HEALTH_SERVING)

    def test_https_with_the_ca_and_plain_http_refused(self):
        context = ssl.create_default_context(cafile=pki("ca.pem"))
        status, body = http(f"https://{self.cluster.http_address}/v1/completions",
                            {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}, context=context)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["usage"]["completion_tokens"], 4)
        with self.assertRaises((urllib.error.URLError, ConnectionError)):
            http(f"http://{self.cluster.http_address}/health")
        self.assertEqual(http(f"https://{self.cluster.http_address}/health", context=context)[0], 200)

    def test_cli_client_with_tls_ca(self):
        out = client_cli(self.cluster.address, "--tls-ca", pki("ca.pem"))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(len(json.loads(out.stdout)["token_ids"]), 4)
        out = client_cli(self.cluster.address)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("UNAVAILABLE", out.stderr)

    def test_worker_port_serves_registration_only(self):
        # The public API is not reachable around TLS through the workers' plaintext port...
        worker_port = grpc.insecure_channel(self.cluster.worker_address)
        with self.assertRaises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(worker_port).Generate(request(), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        # ...and registration is not served on the public port.
        with self.assertRaises(grpc.RpcError) as e:
            grpc.secure_channel(self.cluster.address, self.creds).unary_unary(
                "/shardserve.worker.v1.Registry/Register")(b"", timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


class MutualTls(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = cl.Cluster(TINY, GROUPS, http=True, worker_port=True,
                                 coordinator_args=["--tls-cert", pki("server.pem"), "--tls-key", pki("server.key"),
                                                   "--tls-client-ca", pki("ca.pem")])
        cls.cluster.start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_only_clients_with_a_certificate_of_the_ca_are_served(self):
        with_cert = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"), private_key=read("client.key"),
                                                 certificate_chain=read("client.pem"))
        stub = pb_grpc.GenerationStub(grpc.secure_channel(self.cluster.address, with_cert))
        self.assertEqual(len(stub.Generate(request(), timeout=30).token_ids), 4)
        without = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
        with self.assertRaises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(grpc.secure_channel(self.cluster.address, without)).Generate(request(), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)

        context = ssl.create_default_context(cafile=pki("ca.pem"))
        with self.assertRaises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            http(f"https://{self.cluster.http_address}/v1/models", context=context)
        context.load_cert_chain(pki("client.pem"), pki("client.key"))
        self.assertEqual(http(f"https://{self.cluster.http_address}/v1/models", context=context)[0], 200)

        out = client_cli(self.cluster.address, "--tls-ca", pki("ca.pem"), "--tls-client-cert", pki("client.pem"),
                         "--tls-client-key", pki("client.key"))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(len(stub.Generate(request(), timeout=30).token_ids), 4)


class ApiKey(unittest.TestCase):
    KEY = "sk-test-0123456789"

    @classmethod
    def setUpClass(cls):
        # From the environment, as a Kubernetes Secret provides it (the flag would show in `ps`).
        cls.cluster = cl.Cluster(TINY, GROUPS, http=True, worker_port=True,
                                 coordinator_env={"SHARDSERVE_API_KEY": cls.KEY})
        cls.cluster.start()
        cls.channel = grpc.insecure_channel(cls.cluster.address)
        cls.stub = pb_grpc.GenerationStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_grpc_calls_need_the_key(self):
        good = (("authorization", f"Bearer {self.KEY}"),)
        for metadata, why in [(None, "needs an API key"), ((("authorization", "Bearer wrong"),), "not valid"),
                              ((("authorization", f"Bearer {self.KEY}x"),), "not valid"),
                              ((("authorization", self.KEY),), "Bearer")]:
            for call in (lambda md: self.stub.Generate(request(), timeout=10, metadata=md),
                         lambda md: list(self.stub.GenerateStream(request(), timeout=10, metadata=md)),
                         lambda md: self.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hi"), timeout=10,
                                                       metadata=md),
                         lambda md: self.stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=md)):
                with self.assertRaises(grpc.RpcError) as e:
                    call(metadata)
                self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
                self.assertIn(why, e.exception.details())
        # Health needs no key, and the refused calls left the server healthy.
        self.assertEqual(health(self.channel), HEALTH_SERVING)
        self.assertEqual(len(self.stub.Generate(request(), timeout=30, metadata=good).token_ids), 4)
        self.assertEqual(len(self.stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=good).models), 1)
        lower_case = (("authorization", f"bearer {self.KEY}"),)  # the scheme's name is case-insensitive
        chunks = list(self.stub.GenerateStream(request(), timeout=30, metadata=lower_case))
        self.assertEqual(sum(len(c.token_ids) for c in chunks), 4)
        text = cl.scrape(self.cluster.metrics_address)
        self.assertGreaterEqual(cl.metric(text, "shardserve_requests_total", status="unauthenticated"), 8)

    def test_http_needs_the_key_except_for_probes(self):
        base = f"http://{self.cluster.http_address}"
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        for headers in [{}, {"Authorization": "Bearer wrong"}]:
            for path, data in [("/v1/models", None), ("/v1/completions", body), ("/generate", body)]:
                status, reply = http(base + path, data, headers)
                self.assertEqual(status, 401, path)
                self.assertEqual(reply["error"]["code"], "invalid_api_key")
        self.assertEqual(http(base + "/health")[0], 200)
        self.assertEqual(http(base + "/ready")[0], 200)
        status, reply = http(base + "/v1/completions", body, {"Authorization": f"Bearer {self.KEY}"})
        self.assertEqual(status, 200, reply)
        self.assertEqual(reply["usage"]["completion_tokens"], 4)

    def test_cli_client_with_api_key(self):
        out = client_cli(self.cluster.address)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("UNAUTHENTICATED", out.stderr)
        out = client_cli(self.cluster.address, "--api-key", self.KEY)
        self.assertEqual(out.returncode, 0, out.stderr)
        out = client_cli(self.cluster.address, env={"SHARDSERVE_API_KEY": self.KEY})
        self.assertEqual(out.returncode, 0, out.stderr)


class LimitsAndPaths(unittest.TestCase):
    LIMIT = 64 << 10

    @classmethod
    def setUpClass(cls):
        cls.cluster = cl.Cluster({"tiny": (cl.TINY, None), "text": (cl.TINY_TEXT, cl.TINY_TEXT)},
                                 GROUPS + [{"name": "t", "model": "text", "num_kv_blocks": 64}], http=True,
                                 coordinator_args=["--max-request-bytes", str(cls.LIMIT)])
        cls.cluster.start()
        cls.channel = grpc.insecure_channel(cls.cluster.address)
        cls.stub = pb_grpc.GenerationStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def assert_healthy(self):
        self.assertEqual(health(self.channel), HEALTH_SERVING)
        self.assertEqual(len(self.stub.Generate(request(), timeout=30).token_ids), 4)

    def test_oversized_grpc_messages(self):
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(pb.GenerateRequest(model="text", text="a" * (2 * self.LIMIT)), timeout=30)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("--max-request-bytes", e.exception.details())
        self.assert_healthy()
        # Past gRPC's own receive limit (16 MiB here): refused before it is parsed.
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(pb.GenerateRequest(model="text", text="a" * (20 << 20)), timeout=30)
        self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("larger than max", e.exception.details())
        self.assert_healthy()

    def test_oversized_http_body(self):
        status, reply = http(f"http://{self.cluster.http_address}/v1/completions",
                             {"model": "text", "prompt": "a" * (2 * self.LIMIT)})
        self.assertEqual(status, 413)
        self.assertIn("--max-request-bytes", reply["error"]["message"])
        self.assert_healthy()

    def test_a_model_named_by_a_path_is_not_found_and_nothing_is_opened(self):
        fifo = os.path.join(tempfile.mkdtemp(prefix="shardserve-fifo-"), "model")
        os.mkfifo(fifo)
        # Opening a FIFO for reading blocks until a writer comes: a server that tried would hang
        # this request, and would still hold it open below.
        names = [fifo, cl.TINY, cl.TINY_TEXT, os.path.relpath(cl.TINY), "../../tests/data/tiny/llama3-gqa-bf16",
                 "file:///etc/passwd", "/etc/passwd", "tiny/../tiny"]
        for name in names:
            with self.assertRaises(grpc.RpcError) as e:
                self.stub.Generate(pb.GenerateRequest(model=name, prompt_token_ids=pb.TokenIds(ids=[1, 2])), timeout=10)
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND, name)
            self.assertIn("this server serves: text, tiny", e.exception.details())
            with self.assertRaises(grpc.RpcError) as e:
                self.stub.Tokenize(pb.TokenizeRequest(model=name, text="hi"), timeout=10)
            self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND, name)
            status, _ = http(f"http://{self.cluster.http_address}/v1/completions",
                             {"model": name, "prompt": "hi", "max_tokens": 2})
            self.assertEqual(status, 404, name)
        with self.assertRaises(OSError) as e:  # ENXIO: no process has the FIFO open for reading
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        self.assertEqual(e.exception.errno, 6)
        self.assertTrue(stat.S_ISFIFO(os.stat(fifo).st_mode))
        self.assert_healthy()


class StartUp(unittest.TestCase):
    """Contradictory or unreadable security settings stop the coordinator at start, saying why."""

    def refuses(self, args, message):
        config = os.path.join(tempfile.mkdtemp(prefix="shardserve-cfg-"), "cluster.yaml")
        with open(config, "w") as f:
            f.write(f"models:\n  - name: tiny\n    checkpoint: {cl.TINY}\ngroups:\n  - name: g\n    model: tiny\n")
        out = subprocess.run([os.path.join(cl.BIN_DIR, "shardserve-coordinator"), "--config", config, "--host",
                              "127.0.0.1", "--port", "0", *args], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
        self.assertIn(message, out.stderr)

    def test_refusals(self):
        self.refuses(["--tls-cert", pki("server.pem"), "--tls-key", pki("server.key")], "set --worker-port")
        self.refuses(["--api-key", "k"], "set --worker-port")
        self.refuses(["--tls-cert", pki("server.pem"), "--worker-port", "0"], "both --tls-cert and --tls-key")
        self.refuses(["--tls-client-ca", pki("ca.pem"), "--worker-port", "0"], "--tls-client-ca needs --tls-cert")
        self.refuses(["--tls-cert", pki("server.ext"), "--tls-key", pki("server.key"), "--worker-port", "0"],
                     "is not a PEM file")
        self.refuses(["--tls-cert", pki("server.pem"), "--tls-key", pki("client.key"), "--worker-port", "0"],
                     "TLS certificate and key invalid")


class Manifests(unittest.TestCase):
    """Every container of every rendered overlay runs as non-root, cannot escalate, has a
    read-only root filesystem and no capabilities."""

    def test_containers_are_locked_down(self):
        import yaml  # Debian's python3-yaml
        kubectl = shutil.which("kubectl")
        self.assertIsNotNone(kubectl, "kubectl is not installed (scripts/setup.sh installs it)")
        k8s = os.path.join(cl.SOURCE_DIR, "deploy", "k8s")
        layouts = ["base"] + [f"overlays/{o}" for o in sorted(os.listdir(os.path.join(k8s, "overlays")))]
        checked = 0
        for layout in layouts:
            out = subprocess.run([kubectl, "kustomize", os.path.join(k8s, layout)], capture_output=True, text=True,
                                 timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr)
            for obj in yaml.safe_load_all(out.stdout):
                if not obj or obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                    continue
                pod = obj["spec"]["template"]["spec"]
                where = f"{layout}: {obj['kind']} {obj['metadata']['name']}"
                self.assertTrue(pod.get("securityContext", {}).get("runAsNonRoot"), where)
                self.assertNotEqual(pod["securityContext"].get("runAsUser", 1), 0, where)
                self.assertFalse(pod.get("automountServiceAccountToken", True), f"{where}: mounts an API token")
                for c in pod["containers"] + pod.get("initContainers", []):
                    sc = c.get("securityContext", {})
                    self.assertIs(sc.get("allowPrivilegeEscalation"), False, f"{where}/{c['name']}")
                    self.assertIs(sc.get("readOnlyRootFilesystem"), True, f"{where}/{c['name']}")
                    self.assertIn("ALL", sc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}")
                    self.assertFalse(sc.get("privileged", False), f"{where}/{c['name']}")
                    checked += 1
        self.assertGreaterEqual(checked, 2 * len(layouts))


if __name__ == "__main__":
    unittest.main()
