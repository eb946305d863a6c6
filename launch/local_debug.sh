#!/usr/bin/env bash
# Debug on one machine: the same driver and actors on a local Ray (CPU works).
set -euo pipefail
cd "$(dirname "$0")/.."
exec gad-train experiment=tiny_cpu cluster=local "$@"
