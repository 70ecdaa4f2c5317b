#!/usr/bin/env bash
# The style checks CI runs: ruff (lint + format) on the Python and clang-format on the C++/CUDA.
# Usage: bash scripts/lint.sh [--fix]. The pinned tools are installed into $MGCCL_VENV (default
# .venv, made by scripts/setup.sh) when missing, so every machine checks with the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MGCCL_VENV:-.venv}/bin"
tools=("ruff==0.17.6" "clang-format==23.1.5")
if ! "$bin/python" -m pip --disable-pip-version-check -q show ruff clang-format > /dev/null 2>&1 \
  || [ "$("$bin/ruff" --version)" != "ruff 0.17.6" ]; then
  "$bin/python" -m pip --disable-pip-version-check -q install "${tools[@]}"
fi
mapfile -t cxx_files < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests_cpp/*.cpp' 'tests_cpp/*.h')
if [ "${1:-}" = "--fix" ]; then
  "$bin/ruff" check --fix .
  "$bin/ruff" format .
  "$bin/clang-format" -i "${cxx_files[@]}"
  exit 0
fi
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/clang-format" --dry-run -Werror "${cxx_files[@]}"
echo "lint: ruff and clang-format clean (${#cxx_files[@]} C++/CUDA files)"
