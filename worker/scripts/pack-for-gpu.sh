#!/usr/bin/env bash
# Builds the CUDA worker, the `neox` client, the GPU test binary and the GEMV benchmark, and
# packs them with the HF fixture into .gpu/ (git-ignored locally) for a GPU machine without a
# Rust toolchain: carry `.gpu` with the device tool and run `bash worker/scripts/gpu-run.sh`
# there. Compressed with xz they take ~40 MB, inside the device tool's 64 MiB with the
# repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXTURE=${NEOX_FIXTURE_DIR:-../shared/fixtures/tiny-neox}
TARGET=${NEOX_CUDA_TARGET_DIR:-$PWD/target/cuda}

NEOX_CUDA_TARGET_DIR=$TARGET bash worker/scripts/build-cuda.sh --test gpu --bench gpu_gemv
# The newest executable of an integration test or bench cargo just built.
newest() {
  find "$TARGET/release/deps" -maxdepth 1 -type f -executable -name "$1-*" -printf '%T@ %p\n' |
    sort -n | tail -1 | cut -d' ' -f2
}
TESTS=$(newest gpu)
GEMV_BENCH=$(newest gpu_gemv)
[ -n "$TESTS" ] || { echo "pack-for-gpu: no gpu test binary under $TARGET/release/deps" >&2; exit 1; }
[ -n "$GEMV_BENCH" ] || { echo "pack-for-gpu: no gpu_gemv bench under $TARGET/release/deps" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/fixtures
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
# xz, not gzip: a third smaller, which keeps the four binaries, the fixture and the repository
# inside the device tool's 64 MiB (gpu-env.sh unpacks with python3's lzma).
pack() { xz -9 -T0 -c "$1" >".gpu/$2.xz"; }
pack "$TARGET/release/neox-worker" neox-worker
pack "$TARGET/release/neox" neox
pack "$TESTS" gpu-tests
pack "$GEMV_BENCH" gpu-gemv-bench
# Which code this is: gpu-run.sh prints it first.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- worker proto || echo ' + uncommitted changes') packed $(date -u +%FT%TZ)" >.gpu/commit
cp -r "$FIXTURE" .gpu/fixtures/tiny-neox
du -sh .gpu
echo "pack-for-gpu: carry [\".gpu\"] and run: bash worker/scripts/gpu-run.sh [--bench [--skip-hf]]"
