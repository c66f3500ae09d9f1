#!/usr/bin/env bash
# The prepared script for a lent GPU machine: one device `run` of about five minutes that installs fastdiff
# from the working tree with no network, then
#   1. correctness, in parallel: `fastdiff.selftest`'s accuracy groups beside the CUDA tier of the tests in
#      TIER_SHARDS pytest processes (Triton compiles on many CPU cores at once; nothing is timed), and
#   2. speed, alone on the machine: the selftest's train_step and kernel_timing groups,
# and leaves everything under $OUT (which the device tool brings back).
#
# Here, once, before the device run (both outputs are git-ignored; carry them):
#   tools/gpu_check.sh --wheels       the wheels a bare Python 3.12 machine may lack (numpy<2.4, pillow, tqdm,
#                                     setuptools, wheel) into .gpu_wheels/ (~25 MB)
#   PYTHON=/work/side312/bin/python tools/gpu_check.sh --precompile
#                                     the selftest's first five groups' Triton kernels, compiled for sm_90 by
#                                     the Triton the GPU machine has (tools/side_env.sh), packed into
#                                     .gpu_precompiled.tar.xz (~4 MB; fastdiff.selftest.precompile)
# There:
#   device run(command="tools/gpu_check.sh", carry=[".gpu_wheels", ".gpu_precompiled.tar.xz"], timeout_s=480)
# Here on a CPU it runs too (tests/test_gpu_check.py).
#
# Environment (defaults in brackets):
#   OUT [gpu_check]            where the results go; the device tool sets it
#   CHECK_SECONDS [150]        phase 1's wall limit; the selftest's budget there is 4/5 of it
#   CHECK_GROUPS [versions,accuracy,determinism,large]
#   SPEED_SECONDS [150]        phase 2's selftest budget; a check it started may run GRACE [60] s more
#   SPEED_GROUPS [train_step,kernel_timing]
#   SELFTEST_ARGS []           more flags for both selftests, e.g. "--device cpu --quick"
#   TIER_SHARDS [8], TIER_ARGS [tests -k cuda]   the tier's processes, and what pytest selects for it
#   GPU_CHECK_INSTALL [1]      0 uses the fastdiff already importable instead of installing this tree
#   GPU_CACHE [.gpu_cache], PRECOMPILED [.gpu_precompiled.tar.xz]   the caches' folder, the packed kernels
#
# Triton's and inductor's caches live in GPU_CACHE (git-ignored), the precompiled kernels unpacked into
# Triton's: phase 2 and the tier reuse phase 1's compiles, and a second run on a still-warm machine starts
# warm. Exits 1 when a selftest or a shard did not exit 0 (a failure, an error, a cut, or a shard with no
# tests).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=.gpu_wheels
cache=${GPU_CACHE:-.gpu_cache}
mkdir -p "$cache" && cache=$(cd "$cache" && pwd) || exit 2
if ! command -v python > /dev/null; then  # an image that names it python3 only
  mkdir -p "$cache/bin" && ln -sf "$(command -v python3)" "$cache/bin/python"
  export PATH=$cache/bin:$PATH
fi

if [ "${1:-}" = "--wheels" ]; then
  mkdir -p "$wheels"
  exec python -m pip download -q -d "$wheels" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
    "numpy<2.4" pillow tqdm "setuptools>=64,<82" wheel
fi
precompiled=${PRECOMPILED:-.gpu_precompiled.tar.xz}
if [ "${1:-}" = "--precompile" ]; then
  rm -rf "$cache/precompiled"
  "${PYTHON:-python}" -m fastdiff.selftest.precompile --out "$cache/precompiled" || exit 1
  exec tar -cJf "$precompiled" -C "$cache/precompiled" .
fi
[ $# -eq 0 ] || { echo "usage: tools/gpu_check.sh [--wheels | --precompile]" >&2; exit 2; }

out=${OUT:-gpu_check}
check_seconds=${CHECK_SECONDS:-150}
speed_seconds=${SPEED_SECONDS:-150}
grace=${GRACE:-60}
shards=${TIER_SHARDS:-8}
tier_args=${TIER_ARGS:-tests -k cuda}
mkdir -p "$out/tier" || { echo "cannot create the output directory $out" >&2; exit 2; }
export TRITON_CACHE_DIR=$cache/triton TORCHINDUCTOR_CACHE_DIR=$cache/inductor
began=$(date +%s)
elapsed() { echo "$(( $(date +%s) - began )) s"; }
note() { echo "$*" | tee -a "$out/summary.md"; }

echo "# fastdiff GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$out/summary.md"
kernels_in_cache() { find "$TRITON_CACHE_DIR" -name "__grp__*.json" 2>/dev/null | wc -l; }
if [ -f "$precompiled" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar -xJf "$precompiled" -C "$TRITON_CACHE_DIR"
  note "- Triton's cache holds $(kernels_in_cache) kernels, precompiled ones from $precompiled unpacked"
fi
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  python -c 'import sys; print("python", sys.version.split()[0])'
  for module in torch triton numpy PIL tqdm setuptools pytest pytest_benchmark; do
    python -c "import $module; print('$module', getattr($module, '__version__', '?'))" 2>&1 | tail -1
  done
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)"
} > "$out/machine.txt" 2>&1

