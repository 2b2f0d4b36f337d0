#!/bin/bash
# GLUE fine-tuning of a pretrained discriminator (python -m alectra.glue) on one GPU.
#
#   MODEL=runs/small/export sbatch slurm/finetune_glue.sh                       # all tasks, one job
#   MODEL=runs/small/export GLUE_DIR=/data/glue sbatch slurm/finetune_glue.sh --seeds 5
#   MODEL=runs/small/export sbatch --array=0-7 slurm/finetune_glue.sh           # one array task per GLUE task
#
# Arguments after the script name go to `python -m alectra.glue` (recipe overrides: --learning-rate,
# --epochs, --seeds, ...). In array mode task i fine-tunes the i-th entry of TASKS and writes its table
# to OUTPUT/<task>/; otherwise one table for all TASKS goes to OUTPUT/.
#
# Environment variables:
#   MODEL       required: an export folder (holding discriminator/), an HF model folder, or a run folder
#   TASKS       comma-separated GLUE tasks        (default: cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte)
#   GLUE_DIR    GLUE TSV folder (<dir>/CoLA/train.tsv, ...); compute nodes are often offline, so set it
#               (default: the nyu-mll/glue hub dataset, which needs network or a filled HF cache)
#   OUTPUT      results folder                    (default: glue_results/<model folder name>)
#   PYTHON      interpreter                       (default: python)
#   ALECTRA_DIR repository root                   (default: the submit directory)
#
#SBATCH --job-name=alectra-glue
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

die() { echo "finetune_glue.sh: error: $*" >&2; exit 2; }

ALECTRA_DIR=${ALECTRA_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ALECTRA_DIR" || die "ALECTRA_DIR=$ALECTRA_DIR is not a directory"
PYTHON=${PYTHON:-python}
[ -n "${MODEL:-}" ] || die "set MODEL to an export folder (python -m alectra.export RUN OUT), e.g. MODEL=runs/x/export"
[ -e "$MODEL" ] || die "MODEL=$MODEL does not exist"
TASKS=${TASKS:-cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte}
OUTPUT=${OUTPUT:-glue_results/$(basename "$MODEL")}

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  IFS=, read -r -a TASK_LIST <<< "$TASKS"
  [ "$SLURM_ARRAY_TASK_ID" -lt "${#TASK_LIST[@]}" ] \
    || die "array index $SLURM_ARRAY_TASK_ID but TASKS has ${#TASK_LIST[@]} entries ($TASKS)"
  TASKS=${TASK_LIST[$SLURM_ARRAY_TASK_ID]}
  OUTPUT=$OUTPUT/$TASKS
fi

CMD=("$PYTHON" -m alectra.glue --model "$MODEL" --tasks "$TASKS" --output-dir "$OUTPUT")
[ -n "${GLUE_DIR:-}" ] && CMD+=(--data-dir "$GLUE_DIR")
CMD+=("$@")
echo "=== alectra glue: job ${SLURM_JOB_ID:-none} on $(hostname) at $(date -u +%FT%TZ)"
echo "command: $(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
