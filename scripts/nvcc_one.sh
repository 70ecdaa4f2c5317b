#!/usr/bin/env bash
# Compiles one csrc/cuda/*.cu file alone with nvcc (the flags of CMakeLists.txt's CUDA build),
# for quick iteration and for the spill check: scripts/nvcc_one.sh FILE.cu OUT.o [extra nvcc args].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TORCH=$("$PY" -c "import torch; print(torch.__path__[0])")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ARCHS=${MGCCL_CUDA_ARCHS:-"80;90"}
GENCODE=()
for arch in ${ARCHS//;/ }; do GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done
src=$1 out=$2
shift 2
INCS=(-I csrc -isystem "$TORCH/include" -isystem "$TORCH/include/torch/csrc/api/include" -isystem "$PYINC")
for d in "$TORCH"/../nvidia/*/include; do INCS+=(-isystem "$d"); done
exec nvcc -c "$src" -o "$out" -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC "${GENCODE[@]}" \
  "${INCS[@]}" -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DUSE_CUDA -DTORCH_EXTENSION_NAME=_C "$@"