# 1. Install: the wheels for whatever is missing, then this tree, editable, with no network.
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  missing=()
  for pair in "numpy:numpy<2.4" PIL:pillow tqdm:tqdm "setuptools:setuptools>=64,<82" wheel:wheel; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    # into a folder of our own: a system Python may refuse pip in site-packages (PEP 668)
    site=$cache/site
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    python -m pip install -q --no-index --find-links "$wheels" --target "$site" "${missing[@]}" \
      > "$out/install.log" 2>&1 \
      && note "- installed from $wheels into $site: ${missing[*]}" \
      || note "- could not install ${missing[*]} from $wheels (see install.log)"
  fi
  if FASTDIFF_NO_EXT=1 python -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      >> "$out/install.log" 2>&1; then
    note "- fastdiff installed editable, without the C++ CPU extension ($(elapsed))"
  else
    # The package maps fastdiff.kernels to kernels/; a link does the same for an uninstalled tree.
    [ -e fastdiff/kernels ] || ln -s ../kernels fastdiff/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    note "- pip could not install fastdiff (see install.log): running it from the tree (fastdiff/kernels -> kernels)"
  fi
fi
python -c "import fastdiff.ops as ops; print('backends', ops.available_backends())" >> "$out/machine.txt" 2>&1

selftest() {  # selftest NAME GROUPS BUDGET LIMIT: one selftest run into $out/NAME, cut at LIMIT seconds
  # shellcheck disable=SC2086  # SELFTEST_ARGS is a list of flags
  timeout --kill-after=10 "$4" python -m fastdiff.selftest --only "$2" --budget "$3" --out "$out/$1" \
    ${SELFTEST_ARGS:-} > "$out/$1.log" 2>&1
}
report_selftest() {  # report_selftest NAME STATUS
  [ "$2" -eq 0 ] || failed=1
  note "- $1: exit $2 after $(elapsed) (124: cut by the time limit): $(sed -n 3p "$out/$1/selftest.md" 2>/dev/null || echo 'no report')"
}
failed=0

# 1. Correctness: the selftest's accuracy groups beside the CUDA tier's shards, each shard taking every
# n-th selected test (tests/conftest.py).
selftest selftest_correctness "${CHECK_GROUPS:-versions,accuracy,determinism,large}" \
  $((check_seconds * 4 / 5)) "$check_seconds" &
correctness=$!
pids=()
for ((shard = 0; shard < shards; shard++)); do
  # shellcheck disable=SC2086  # TIER_ARGS is a list of pytest arguments
  FASTDIFF_TEST_SHARD=$shard/$shards timeout --kill-after=10 "$check_seconds" python -m pytest -q \
    -p no:cacheprovider --continue-on-collection-errors -rfE --durations=5 $tier_args \
    --junitxml "$out/tier/shard$shard.xml" > "$out/tier/shard$shard.log" 2>&1 &
  pids+=($!)
done
wait "$correctness"
report_selftest selftest_correctness $?
note "- CUDA tier, $shards shards within ${check_seconds} s (exit 124: cut by the limit):"
for ((shard = 0; shard < shards; shard++)); do
  wait "${pids[shard]}"
  status=$?
  [ "$status" -eq 0 ] || failed=1
  note "  - shard $shard: exit $status, $(grep -E '(passed|failed|skipped|error|no tests ran)' "$out/tier/shard$shard.log" | tail -1)"
done
grep -h -E "^(FAILED|ERROR) " "$out"/tier/shard*.log | sort -u > "$out/tier/failures.txt"
note "- failures and errors: $(wc -l < "$out/tier/failures.txt") (tier/failures.txt)"

# 2. Speed, alone on the machine.
selftest selftest_speed "${SPEED_GROUPS:-train_step,kernel_timing}" "$speed_seconds" $((speed_seconds + grace))
report_selftest selftest_speed $?
note "- Triton's cache holds $(kernels_in_cache) kernels at the end; all done after $(elapsed)"
exit "$failed"
