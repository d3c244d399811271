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
chmod +x "$BIN/neox-worker" "$BIN/gpu-tests"

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
if [ "${1:-}" = "--bench" ]; then
  echo "== 20B-shaped benchmark"
  python3 worker/benches/gpu_20b.py --worker "$BIN/neox-worker" --dir /tmp/neox20b
fi
