#!/usr/bin/env bash
# The one prepared GPU check: builds mgccl_ops against the torch already installed, installs the
# peer wheels from a local folder, runs the GPU tests (pytest -m gpu) and the GPU benchmarks, and
# writes JSON + Markdown into OUT_DIR, all within 8 minutes (every step has a timeout).
#
#   bash bench/gpu_check.sh OUT_DIR [--dry-run] [--wheels DIR]
#
#   --wheels DIR  a folder of .whl files installed (pip --no-index --no-deps) before the tests:
#                 peers (inf-cl, faiss-gpu, open_clip_torch and their pure-Python dependencies) and,
#                 where the machine lacks them, the build tools (scikit-build-core, pybind11, cmake,
#                 ninja). torch, triton and nvidia-* wheels in it are never installed.
#   --dry-run     (CI, no GPU) builds the package with its CUDA kernels, imports the built wheel,
#                 checks the wheel folder, collects the GPU tests and lists the test and benchmark
#                 commands it would run, without running them.
#
# Environment: PYTHON (default python3), MGCCL_GPU_CHECK_BUDGET (seconds; default 465, a dry run 2400),
# MGCCL_CUDA_ARCHS (default: the GPU's own, e.g. "90"; "80;90" in a dry run).
# Nothing is downloaded and nothing is installed into the Python environment: the package is
# built as a wheel and unpacked into OUT_DIR/site, the peer wheels into OUT_DIR/peers, and both
# are put on PYTHONPATH for the tests and benchmarks (the preinstalled torch stays untouched).
#
# Outputs in OUT_DIR: summary.md and summary.json (the environment, every step's exit status
# and duration, the test counts and failures, the benchmark tables), steps.jsonl, env.json,
# wheels.json, build_info.json, pytest.xml, bench/*.{json,md,png} and logs/*.log.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run] [--wheels DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out_dir=""
dry_run=0
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheels) [ $# -ge 2 ] || usage; wheels="$2"; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$out_dir" ] || usage; out_dir="$1" ;;
  esac
  shift
done
[ -n "$out_dir" ] || usage

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
python="$(command -v "$python")" || { echo "no python: set PYTHON" >&2; exit 2; }
# Absolute (not resolved through the venv's symlink), since the steps run in other directories.
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
mkdir -p "$out_dir/logs" "$out_dir/bench"
out_dir="$(cd "$out_dir" && pwd)"
# 7 m 45 s on the GPU machine; a dry run (CI, a small CPU machine compiling the CUDA kernels) has no
# 8-minute limit.
default_budget=$([ "$dry_run" -eq 1 ] && echo 2400 || echo 465)
budget="${MGCCL_GPU_CHECK_BUDGET:-$default_budget}"
build_cap=$([ "$dry_run" -eq 1 ] && echo 2000 || echo 300)
deadline=$((SECONDS + budget))
steps="$out_dir/steps.jsonl"
: > "$steps"
failed=0
# The GPU run uses the default providers and real devices, whatever the caller's shell had set.
unset TRITON_INTERPRET MGCCL_TRITON_ON_CPU MGCCL_GPU_KERNELS

# step NAME CAP_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND with a timeout of CAP seconds,
# shortened so that RESERVE seconds of the budget stay for the steps after it; its output goes to
# logs/NAME.log (and the terminal); one JSON line per step goes to steps.jsonl.
step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local left=$((deadline - SECONDS - reserve))
  local limit=$((cap < left ? cap : left))
  local started=$SECONDS rc
  if [ "$limit" -le 5 ]; then
    echo "== $name: not run, the time budget is spent" | tee "$out_dir/logs/$name.log"
    rc=124
  else
    echo "== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out_dir/logs/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  printf '{"step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d, "log": "logs/%s.log"}\n' \
    "$name" "$rc" $((SECONDS - started)) "$limit" "$name" >> "$steps"
  [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; failed=1; }
  return "$rc"
}

site="$out_dir/site"
peers="$out_dir/peers"
py_path="$site:$peers${PYTHONPATH:+:$PYTHONPATH}"

# 1. The machine: python, torch, triton, CUDA, the GPU.
step env 30 400 "$python" "$repo/bench/gpu_check.py" env "$out_dir/env.json"

# 2. The wheel folder: check every wheel; in a real run unpack the compatible ones (never torch,
#    triton or nvidia-*) into OUT_DIR/peers, build tools included.
if [ -n "$wheels" ]; then
  install_flag=$([ "$dry_run" -eq 1 ] && echo "--check-only" || echo "--install")
  step wheels 60 380 "$python" "$repo/bench/gpu_check.py" wheels "$wheels" "$out_dir/wheels.json" "$peers" $install_flag
else
  echo '{"folder": null, "wheels": []}' > "$out_dir/wheels.json"
fi

# 3. Build a wheel of mgccl_ops against the installed torch (no build isolation, no downloads), with
#    the CUDA kernels, and unpack it into OUT_DIR/site.
if [ -n "${MGCCL_CUDA_ARCHS:-}" ]; then
  archs="$MGCCL_CUDA_ARCHS"
elif [ "$dry_run" -eq 1 ]; then
  archs="80;90"
else
  archs="$("$python" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "80;90")"
