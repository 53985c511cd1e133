"""policies.running_spec: what a running job keeps when its spec is edited."""

from __future__ import annotations

from op_helpers import job
from rlhf_operator import builders
from rlhf_operator.policies import running_spec
from rlhf_operator.settings import Settings

PPO = {"actor": {"path": "/a"}, "rewardModel": {"path": "/r"}, "dataset": {"path": "/d"}, "ppo": {"klCoef": 0.05},
       "resources": {"gpus": 0}, "checkpoint": {"everySteps": 5, "retainPolicy": "Retain"}, "backoffLimit": 3}


def edited(**changes):
    spec = {**PPO, **changes}
    return spec


def test_only_fields_mutable_while_running_are_taken():
    spec = edited(ppo={"klCoef": 0.5}, resources={"gpus": 1}, backoffLimit=5, suspend=False,
                  checkpoint={"everySteps": 5, "retainPolicy": "Delete"})
    assert running_spec.refused_fields(running_spec.snapshot(PPO), spec) == ["spec.ppo", "spec.resources"]
    eff = running_spec.effective_spec(running_spec.snapshot(PPO), spec)
    assert eff["ppo"] == {"klCoef": 0.05} and eff["resources"] == {"gpus": 0}
    assert eff["backoffLimit"] == 5 and eff["suspend"] is False and eff["checkpoint"] == {"everySteps": 5, "retainPolicy": "Delete"}
    # checkpoint.everySteps feeds the trainer config: refused like any other field.
    assert running_spec.refused_fields(running_spec.snapshot(PPO), edited(checkpoint={"everySteps": 1})) == \
        ["spec.checkpoint.everySteps"]  # (retainPolicy, dropped here too, may change)
    assert running_spec.refused_fields(running_spec.snapshot(PPO), edited(activeDeadlineSeconds=60)) == []
    # Removing a mutable field removes it from the effective spec too.
    assert "backoffLimit" not in running_spec.effective_spec(running_spec.snapshot(PPO), {k: v for k, v in PPO.items() if k != "backoffLimit"})


def test_empty_values_are_not_changes():
    # The status drops empty strings and objects; a spec with them is the same spec.
    assert running_spec.refused_fields(running_spec.snapshot(PPO), {**PPO, "env": None, "sft": {}}) == []


def test_pods_and_config_of_a_run_are_built_from_its_spec():
    status = {"trainerPod": "p-ppo-trainer-0", "phase": "Running", "runningSpec": running_spec.snapshot(PPO)}
    assert running_spec.in_run(status)
    assert not running_spec.in_run({**status, "phase": "Failed"}) and not running_spec.in_run({"runningSpec": {}})
    new = job("PPOJob", "p", spec=edited(ppo={"klCoef": 0.5}, resources={"gpus": 1}))
    run = {**new, "spec": running_spec.effective_spec(status["runningSpec"], new["spec"])}
    cfg, _ = builders.render_config(run, Settings())
    assert cfg.ppo.kl_coef == 0.05
    pod = builders.build_pod(run, Settings(), 1, 1, "hash", [])
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])
