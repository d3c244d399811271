#!/usr/bin/env bash
# Builds the CUDA worker (`neox-worker --features cuda`, release) for NVIDIA H100/H200 (sm_90).
#
# With a CUDA 13.0 toolkit already installed (CUDA_HOME set, nvcc on PATH) it just builds.
# Otherwise it first assembles one from NVIDIA's PyPI wheels into $NEOX_CUDA_TOOLKIT
# (default ~/.cache/neox-cuda/toolkit; ~0.9 GB of wheels, once): nvcc/cudart/cuBLAS/cuRAND/
# NVRTC 13.0.2 and NCCL 2.28.9 — the versions torch 2.11 pins — plus a link-time stub of
# libcuda (the real one comes with the driver on the GPU machine). nvcc stays at 13.0: PTX from
# a newer nvcc is refused by an R580 driver.
#
# Output: $NEOX_CUDA_TARGET_DIR/release/neox-worker (default target/cuda). At run time it needs
# the driver's libcuda.so.1 and the CUDA 13 + NCCL libraries on the library path, e.g. from a
# torch install:  SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
#   LD_LIBRARY_PATH=$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib
set -euo pipefail
cd "$(dirname "$0")/../.."

toolkit_from_pypi() {
  local root=$1
  local cu=$root/pipcuda/nvidia/cu13 nccl=$root/pipnccl/nvidia/nccl
  rm -rf "$root/pipcuda" "$root/pipnccl" "$root/stub"
  mkdir -p "$root"
  python3 -m pip install --no-cache-dir --target "$root/pipcuda" \
    "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,cublas,curand,nvrtc]==13.0.2"
  python3 -m pip install --no-cache-dir --no-deps --target "$root/pipnccl" nvidia-nccl-cu13==2.28.9
  # Shape it like a CUDA_HOME: unversioned library names, lib64, NCCL beside CUDA.
  (
    cd "$cu/lib"
    for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
    ln -sf libcurand.so.10 libcurand.so
    ln -sf "$nccl/lib/libnccl.so.2" libnccl.so.2
    ln -sf libnccl.so.2 libnccl.so
    ln -sfn lib "$cu/lib64"
  )
  for h in nccl.h nccl_device.h nccl_device; do
    if [ -e "$nccl/include/$h" ]; then ln -sfn "$nccl/include/$h" "$cu/include/$h"; fi
  done
  # libcuda for the linker only: every entry point fails with CUDA_ERROR_STUB_LIBRARY (34), so
  # if it were ever loaded at run time the worker reports "no usable CUDA device" cleanly.
  mkdir -p "$cu/lib/stubs" "$root/stub"
  gcc -E -P -I"$cu/include" "$cu/include/cuda.h" |
    grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | sed 's/[[:space:](]//g' | sort -u |
    awk '{print "int "$1"(void){return 34;}"}' >"$root/stub/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$root/stub/libcuda_stub.c"
  cat >"$root/env.sh" <<ENV
export CUDA_HOME=$cu CUDA_PATH=$cu CUDA_ROOT=$cu CUDA_TOOLKIT_ROOT_DIR=$cu
export PATH=$cu/bin:\$PATH
export LD_LIBRARY_PATH=$cu/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
ENV
}

if ! command -v nvcc >/dev/null 2>&1 || [ -z "${CUDA_HOME:-}" ]; then
  TOOLKIT=${NEOX_CUDA_TOOLKIT:-$HOME/.cache/neox-cuda/toolkit}
  if [ ! -f "$TOOLKIT/env.sh" ]; then
    echo "build-cuda: assembling a CUDA 13.0 toolkit from PyPI in $TOOLKIT"
    toolkit_from_pypi "$TOOLKIT"
  fi
  # shellcheck disable=SC1091
  source "$TOOLKIT/env.sh"
fi
if nvcc --version 2>/dev/null | grep -q "fake"; then
  echo "build-cuda: nvcc on PATH is a fake (type-check only); put a real toolkit first" >&2
  exit 1
fi

# sm_90 (H100/H200) unless told otherwise; cudaforge makes it sm_90a. Setting it also spares
# the build from asking nvidia-smi, which a build machine has not got.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Its own target directory: never mixed with CPU or type-check-only artefacts.
export CARGO_TARGET_DIR=${NEOX_CUDA_TARGET_DIR:-$PWD/target/cuda}
cargo build --release --locked -p neox-worker --features cuda --bins "$@"

BIN=$CARGO_TARGET_DIR/release/neox-worker
# Guard: a build that compiled no GPU code would still "succeed".
if [ "$(grep -ac '\.target sm_' "$BIN")" -eq 0 ]; then
  echo "build-cuda: $BIN carries no PTX; the CUDA kernels were not built" >&2
  exit 1
fi
echo "build-cuda: $BIN ($(du -h "$BIN" | cut -f1), sm_${CUDA_COMPUTE_CAP})"
