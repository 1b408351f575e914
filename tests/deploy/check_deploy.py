"""Checks of deploy/ (CTest deploy_checks):

- every kustomize overlay renders with `kubectl kustomize` (the kustomize built into kubectl,
  1.20 on Debian 12 and newer);
- the rendered objects validate against the Kubernetes schemas (and the Prometheus Operator's
  for the ServiceMonitor) with kubernetes-models, installed by `npm ci` from package-lock.json;
- the cluster config each overlay puts in its ConfigMap parses with the coordinator's own parser
  (`shardserve-coordinator --check-config`);
- `promtool check config` and `promtool check rules` pass;
- every shardserve_* metric the Grafana dashboard and the alerting rules query is one that a
  running coordinator and worker really export (scraped from a CPU cluster on the tiny model).

Environment: SHARDSERVE_BIN_DIR (the binaries), SHARDSERVE_SOURCE_DIR, DEPLOY_NODE_DIR (where
node_modules is installed and kept between runs), KUBECTL, PROMTOOL, NPM, NODE to override tools.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

SOURCE_DIR = os.environ.get("SHARDSERVE_SOURCE_DIR",
                            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BIN_DIR = os.environ.get("SHARDSERVE_BIN_DIR", os.path.join(SOURCE_DIR, "build", "bin"))
DEPLOY = os.path.join(SOURCE_DIR, "deploy")
HERE = os.path.join(SOURCE_DIR, "tests", "deploy")
NODE_DIR = os.environ.get("DEPLOY_NODE_DIR", os.path.join(tempfile.gettempdir(), "shardserve-deploy-node"))
OVERLAYS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DEPLOY, "k8s", "overlays", "*")))

sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "e2e"))


def tool(name, env):
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def install_validator():
    """npm ci into NODE_DIR, unless package-lock.json there is already the one here."""
    lock = os.path.join(HERE, "package-lock.json")
    installed = os.path.join(NODE_DIR, "package-lock.json")
    if os.path.exists(os.path.join(NODE_DIR, "node_modules")) and os.path.exists(installed):
        with open(lock) as a, open(installed) as b:
            if a.read() == b.read():
                return
    os.makedirs(NODE_DIR, exist_ok=True)
    for f in ("package.json", "package-lock.json"):
        shutil.copy(os.path.join(HERE, f), NODE_DIR)
    out = run([tool("npm", "NPM"), "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR)
    if out.returncode != 0:
        raise RuntimeError(f"npm ci failed:\n{out.stdout}\n{out.stderr}")


class Rendered(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="shardserve-deploy-")
        cls.rendered = {}
        kubectl = tool("kubectl", "KUBECTL")
        for name in ["base"] + OVERLAYS:
            path = os.path.join(DEPLOY, "k8s", "base" if name == "base" else f"overlays/{name}")
            out = run([kubectl, "kustomize", path])
            if out.returncode != 0:
                raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
            cls.rendered[name] = os.path.join(cls.dir, f"{name}.yaml")
            with open(cls.rendered[name], "w") as f:
                f.write(out.stdout)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_overlays_exist(self):
        self.assertEqual(OVERLAYS, ["awq-int4", "fp16-tp2", "fp8"])

    def test_objects_validate_against_kubernetes_schemas(self):
        install_validator()
        configmaps = os.path.join(self.dir, "configmaps")
        out = run([tool("node", "NODE"), os.path.join(HERE, "validate.js"), "--dump-configmaps", configmaps]
                  + list(self.rendered.values()), env=dict(os.environ, NODE_PATH=os.path.join(NODE_DIR, "node_modules")))
        print(out.stdout, out.stderr)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        for name, path in self.rendered.items():
            with open(path) as f:
                text = f.read()
            for kind in ("Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"):
                self.assertIn(f"\nkind: {kind}\n", "\n" + text, f"{name} renders no {kind}")

        # Each rendered cluster config parses with the coordinator's own parser.
        configs = glob.glob(os.path.join(configmaps, "*", "shardserve-cluster-config-*", "cluster.yaml"))
        self.assertEqual(len(configs), 1 + len(OVERLAYS), configs)
        for config in configs:
            out = run([os.path.join(BIN_DIR, "shardserve-coordinator"), "--config", config, "--check-config"])
            self.assertEqual(out.returncode, 0, f"{config}: {out.stdout}{out.stderr}")
            self.assertIn("backend cuda", out.stdout)

    def test_layouts(self):
        with open(self.rendered["fp16-tp2"]) as f:
            tp2 = f.read()
        self.assertIn("nvidia.com/gpu: 2", tp2)
        self.assertIn("tp_size: 2", tp2)
        with open(self.rendered["fp8"]) as f:
            fp8 = f.read()
        self.assertIn("nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3", fp8)
        self.assertIn("quantization: fp8", fp8)
        with open(self.rendered["awq-int4"]) as f:
            self.assertIn("quantization: awq", f.read())


class Prometheus(unittest.TestCase):
    def test_promtool(self):
        promtool = tool("promtool", "PROMTOOL")
        out = run([promtool, "check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml")])
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        out = run([promtool, "check", "rules", os.path.join(DEPLOY, "prometheus", "alerts.yml")])
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)


def referenced_metrics():
    """{name: [where]} of every shardserve_* series the dashboard's and the rules' queries name."""
    names = {}
    with open(os.path.join(DEPLOY, "grafana", "shardserve-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [("dashboard", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [("dashboard variable", v["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        rules = f.read()
    rule_exprs = re.findall(r"expr: *>?-?\s*((?:.|\n)*?)\n\s+(?:for|labels):", rules)
    assert len(rule_exprs) == rules.count("- alert:"), "an alert's expr was not found"
    exprs += [("alerts.yml", e) for e in rule_exprs]
    for where, expr in exprs:
        for name in re.findall(r"\bshardserve_[a-z0-9_]+", expr):
            names.setdefault(name, []).append(where)
    return names


def exposed_series(text):
    """Series names in a Prometheus text exposition (histograms as _bucket, _sum, _count)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


class Metrics(unittest.TestCase):
    def test_dashboard_and_rules_query_exported_metrics(self):
        import cluster as cl
        import grpc
        pb, pb_grpc = cl.load_stubs()
        cluster = cl.Cluster(models={"tiny": (cl.TINY, None)},
                             groups=[{"name": "main", "model": "tiny", "num_kv_blocks": 64}])
        cluster.start()
        try:
            # One request, so that every per-model series (latency histograms, tokens) exists.
            stub = pb_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
            stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=4,
                                             temperature=0, ignore_eos=True), timeout=60)
            exported = exposed_series(cl.scrape(cluster.metrics_address))
            for worker in cluster.workers.values():
                exported |= exposed_series(cl.scrape(worker["metrics_address"]))
        finally:
            cluster.stop()
        referenced = referenced_metrics()
        self.assertGreater(len(referenced), 10)
        missing = {n: w for n, w in referenced.items() if n not in exported}
        self.assertEqual(missing, {}, f"queried but not exported; exported: {sorted(exported)}")


if __name__ == "__main__":
    unittest.main()
