#!/usr/bin/python3
"""Serving benchmark sweeps and their report, docs/benchmarks.md.

    # against a running server: every (input/output lengths) x concurrency, then the report
    scripts/bench_report.py sweep --target HOST:PORT --model NAME --name fp8-h100 \\
        --setup "synthetic Llama-3.1-70B, FP8, 1x H100" --deployment fp8-h100 \\
        --server-command "shardserve serve ..." [--bench build/bin/shardserve]
    # the report again from the result files alone (no server)
    scripts/bench_report.py render

`sweep` runs `shardserve bench` (closed loop; --bench, else $SHARDSERVE_BENCH, else
build/bin/shardserve) once per point and writes under RESULTS_DIR/NAME/: run.json (the set's
setup and the sweeps' commands), one report per point (in128-out128-c8.json) and its per-request
samples (samples/), then the plots (scripts/plot_bench.py) and the report. A point whose
requests fail is kept (its errors show in the tables); an interrupted or unreachable bench stops
the sweep. A set's folder accumulates points over sweeps (a point measured again replaces its
file): delete the folder to start a set over.

`render` rebuilds the plots of every set under RESULTS_DIR and writes the report from the result
files found there, and from nothing else: tables of the measured figures, the plots, the exact
commands, and the reference claims beside what the sets measured. It needs Debian's
python3-matplotlib for the plots; the rest is the standard library.
"""
import argparse
import datetime
import glob
import gzip
import json
import shutil
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "scripts", "plot_bench.py")
DEFAULT_RESULTS = os.path.join("docs", "benchmarks", "serving")
DEFAULT_DOC = os.path.join("docs", "benchmarks.md")

# (deployment key, what is claimed, source, output tokens/s). Single-stream claims are compared
# with a set's concurrency-1 run; TensorRT-LLM's offline throughput (every request at once) with a
# set's highest concurrency at the same lengths.
SINGLE_STREAM_CLAIMS = [
    ("fp16-tp2", "Llama-3.1-70B FP16 on 2 GPUs, single stream", "deployment guide", "~50"),
    ("int8", "Llama-3.1-70B INT8, single stream", "deployment guide", "~40"),
    ("awq-int4", "Llama-3.1-70B INT4 AWQ, single stream", "deployment guide", "~60"),
    ("fp8-h100", "Llama-3.1-70B FP8 on one H100, single stream", "deployment guide", "~80"),
]
THROUGHPUT_CLAIMS = [
    ("fp8-h100", (128, 128), "Llama-3.1-70B FP8 on one H100, 128 in / 128 out, max throughput",
     "TensorRT-LLM published performance", "3,378"),
    ("fp8-h100", (128, 2048), "Llama-3.1-70B FP8 on one H100, 128 in / 2048 out, max throughput",
     "TensorRT-LLM published performance", "911"),
]


def bench_binary(arg):
    return arg or os.environ.get("SHARDSERVE_BENCH") or os.path.join("build", "bin", "shardserve")


def parse_lengths(text):
    pairs = []
    for item in text.split(","):
        inp, _, out = item.partition("/")
        pairs.append((int(inp), int(out)))
    return pairs


def point_name(inp, out, c):
    return f"in{inp}-out{out}-c{c}"


