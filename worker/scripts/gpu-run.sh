#!/usr/bin/env bash
# On a GPU machine, from the repository root, with `.gpu/` from pack-for-gpu.sh: unpacks the
# CUDA worker and the GPU tests, puts the CUDA 13 and NCCL libraries of the local torch install
# on the library path, runs every GPU check, and with --bench the 20B-shaped benchmark against
# HF transformers (worker/benches/gpu_20b.py; its ~41 GB checkpoint is written in the
# background while the checks run).
#
# Every check runs even when one before it failed; the failures are listed at the end (exit 1).
# With the device tool's $OUT set, the whole log, the figures and each JSON result land there
# as they are made, so a run cut short still brings back what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu-run.log") 2>&1
fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
LOGS=${OUT:-/tmp}
BENCH=0
[ "${1:-}" = "--bench" ] && BENCH=1
# shellcheck source=gpu-env.sh
. worker/scripts/gpu-env.sh neox-worker gpu-tests neox gpu-gemv-bench
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
echo "missing libraries:"; ldd "$BIN/neox-worker" | grep "not found" || echo "  none"
df -h / /tmp /dev/shm 2>/dev/null; free -g

# The checkpoint (38.3 GiB) goes where there is room for it, written while the checks run: RAM
# (/dev/shm) first, as the lent machines' disk is slower than their memory and the run is timed.
CKPT=""
WRITER=""
if [ $BENCH = 1 ]; then
  for d in /dev/shm /tmp; do
    avail=$(df --output=avail -B1G "$d" 2>/dev/null | tail -1 | tr -d ' ')
    if [ "${avail:-0}" -ge 42 ] || [ -f "$d/neox20b/model.safetensors.index.json" ]; then CKPT=$d/neox20b; break; fi
  done
  if [ -n "$CKPT" ]; then
    echo "== writing the 20B-shaped checkpoint to $CKPT in the background"
    python3 worker/benches/gpu_20b.py --write-only --dir "$CKPT" >"$LOGS/checkpoint.log" 2>&1 &
    WRITER=$!
  else
    echo "gpu-run: no 42 GiB free in /tmp or /dev/shm for the 20B checkpoint" >&2
  fi
fi

FAILED=()
check() {
  local name=$1
  shift
  echo
  echo "== $name"
  if "$@"; then echo "-- ok: $name"; else echo "-- FAILED: $name"; FAILED+=("$name"); fi
}

gpu_tests() {
  # The NCCL time-out test leaves a thread blocked in ncclCommInitRank: it runs alone, last.
  NEOX_FIXTURE_DIR=$PWD/.gpu/fixtures/tiny-neox timeout 240 "$BIN/gpu-tests" --test-threads 1 --nocapture \
    --skip nccl_group_whose_peer_never_joins || return 1
  NEOX_FIXTURE_DIR=$PWD/.gpu/fixtures/tiny-neox timeout 60 "$BIN/gpu-tests" --exact --nocapture \
    nccl_group_whose_peer_never_joins_fails_within_the_timeout
}

# gen FLAGS...: greedy ids of `neox-worker generate` (stderr kept for a failure).
gen() {
  timeout 120 "$BIN/neox-worker" generate --prompt $'ROMEO:\n' --max-new-tokens 32 --json "$@" 2>"$LOGS/gen.err" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['generated_ids'])" || { cat "$LOGS/gen.err" >&2; return 1; }
}

tp2_over_tcp() {
  local gpu_ids cpu_ids
  gpu_ids=$(gen --device cuda --tp 2 --collectives tcp) || return 1
  cpu_ids=$(gen --device cpu) || return 1
  echo "gpu tp2: $gpu_ids"
  echo "cpu:     $cpu_ids"
  [ "$gpu_ids" = "$cpu_ids" ] || { echo "TP=2 on the GPU differs from the CPU" >&2; return 1; }
}

SERVER=""
stop_server() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; SERVER=""; }
trap stop_server EXIT
# serve GRPC_PORT METRICS_PORT [FLAGS...]: a fp32 server on the GPU, SERVING before it returns.
serve() {
  local grpc=$1 metrics=$2
  shift 2
  stop_server
  NEOX_LOG=info "$BIN/neox-worker" serve --device cuda --dtype fp32 --grpc-addr "127.0.0.1:$grpc" \
    --metrics-addr "127.0.0.1:$metrics" --http-addr off "$@" >"$LOGS/serve-$grpc.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    "$BIN/neox" --addr "http://127.0.0.1:$grpc" health >/dev/null 2>&1 && return 0
    kill -0 "$SERVER" 2>/dev/null || { tail -20 "$LOGS/serve-$grpc.log" >&2; echo "the server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "the server never answered health" >&2
  return 1
}
metric() {
  python3 -c "import urllib.request as u, sys; t=u.urlopen('http://127.0.0.1:$1/metrics').read().decode(); print(int(float([l.split()[1] for l in t.splitlines() if l.startswith(sys.argv[1] + ' ')][0])))" "$2"
}
ids() { python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])"; }
WANT=$(python3 -c "import json; print(json.load(open('worker/assets/shakespeare-neox/golden.json'))['prompts'][0]['output_ids'])")
sampled() {
  "$BIN/neox" --addr "http://127.0.0.1:$1" generate $'ROMEO:\n' --max-new-tokens 40 --ignore-eos \
    --temperature 0.8 --top-k 40 --top-p 0.9 --repetition-penalty 1.2 --seed "$2" --json | ids
}
ALONE=""

