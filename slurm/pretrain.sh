#!/bin/bash
# alectra pretraining on SLURM: one task per GPU (CPU-only nodes: one task per node), preemption-safe.
#
#   cd /path/to/alectra                                  # submit from the repository root (or set ALECTRA_DIR)
#   sbatch slurm/pretrain.sh                             # 1 node x 8 GPUs with the defaults below
#   sbatch --nodes=4 slurm/pretrain.sh                   # 4 nodes x 8 GPUs = 32 ranks
#   CONFIG=configs/electra_small_owt.yaml DATA=data/owt OUTPUT=runs/small \
#     sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 slurm/pretrain.sh --train.lr 2e-4
#
# Arguments after the script name are passed to alectra/pretrain.py as config overrides.
# Every rank finds RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from its srun task
# (alectra.distributed.init_distributed_env): the master is the first host of the node list, the port
# is derived from the job id (LAUNCHER=mpirun: from MPI, rank 0's host and port broadcast with mpi4py).
# Set MASTER_ADDR / MASTER_PORT here to override.
#
# Preemption and time limit: SLURM sends USR1 to this script 300 s before the limit (--signal=B:USR1@300)
# and TERM to every process on preemption. The trap forwards USR1/TERM as USR1 to the training step (srun
# relays USR1 to all tasks; srun itself would treat TERM as "kill the step"). Training saves a checkpoint
# at the next step boundary and exits 75; this script then runs `scontrol requeue`, and the requeued job
# (same job id, same OUTPUT) resumes from the newest complete checkpoint.
#   exit 0 -> finished, no requeue.     exit 75 -> requeue (at most MAX_RESTARTS times in all).
#   exit 2 -> a user error (configuration, a path, damaged data or checkpoint, a full disk): not requeued.
#   anything else -> a crash: requeued at most MAX_CRASH_RETRIES times, then the job fails with that code.
# A rank that fails exits within seconds (alectra.training.failstop) and its peers, whose collectives then
# fail, exit 1; srun returns the highest exit code of the step's tasks, so a rank's 2 is not lost.
#
# Environment variables (all optional):
#   ALECTRA_DIR        repository root                          (default: the submit directory)
#   PYTHON             interpreter                              (default: python)
#   TRAIN_SCRIPT       training entry point                     (default: alectra/pretrain.py)
#   CONFIG             run config YAML                          (default: none = the built-in demo config)
#   DS_CONFIG          DeepSpeed JSON                           (default: ds_configs/zero2.json)
#   DATA               dataset folder(s), comma-separated       (default: from CONFIG)
#   OUTPUT             run folder (checkpoints, logs, export)   (default: runs/<job name>-<job id>)
#   GPUS_PER_NODE      ranks per node                           (default: GPUs SLURM allocated; 0 -> CPU, 1 rank)
#   MAX_RESTARTS       bound on requeues of any kind            (default: 50)
#   MAX_CRASH_RETRIES  bound on requeues after a crash          (default: 2)
#   LAUNCHER           srun (one task per rank) or mpirun (OpenMPI; ranks meet through mpi4py) (default: srun)
#   MPIRUN_ARGS        extra mpirun options, e.g. "--mca btl_tcp_if_include ib0"
#   SRUN_WAIT          seconds the other ranks may run on after one exits before srun kills them: the
#                      backstop for peers that do not notice (NCCL may wait for its timeout; gloo peers
#                      exit at once) (default: 120)
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME   network interface for NCCL / gloo (e.g. ib0, eth0, ^docker)
#   NCCL_IB_TIMEOUT    InfiniBand transport timeout exponent (NCCL default 20 = 4.096 us * 2^20)
#   NCCL_DEBUG         INFO or WARN to see NCCL's transport choices
#   DEEPSPEED_TIMEOUT  collective timeout in minutes for deepspeed.init_distributed (DeepSpeed default: 10)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING / TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC   torch's NCCL watchdog
#
#SBATCH --job-name=alectra-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

readonly EXIT_REQUEUE=75  # alectra.training.EXIT_REQUEUE (BSD EX_TEMPFAIL)
readonly EXIT_USAGE=2     # pretrain.py's user-error exit (and argparse's): a retry would fail the same way

