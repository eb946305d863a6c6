#!/usr/bin/env bash
# One 8 x 80 GB node: the paper's Qwen2.5-7B <- GPT-5-Chat recipe, colocated (docs/plan.md).
#   export OPENAI_API_KEY=...                 # only if teacher=api, BEFORE ray start: actors
#   ray start --head --num-gpus 8            # inherit it; it never travels in the job spec
#   bash launch/submit_single_node.sh        # data: the released set from the hub
#   RUN_ROOT=/data/gad-runs bash launch/submit_single_node.sh data.train_path=/data/lmsys_gpt5chat.parquet
# Outputs: $RUN_ROOT/$RUN_NAME (default outputs/qwen2.5-7b_gpt5chat in this repo, on this
# machine: set RUN_ROOT when submitting to a head elsewhere); see launch/submit.sh.
# Check the layout first (no GPU needed): gad-train experiment=qwen2.5-7b_gpt5chat plan_only=true
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
: "${RUN_ROOT:=$PWD/outputs}"
export RAY_ADDRESS RUN_ROOT
exec bash launch/submit.sh experiment=qwen2.5-7b_gpt5chat cluster=single_node "$@"
