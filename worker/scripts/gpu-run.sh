#!/usr/bin/env bash
# On a GPU machine, from the repository root, with `.gpu/` from pack-for-gpu.sh: unpacks the
# CUDA worker and the GPU tests, puts the CUDA 13 and NCCL libraries of the local torch install
# on the library path, runs the GPU test suite, and with --bench the 20B-shaped benchmark
# against HF transformers (worker/benches/gpu_20b.py; writes ~41 GB under /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .gpu ] || { echo "gpu-run: no .gpu/ here (run worker/scripts/pack-for-gpu.sh, carry .gpu)" >&2; exit 1; }
BIN=/tmp/neox-gpu
mkdir -p "$BIN"
gunzip -c .gpu/neox-worker.gz >"$BIN/neox-worker"
gunzip -c .gpu/gpu-tests.gz >"$BIN/gpu-tests"
gunzip -c .gpu/neox.gz >"$BIN/neox"
chmod +x "$BIN/neox-worker" "$BIN/gpu-tests" "$BIN/neox"

SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export LD_LIBRARY_PATH=$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
echo "missing libraries:"; ldd "$BIN/neox-worker" | grep "not found" || echo "  none"

echo "== GPU test suite"
NEOX_FIXTURE_DIR=$PWD/.gpu/fixtures/tiny-neox "$BIN/gpu-tests" --test-threads 1
echo "== TP=2 ranks sharing the GPU over TCP: greedy ids equal the CPU's (fp32)"
gen() { "$BIN/neox-worker" generate --prompt $'ROMEO:\n' --max-new-tokens 32 --json "$@" 2>/dev/null |
  python3 -c "import json,sys; print(json.load(sys.stdin)['generated_ids'])"; }
gpu_ids=$(gen --device cuda --tp 2 --collectives tcp)
cpu_ids=$(gen --device cpu)
echo "gpu tp2: $gpu_ids"
echo "cpu:     $cpu_ids"
[ "$gpu_ids" = "$cpu_ids" ] || { echo "gpu-run: TP=2 on the GPU differs from the CPU" >&2; exit 1; }
echo "== serve on the GPU (fp32, paged KV): 8 concurrent greedy requests equal HF's golden ids"
# serve GRPC_PORT METRICS_PORT [FLAGS...]: a fp32 server on the GPU, SERVING before it returns.
serve() {
  local grpc=$1 metrics=$2
  shift 2
  "$BIN/neox-worker" serve --device cuda --dtype fp32 --grpc-addr "127.0.0.1:$grpc" \
    --metrics-addr "127.0.0.1:$metrics" --http-addr off "$@" >"/tmp/neox-gpu-serve-$grpc.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 240); do
    "$BIN/neox" --addr "http://127.0.0.1:$grpc" health >/dev/null 2>&1 && return 0
    kill -0 $SERVER 2>/dev/null || { cat "/tmp/neox-gpu-serve-$grpc.log" >&2; echo "gpu-run: the server exited" >&2; exit 1; }
    sleep 0.5
  done
}
serve 50091 9491
want=$(python3 -c "import json; print(json.load(open('worker/assets/shakespeare-neox/golden.json'))['prompts'][0]['output_ids'])")
clients=()
for i in $(seq 1 8); do
  "$BIN/neox" --addr http://127.0.0.1:50091 generate $'ROMEO:\n' --max-new-tokens 40 --json >"/tmp/neox-gpu-gen-$i.json" &
  clients+=($!)
done
wait "${clients[@]}"
for i in $(seq 1 8); do
  got=$(python3 -c "import json; print(json.load(open('/tmp/neox-gpu-gen-$i.json'))['token_ids'])")
  [ "$got" = "$want" ] || { echo "gpu-run: served request $i differs: $got" >&2; exit 1; }
done
echo "== sampling on the GPU: a seed fixes the text, alone or among 8 concurrent requests"
sampled() { "$BIN/neox" --addr http://127.0.0.1:50091 generate $'ROMEO:\n' --max-new-tokens 40 --ignore-eos \
  --temperature 0.8 --top-k 40 --top-p 0.9 --repetition-penalty 1.2 --seed "$1" --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])"; }
alone=$(sampled 7)
pids=()
for i in $(seq 1 8); do
  sampled "$i" >"/tmp/neox-gpu-sampled-$i.txt" &
  pids+=($!)
done
wait "${pids[@]}"
echo "seed 7: $alone"
[ "$(cat /tmp/neox-gpu-sampled-7.txt)" = "$alone" ] || { echo "gpu-run: seed 7 batched differs from alone" >&2; exit 1; }
[ "$(cat /tmp/neox-gpu-sampled-1.txt)" != "$alone" ] || { echo "gpu-run: seeds 1 and 7 gave the same text" >&2; exit 1; }
echo "== prefix caching on the GPU: a repeated long prompt starts from its cached KV, same ids"
long=$(python3 -c "import json; g=json.load(open('worker/assets/shakespeare-neox/golden.json')); print(''.join(p['prompt'] for p in g['prompts']))")
served() { "$BIN/neox" --addr http://127.0.0.1:50091 generate "$long" --max-new-tokens 24 --ignore-eos --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])"; }
first=$(served)
second=$(served)
hits=$(python3 -c "import urllib.request as u; t=u.urlopen('http://127.0.0.1:9491/metrics').read().decode(); print(int(float([l.split()[1] for l in t.splitlines() if l.startswith('neox_prefix_cache_hits_total ')][0])))")
echo "cached prompt tokens: $hits"
[ "$first" = "$second" ] || { echo "gpu-run: the cached prompt changed the output: $first vs $second" >&2; exit 1; }
[ "$hits" -gt 0 ] || { echo "gpu-run: the repeated prompt found nothing in the prefix cache" >&2; exit 1; }
"$BIN/neox" --addr http://127.0.0.1:50091 info
kill $SERVER; trap - EXIT
echo "== speculative decoding on the GPU: the same greedy and seeded ids, drafts kept"
serve 50092 9492 --speculative-tokens 4
got=$("$BIN/neox" --addr http://127.0.0.1:50092 generate $'ROMEO:\n' --max-new-tokens 40 --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])")
[ "$got" = "$want" ] || { echo "gpu-run: speculative greedy differs from HF: $got" >&2; exit 1; }
spec_sampled=$("$BIN/neox" --addr http://127.0.0.1:50092 generate $'ROMEO:\n' --max-new-tokens 40 --ignore-eos \
  --temperature 0.8 --top-k 40 --top-p 0.9 --repetition-penalty 1.2 --seed 7 --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])")
[ "$spec_sampled" = "$alone" ] || { echo "gpu-run: speculative seed 7 differs: $spec_sampled" >&2; exit 1; }
kept=$(python3 -c "import urllib.request as u; t=u.urlopen('http://127.0.0.1:9492/metrics').read().decode(); print(int(float([l.split()[1] for l in t.splitlines() if l.startswith('neox_spec_decode_accepted_tokens_total ')][0])))")
echo "draft tokens kept: $kept"
[ "$kept" -gt 0 ] || { echo "gpu-run: no draft was kept" >&2; exit 1; }
kill $SERVER; trap - EXIT
if [ "${1:-}" = "--bench" ]; then
  echo "== 20B-shaped benchmark"
  python3 worker/benches/gpu_20b.py --worker "$BIN/neox-worker" --dir /tmp/neox20b
fi