die() { echo "pretrain.sh: error: $*" >&2; exit 2; }

# Installed first so that a signal arriving during setup is not lost (USR1's default action would end
# the script): before srun starts it only marks the stop; afterwards it goes to the ranks.
LAUNCH_PID=
STOP_REQUESTED=
RUN_LOG=/dev/null
forward_stop() {
  echo "pretrain.sh: got SIG$1 at $(date -u +%FT%TZ); asking the ranks to checkpoint and stop" | tee -a "$RUN_LOG"
  STOP_REQUESTED=1
  [ -n "$LAUNCH_PID" ] && kill -USR1 "$LAUNCH_PID" 2>/dev/null
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

[ -n "${SLURM_JOB_ID:-}" ] || die "run this with sbatch (SLURM_JOB_ID is not set)"
ALECTRA_DIR=${ALECTRA_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ALECTRA_DIR" || die "ALECTRA_DIR=$ALECTRA_DIR is not a directory"
PYTHON=${PYTHON:-python}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-alectra/pretrain.py}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
CONFIG=${CONFIG:-}
DATA=${DATA:-}
OUTPUT=${OUTPUT:-runs/${SLURM_JOB_NAME:-alectra}-${SLURM_JOB_ID}}
# one OpenMP/MKL thread pool per rank sized to its CPUs, not to the whole node
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
MAX_RESTARTS=${MAX_RESTARTS:-50}
MAX_CRASH_RETRIES=${MAX_CRASH_RETRIES:-2}
SRUN_WAIT=${SRUN_WAIT:-120}
for var in MAX_RESTARTS MAX_CRASH_RETRIES SRUN_WAIT; do
  [[ ${!var} =~ ^[0-9]+$ ]] || die "$var=${!var} must be a non-negative integer"
done
LAUNCHER=${LAUNCHER:-srun}
[ "$LAUNCHER" = srun ] || [ "$LAUNCHER" = mpirun ] || die "LAUNCHER=$LAUNCHER: choose srun or mpirun"
[ -f "$TRAIN_SCRIPT" ] || die "TRAIN_SCRIPT=$TRAIN_SCRIPT not found in $ALECTRA_DIR (submit from the repository root or set ALECTRA_DIR)"
[ -f "$DS_CONFIG" ] || die "DS_CONFIG=$DS_CONFIG not found"
[ -z "$CONFIG" ] || [ -f "$CONFIG" ] || die "CONFIG=$CONFIG not found"

# Ranks per node: one per allocated GPU; no GPU -> one CPU rank per node (gloo).
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE must be a non-negative integer"
TASKS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
NTASKS=$(( NODES * TASKS_PER_NODE ))

# SLURM_RESTART_COUNT is unset on the first run and 1, 2, ... after each requeue.
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$OUTPUT/logs/slurm
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"
RUN_LOG=$LOG_DIR/job${SLURM_JOB_ID}-restart${RESTART}.log
CRASH_FILE=$LOG_DIR/job${SLURM_JOB_ID}.crashes

CMD=("$PYTHON" "$TRAIN_SCRIPT" --deepspeed "$DS_CONFIG")
[ -n "$CONFIG" ] && CMD+=(--config "$CONFIG")
CMD+=(--output_dir "$OUTPUT")
# as a YAML list of quoted strings: "a,b" -> ["a","b"] (a path may hold ':' or spaces)
[ -n "$DATA" ] && CMD+=(--data.paths "[\"${DATA//,/\",\"}\"]")
CMD+=("$@")
case $LAUNCHER in
  srun)
    LAUNCH=(srun --nodes="$NODES" --ntasks="$NTASKS" --ntasks-per-node="$TASKS_PER_NODE" --wait="$SRUN_WAIT"
            --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --export=ALL) ;;
  mpirun)
    # OpenMPI's mpirun reads the allocation from SLURM and starts its daemons with srun; the ranks find
    # each other through mpi4py (alectra.distributed). It forwards USR1 to the ranks as srun does.
    # shellcheck disable=SC2206  # MPIRUN_ARGS is a list of options, split on spaces on purpose
    LAUNCH=(mpirun -np "$NTASKS" --map-by "ppr:$TASKS_PER_NODE:node" --bind-to none ${MPIRUN_ARGS:-}) ;;
