#!/usr/bin/env bash
# One device call that measures everything the projection stands for, on one H100/H200 (issue 18 item 5):
# the CUDA tests, benchmarks/kernels.py --device cuda, benchmarks/throughput.py --device cuda (d4, d12, d20 at
# L = 1, 4, 16; sequential and the eager row), and a d20 grid row in 4 chunks against `plan`'s projection
# (benchmarks/grid_row.py, compared with benchmarks/results/plan-d20-h100-L4.json). Within 8 minutes: each step has
# its own timeout, and a step is skipped when the time left cannot hold it. It writes, as it goes, one table
# ($OUT/gpu_check.md: step, exit status, seconds, output file) and one JSON ($OUT/gpu_check.json), and each step's
# own JSON and log under $OUT: a run cut short keeps what it measured.
#
# The machine's own python3 (torch + triton; no uv, no registry: see ../shared/device/README.md). Wheels the image
# lacks (simple_parsing, docstring-parser) are installed from .whl/ when it is there (../shared/device/make_wheels.sh).
#
#   scripts/gpu_check.sh              # on the GPU machine, from the checkout's root, OUT set by the device tool
#   scripts/gpu_check.sh --dry-run    # on CPU (CI: tests/test_gpu_check.py): every step's CPU analogue, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}  # 8 minutes
START=$(date +%s)
: > "$OUT/steps.jsonl"
printf '| step | status | seconds | output |\n| --- | --- | --- | --- |\n' > "$OUT/gpu_check.md"

# step NAME TIMEOUT_S OUTPUT CMD...: runs CMD with its timeout (skipped if the budget left is smaller), logs it
step() {
  local name=$1 limit=$2 output=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) )) rc t0 t1
  if (( left < limit && DRY == 0 )); then
    rc=skipped; t0=0; t1=0
  else
    t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
  fi
  printf '| %s | %s | %s | %s |\n' "$name" "$rc" "$((t1 - t0))" "$output" >> "$OUT/gpu_check.md"
  printf '{"step": "%s", "status": "%s", "seconds": %s, "output": "%s"}\n' "$name" "$rc" "$((t1 - t0))" "$output" \
    >> "$OUT/steps.jsonl"
  "$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; json.dump({"dry_run": bool(int(sys.argv[3])), "steps": rows}, open(sys.argv[2], "w"), indent=2)' \
    "$OUT/steps.jsonl" "$OUT/gpu_check.json" "$DRY"
  tail -n 3 "$OUT/$name.log" 2>/dev/null
}

if (( DRY )); then
  DEV=cpu
  step imports 120 imports.log "$PY" -c 'import torch, triton, simple_parsing, rich, fractal_vmap.cli, fractal_vmap.kernels.ops; print("imports ok", torch.__version__)'
  step cuda_tests 120 cuda_tests.log "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_attention_cuda.py
  step kernels 120 kernels.json "$PY" benchmarks/kernels.py --device cpu --out "$OUT/kernels.json"
  step throughput 300 throughput.json "$PY" benchmarks/throughput.py --device cpu --model depth --depths 1 \
    --lanes 1 2 --modes sequential row --batch_size 1 --seq_len 16 --vocab_size 256 --context 32 --warmup 1 \
    --steps 1 --repeats 1 --max_load 0 --out "$OUT/throughput.json"
  step grid_row 300 grid_row.json "$PY" benchmarks/grid_row.py --device cpu --depth 1 --vocab 320 --cols 2 \
    --lane_chunk 2 --steps 1 --out "$OUT/grid_row.json"
else
  DEV=cuda
  step imports 30 imports.log "$PY" -c 'import torch, triton, simple_parsing, rich, fractal_vmap.cli, fractal_vmap.kernels.ops; print("imports ok", torch.__version__, torch.cuda.get_device_name())'
  step cuda_tests 50 cuda_tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_cuda.py
  step kernels 70 kernels.json "$PY" benchmarks/kernels.py --device cuda --out "$OUT/kernels.json"
  for d in 4 12 20; do  # 60, 80, 100 s
    step "throughput_d$d" $(( 60 + (d - 4) * 40 / 16 )) "throughput-d$d.json" "$PY" benchmarks/throughput.py --device cuda --model depth \
      --depths "$d" --lanes 1 4 16 --modes sequential row --out "$OUT/throughput-d$d.json"
  done
  step grid_row 90 grid_row.json "$PY" benchmarks/grid_row.py --device cuda --depth 20 --cols 16 --lane_chunk 4 \
    --steps 6 --plan benchmarks/results/plan-d20-h100-L4.json --out "$OUT/grid_row.json"
fi
echo "gpu_check ($DEV): $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
