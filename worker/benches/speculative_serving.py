#!/usr/bin/env python3
"""Served decode with and without speculative decoding, side by side in one run.

Starts `neox-worker serve` once per setting (`--speculative-tokens 0`, then each K given),
drives it with `neox bench --json` over the same workloads, and prints tokens/s, TPOT and
TTFT per workload with the on/off ratio and the share of drafts the model kept (from the
server's metrics). Workloads: greedy (text that repeats itself, as a model in a loop or a
copy-heavy task does), "natural" (temperature 0.7, top-k 40: on a trained model, text whose
word pairs recur with other continuations, so many drafts fail) and sampled at temperature 1
(on random weights no suffix recurs: no drafts, the cost of looking).

  python3 worker/benches/speculative_serving.py --worker target/release/neox-worker \
      --neox target/release/neox --model /tmp/neox125m [--k 4] [--requests 8]
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url, name):
    text = urllib.request.urlopen(url).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def serve(worker, neox, model, k, extra):
    grpc, metrics = free_port(), free_port()
    args = [worker, "serve", "--grpc-addr", f"127.0.0.1:{grpc}", "--metrics-addr", f"127.0.0.1:{metrics}", "--http-addr", "off",
            "--speculative-tokens", str(k)] + extra
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    addr = f"http://127.0.0.1:{grpc}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode})")
        ok = subprocess.run([neox, "--addr", addr, "health"], capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.strip() == "SERVING":
            return proc, addr, f"http://127.0.0.1:{metrics}/metrics"
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server never became SERVING")


def bench(neox, addr, workload, concurrency, requests, tokens):
    args = [neox, "--addr", addr, "bench", "--json", "--concurrency", str(concurrency), "--requests",
            str(requests), "--max-new-tokens", str(tokens), "--ignore-eos", "--prompt", "ROMEO:\n"]
    if workload == "sampled":
        args += ["--temperature", "1.0", "--seed", "1"]
    elif workload == "natural":
        args += ["--temperature", "0.7", "--top-k", "40", "--seed", "1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--neox", required=True)
    ap.add_argument("--model", default="", help="HF checkpoint dir (default: the built-in model)")
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--extra", default="", help="more serve flags, space separated")
    ap.add_argument("--json", action="store_true", help="also print every figure as JSON")
    a = ap.parse_args()
    runs = [("greedy", 1), ("greedy", 4), ("natural", 1), ("sampled", 1)]
    results = {}
    for k in [0] + a.k:
        proc, addr, url = serve(a.worker, a.neox, a.model, k, a.extra.split())
        try:
            # Warm up (first-touch of the weights, thread pools).
            bench(a.neox, addr, "greedy", 1, 1, 8)
            for w, c in runs:
                d0 = metric(url, "neox_spec_decode_draft_tokens_total")
                k0 = metric(url, "neox_spec_decode_accepted_tokens_total")
                r = bench(a.neox, addr, w, c, a.requests * c, a.tokens)
                r["drafts"] = metric(url, "neox_spec_decode_draft_tokens_total") - d0
                r["kept"] = metric(url, "neox_spec_decode_accepted_tokens_total") - k0
                results[(k, w, c)] = r
        finally:
            proc.kill()
            proc.wait()
    print(f"model {a.model or 'builtin:shakespeare'}, {a.tokens} new tokens per request")
    print("| workload | streams | K | tokens/s | vs K=0 | TPOT p50 ms | TTFT p50 ms | drafts kept |")
    print("|---|---|---|---|---|---|---|---|")
    for w, c in runs:
        base = results[(0, w, c)]["tokens_per_second"]
        for k in [0] + a.k:
            r = results[(k, w, c)]
            kept = f"{r['kept']:.0f}/{r['drafts']:.0f}" if r["drafts"] else "-"
            print(f"| {w} | {c} | {k} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base:.2f}x "
                  f"| {r['tpot_ms']['p50']:.2f} | {r['ttft_ms']['p50']:.1f} | {kept} |")
    if "--json" in sys.argv:
        print(json.dumps({f"{k}/{w}/{c}": r for (k, w, c), r in results.items()}))


if __name__ == "__main__":
    main()