serving() {
  serve 50091 9491 || return 1
  local i got pids=() hits first second long t0
  grep -h "warmed up\|loaded .* of weights\|staged" "$LOGS/serve-50091.log"
  # The warm-up compiled the kernels' PTX before health said SERVING: a first request is fast.
  t0=$(date +%s.%N)
  "$BIN/neox" --addr http://127.0.0.1:50091 generate $'ROMEO:\n' --max-new-tokens 40 --ignore-eos --temperature 0.8 \
    --top-k 40 --seed 1 --json >/dev/null || return 1
  echo "FIGURE first request after start-up (40 tokens, sampled): $(python3 -c "import time; print(f'{time.time() - $t0:.2f}')") s"
  for i in $(seq 1 8); do
    "$BIN/neox" --addr http://127.0.0.1:50091 generate $'ROMEO:\n' --max-new-tokens 40 --json >"/tmp/neox-gpu-gen-$i.json" &
    pids+=($!)
  done
  wait "${pids[@]}"
  for i in $(seq 1 8); do
    got=$(ids <"/tmp/neox-gpu-gen-$i.json")
    [ "$got" = "$WANT" ] || { echo "served request $i differs from HF: $got" >&2; return 1; }
  done
  echo "8 concurrent greedy requests equal HF's golden ids"
  # Sampling on the GPU: a seed fixes the text, alone or among 8 concurrent requests.
  ALONE=$(sampled 50091 7)
  pids=()
  for i in $(seq 1 8); do
    sampled 50091 "$i" >"/tmp/neox-gpu-sampled-$i.txt" &
    pids+=($!)
  done
  wait "${pids[@]}"
  echo "seed 7: $ALONE"
  [ "$(cat /tmp/neox-gpu-sampled-7.txt)" = "$ALONE" ] || { echo "seed 7 batched differs from alone" >&2; return 1; }
  [ "$(cat /tmp/neox-gpu-sampled-1.txt)" != "$ALONE" ] || { echo "seeds 1 and 7 gave the same text" >&2; return 1; }
  # Prefix caching: a repeated long prompt starts from its cached KV, same ids.
  long=$(python3 -c "import json; g=json.load(open('worker/assets/shakespeare-neox/golden.json')); print(''.join(p['prompt'] for p in g['prompts']))")
  first=$("$BIN/neox" --addr http://127.0.0.1:50091 generate "$long" --max-new-tokens 24 --ignore-eos --json | ids)
  second=$("$BIN/neox" --addr http://127.0.0.1:50091 generate "$long" --max-new-tokens 24 --ignore-eos --json | ids)
  hits=$(metric 9491 neox_prefix_cache_hits_total)
  echo "cached prompt tokens: $hits"
  [ "$first" = "$second" ] || { echo "the cached prompt changed the output: $first vs $second" >&2; return 1; }
  [ "$hits" -gt 0 ] || { echo "the repeated prompt found nothing in the prefix cache" >&2; return 1; }
  "$BIN/neox" --addr http://127.0.0.1:50091 info
  stop_server
}

speculation() {
  serve 50092 9492 --speculative-tokens 4 || return 1
  local got spec kept
  got=$("$BIN/neox" --addr http://127.0.0.1:50092 generate $'ROMEO:\n' --max-new-tokens 40 --json | ids)
  [ "$got" = "$WANT" ] || { echo "speculative greedy differs from HF: $got" >&2; return 1; }
  spec=$(sampled 50092 7)
  [ -z "$ALONE" ] || [ "$spec" = "$ALONE" ] || { echo "speculative seed 7 differs: $spec" >&2; return 1; }
  kept=$(metric 9492 neox_spec_decode_accepted_tokens_total)
  echo "draft tokens kept: $kept"
  [ "$kept" -gt 0 ] || { echo "no draft was kept" >&2; return 1; }
  stop_server
}

check "GPU test suite (HF goldens in fp32/fp16/bf16, fp16 perplexity, paged KV, sampling, NCCL)" gpu_tests
check "TP=2 ranks sharing the GPU over TCP: greedy ids equal the CPU's (fp32)" tp2_over_tcp
check "the logits (fp32) and perplexity (fp16) commands on the GPU against HF's goldens" \
  python3 worker/scripts/check_cli_goldens.py "$BIN/neox-worker" "$PWD/.gpu/fixtures/tiny-neox" --device cuda
check "serving on the GPU (fp32, paged KV): HF ids, seeded sampling, prefix cache" serving
check "speculative decoding on the GPU: the same greedy and seeded ids, drafts kept" speculation

bench() {
  [ -n "$CKPT" ] || return 1
  echo "waiting for the checkpoint writer"
  wait "$WRITER" || { tail -20 "$LOGS/checkpoint.log" >&2; return 1; }
  tail -2 "$LOGS/checkpoint.log"
  python3 worker/benches/gpu_20b.py --worker "$BIN/neox-worker" --dir "$CKPT" --out "$LOGS" "${@}"
}
[ $BENCH = 1 ] && check "20B-shaped benchmark beside HF transformers" bench "${@:2}"
# After it: the checkpoint writer holds the GPU's memory while it runs.
[ $BENCH = 1 ] && check "the GEMV kernels beside cuBLAS on the 20B matrix shapes" timeout 300 "$BIN/gpu-gemv-bench"

echo
echo "== figures"
grep -h "^FIGURE" "$OUT/gpu-run.log" 2>/dev/null || echo "(set OUT to collect them)"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu-run: FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "gpu-run: every check passed"
