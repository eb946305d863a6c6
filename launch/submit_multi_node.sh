#!/usr/bin/env bash
# Two 8 x 80 GB nodes in one Ray cluster: the Qwen2.5-14B recipe (docs/plan.md).
#   (teacher=api: export OPENAI_API_KEY on every node before ray start; actors inherit it)
#   head:    ray start --head --num-gpus 8
#   workers: ray start --address <head-ip>:6379 --num-gpus 8
# Then, from any machine that reaches the head's dashboard (port 8265), with RUN_ROOT on storage
# every node mounts at the same path (the run checks it before its first step):
#   RAY_ADDRESS=http://<head-ip>:8265 RUN_ROOT=/shared/gad-runs bash launch/submit_multi_node.sh
# Outputs: $RUN_ROOT/$RUN_NAME (default $RUN_ROOT/qwen2.5-14b_gpt5chat); see launch/submit.sh.
# Another layout (more nodes, other ranks): pass overrides, and check them first with
#   gad-train experiment=qwen2.5-14b_gpt5chat <overrides> plan_only=true
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head-ip>:8265}"
: "${RUN_ROOT:?set RUN_ROOT to an absolute path on storage every node mounts, e.g. RUN_ROOT=/shared/gad-runs}"
export RAY_ADDRESS RUN_ROOT
exec bash launch/submit.sh experiment=qwen2.5-14b_gpt5chat cluster=multi_node "$@"
