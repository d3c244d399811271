#!/usr/bin/env bash
# Builds the CUDA worker and its GPU test binary, and packs them with the HF fixture into
# .gpu/ (git-ignored locally) for a GPU machine without a Rust toolchain: carry `.gpu` with the
# device tool and run `bash worker/scripts/gpu-run.sh` there. Gzipped, the two binaries and
# the fixture take ~45 MB, which fits the device tool's 64 MiB with the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXTURE=${NEOX_FIXTURE_DIR:-../shared/fixtures/tiny-neox}
TARGET=${NEOX_CUDA_TARGET_DIR:-$PWD/target/cuda}

NEOX_CUDA_TARGET_DIR=$TARGET bash worker/scripts/build-cuda.sh --test gpu
# The newest `gpu` integration-test executable cargo just built.
TESTS=$(find "$TARGET/release/deps" -maxdepth 1 -type f -executable -name 'gpu-*' -printf '%T@ %p\n' |
  sort -n | tail -1 | cut -d' ' -f2)
[ -n "$TESTS" ] || { echo "pack-for-gpu: no gpu test binary under $TARGET/release/deps" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/fixtures
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
gzip -9 -c "$TARGET/release/neox-worker" >.gpu/neox-worker.gz
gzip -9 -c "$TARGET/release/neox" >.gpu/neox.gz
gzip -9 -c "$TESTS" >.gpu/gpu-tests.gz
# Which code this is: gpu-run.sh prints it first.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- worker proto || echo ' + uncommitted changes') packed $(date -u +%FT%TZ)" >.gpu/commit
cp -r "$FIXTURE" .gpu/fixtures/tiny-neox
du -sh .gpu
echo "pack-for-gpu: carry [\".gpu\"] and run: bash worker/scripts/gpu-run.sh [--bench [--skip-hf]]"
