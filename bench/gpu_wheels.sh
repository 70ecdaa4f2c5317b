#!/usr/bin/env bash
# Fills a wheel folder for bench/gpu_check.sh --wheels DIR, on a machine with network access:
# the peers the GPU benchmarks compare against and the build tools, as wheels for the GPU
# machine's Python (3.12, manylinux x86_64). torch, triton and the CUDA libraries are not fetched:
# the GPU machine has its own.
#
#   bash bench/gpu_wheels.sh DIR [PACKAGE ...]     (default: every package below)
#
# PYTHON (default python3) runs pip; GPU_PYTHON_VERSION (default 3.12) the target Python.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_wheels.sh DIR [PACKAGE ...]" >&2; exit 2; }
dir="$1"
shift
python="${PYTHON:-python3}"
version="${GPU_PYTHON_VERSION:-3.12}"
build_tools=(scikit-build-core pybind11 cmake ninja pathspec packaging)
peers=(inf-cl faiss-gpu-cu12 open_clip_torch ftfy regex wcwidth huggingface_hub safetensors timm
  filelock fsspec pyyaml tqdm hf-xet)
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=("${build_tools[@]}" "${peers[@]}")
mkdir -p "$dir"
for package in "${packages[@]}"; do
  # A binary wheel for the target Python and platform; a package published only as source is
  # built into a wheel here (pure Python ones, such as inf-cl, suit any platform).
  if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$dir" "$package"; then
    "$python" -m pip wheel --quiet --no-deps -w "$dir" "$package"
  fi
done
ls -1 "$dir"
