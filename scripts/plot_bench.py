#!/usr/bin/python3
"""Plots of `shardserve bench` results, with Debian's python3-matplotlib.

    scripts/plot_bench.py --out-dir DIR RESULT.json [RESULT.json ...]

A result file holds one JSON report (`--output-file`, or the line `--output json` prints) or
several, one per line. It writes, and prints the paths of:

- throughput_latency.png: output tokens/s against TTFT, ITL and E2E latency (p50 solid, p99
  dashed): one line per workload (input/output lengths, closed or open loop), one point per
  concurrency or request rate, labelled with it;
- ttft_distribution.png and itl_distribution.png: histogram and CDF of each result whose report
  names a samples file (`--samples-file`), found as written or beside the result file, plain or
  gzipped (NAME.gz, as scripts/bench_report.py keeps them). ITL gaps
  of 0 (tokens that came in one message) are drawn at 1 us on the CDF's log axis.
"""
import argparse
import gzip
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def load_results(path):
    with open(path) as f:
        text = f.read()
    try:
        results = [json.loads(text)]
    except json.JSONDecodeError:
        results = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in results:
        r["_path"] = path
    return results


def workload(r):
    inp = r.get("input_len") or "file"
    return f"{inp}/{r['output_len']}" + (" open loop" if r["mode"] == "open" else "")


def load_label(r):
    if r["mode"] == "closed":
        return f"c={r['concurrency']}"
    label = f"r={r['request_rate']}"
    return label + (f" max {r['max_concurrency']}" if r.get("max_concurrency") else "")


def load_key(r):
    """Orders the points of one workload: by concurrency, or by request rate."""
    if r["mode"] == "closed":
        return r["concurrency"]
    rate = r["request_rate"]
    return float("inf") if rate == "inf" else rate


def samples_path(r):
    name = r.get("samples_file")
    if not name:
        return None
    here = os.path.dirname(r["_path"])
    for candidate in (name, os.path.join(here, name), os.path.join(here, os.path.basename(name))):
        for path in (candidate, candidate + ".gz"):
            if os.path.exists(path):
                return path
    print(f"plot_bench: {r['_path']}: samples file {name} not found; no distribution for it", file=sys.stderr)
    return None


def load_samples(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ok = [s for s in rows if s["status"] == "OK"]
    return [s["ttft_s"] for s in ok], [v for s in ok for v in s["itl_s"]]


def plot_throughput_latency(results, out):
    groups = {}
    for r in results:
        groups.setdefault(workload(r), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    metrics = [("ttft", "TTFT (ms)"), ("itl", "inter-token latency (ms)"), ("e2e", "end-to-end latency (s)")]
    for ax, (metric, ylabel) in zip(axes, metrics):
        scale = 1.0 if metric == "e2e" else 1e3
        for i, (name, rs) in enumerate(sorted(groups.items())):
            rs = sorted(rs, key=load_key)
            color = f"C{i % 10}"
            x = [r["output_tokens_per_s"] for r in rs]
            ax.plot(x, [r[f"{metric}_p50_s"] * scale for r in rs], "o-", color=color, label=f"{name} p50")
            ax.plot(x, [r[f"{metric}_p99_s"] * scale for r in rs], "s--", color=color, alpha=0.7, label=f"{name} p99")
            for r, xv in zip(rs, x):
                ax.annotate(load_label(r), (xv, r[f"{metric}_p50_s"] * scale), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Throughput against latency (p50 solid, p99 dashed)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_distribution(series, title, unit_label, out, zero_floor_ms=None):
    """series: [(label, values in ms)]. Histogram (linear, up to the largest p99) and CDF (log x)."""
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(13, 4.8))
    top = max(sorted(v)[int(0.99 * (len(v) - 1))] for _, v in series) or 1.0
    for i, (label, values) in enumerate(series):
        color = f"C{i % 10}"
        hist.hist([v for v in values if v <= top], bins=50, histtype="step", color=color, label=label)
        xs = sorted(max(v, zero_floor_ms) if zero_floor_ms else v for v in values)
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        cdf.step(xs, ys, where="post", color=color, label=label)
    hist.set_xlabel(f"{unit_label} (up to the largest p99)")
    hist.set_ylabel("count")
    cdf.set_xscale("log")
    cdf.set_xlabel(unit_label + (" (gaps of 0 at 1 us)" if zero_floor_ms else ""))
    cdf.set_ylabel("fraction of samples")
    for ax in (hist, cdf):
        ax.grid(True, alpha=0.3)
    cdf.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="result JSON files of shardserve bench")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    results = [r for path in args.results for r in load_results(path)]
    os.makedirs(args.out_dir, exist_ok=True)
    written = []

    out = os.path.join(args.out_dir, "throughput_latency.png")
    plot_throughput_latency(results, out)
    written.append(out)

    ttfts, itls = [], []
    for r in sorted(results, key=lambda r: (workload(r), load_key(r))):
        path = samples_path(r)
        if not path:
            continue
        ttft, itl = load_samples(path)
        label = f"{workload(r)} {load_label(r)}"
        if ttft:
            ttfts.append((label, [v * 1e3 for v in ttft]))
        if itl:
            itls.append((label, [v * 1e3 for v in itl]))
    if ttfts:
        out = os.path.join(args.out_dir, "ttft_distribution.png")
        plot_distribution(ttfts, "Time to first token", "TTFT (ms)", out)
        written.append(out)
    if itls:
        out = os.path.join(args.out_dir, "itl_distribution.png")
        plot_distribution(itls, "Inter-token latency", "ITL (ms)", out, zero_floor_ms=1e-3)
        written.append(out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