esac

{
  echo "=== alectra pretrain: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-unset (first run)} on $(hostname) at $(date -u +%FT%TZ)"
  echo "nodes: $NODES ($SLURM_JOB_NODELIST)  tasks per node: $TASKS_PER_NODE  world size: $NTASKS"
  echo "command: $(printf '%q ' "${LAUNCH[@]}" "${CMD[@]}")"
  echo "environment:"
  env | grep -E '^(SLURM_(JOB_ID|JOB_NAME|JOB_NODELIST|JOB_NUM_NODES|RESTART_COUNT|SUBMIT_DIR|GPUS_ON_NODE|CPUS_PER_TASK)|MASTER_(ADDR|PORT)|NCCL_|GLOO_|TORCH_NCCL_|DEEPSPEED_TIMEOUT|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|PYTHONPATH|CONFIG|DS_CONFIG|DATA|OUTPUT|MAX_RESTARTS|MAX_CRASH_RETRIES)=' | sort | sed 's/^/  /'
  echo "log of this run: $RUN_LOG"
} | tee -a "$RUN_LOG"

# ---- launch; the traps above forward preemption signals to the step ----
if [ -n "$STOP_REQUESTED" ]; then
  rc=$EXIT_REQUEUE  # stopped before training started: nothing new to save, just requeue
else
  "${LAUNCH[@]}" "${CMD[@]}" > >(tee -a "$RUN_LOG") 2>&1 &
  LAUNCH_PID=$!
  # `wait` returns early (status > 128) whenever a trapped signal arrives; wait until the launcher is gone.
  rc=0
  wait "$LAUNCH_PID" || rc=$?
  while kill -0 "$LAUNCH_PID" 2>/dev/null; do
    rc=0
    wait "$LAUNCH_PID" || rc=$?
  done
fi
# From here on a late USR1/TERM must not kill the script before it has requeued or reported.
trap '' USR1 TERM

requeue() {
  echo "pretrain.sh: $1; requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)) of at most $MAX_RESTARTS)" | tee -a "$RUN_LOG"
  # The controller kills this script while requeueing it; reaching the next line means it refused
  # (e.g. the partition or slurm.conf forbids requeue).
  scontrol requeue "$SLURM_JOB_ID" && sleep 60
  echo "pretrain.sh: scontrol requeue did not take effect; resubmit by hand with OUTPUT=$OUTPUT" | tee -a "$RUN_LOG"
  exit "$rc"
}

if [ "$rc" -eq 0 ]; then
  echo "pretrain.sh: training finished (exit 0)" | tee -a "$RUN_LOG"
  exit 0
fi
if [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
  echo "pretrain.sh: exit $rc after $RESTART restarts = MAX_RESTARTS; not requeueing" | tee -a "$RUN_LOG"
  exit "$rc"
fi
if [ "$rc" -eq "$EXIT_REQUEUE" ]; then
  requeue "checkpoint saved after a stop signal (exit $EXIT_REQUEUE)"
fi
if [ "$rc" -eq "$EXIT_USAGE" ]; then
  echo "pretrain.sh: user error (exit $EXIT_USAGE: configuration, path, data, checkpoint or disk space; see above); not requeueing: fix it and resubmit" | tee -a "$RUN_LOG"
  exit "$rc"
fi
CRASHES=$(cat "$CRASH_FILE" 2>/dev/null || echo 0)
if [ "$CRASHES" -ge "$MAX_CRASH_RETRIES" ]; then
  echo "pretrain.sh: training failed with exit $rc; $CRASHES crash retries used (MAX_CRASH_RETRIES=$MAX_CRASH_RETRIES), giving up" | tee -a "$RUN_LOG"
  exit "$rc"
fi
echo $((CRASHES + 1)) > "$CRASH_FILE.tmp" && mv "$CRASH_FILE.tmp" "$CRASH_FILE"
requeue "training failed with exit $rc (crash retry $((CRASHES + 1)) of $MAX_CRASH_RETRIES)"