fi
rm -rf "$out_dir/wheel" "$site"
pip=("$python" -m pip --disable-pip-version-check)
step build "$build_cap" 150 env PYTHONPATH="$peers${PYTHONPATH:+:$PYTHONPATH}" MGCCL_WITH_CUDA=ON MGCCL_CUDA_ARCHS="$archs" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${pip[@]}" wheel -v --no-build-isolation --no-deps --no-index \
  -w "$out_dir/wheel" "$repo" &&
  step unpack 60 140 bash -c "${pip[*]@Q} install --no-deps --no-index --target '$site' '$out_dir'/wheel/*.whl"

# 4. The built package imports against this torch, from outside the checkout, with its build facts.
step import 60 140 env -C "$out_dir" PYTHONPATH="$py_path" "$python" -c "
import json, sys, mgccl_ops
from mgccl_ops.ops import devices
assert mgccl_ops.__file__.startswith('$site'), mgccl_ops.__file__
info = mgccl_ops.build_info(); info.pop('parallel_info')
info['device_table'] = devices.device_table()
assert info['with_cuda'], 'the CUDA kernels were not built'
import torch
assert $dry_run or torch.cuda.is_available(), 'torch sees no CUDA device'
json.dump(info, open('$out_dir/build_info.json', 'w'), indent=2); print(json.dumps(info, indent=2))
"

# 5. The GPU tests, run from OUT_DIR so that the built package (not the sources) is imported.
pytest_args=(-m gpu "$repo/python_tests" --rootdir "$repo" -c "$repo/pyproject.toml" -p no:cacheprovider)
if [ "$dry_run" -eq 1 ]; then
  step pytest 120 60 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' '$python' -m pytest ${pytest_args[*]} --collect-only -q"
else
  step pytest 210 130 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' HYPOTHESIS_PROFILE=ci '$python' -m pytest ${pytest_args[*]} -q -rfE --durations=15 --junitxml='$out_dir/pytest.xml'"
fi

# 6a. With two or more GPUs: the distributed benchmark (ring against gather) on NCCL, one GPU per
#     rank, world sizes 2 (and 4 with four GPUs), per-rank peak memory and step time.
gpus="$(cd "$out_dir" && PYTHONPATH="$py_path" "$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)"
gpus="${gpus:-0}"
worlds=(2)
[ "$gpus" -ge 4 ] && worlds=(2 4)
command=("$python" -m mgccl_ops.bench distributed --device cuda --worlds "${worlds[@]}"
         --batches 4096 16384 65536 --dim 512 --out "$out_dir/bench")
if [ "$dry_run" -eq 1 ]; then
  echo "would run with 2 or more GPUs (timeout 120s): PYTHONPATH=$py_path ${command[*]}"
  step bench_distributed_nccl 30 10 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' ${command[*]@Q} --help > /dev/null"
elif [ "$gpus" -ge 2 ]; then
  step bench_distributed_nccl 120 150 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' ${command[*]@Q}"
else
  echo "== bench_distributed_nccl: not run, NCCL ring against gather needs 2 or more GPUs, this machine has $gpus"
fi

# 6b. The GPU benchmarks: every entry of mgccl_ops.bench.cli.BENCHMARKS named gpu_*, each with
#    --device cuda --out OUT_DIR/bench and its share of the time left (--time-budget).
# NAME:1 where the benchmark takes --time-budget, NAME:0 where it does not.
benches="$(cd "$out_dir" && PYTHONPATH="$py_path" "$python" -c '
from mgccl_ops.bench.cli import BENCHMARKS, build_parser
commands = build_parser()._subparsers._group_actions[0].choices
for name in BENCHMARKS:
    if name.startswith("gpu_"):
        print(name + ":" + str(int("--time-budget" in commands[name]._option_string_actions)))
' 2>/dev/null)"
echo "GPU benchmarks: ${benches:-none found}"
weight() { [ "$1" = gpu_contrastive ] && echo 3 || echo 1; }
weight_left=0
for entry in $benches; do weight_left=$((weight_left + $(weight "${entry%:*}"))); done
for entry in $benches; do
  bench="${entry%:*}"
  # This benchmark's share of the time left, by weight (gpu_contrastive 3, the others 1).
  share=$(((deadline - SECONDS - 20) * $(weight "$bench") / (weight_left > 0 ? weight_left : 1)))
  weight_left=$((weight_left - $(weight "$bench")))
  command=("$python" -m mgccl_ops.bench "$bench" --device cuda --out "$out_dir/bench")
  if [ "${entry#*:}" = 1 ]; then
    command+=(--time-budget $((share > 40 ? share - 25 : 15)))  # 25 s for start-up and the report
  fi
  if [ "$dry_run" -eq 1 ]; then
    echo "would run (timeout ${share}s): PYTHONPATH=$py_path ${command[*]}"
    step "bench_$bench" 30 10 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' ${command[*]@Q} --help > /dev/null"
  else
    step "bench_$bench" "$share" 15 bash -c "cd '$out_dir' && PYTHONPATH='$py_path' ${command[*]@Q}"
  fi
done

# 7. summary.md and summary.json from everything above.
"$python" "$repo/bench/gpu_check.py" summary "$out_dir" $([ "$dry_run" -eq 1 ] && echo --dry-run)
echo "== done in $SECONDS s: $out_dir/summary.md"
exit "$failed"
