#!/usr/bin/env bash
# The main job: SFT -> reward model -> PPO through the operator, on the embedded cluster
# (or on the cluster $KUBECONFIG points at). Extra arguments go to `python -m rlhf_pipeline run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m rlhf_pipeline run "$@"
