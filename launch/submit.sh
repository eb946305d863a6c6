#!/usr/bin/env bash
# `ray job submit` of one gad-train run, its outputs on durable storage (docs/cluster.md#run-storage):
#   RAY_ADDRESS=http://<head-ip>:8265 RUN_ROOT=/shared/gad-runs \
#     bash launch/submit.sh experiment=<preset> cluster=<cluster> [overrides...]
# The run dir is $RUN_ROOT/$RUN_NAME (RUN_NAME: default the name= override, else the experiment
# preset's name); submitting the same command again resumes from its last checkpoint. RUN_ROOT
# must be an absolute path every node of the cluster mounts (NFS, a parallel file system): a job's
# working directory is Ray's cache, which Ray deletes, and each node has its own local disk.
# launch/submit_single_node.sh and launch/submit_multi_node.sh call this with their presets.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head-ip>:8265 (the dashboard of the head)}"
: "${RUN_ROOT:?set RUN_ROOT to an absolute path on storage every node mounts, e.g. RUN_ROOT=/shared/gad-runs}"
case "$RUN_ROOT" in
  /*) ;;
  *) echo "RUN_ROOT=$RUN_ROOT: must be an absolute path (on storage every node mounts)" >&2; exit 2 ;;
esac
name=run
for arg in "$@"; do case "$arg" in experiment=*) name=${arg#experiment=} ;; esac; done
for arg in "$@"; do case "$arg" in name=*) name=${arg#name=} ;; esac; done
RUN_NAME=${RUN_NAME:-$name}
export RAY_ADDRESS
echo "run dir: $RUN_ROOT/$RUN_NAME"
# trainer.run_dir goes first: a trainer.run_dir among the overrides still wins
exec ray job submit --runtime-env launch/runtime_env.yaml \
  -- gad-train "trainer.run_dir=$RUN_ROOT/$RUN_NAME" "$@"
