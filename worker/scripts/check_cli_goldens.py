#!/usr/bin/env python3
"""The `logits` and `perplexity` commands of a neox-worker binary against HF's goldens, on the
device given: every fixture case's last-position top-5 logits (fp32, within 1e-3) and the demo
model's Hamlet perplexity (fp16, within 0.05). gpu-run.sh runs it with --device cuda; with
--device cpu it checks the script itself anywhere.

Usage: check_cli_goldens.py WORKER FIXTURE_DIR --device cuda
"""
import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "worker/assets/shakespeare-neox"


def run(worker, *args):
    out = subprocess.run([worker, *args, "--json"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("worker")
    ap.add_argument("fixture")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    failed = []

    golden = json.loads((pathlib.Path(a.fixture) / "golden.json").read_text())
    worst = 0.0
    for case in golden["cases"]:
        ids = ",".join(map(str, case["input_ids"]))
        got = run(a.worker, "logits", "--model", a.fixture, "--device", a.device, "--dtype", "fp32", "--prompt-ids", ids)
        logits = got["logits"]
        for i, want in zip(case["last_top5_ids"], case["last_top5_logits"]):
            worst = max(worst, abs(logits[i] - want))
    print(f"FIGURE cli logits fp32 on {a.device}: max |logit - HF| over the top 5 of {len(golden['cases'])} cases {worst:.2e}")
    if worst > 1e-3:
        failed.append(f"logits differ from HF by {worst}")

    hamlet = json.loads((SHAKESPEARE / "golden.json").read_text())["hamlet_eval"]
    got = run(
        a.worker, "perplexity", "--device", a.device, "--dtype", "fp16",
        "--ids-file", str(SHAKESPEARE / hamlet["file"]), "--window", str(hamlet["window"]),
    )
    print(f"FIGURE cli perplexity fp16 on {a.device}: {got['perplexity']:.4f} vs HF {hamlet['perplexity']:.4f}")
    if abs(got["perplexity"] - hamlet["perplexity"]) > 0.05 or got["predicted_tokens"] != hamlet["predicted_tokens"]:
        failed.append(f"perplexity {got['perplexity']} over {got['predicted_tokens']} tokens")

    for f in failed:
        print(f"check_cli_goldens: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
