"""Rules beyond the schema (jobspec), fromJob resolution, progress parsing and admission."""

from __future__ import annotations

import pytest
from op_helpers import job
from rlhf_operator import dependencies, jobspec, progress, webhook
from rlhf_operator.settings import Settings

BASE = {"model": {"path": "/m"}, "dataset": {"path": "/d"}}


@pytest.mark.parametrize("kind, patch, needle", [
    ("SFTJob", {"model": {}}, "spec.model: set one of path"),
    ("SFTJob", {"model": {"path": "/m", "hubId": "gpt2"}}, "spec.model: set only one of path, hubId"),
    ("SFTJob", {"model": {"initFromConfig": {"model_type": "gpt2"}}}, "spec.model.tokenizerPath: required"),
    ("SFTJob", {"model": {"fromJob": {"name": "rm", "kind": "RewardModelJob"}}}, "spec.model.fromJob.kind: a RewardModelJob cannot be used as model"),
    ("SFTJob", {"model": {"fromJob": {"name": "j"}}}, "cannot depend on itself"),
    ("SFTJob", {"dataset": {}}, "spec.dataset: set one of path"),
    ("SFTJob", {"dataset": {"claim": "c", "configMap": {"name": "x", "key": "y"}}}, "claim and configMap cannot be combined"),
    ("SFTJob", {"resources": {"gpus": 3}}, "spec.resources.gpus: 3 GPUs per pod cannot be used; choose one of 0, 1, 2, 4, 8"),
    ("SFTJob", {"resources": {"gpus": 16}}, "spec.resources.gpus"),
    ("SFTJob", {"deepspeed": {"bf16": True, "fp16": True}}, "spec.deepspeed: bf16 and fp16"),
    ("SFTJob", {"deepspeed": {"offloadParams": True, "zeroStage": 2}}, "spec.deepspeed.offloadParams"),
    ("SFTJob", {"env": [{"name": "POD_IP", "value": "x"}]}, "spec.env[0].name: POD_IP is set by the operator"),
    ("PPOJob", {"ppo": {"minibatchSize": 32, "rolloutBatchSize": 16}}, "spec.ppo.minibatchSize: 32 is larger"),
    ("PPOJob", {"rewardModel": {"fromJob": {"name": "s", "kind": "SFTJob"}}}, "spec.rewardModel.fromJob.kind: a SFTJob cannot be used as rewardModel"),
])
def test_validate_names_the_field(kind, patch, needle):
    spec = dict(job(kind)["spec"] if kind == "PPOJob" else BASE)
    spec.update(patch)
    errors = jobspec.validate(kind, "j", spec)
    assert any(needle in e for e in errors), errors


def test_valid_specs_pass_and_long_names_fail():
    assert jobspec.validate("SFTJob", "j", BASE) == []
    assert jobspec.validate("PPOJob", "p", job("PPOJob")["spec"]) == []
    assert jobspec.validate("SFTJob", "j", {**BASE, "model": {"claim": "models"}}) == []  # the claim's root
    assert "metadata.name" in jobspec.validate("SFTJob", "x" * 64, BASE)[0]


def test_dependencies_group_roles_and_default_kinds():
    spec = {"actor": {"fromJob": {"name": "s"}}, "reference": {"fromJob": {"name": "s"}},
            "rewardModel": {"fromJob": {"name": "r"}}, "critic": {"path": "/c"}}
    deps = jobspec.dependencies("PPOJob", spec)
    assert [(d.kind, d.name, d.roles) for d in deps] == [("SFTJob", "s", ("actor", "reference")), ("RewardModelJob", "r", ("rewardModel",))]


def test_update_rules():
    running = {"phase": "Running", "trainerPod": "j-trainer-0", "checkpoint": {"claim": "j-checkpoints"}}
    assert jobspec.update_errors(BASE, {**BASE, "suspend": True}, running) == []
    assert jobspec.update_errors(BASE, {**BASE, "activeDeadlineSeconds": 5}, running) == []
    errs = jobspec.update_errors(BASE, {**BASE, "training": {"maxSteps": 3}}, running)
    assert errs == ["spec.training: cannot change while the job is running; set spec.suspend: true first, then change it"]
    suspended = {"phase": "Suspended", "trainerPod": "", "checkpoint": {"claim": "j-checkpoints"}}
    assert jobspec.update_errors(BASE, {**BASE, "training": {"maxSteps": 3}}, suspended) == []
    assert "storage cannot change" in jobspec.update_errors(BASE, {**BASE, "checkpoint": {"size": "1Gi"}}, suspended)[0]
    done = {"phase": "Succeeded"}
    assert jobspec.update_errors(BASE, {**BASE, "ttlSecondsAfterFinished": 1}, done) == []
    assert "finished job" in jobspec.update_errors(BASE, {**BASE, "suspend": True}, done)[0]


