#!/usr/bin/env bash
# The main job: SFT -> reward model -> PPO (or -> online DPO rounds with --pipeline dpo) through the operator, on the embedded cluster
# (or on the cluster $KUBECONFIG points at). Extra arguments go to `python -m rlhf_pipeline run`.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash scripts/main.sh [OPTIONS]

The main job: the InstructGPT-style RLHF pipeline run through the rlhf operator.
  1. starts an embedded Kubernetes cluster (real kube-apiserver, etcd, scheduler; a local node agent
     runs the pods from this checkout's .venv), or uses the cluster $KUBECONFIG points at;
  2. seeds a claim with the HH-RLHF harmless preference pairs and the all-MiniLM-L6-v2 encoder;
  3. applies examples/pipeline/: SFTJob policy-sft and RewardModelJob harmless-rm (side by side,
     1 CPU each), then PPOJob harmless-ppo (2 CPUs) from both outputs; prints a live table;
  4. ends with a summary (reward-model held-out accuracy +- its standard error; PPO reward in the
     first and last quarter of training with their spread; KL; where each checkpoint lives; time
     per stage) and writes out/pipeline/{summary.json,training_curves.png,*.log}.
Exits non-zero naming the stage that failed and why.

How long: about 10 minutes on 2 CPU cores once installed (the pipeline itself under 10 minutes).
The first run also installs (scripts/install.sh): a few minutes of pip downloads (.venv, ~6 GB)
and a cold build of Kubernetes v1.34, etcd and CoreDNS from pinned Go modules (tens of minutes on 2
cores; ~/.cache/rlhf-platform/); both are cached, so a second run reuses them and starts at once.

What it needs: Debian bookworm (or a derivative) with python3 and root or sudo for apt-get the first
time; network access the first time only; 2+ CPU cores, ~6 GiB free memory, ~10 GiB disk. No GPU.

Options (passed to `python -m rlhf_pipeline run`):
  --pipeline ppo|dpo     ppo (default): the pipeline above; dpo: SFT and the reward model as above, then
                         DPOJob harmless-dpo (examples/pipeline-dpo/): 3 online iterative DPO rounds, each
                         sampling n responses per prompt, scoring them with the reward model and training
                         on the best and worst of each; the summary shows per round the best-of-n and
                         worst-of-n reward and the implicit-reward accuracy (out/pipeline-dpo/)
  --data PATH            HH-RLHF pairs JSONL (default ../shared/data/hh-rlhf-harmless/pairs.jsonl,
                         or $RLHF_DEMO_DATA)
  --set KIND/NAME:PATH=VALUE
                         override a manifest field (repeatable), e.g.
                         --set PPOJob/harmless-ppo:spec.training.maxSteps=10
  --examples DIR         directory of job manifests (default examples/pipeline, or examples/pipeline-dpo)
  --out DIR              where the summary, chart and logs go (default out/pipeline, or out/pipeline-dpo)
  --namespace NAME       namespace of the jobs (default rlhf-demo; recreated each run)
  --cpus N               CPUs the embedded node offers (default: this machine's cores)
  --gpus N               GPUs the embedded node advertises (default 2)
  --state-dir DIR        embedded cluster state (default .state/demo-cluster)
  --keep-cluster         leave the embedded cluster running afterwards
  --timeout SECONDS      give up after this long (default 1800)
  --image IMAGE          trainer image name (recorded only, on the embedded cluster)
  -h, --help             show this help (installs and starts nothing)
EOF
}

for arg in "$@"; do
  case "$arg" in -h|--help) usage; exit 0 ;; esac
done

bash scripts/install.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m rlhf_pipeline run "$@"
