#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer job: builds the CPU kernels with
# -fsanitize=address,undefined in their own build folder (build/asan, CUDA off), stages that
# module beside a copy of the Python package (build/asan/stage, so the normal build is not
# touched), and runs the op tests and the bad-input sweep against it with the sanitizer runtimes
# preloaded. Sanitizer reports go to files (pytest hides what passing tests print); any report
# file fails the job, as does any failing test.
#
#   MGCCL_PYTHON   the interpreter of an environment with torch and the test deps (default .venv)
#   MGCCL_SANITIZE_TESTS  test files to run (default: the op tests, the sweep, concurrency)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
python="$(cd "$(dirname "${MGCCL_PYTHON:-.venv/bin/python}")" && pwd)/$(basename "${MGCCL_PYTHON:-.venv/bin/python}")"
bin="$(dirname "$python")"
build="$repo/build/asan"
stage="$build/stage"
reports="$build/reports"
cxx="${CXX:-c++}"
# No link-time optimisation (pybind11 turns it on for Release): an LTO link of sanitized code
# takes many minutes.
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -g"
start=$(date +%s)

"$bin/cmake" -S . -B "$build" -G Ninja -DCMAKE_MAKE_PROGRAM="$bin/ninja" -DPython_EXECUTABLE="$python" \
  -DCMAKE_CXX_COMPILER="$cxx" -DMGCCL_WITH_CUDA=OFF -DMGCCL_INPLACE=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
"$bin/cmake" --build "$build" -j "${MGCCL_JOBS:-2}"
built=$(date +%s)

rm -rf "$stage" "$reports"
mkdir -p "$stage" "$reports"
cp -r mgccl_ops "$stage/"
rm -f "$stage"/mgccl_ops/_C*.so "$stage"/mgccl_ops/_build_config.py
cp "$build"/_C*.so "$build/_build_config.py" "$stage/mgccl_ops/"

tests="${MGCCL_SANITIZE_TESTS:-test_contrastive.py test_hard_negative_loss.py test_topk_hard_negatives.py \
test_multi_grained.py test_region_merge.py test_region_pool.py test_semantic_unit.py test_edge_contracts.py \
test_bad_input_sweep.py test_concurrency.py}"
paths=()
for t in $tests; do paths+=("$repo/python_tests/$t"); done

# Run from the stage so that `import mgccl_ops` finds the sanitized build first. The runtimes are
# preloaded because the Python interpreter itself is not instrumented. allocator_may_return_null:
# the sweep asks for absurd sizes on purpose, which must come back as errors, not aborts.
status=0
(
  cd "$stage"
  export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libubsan.so)"
  export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:log_path=$reports/asan"
  export UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan"
  export MGCCL_SANITIZER=1
  "$python" -m pytest -q -p no:cacheprovider --rootdir "$repo" "${paths[@]}"
) || status=$?
end=$(date +%s)

echo "sanitizer job: build $((built - start)) s, tests $((end - built)) s"
# With allocator_may_return_null, ASan still writes one warning line per refused allocation
# ("WARNING: AddressSanitizer failed to allocate 0x... bytes"): the sweep's absurd sizes on
# purpose. Those lines are listed but are not reports; anything else in a log is.
found=0
for f in "$reports"/*; do
  [ -e "$f" ] || continue
  if grep -qv "^==[0-9]*==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]* bytes$" "$f"; then
    echo "== sanitizer report $f"
    cat "$f"
    found=1
  else
    echo "(refused allocation, expected: $(cat "$f"))"
  fi
done
if [ "$found" = 1 ]; then
  exit 1
fi
echo "sanitizer reports: none"
exit "$status"
