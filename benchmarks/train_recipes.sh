#!/usr/bin/env bash
# Issue 13's check: each recipe config trains a few hundred steps on the embedded demo data with falling loss.
# Runs configs/alectra_small_owt.yaml (the seed's recipe), configs/alectra_small_electra_recipe.yaml and
# configs/electra_small_owt.yaml with their own optimizer, schedule, masking, examples, heads and embedding
# tying, on data/demo at a small size: 3 discriminator layers and 1 generator layer (hidden sizes as in the
# presets), 64 tokens, and the batch, step count and warmup scaled down; prints the logged losses of each run
# and the ratio of the last logged training loss to the first. CPU is enough (a few minutes per recipe).
#   benchmarks/train_recipes.sh [STEPS] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-200}
batch=${2:-16}
warmup=$((steps / 10))
out=${OUT_DIR:-runs/train_recipes}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -c "from data_prep import prepare_demo; prepare_demo('data/demo')"  # no-op when built
for config in alectra_small_owt alectra_small_electra_recipe electra_small_owt; do
  rm -rf "$out/$config"
  log="$out/$config.log"
  mkdir -p "$out"
  python alectra/pretrain.py --config "configs/$config.yaml" --output_dir "$out/$config" \
    --data.paths '[data/demo]' --data.num_workers 1 --data.valid_fraction 0.02 --data.max_seq_length 64 \
    --model.overrides "{discriminator_num_layers: 3, generator_num_layers: 1}" \
    --train.steps "$steps" --train.warmup_steps "$warmup" \
    --train.global_batch_size "$batch" --train.micro_batch_size "$batch" \
    --logging.every $((steps / 10)) --logging.eval_every "$steps" --logging.eval_batches 10 \
    --checkpoint.every "$steps" >"$log" 2>&1
  python - "$config" "$log" <<'PY'
import re
import sys

config, log = sys.argv[1], sys.argv[2]
rows = [(int(m[1]), float(m[2])) for m in re.finditer(r"^train step (\d+)/\d+: loss=([\d.e+-]+)", open(log).read(), re.M)]
evals = re.findall(r"^eval step \d+/\d+: loss=([\d.e+-]+)", open(log).read(), re.M)
print(f"{config}: " + ", ".join(f"{s}:{l:.3g}" for s, l in rows) + f"  eval {evals[-1] if evals else '-'}")
print(f"  last/first training loss {rows[-1][1] / rows[0][1]:.2f}x")
PY
done
