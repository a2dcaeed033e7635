#!/usr/bin/env bash
# Shapes the CUDA 13.0 toolkit from the Python registry as a CUDA install that candle's build
# (cudarc, bindgen_cuda/cudaforge) accepts, on a machine with no GPU and no system CUDA:
#   DEST/{bin,include,nvvm} -> site-packages/nvidia/cu13/...
#   DEST/lib64/*.so*        -> the wheel's libraries, plus the unversioned libX.so links it lacks
#   DEST/lib64/stubs/libcuda.so  a stub exporting every cu* function of cuda.h (returns 999),
#                                soname libcuda.so.1: links here, the real driver loads on the GPU.
# Usage (after `pip install "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2"`):
#   scripts/cuda/make_cuda_home.sh "$HOME/cuda-13.0"
#   export CUDA_HOME=$HOME/cuda-13.0 PATH=$HOME/cuda-13.0/bin:$PATH CUDA_COMPUTE_CAP=90
#   export LIBRARY_PATH=$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs
#   cargo xtask kernels
# Set CU13=/path/to/nvidia/cu13 if the toolkit is not in python3's site-packages.
set -euo pipefail
DEST=${1:?usage: make_cuda_home.sh DEST}
CU=${CU13:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13}
for d in bin include lib nvvm; do
  [ -d "$CU/$d" ] || { echo "error: $CU/$d is missing: pip install \"cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2\" (or set CU13)" >&2; exit 1; }
done
mkdir -p "$DEST/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$DEST/$d"; done
for f in "$CU"/lib/*.so*; do ln -sf "$f" "$DEST/lib64/$(basename "$f")"; done
for f in "$CU"/lib/lib*.so.*; do
  stem=$(basename "$f"); stem=${stem%%.so.*}
  [ -e "$DEST/lib64/$stem.so" ] || ln -s "$f" "$DEST/lib64/$stem.so"
done
# The driver API's exported names after cuda.h's macro renames (cuMemAlloc -> cuMemAlloc_v2, ...).
echo '#include <cuda.h>' | gcc -E -P -I"$CU/include" - \
  | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u \
  | sed 's/.*/int &(void) { return 999; }/' > "$DEST/lib64/stubs/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEST/lib64/stubs/libcuda.so" "$DEST/lib64/stubs/cuda_stub.c"
ln -sf libcuda.so "$DEST/lib64/stubs/libcuda.so.1"
echo "CUDA_HOME ready: $DEST ($(grep -c . "$DEST/lib64/stubs/cuda_stub.c") stub functions; nvcc $("$DEST/bin/nvcc" --version | grep -oE 'release [0-9.]+'))"
