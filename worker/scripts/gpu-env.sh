# Sourced by gpu-run.sh and gpu-profile.sh on a GPU machine, from the repository root: unpacks
# the binaries named as arguments from `.gpu/` (pack-for-gpu.sh) into $BIN and puts the CUDA 13
# and NCCL libraries of the local torch install on the library path.
[ -d .gpu ] || { echo "no .gpu/ here (run worker/scripts/pack-for-gpu.sh, carry .gpu)" >&2; exit 1; }
echo "pack: $(cat .gpu/commit 2>/dev/null || echo 'unknown commit')"
BIN=/tmp/neox-gpu
mkdir -p "$BIN"
for b in "$@"; do
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    ".gpu/$b.xz" "$BIN/$b" && chmod +x "$BIN/$b" || exit 1
done
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export LD_LIBRARY_PATH=$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
