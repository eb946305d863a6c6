#!/usr/bin/env bash
# Several 8-GPU nodes in one Ray cluster:
#   (teacher=api: export OPENAI_API_KEY on every node before ray start; actors inherit it)
#   head:    ray start --head --num-gpus 8
#   workers: ray start --address <head-ip>:6379 --num-gpus 8
# Then, from any machine that reaches the head's dashboard (port 8265):
#   RAY_ADDRESS=http://<head-ip>:8265 bash launch/submit_multi_node.sh cluster.num_nodes=2 \
#       learner.generator_ranks=8 learner.discriminator_ranks=4 rollout.num_workers=2
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head-ip>:8265}"
export RAY_ADDRESS
ray job submit --runtime-env launch/runtime_env.yaml \
  -- gad-train experiment=qwen2.5-7b_gpt5chat cluster=multi_node "$@"
