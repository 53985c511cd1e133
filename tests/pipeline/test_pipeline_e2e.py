"""The main job, shortened: `python -m rlhf_pipeline run` on its own embedded cluster with the real trainer.

Asserts what issue 6 asks of the CI run: all three stages Succeeded, the PPO job read exactly the
checkpoints the SFT and reward-model jobs wrote (digests recorded by the trainers), metrics were served
(the operator's live progress came from the trainer's endpoint), and the summary and chart exist.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from pipeline_helpers import UPSTREAM_SHORT, claim_dir, run_pipeline
from rlhf_operator.names import pod_name, pvc_name

from localcluster import Cluster

SHORT = [
    *UPSTREAM_SHORT,
    "PPOJob/harmless-ppo:spec.training.maxSteps=2",
    "PPOJob/harmless-ppo:spec.ppo.rolloutBatchSize=4",
    "PPOJob/harmless-ppo:spec.ppo.minibatchSize=4",
    "PPOJob/harmless-ppo:spec.ppo.maxNewTokens=8",
    "PPOJob/harmless-ppo:spec.checkpoint.everySteps=1",
]


@pytest.mark.slow
def test_short_pipeline_hands_exact_checkpoints_to_ppo(tmp_path):
    state, out = tmp_path / "cluster", tmp_path / "out"
    cluster = Cluster(str(state))
    try:
        proc = run_pipeline(state, out, SHORT)
        assert "=== RLHF pipeline summary ===" in proc.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ok"] is True
        assert [s["phase"] for s in summary["stages"]] == ["Succeeded"] * 3
        # Metrics were served: the operator's progress was scraped from each trainer's endpoint.
        for st in summary["stages"]:
            assert st["progress"].get("step", 0) >= 1, st
        assert summary["ppo_reward_start"] is not None and summary["ppo_final_kl"] is not None
        assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

        # Exact hand-over: what PPO read (digests it recorded) is what the upstream jobs wrote.
        kc = str(state / "kubeconfig")
        finals = {name: claim_dir(kc, "rlhf-demo", pvc_name(kind, name)) / "final"
                  for kind, name in (("SFTJob", "policy-sft"), ("RewardModelJob", "harmless-rm"), ("PPOJob", "harmless-ppo"))}
        meta = {name: json.loads((d / "rlhf_metadata.json").read_text()) for name, d in finals.items()}
        read = meta["harmless-ppo"]["inputs"]["digests"]
        assert read["/inputs/policy-sft/final"] == meta["policy-sft"]["output_digest"]
        assert read["/inputs/harmless-rm/final"] == meta["harmless-rm"]["output_digest"]
        from rlhf_trainer.export import tree_digest

        assert tree_digest(finals["policy-sft"]) == meta["policy-sft"]["output_digest"]
        # The PPO pod mounted the upstream claims read-only.
        pod = yaml.safe_load(subprocess.run(
            ["kubectl", "--kubeconfig", kc, "-n", "rlhf-demo", "get", "pod", pod_name("PPOJob", "harmless-ppo", 0), "-o", "yaml"],
            capture_output=True, text=True, check=True).stdout)
        mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/inputs/policy-sft"].get("readOnly") is True
        assert mounts["/inputs/harmless-rm"].get("readOnly") is True
    finally:
        cluster.down(log=lambda _m: None)