def summary(kind, name, phase="Running", ns="ns", deps=()):
    return {"kind": kind, "name": name, "namespace": ns, "uid": f"u-{name}", "phase": phase, "message": "",
            "claim": f"{name}-checkpoints", "completionTime": "", "ttl": None, "deps": list(deps), "generation": 1}


def test_resolve_dependents_and_wrong_kind():
    jobs = [summary("SFTJob", "s", "Succeeded"), summary("PPOJob", "p", "Waiting", deps=[("SFTJob", "s")]),
            summary("PPOJob", "done", "Succeeded", deps=[("SFTJob", "s")]),
            summary("PPOJob", "other-ns", "Waiting", ns="x", deps=[("SFTJob", "s")])]
    lookup = lambda kind, name: next((j for j in jobs if j["kind"] == kind and j["name"] == name and j["namespace"] == "ns"), None)  # noqa: E731
    spec = {"actor": {"fromJob": {"name": "s"}}, "rewardModel": {"fromJob": {"name": "missing"}}}
    states = dependencies.resolve("PPOJob", spec, lookup)
    assert [(d.name, d.exists, d.phase, d.claim) for d in states] == [("s", True, "Succeeded", "s-checkpoints"), ("missing", False, "", "")]
    assert dependencies.dependents("ns", "SFTJob", "s", jobs) == [("ns", "PPOJob", "p")]
    errs = dependencies.wrong_kind_errors("PPOJob", {"rewardModel": {"fromJob": {"name": "s"}}}, lookup)
    assert errs == ["spec.rewardModel.fromJob: 's' is a SFTJob, but rewardModel needs a RewardModelJob; name a RewardModelJob or set fromJob.kind"]
    assert dependencies.wrong_kind_errors("PPOJob", spec, lookup) == []  # missing names just wait


def test_summarize_reads_status():
    j = job("RewardModelJob", "rm", status={"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "message": "bad data"}], "checkpoint": {"claim": "c"}})
    s = dependencies.summarize("RewardModelJob", j)
    assert (s["phase"], s["message"], s["claim"], s["uid"]) == ("Failed", "bad data", "c", "uid-rm")


METRICS = """# HELP rlhf_trainer_step step
# TYPE rlhf_trainer_step gauge
rlhf_trainer_step{job="j",namespace="ns",stage="ppo"} 12.0
rlhf_trainer_total_steps{job="j",namespace="ns",stage="ppo"} 40.0
rlhf_trainer_loss{job="j",namespace="ns",stage="ppo"} NaN
rlhf_ppo_reward_mean{job="j",namespace="ns",stage="ppo"} 0.75
rlhf_ppo_kl{job="j",namespace="ns",stage="ppo"} 0.02
rlhf_trainer_last_checkpoint_step{job="j",namespace="ns",stage="ppo"} 10.0
rlhf_ppo_phase_seconds{job="j",namespace="ns",phase="generate",stage="ppo"} 1.5
"""


def test_progress_parse_uses_contract_names_and_drops_nan():
    assert progress.parse(METRICS) == {"step": 12, "totalSteps": 40, "reward": 0.75, "kl": 0.02, "checkpointStep": 10}


def lookup_none(kind, name):
    return None


def test_admission_errors():
    s = Settings()
    body = job("SFTJob", "j", spec={**BASE, "training": {"maxLength": 4}})
    assert webhook.admission_errors("SFTJob", body, None, s, lookup_none) == [
        "spec.training.maxLength: must be >= 8, got 4"]
    ok = job("SFTJob", "j", spec=BASE)
    assert webhook.admission_errors("SFTJob", ok, None, s, lookup_none) == []
    running = job("SFTJob", "j", spec=BASE, status={"phase": "Running", "trainerPod": "j-trainer-0"})
    changed = job("SFTJob", "j", spec={**BASE, "image": "other"})
    assert "spec.image: cannot change while the job is running" in webhook.admission_errors("SFTJob", changed, running, s, lookup_none)[0]
    relabelled = job("SFTJob", "j", spec=BASE)
    assert webhook.admission_errors("SFTJob", relabelled, running, s, lookup_none) == []
