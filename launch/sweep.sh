#!/usr/bin/env bash
# A Hydra sweep: every combination runs as its own job, one after another, each in
# outputs/<name>-sweep/<overrides>/ (resumable: re-running the sweep continues each job).
#   bash launch/sweep.sh                       # the local CPU preset
#   bash launch/sweep.sh experiment=qwen2.5-7b_gpt5chat cluster=single_node
set -euo pipefail
cd "$(dirname "$0")/.."
exec gad-train --multirun \
  algorithm=gad,seqkd,gad_frozen_d \
  algorithm.grpo.n_samples=4,8 \
  "$@"
