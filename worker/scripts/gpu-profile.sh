#!/usr/bin/env bash
# On a GPU machine, with `.gpu/` from pack-for-gpu.sh: where a 20B-shaped decode step's time
# goes. Writes a 20B-wide checkpoint of a few layers (every layer of GPT-NeoX-20B costs the
# same), times `neox-worker bench` on it, then records every kernel of a short bench run at
# batch 1 and 32 (NEOX_PROFILE_BATCHES) with Nsight Compute (name, grid, duration), gzipped
# CSV under $OUT for offline analysis.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/neox-profile}
mkdir -p "$OUT"
exec > >(tee "$OUT/profile.log") 2>&1
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
LAYERS=${NEOX_PROFILE_LAYERS:-4}
# shellcheck source=gpu-env.sh
. worker/scripts/gpu-env.sh neox-worker
CKPT=/dev/shm/neox20b-${LAYERS}l
python3 worker/benches/gpu_20b.py --write-only --layers "$LAYERS" --dir "$CKPT" || exit 1
bench() { "$BIN/neox-worker" bench --model "$CKPT" --device cuda --dtype fp16 "$@"; }
echo "== bench, $LAYERS layers"
bench --batch 1,8,32 --prefill-len 512 --context-len 32 --steps 32 --json | tee "$OUT/bench.json"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu here"; exit 1; }
for b in ${NEOX_PROFILE_BATCHES:-1 32}; do
  echo "== kernels, batch $b"
  timeout 240 "$NCU" --metrics gpu__time_duration.sum --csv --page raw --log-file "$OUT/kernels-b$b.csv" \
    "$BIN/neox-worker" bench --model "$CKPT" --device cuda --dtype fp16 --batch "$b" --prefill-len 16 \
    --context-len 32 --steps 2 --json >/dev/null || echo "ncu batch $b failed"
  gzip -f "$OUT/kernels-b$b.csv" && ls -la "$OUT/kernels-b$b.csv.gz"
done
