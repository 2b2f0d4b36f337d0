#!/bin/bash
# Tokenize a large corpus into indexed shards across nodes (python -m data_prep build), then write the
# manifest once every part is done (python -m data_prep merge). Two ways, same output:
#
#   Job array (default; no MPI needed, parts are scheduled independently and retried independently):
#     SHARDS=32 bash slurm/preprocess.sh --input /data/openwebtext --tokenizer data/tok --output-dir data/owt
#       -> submits `sbatch --array=0-31` (each task: build --num-shards 32 --shard-index $SLURM_ARRAY_TASK_ID)
#          and a merge job with --dependency=afterok on the whole array; prints both job ids.
#
#   One MPI job (N nodes x K ranks; mpi4py ranks split the shards, as data_prep/build.py does).
#     MODE=mpi NODES=4 RANKS_PER_NODE=16 bash slurm/preprocess.sh --input ... --tokenizer ... --output-dir ...
#       -> one job: `mpirun python -m data_prep build ...`, then merge in the same job.
#
# Everything after the script name goes to `python -m data_prep build` unchanged (--input/--hf-dataset/
# --demo, --tokenizer, --output-dir, --docs-per-shard, ...); --output-dir is required. A part that was
# killed resumes where it stopped when resubmitted (data_prep skips complete shards).
#
# Environment variables (all optional):
#   MODE            array | mpi                                        (default: array)
#   SHARDS          array tasks                                        (default: 16)
#   MAX_PARALLEL    array tasks running at once (the %N of --array)    (default: all)
#   CPUS_PER_TASK   tokenizing workers per array task / CPUs per rank  (default: 8 / 1)
#   NODES, RANKS_PER_NODE   MPI mode size                              (default: 2, 8)
#   TIME            time limit per job                                 (default: 12:00:00)
#   PARTITION       partition to submit to                             (default: the cluster's default)
#   PYTHON          interpreter                                        (default: python)
#   ALECTRA_DIR     repository root                                    (default: the current directory)
#   LOG_DIR         SLURM logs                                         (default: <output-dir>/slurm-logs)
#   SBATCH_EXTRA    more sbatch options, e.g. "--account=abc --qos=high"
set -euo pipefail

die() { echo "preprocess.sh: error: $*" >&2; exit 2; }

PYTHON=${PYTHON:-python}
ALECTRA_DIR=${ALECTRA_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ALECTRA_DIR" || die "ALECTRA_DIR=$ALECTRA_DIR is not a directory"

output_dir() {  # the value of --output-dir / -o in the build arguments
  local prev=
  for arg in "$@"; do
    case $arg in
      --output-dir=*) echo "${arg#*=}"; return ;;
    esac
    if [ "$prev" = --output-dir ] || [ "$prev" = -o ]; then echo "$arg"; return; fi
    prev=$arg
  done
}

case "${PREPROCESS_STEP:-submit}" in
  build-part)  # one array task
    echo "preprocess.sh: part $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT on $(hostname), job $SLURM_JOB_ID"
    exec "$PYTHON" -m data_prep build "$@" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress \
      --num-shards "$SLURM_ARRAY_TASK_COUNT" --shard-index "$SLURM_ARRAY_TASK_ID"
    ;;
  merge)
    echo "preprocess.sh: merging $MERGE_DIR on $(hostname), job $SLURM_JOB_ID"
    exec "$PYTHON" -m data_prep merge "$MERGE_DIR"
    ;;
  mpi)  # the whole MPI job: build on every rank, then merge once
    echo "preprocess.sh: MPI build, $SLURM_NTASKS ranks on $SLURM_JOB_NODELIST, job $SLURM_JOB_ID"
    # OpenMPI's mpirun reads the SLURM allocation itself (one rank per task slot); --bind-to none lets
    # each rank's tokenizer use its CPUs.
    mpirun --bind-to none "$PYTHON" -m data_prep build "$@" --no-progress
    exec "$PYTHON" -m data_prep merge "$MERGE_DIR"
    ;;
  submit) ;;
  *) die "unknown PREPROCESS_STEP=$PREPROCESS_STEP" ;;
esac

# ---- on the login node: submit ----
[ $# -gt 0 ] || die "pass the arguments of \`python -m data_prep build\`, e.g. --demo --tokenizer T --output-dir D"
OUT=$(output_dir "$@")
[ -n "$OUT" ] || die "--output-dir is required"
MODE=${MODE:-array}
SHARDS=${SHARDS:-16}
TIME=${TIME:-12:00:00}
LOG_DIR=${LOG_DIR:-$OUT/slurm-logs}
mkdir -p "$LOG_DIR"
COMMON=(--parsable --time="$TIME" --chdir="$ALECTRA_DIR" --export=ALL)
[ -n "${PARTITION:-}" ] && COMMON+=(--partition="$PARTITION")
# shellcheck disable=SC2206  # SBATCH_EXTRA is a list of options, split on spaces on purpose
[ -n "${SBATCH_EXTRA:-}" ] && COMMON+=($SBATCH_EXTRA)
SCRIPT=$(readlink -f "$0")

case $MODE in
  array)
    [[ $SHARDS =~ ^[1-9][0-9]*$ ]] || die "SHARDS=$SHARDS must be a positive integer"
    RANGE=0-$((SHARDS - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}
    BUILD=$(PREPROCESS_STEP=build-part sbatch "${COMMON[@]}" --job-name=alectra-prep --array="$RANGE" \
      --ntasks=1 --cpus-per-task="${CPUS_PER_TASK:-8}" --output="$LOG_DIR/build-%A_%a.out" "$SCRIPT" "$@")
    MERGE=$(PREPROCESS_STEP=merge MERGE_DIR=$OUT sbatch "${COMMON[@]}" --job-name=alectra-prep-merge \
      --dependency=afterok:"$BUILD" --kill-on-invalid-dep=yes --ntasks=1 --cpus-per-task=1 \
      --output="$LOG_DIR/merge-%j.out" "$SCRIPT")
    ;;
  mpi)
    NODES=${NODES:-2}
    RANKS_PER_NODE=${RANKS_PER_NODE:-8}
    MERGE=$(PREPROCESS_STEP=mpi MERGE_DIR=$OUT sbatch "${COMMON[@]}" --job-name=alectra-prep-mpi \
      --nodes="$NODES" --ntasks-per-node="$RANKS_PER_NODE" --cpus-per-task="${CPUS_PER_TASK:-1}" \
      --output="$LOG_DIR/mpi-%j.out" "$SCRIPT" "$@")
    BUILD=$MERGE
    ;;
  *) die "MODE=$MODE: choose array or mpi" ;;
esac
echo "build job: $BUILD"
echo "merge job: $MERGE"
echo "logs: $LOG_DIR   wait: squeue -j $BUILD,$MERGE   manifest when done: $OUT/manifest.json"
