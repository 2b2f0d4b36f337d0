#!/usr/bin/env bash
# Every check that needs a GPU, in one go, most important first; each stage's output is also written to $OUT.
#
#   bash benchmarks/gpu_checks.sh                 # writes gpu_out/
#   OUT=/tmp/figures bash benchmarks/gpu_checks.sh
#
# 1. the machine: GPU, driver, library versions;
# 2. benchmarks/bench_kernels.py --sweep: each kernel checked against its reference on the GPU, then timed
#    against PyTorch and the card's copy bandwidth, plus other launch configurations;
# 3. benchmarks/bench_throughput.py: tokens/s and MFU of pretrain.py (DeepSpeed ZeRO-2, bf16) for
#    electra-small and alectra-small at batch 128 x 128;
# 4. benchmarks/bench_step.py --device cuda: the fused model against the naive Hugging Face baseline, one
#    training step at batch 128 x 128 under bf16 autocast (no DeepSpeed).
# A stage that fails or overruns its time limit does not stop the next one; the exit code is the number of
# failed stages.
set -u
OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
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

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv; $PY -c 'import torch, triton, transformers, deepspeed; print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \
\"deepspeed\", deepspeed.__version__)'"
stage bench_kernels "${KERNELS_LIMIT:-180}" "$PY" benchmarks/bench_kernels.py --sweep
stage bench_throughput "${THROUGHPUT_LIMIT:-220}" "$PY" benchmarks/bench_throughput.py \
    --json "$OUT/throughput.json"
stage bench_step "${STEP_LIMIT:-120}" "$PY" benchmarks/bench_step.py --device cuda --batch 128 --steps 20 \
    --repeats 1
exit "$failed"
