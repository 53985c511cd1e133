"""Helpers of the main-job tests: `python -m rlhf_pipeline run`, shortened, on its own embedded cluster, and
where a job's claim lies on this machine's disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The SFT and reward-model stages shortened (`--set` overrides), as every pipeline's shortened run starts
UPSTREAM_SHORT = [
    "SFTJob/policy-sft:spec.training.maxSteps=6",
    "SFTJob/policy-sft:spec.checkpoint.everySteps=3",
    "RewardModelJob/harmless-rm:spec.training.maxSteps=4",
    "RewardModelJob/harmless-rm:spec.training.evalEvery=0",
    "RewardModelJob/harmless-rm:spec.dataset.maxSamples=120",
    "RewardModelJob/harmless-rm:spec.checkpoint.everySteps=2",
]


def run_pipeline(state: Path, out: Path, sets: list[str], *options: str) -> subprocess.CompletedProcess:
    """Run the main job with `--set` overrides (and `options`, e.g. --pipeline dpo) on a cluster under `state`,
    kept afterwards for the test to inspect; asserts that it succeeded."""
    args = [sys.executable, "-m", "rlhf_pipeline", "run", *options, "--state-dir", str(state), "--out", str(out),
            "--keep-cluster", "--timeout", "1500"]
    for item in sets:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return proc


def claim_dir(kubeconfig: str, namespace: str, claim: str) -> Path:
    """The directory of a bound claim's volume (the embedded cluster's hostPath or local PersistentVolume)."""
    def get(*what: str) -> dict:
        out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *what, "-o", "json"], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)

    pv = get("get", "pv", get("-n", namespace, "get", "pvc", claim)["spec"]["volumeName"])
    return Path((pv["spec"].get("hostPath") or pv["spec"]["local"])["path"])