def sweep_command(argv):
    """The sweep as typed, less --bench: where the binary lives is the machine's business."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--bench":
            skip = True
        elif not a.startswith("--bench="):
            kept.append(a)
    return "scripts/bench_report.py " + " ".join(shlex.quote(a) for a in kept)


def sweep(args):
    bench = bench_binary(args.bench)
    set_dir = os.path.join(args.results_dir, args.name)
    os.makedirs(os.path.join(set_dir, "samples"), exist_ok=True)
    # A set may be measured by several sweeps (one per length pair, say): it keeps every command.
    earlier = []
    if os.path.exists(os.path.join(set_dir, "run.json")):
        with open(os.path.join(set_dir, "run.json")) as f:
            earlier = json.load(f)["sweep_commands"]
    command = sweep_command(sys.argv[1:])
    meta = {
        "name": args.name,
        "setup": args.setup,
        "deployment": args.deployment,
        "note": args.note,
        "target": args.target,
        "model": args.model,
        "server_command": args.server_command,
        "sweep_commands": [c for c in earlier if c != command] + [command],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with open(os.path.join(set_dir, "run.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    points = [(inp, out, c) for inp, out in parse_lengths(args.lengths) for c in concurrencies]
    for k, (inp, out, c) in enumerate(points):
        name = point_name(inp, out, c)
        result = os.path.join(set_dir, name + ".json")
        # Paths relative to the set's folder, as the report and the plots look them up.
        samples = os.path.join("samples", name + ".jsonl")
        cmd = [bench, "bench", "--target", args.target, "--model", args.model, "--concurrency", str(c),
               "--num-requests", str(max(args.min_requests, args.rounds * c)),
               "--warmup", str(args.warmup_rounds * c), "--input-len", str(inp), "--output-len", str(out),
               "--timeout", str(args.timeout), "--output", "json",
               "--output-file", name + ".json", "--samples-file", samples] + shlex.split(args.extra_args)
        # Without --seed each bench draws its own; with it, one per point, so that no point
        # meets another's prompts in the server's prefix cache.
        if args.seed is not None:
            cmd += ["--seed", str(args.seed + k)]
        print(f"bench_report: {name}: {' '.join(shlex.quote(a) for a in cmd)}", file=sys.stderr, flush=True)
        if os.path.exists(result):
            os.unlink(result)  # an earlier sweep's: only this run's may stand
        proc = subprocess.run(cmd, cwd=set_dir, stdout=subprocess.DEVNULL)
        if proc.returncode not in (0, 1) or not os.path.exists(result):
            sys.exit(f"bench_report: {name}: shardserve bench ended with status {proc.returncode}; sweep stopped")
        if proc.returncode == 1:
            print(f"bench_report: {name}: some requests failed (see errors_by_code in {result})", file=sys.stderr)
        # A long point's samples run to megabytes of ITLs: kept compressed (plot_bench.py reads both).
        with open(os.path.join(set_dir, samples), "rb") as raw, gzip.open(os.path.join(set_dir, samples + ".gz"), "wb") as gz:
            shutil.copyfileobj(raw, gz)
        os.unlink(os.path.join(set_dir, samples))
    if not args.no_render:
        render(args)


def load_set(set_dir):
    with open(os.path.join(set_dir, "run.json")) as f:
        meta = json.load(f)
    results = []
    for path in sorted(glob.glob(os.path.join(set_dir, "*.json"))):
        if os.path.basename(path) == "run.json":
            continue
        with open(path) as f:
            r = json.load(f)
        r["_path"] = path
        results.append(r)
    results.sort(key=lambda r: (int(r["input_len"]) if str(r.get("input_len", "")).isdigit() else 0,
                                int(r["output_len"]) if str(r["output_len"]).isdigit() else 0,
                                r.get("concurrency") or 0))
    return meta, results


def fmt(v, digits=1):
    return f"{v:,.{digits}f}"


def ms(v, digits=1):
    return fmt(v * 1e3, digits)


def lengths_of(r):
    try:
        return int(r["input_len"]), int(r["output_len"])
    except (TypeError, ValueError):
        return None


def single_stream(results):
    """The concurrency-1 run with the longest output (closest to steady decode), or None."""
    ones = [r for r in results if r.get("concurrency") == 1 and r["completed"] > 0 and lengths_of(r)]
    return max(ones, key=lambda r: lengths_of(r)[1], default=None)


def best_at(results, lengths):
    rs = [r for r in results if lengths_of(r) == lengths and r["completed"] > 0]
    return max(rs, key=lambda r: r["output_tokens_per_s"], default=None)


def render(args):
    doc_dir = os.path.dirname(os.path.abspath(args.doc))
    sets = []
    for run_json in sorted(glob.glob(os.path.join(args.results_dir, "*", "run.json"))):
        set_dir = os.path.dirname(run_json)
        meta, results = load_set(set_dir)
        if not results:
            continue
        plots = subprocess.run([sys.executable, PLOT, "--out-dir", set_dir] + [r["_path"] for r in results],
                               capture_output=True, text=True)
        if plots.returncode != 0:
            sys.exit(f"bench_report: plotting {set_dir} failed (needs python3-matplotlib):\n{plots.stderr}")
        sets.append((set_dir, meta, results, plots.stdout.split()))
    if not sets:
        sys.exit(f"bench_report: no results under {args.results_dir}: run `bench_report.py sweep` first")

    rel = lambda p: os.path.relpath(os.path.abspath(p), doc_dir)  # noqa: E731
    out = [
        "# Serving benchmarks",
        "",
        f"<!-- Generated by scripts/bench_report.py from {args.results_dir}/; edit the results, not this file. -->",
        "",
        "Load from `shardserve bench` against a running server through the public gRPC API (streaming",
        "`GenerateStream`), closed loop: `concurrency` requests in flight, each followed at once by the next.",
        "Prompts are synthetic token ids; every request generates exactly its output length (`ignore_eos`).",
        "TTFT: first token - send; ITL: gaps between streamed tokens (a message of n tokens after a gap g",
        "counts n gaps of g/n); E2E: the whole call; output tok/s and req/s over the measured window",
        "(warm-up excluded). \"cached input tok\": prompt tokens the server's prefix cache served (0 unless",
        "prompts repeat). Conventions: `worker/cli/bench_stats.h`. Engine-only figures (no network, no",
        "coordinator) are in [benchmarks/README.md](benchmarks/README.md).",
        "",
    ]
    for set_dir, meta, results, pngs in sets:
        out += [f"## {meta['name']}: {meta['setup']}", ""]
        if meta.get("note"):
            out += [f"> {meta['note']}", ""]
        out += [f"Model `{meta['model']}`, measured {meta['date']}.", "",
                "| in / out | concurrency | requests | errors | req/s | output tok/s | input tok/s "
                "| cached input tok | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms | E2E p50 / p99 s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            errors = str(r["errors"]) + (" (" + ", ".join(f"{k} {v}" for k, v in r["errors_by_code"].items()) + ")"
                                         if r["errors"] else "")
            out.append(f"| {r.get('input_len') or 'file'} / {r['output_len']} | {r.get('concurrency') or load_desc(r)} "
                       f"| {r['completed']} | {errors} | {fmt(r['requests_per_s'], 2)} | {fmt(r['output_tokens_per_s'])} "
                       f"| {fmt(r['input_tokens_per_s'])} | {r['total_cached_prompt_tokens']:,} "
                       f"| {ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])} "
                       f"| {ms(r['itl_p50_s'], 2)} / {ms(r['itl_p99_s'], 2)} | {ms(r['tpot_p50_s'], 2)} "
                       f"| {fmt(r['e2e_p50_s'], 2)} / {fmt(r['e2e_p99_s'], 2)} |")
        out.append("")
        for png in pngs:
            title = os.path.splitext(os.path.basename(png))[0].replace("_", " ")
            out += [f"![{meta['name']}: {title}]({rel(png)})", ""]
        out += ["Commands: the server, then the sweeps (from the repository root), which ran these benches"
                f" (in `{os.path.join(args.results_dir, meta['name'])}/`; `shardserve` is the binary the sweep was given):",
                "", "```sh"]
        if meta.get("server_command"):
            out.append(meta["server_command"])
        out += meta["sweep_commands"]
        out += [r["command"] for r in results]
        out += ["```", ""]

    out += ["## Reference claims", "",
            "What the deployment guide and TensorRT-LLM claim, beside what the sets above measured on the same",
            "deployment (a set's `--deployment`). Single-stream rows: the set's concurrency-1 run with the",
            "longest output. TensorRT-LLM's figures are offline throughput (every request at once): beside them",
            "the set's best output tok/s at those lengths. For the bandwidth bounds of single-stream decode see",
            "[deploy.md](deploy.md) (\"Where the guide is wrong\").", "",
            "| claim | source | claimed output tok/s | measured here |", "|---|---|---:|---|"]
    by_deployment = {}
    for _, meta, results, _ in sets:
        if meta.get("deployment"):
            by_deployment.setdefault(meta["deployment"], []).append((meta, results))
    for key, claim, source, value in SINGLE_STREAM_CLAIMS:
        cells = []
        for meta, results in by_deployment.get(key, []):
            r = single_stream(results)
            if r:
                cells.append(f"{fmt(r['output_tokens_per_s'])} ({meta['name']}, {r['input_len']}/{r['output_len']}, "
                             f"TPOT p50 {ms(r['tpot_p50_s'])} ms)")
        out.append(f"| {claim} | {source} | {value} | {'; '.join(cells) or 'not measured'} |")
    for key, lengths, claim, source, value in THROUGHPUT_CLAIMS:
        cells = []
        for meta, results in by_deployment.get(key, []):
            r = best_at(results, lengths)
            if r:
                cells.append(f"{fmt(r['output_tokens_per_s'])} ({meta['name']}, concurrency {r['concurrency']})")
        out.append(f"| {claim} | {source} | {value} | {'; '.join(cells) or 'not measured'} |")
    out.append("")

    with open(args.doc, "w") as f:
        f.write("\n".join(out))
    print(f"bench_report: wrote {args.doc} from {sum(len(s[2]) for s in sets)} results in {len(sets)} set(s)",
          file=sys.stderr)


def load_desc(r):
    return f"rate {r['request_rate']}" if r["mode"] == "open" else str(r.get("concurrency"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("sweep", "render"):
        p = sub.add_parser(name)
        p.add_argument("--results-dir", default=DEFAULT_RESULTS, help="one folder per set (default %(default)s)")
        p.add_argument("--doc", default=DEFAULT_DOC, help="the report to write (default %(default)s)")
        if name == "render":
            continue
        p.add_argument("--target", required=True, help="the server, HOST:PORT")
        p.add_argument("--model", required=True)
        p.add_argument("--name", required=True, help="the set's folder under --results-dir, e.g. fp8-h100")
        p.add_argument("--setup", required=True, help="what was measured: model, precision, GPUs")
        p.add_argument("--deployment", choices=[c[0] for c in SINGLE_STREAM_CLAIMS],
                       help="the reference claims this set is compared with")
        p.add_argument("--note", default="", help="a line printed under the set's heading")
        p.add_argument("--server-command", default="", help="how the server was started, for the report")
        p.add_argument("--bench", help="the shardserve binary (default $SHARDSERVE_BENCH, else build/bin/shardserve)")
        p.add_argument("--lengths", default="128/128,128/2048", help="input/output pairs (default %(default)s)")
        p.add_argument("--concurrencies", default="1,8,32,128", help="(default %(default)s)")
        p.add_argument("--rounds", type=int, default=4, help="requests per point: rounds x concurrency ...")
        p.add_argument("--min-requests", type=int, default=8, help="... and at least this many")
        p.add_argument("--warmup-rounds", type=int, default=1, help="warm-up requests: this x concurrency")
        p.add_argument("--seed", type=int, help="point k of the sweep gets seed + k (default: fresh seeds)")
        p.add_argument("--timeout", type=float, default=1800, help="deadline of each request, seconds")
        p.add_argument("--extra-args", default="", help="more shardserve bench arguments, one string")
        p.add_argument("--no-render", action="store_true", help="results only; render later")
    args = ap.parse_args()
    if args.command == "sweep":
        bench = bench_binary(args.bench)
        args.bench = os.path.abspath(bench) if os.sep in bench else bench  # the benches run in the set's folder
        sweep(args)
    else:
        render(args)


if __name__ == "__main__":
    main()
