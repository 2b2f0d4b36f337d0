#!/usr/bin/env bash
# The GPU measurements of issue 12 (item 5) in one command, under 8 minutes on one H100/H200; each stage's output
# is also written to $OUT.
#
#   bash benchmarks/gpu_checks.sh                  # writes gpu_out/
#   OUT=/tmp/figures bash benchmarks/gpu_checks.sh
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh        # every piece on the CPU at a tiny size; no GPU figure
#   FULL=1 bash benchmarks/gpu_checks.sh           # + kernel sweep and the naive-HF step (about 5 more minutes)
#
# 1. env: GPU, driver, library versions;
# 2. bench_gpu electra-small, batch 128 x 128, and 3. alectra-small, batch 512 x 128 (the seed's batch):
#    benchmarks/bench_gpu.py: tokens/s and MFU of the trainer's step, bf16, through DeepSpeed ZeRO-1 and ZeRO-2,
#    eager and compiled (train.compile cuda-graphs, and on), the bare model beside them; kernels and host
#    launch calls per step (profiler device rows, each launch once) and the fraction of the step the GPU is
#    busy. A row that fails prints its error and the next row runs; --budget-s cuts the tail of a stage.
# With FULL=1 also: 4. benchmarks/bench_kernels.py --sweep; 5. benchmarks/bench_step.py --device cuda.
# A stage that fails or overruns its limit does not stop the next one; the exit code is the number of failed
# stages. DRY_RUN=1 runs stages 2-3 on the CPU (tiny preset, fp32, aot_eager) and says which CUDA-only
# measurements it skipped; stages 1, 4 and 5 need CUDA and are skipped with a line saying so.
set -u
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${DRY_RUN:+--dry-run}
failed=0

stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, output to the console and $OUT/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $* (limit ${seconds} s)"
    local start=$SECONDS
    set -o pipefail
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=$?
    set +o pipefail
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

skip() {  # skip NAME: a CUDA-only stage in a dry run
    echo "== $1: skipped (CUDA only; DRY_RUN=1)"
}

if [ -n "$DRY" ]; then skip env; else
    stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv; $PY -c 'import torch, triton, transformers, deepspeed; print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \
\"deepspeed\", deepspeed.__version__)'"
fi
# Limits: --budget-s (counted after the imports) stops starting rows early enough for the last one to finish
# inside the stage's limit (a compiled row: ~1-2 minutes of compilation, then its steps).
stage bench_gpu_electra_small "${ELECTRA_LIMIT:-200}" "$PY" benchmarks/bench_gpu.py $DRY --preset electra-small \
    --batch 128 --seq-len 128 --steps 20 --budget-s "${ELECTRA_BUDGET:-110}" --json "$OUT/bench_gpu.jsonl"
stage bench_gpu_alectra_small "${ALECTRA_LIMIT:-230}" "$PY" benchmarks/bench_gpu.py $DRY --preset alectra-small \
    --batch 512 --seq-len 128 --steps 10 --budget-s "${ALECTRA_BUDGET:-120}" --json "$OUT/bench_gpu.jsonl"
if [ -n "${FULL:-}" ]; then
    if [ -n "$DRY" ]; then skip bench_kernels; skip bench_step; else
        stage bench_kernels "${KERNELS_LIMIT:-180}" "$PY" benchmarks/bench_kernels.py --sweep
        stage bench_step "${STEP_LIMIT:-120}" "$PY" benchmarks/bench_step.py --device cuda --batch 128 \
            --steps 20 --repeats 1
    fi
fi
exit "$failed"
