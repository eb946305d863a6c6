#!/usr/bin/env bash
# Two 8 x 80 GB nodes in one Ray cluster: the Qwen2.5-14B recipe (docs/plan.md).
#   (teacher=api: export OPENAI_API_KEY on every node before ray start; actors inherit it)
#   head:    ray start --head --num-gpus 8
#   workers: ray start --address <head-ip>:6379 --num-gpus 8
# Then, from any machine that reaches the head's dashboard (port 8265):
#   RAY_ADDRESS=http://<head-ip>:8265 bash launch/submit_multi_node.sh
# Another layout (more nodes, other ranks): pass overrides, and check them first with
#   gad-train experiment=qwen2.5-14b_gpt5chat <overrides> plan_only=true
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head-ip>:8265}"
export RAY_ADDRESS
ray job submit --runtime-env launch/runtime_env.yaml \
  -- gad-train experiment=qwen2.5-14b_gpt5chat cluster=multi_node "$@"
