#!/usr/bin/env bash
# Table 3 offline, under the paper protocol, seeds 0 1 2: all ten strategies x four tasks
# on four small local experts (the CLM experts of `make clm`) and the synthetic task files
# of dume.reasoning.tasks.synthetic. Plumbing, not the paper's numbers (docs/reasoning.md).
#   bash reproduction/reasoning/offline_table3.sh [CLM_RUN_DIR] [OUT_DIR]
set -euo pipefail
CLM=${1:-runs/clm}
R=${2:-runs/reasoning_offline}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
E=math=$CLM/experts/math,multilingual=$CLM/experts/history,coding=$CLM/experts/code,instruction=$CLM/experts/philosophy
# The CLM experts have a 256-token context: 128 new tokens leave room for the prompt
# (the paper protocol samples 256 on the 3B experts' 128k context).
CELL=(--experts "$E" --data-dir "$R/data" --run-dir "$R" --limit 20 --max-gen-toks 128 --train-steps 50 --seq-len 256)
python -m dume.reasoning.tasks.synthetic "$R/data" --n 20
python reasoning_generate_dume_params.py --experts "$E" --data-dir "$R/data" --run-dir "$R"
for seed in 0 1 2; do
  for s in math_expert multilingual_expert coding_expert instruction_expert model_averaging oracle random_routing DUME BTX DUMEplus; do
    for t in math multilingual coding instruction; do
      python reasoning_eval.py --strategy $s --task $t --seed $seed "${CELL[@]}"
    done
  done
  # which checkpoints exist after this seed, and when each was written
  find "$R/models" -name config.json -printf "%TT %p\n" | sort -k2 > "$R/models_after_seed$seed.txt"
done
python reasoning_table.py --run-dir "$R" --protocol paper
