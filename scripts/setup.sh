#!/usr/bin/env bash
# Creates the virtual environment, installs torch and the build tools, and builds mgccl_ops into it
# (without build isolation, so it compiles against exactly this torch). Safe to run again.
#
#   MGCCL_TORCH   torch release to install (default 2.14.1, a CUDA build; 2.13.0 is a CPU build)
#   MGCCL_VENV    environment folder (default .venv)
#   MGCCL_EXTRAS  optional dependency groups (default "test,openclip")
#   MGCCL_WITH_CUDA / MGCCL_CUDA_ARCHS  see CMakeLists.txt (default: CUDA when torch and nvcc have it)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${MGCCL_TORCH:-2.14.1}"
venv="${MGCCL_VENV:-.venv}"
extras="${MGCCL_EXTRAS:-test,openclip}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==$torch_version"
"${pip[@]}" install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy
"${pip[@]}" install --no-build-isolation ".[${extras}]"
# Import check from outside the checkout, so the installed package (not the sources) is loaded.
python_bin="$(cd "$venv/bin" && pwd)/python"
(cd / && "$python_bin" -c "import mgccl_ops; info = mgccl_ops.build_info(); info.pop('parallel_info'); print('mgccl_ops built:', info)")
