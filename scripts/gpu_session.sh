#!/usr/bin/env bash
# Every full-shape GPU measurement in one go (an H100 session is short): correctness of the engine and of the
# Triton kernel on the GPU, then every issue-14 target in one script (targets.json, at most 8 minutes), the
# other benchmarks, the profiling cost and the numerics (and whole-run time) against the reference.
#
#   bash scripts/gpu_session.sh OUTDIR [SELF_FORCING_CHECKOUT]
#
# Needs torch with CUDA and diffusers; wheels found in .whl/ (diffusers, imageio-ffmpeg) are installed into
# /tmp/site first, for machines without network. Each step has its own time limit so that one failure does
# not cost the others; everything is logged to OUTDIR/log.txt.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [SELF_FORCING_CHECKOUT]}
reference=${2:-}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$log"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
  python3 -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, diffusers.__version__)"'
step gpu-tests 180 env PFGEN_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_cache.py \
  tests/test_backends.py -k "oracle or lse"
step targets 480 python3 scripts/bench_gpu.py --json "$out/targets.json"
step attention 120 python3 scripts/bench_attention.py --shape full --json "$out/attention.json" \
  --markdown "$out/benchmarks.md"
step generate 420 python3 scripts/bench_generate.py --shape full --json "$out/generate.json" \
  --markdown "$out/benchmarks.md"
step profile 180 python3 scripts/bench_profile.py --shape full --json "$out/profile.json" \
  --markdown "$out/benchmarks.md"
if [ -n "$reference" ]; then
  step numerics 300 python3 scripts/compare_reference.py --reference "$reference" --shape full --device cuda \
    --dtype bfloat16 --json "$out/numerics.json"
fi
step tiny-generate 120 python3 -m pfgen generate --device cuda --seconds 5 -o "$out/tiny.mp4"
rm -f "$out/tiny.mp4"
echo "done ($(date +%T))" | tee -a "$log"
