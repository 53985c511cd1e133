"""Pure builders: the pod, claim and config a job turns into."""

from __future__ import annotations

import pytest
import yaml
from op_helpers import job
from rlhf_operator import builders
from rlhf_operator.settings import Settings
from rlhf_trainer import config as tc
from rlhf_trainer import contract

S = Settings()


def build(j, attempt=0, restarts=0, settings=S):
    cfg, mounts = builders.render_config(j, settings)
    return cfg, builders.build_pod(j, settings, attempt, restarts, builders.config_hash(cfg.to_yaml()), mounts)


def env_of(pod):
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_single_gpu_pod():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d.jsonl"}, "resources": {"cpu": "2", "memory": "4Gi"}})
    _, pod = build(j, attempt=2, restarts=1)
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert pod["metadata"]["name"] == "j-sft-trainer-2"
    assert pod["metadata"]["labels"] == {**builders.labels("SFTJob", "j"), builders.LABEL_ATTEMPT: "2",
                                         builders.LABEL_JOB_UID: "uid-j", "app.kubernetes.io/name": "rlhf-trainer"}
    assert pod["metadata"]["labels"][builders.LABEL_STAGE] == "sft"
    assert pod["metadata"]["annotations"][builders.ANN_RESTART_COUNT] == "1"
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "rlhf.io/v1alpha1", "kind": "SFTJob", "name": "j",
                                                   "uid": "uid-j", "controller": True, "blockOwnerDeletion": True}]
    assert c["command"] == ["python", "-m", "rlhf_trainer", "sft", "--config", "/etc/rlhf/config.yaml"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
                              "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"}}
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(pod)
    assert env[contract.ENV_POD_IP]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env[contract.ENV_JOB_NAME]["value"] == "j" and env[contract.ENV_JOB_KIND]["value"] == "SFTJob"
    assert env[contract.ENV_CONFIG]["value"] == "/etc/rlhf/config.yaml"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/ckpt"].get("readOnly") is not True and mounts["/etc/rlhf"]["readOnly"] is True
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "j-sft-checkpoints"
    assert vols["config"]["configMap"]["name"] == "j-sft-config"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_multi_gpu_pod_uses_torchrun_and_shm():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "resources": {"gpus": 4},
                  "scheduling": {"nodeSelector": {"gpu": "a100"}, "priorityClassName": "high",
                                 "tolerations": [{"key": "x", "operator": "Exists"}]}})
    _, pod = build(j)
    c = pod["spec"]["containers"][0]
    assert c["command"][:5] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "-m"]
    assert c["command"][5:] == ["rlhf_trainer", "sft", "--config", "/etc/rlhf/config.yaml"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    assert pod["spec"]["nodeSelector"] == {"gpu": "a100"} and pod["spec"]["priorityClassName"] == "high"
    assert pod["spec"]["tolerations"][0] == {"key": "x", "operator": "Exists"}


def test_cpu_only_pod_requests_no_gpu_and_command_override():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "resources": {"gpus": 0}})
    _, pod = build(j, settings=Settings(trainer_command=("python", "/s.py")))
    c = pod["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(c["resources"]) and "tolerations" not in pod["spec"]
    assert c["command"] == ["python", "/s.py", "sft", "--config", "/etc/rlhf/config.yaml"]


def test_from_job_inputs_are_mounted_read_only_and_config_points_at_final():
    j = job("PPOJob", "p", spec={"actor": {"fromJob": {"name": "sft"}}, "reference": {"fromJob": {"name": "sft"}},
                                 "rewardModel": {"fromJob": {"name": "rm", "kind": "RewardModelJob"}},
                                 "dataset": {"claim": "data", "path": "prompts.jsonl"}, "ppo": {"klCoef": 0.2}})
    cfg, pod = build(j)
    assert cfg.stage == "ppo" and cfg.ppo.kl_coef == 0.2
    assert cfg.ppo.actor.path == "/inputs/sft/final" == cfg.ppo.reference.path
    assert cfg.ppo.reward_model.path == "/inputs/rm/final"
    assert cfg.dataset.path == "/mnt/claims/data/prompts.jsonl"
    assert cfg.inputs == {"sft": "/inputs/sft/final", "rm": "/inputs/rm/final"}
    c = pod["spec"]["containers"][0]
    inputs = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"].startswith("input-")}
    assert set(inputs) == {"/inputs/sft", "/inputs/rm", "/mnt/claims/data"}  # sft mounted once for two roles
    assert all(m["readOnly"] for m in inputs.values())
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["spec"]["volumes"] if v["name"].startswith("input-")}
    # Without an upstream status to go by, the claim names come from rlhf_operator.names (kind included).
    assert claims == {"sft-sft-checkpoints": True, "rm-rm-checkpoints": True, "data": True}


def test_configmap_round_trips_through_the_trainer_parser():
    j = job("RewardModelJob", "rm", spec={
        "model": {"initFromConfig": {"model_type": "gpt2", "n_layer": 2}, "tokenizerPath": "/tok"},
        "dataset": {"configMap": {"name": "pairs", "key": "pairs.jsonl"}, "format": "hh_rlhf", "evalFraction": 0.2},
        "training": {"maxSteps": 7, "batchSize": 4, "learningRate": 0.001}, "reward": {"margin": 0.5},
        "deepspeed": {"zeroStage": 2, "bf16": True}, "checkpoint": {"everySteps": 3, "keepLast": 4}})
    cfg, _ = builders.render_config(j, S)
    cm = builders.build_configmap(j, cfg.to_yaml())
    parsed = tc.from_dict(yaml.safe_load(cm["data"][tc.CONFIG_FILE_NAME]))
    assert parsed == cfg
    assert parsed.stage == "reward" and parsed.job.kind == "RewardModelJob" and parsed.job.namespace == "ns"
    assert parsed.training.max_steps == 7 and parsed.training.batch_size == 4 and parsed.reward.margin == 0.5
    assert parsed.dataset.path == "/mnt/configmaps/pairs/pairs.jsonl" and parsed.dataset.eval_fraction == 0.2
    assert parsed.model.init_from_config == {"model_type": "gpt2", "n_layer": 2} and parsed.model.tokenizer_path == "/tok"
    assert parsed.deepspeed.zero_stage == 2 and parsed.deepspeed.bf16
    assert parsed.checkpoint.dir == "/ckpt" and parsed.checkpoint.every_steps == 3 and parsed.checkpoint.keep_last == 4
    assert parsed.metrics.port == S.trainer_metrics_port
    assert cm["metadata"]["name"] == "rm-rm-config" and cm["metadata"]["ownerReferences"][0]["uid"] == "uid-rm"
    assert cm["metadata"]["labels"][builders.LABEL_JOB_UID] == "uid-rm"


def test_trainer_errors_are_reported_with_the_crd_field():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "training": {"maxLength": 4}})
    with pytest.raises(tc.ConfigError, match=r"^spec\.training\.maxLength: must be >= 8"):
        builders.render_config(j, S)
    assert builders.spec_path("ppo.reward_model.path") == "spec.rewardModel.path"
    assert builders.spec_path("training.batch_size") == "spec.training.batchSize"


@pytest.mark.parametrize("policy, owned", [(None, False), ("Retain", False), ("Delete", True)])
def test_pvc_retain_policy(policy, owned):
    cp = {"size": "5Gi", "storageClass": "fast"}
    if policy:
        cp["retainPolicy"] = policy
    pvc = builders.build_pvc(job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "checkpoint": cp}), S)
    assert pvc["metadata"]["name"] == "j-sft-checkpoints"
    assert ("ownerReferences" in pvc["metadata"]) is owned
    assert pvc["metadata"]["labels"][builders.LABEL_JOB_UID] == "uid-j"  # whose it is, even without an owner
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}, "storageClassName": "fast"}


def test_pvc_defaults_come_from_settings():
    pvc = builders.build_pvc(job(), Settings(checkpoint_size="3Gi", checkpoint_storage_class="std"))
    assert pvc["spec"]["resources"]["requests"]["storage"] == "3Gi" and pvc["spec"]["storageClassName"] == "std"
    assert "storageClassName" not in builders.build_pvc(job(), S)["spec"]


def test_trainer_pod_gets_a_writable_tmp_for_home_and_caches():
    """The root filesystem is read-only: /tmp is an emptyDir and HOME and the caches live under it."""
    _, pod = build(job())
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    vols = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert vols[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}} and not tmp.get("readOnly")
    env = {k: v["value"] for k, v in env_of(pod).items() if "value" in v}
    assert env["HOME"] == "/tmp"
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/tmp/"), var


def test_env_the_user_sets_wins_over_the_scratch_defaults():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"},
                  "env": [{"name": "HF_HOME", "value": "/ckpt/hf"}, {"name": "STANDIN_X", "value": "1"}]})
    _, pod = build(j)
    names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)), names  # one value per variable, no silent shadowing
    env = env_of(pod)
    assert env["HF_HOME"]["value"] == "/ckpt/hf" and env["STANDIN_X"]["value"] == "1"
    assert env["HOME"]["value"] == "/tmp"


def test_default_security_context_runs_as_the_trainer_images_user():
    sc = S.trainer_pod_security_context
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 10001  # trainer_image/Dockerfile: USER 10001:10001


def test_empty_strings_in_the_spec_mean_unset():
    """API servers built with Go >= 1.16 from 1.20 sources refuse "" in custom resources (the embedded one
    does); others accept it. Either way the operator reads "" as "not set"."""
    from rlhf_operator import jobspec

    spec = {"model": {"path": "/m", "hubId": "", "tokenizerPath": "", "claim": ""},
            "dataset": {"path": "/d", "hubId": ""}, "image": ""}
    assert jobspec.validate("SFTJob", "j", spec) == []
    cfg, pod = build(job(spec=spec))
    assert cfg.model.path == "/m" and not cfg.model.hub_id and not cfg.model.tokenizer_path
    assert pod["spec"]["containers"][0]["image"] == S.trainer_image
    assert not [v for v in pod["spec"]["volumes"] if v["name"].startswith("input-")]


def test_upstream_claims_are_named_by_the_upstream_kind_and_name():
    """A consumer mounts its upstream's claim by the one naming rule (names.pvc_name of its kind and name),
    not by a name read back from the upstream's status."""
    j = job("PPOJob", "p", spec={"actor": {"fromJob": {"name": "x"}}, "rewardModel": {"fromJob": {"name": "y"}},
                                 "dataset": {"path": "/d"}})
    _, mounts = builders.render_config(j, S)
    assert {m.path: m.volume["persistentVolumeClaim"]["claimName"] for m in mounts} == \
        {"/inputs/x": "x-sft-checkpoints", "/inputs/y": "y-rm-checkpoints"}


@pytest.mark.parametrize("name", ["dup", "a" * 63, "a.b", "x" * 40 + "-" + "y" * 22])
def test_child_names_are_unique_per_kind_and_valid_labels(name):
    import re

    from rlhf_operator import names

    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    made = {kind: [names.pvc_name(kind, name), names.configmap_name(kind, name), names.pod_name(kind, name, 0),
                   names.pod_name(kind, name, 123)] for kind in names.KIND_ABBREVIATIONS}
    every = [n for ns in made.values() for n in ns]
    assert len(set(every)) == len(every), every  # no two children share a name, across kinds too
    for n in every:
        assert len(n) <= 63 and label.match(n), n
    assert made["SFTJob"][0].endswith("-sft-checkpoints") and made["RewardModelJob"][2].endswith("-rm-trainer-0")
    assert names.pvc_name("SFTJob", name) == made["SFTJob"][0]  # deterministic


def test_short_names_read_plainly_and_long_ones_keep_a_hash_of_kind_and_name():
    from rlhf_operator import names

    assert names.pvc_name("SFTJob", "dup") == "dup-sft-checkpoints"
    assert names.pvc_name("RewardModelJob", "dup") == "dup-rm-checkpoints"
    assert names.configmap_name("PPOJob", "dup") == "dup-ppo-config"
    assert names.pod_name("SFTJob", "dup", 3) == "dup-sft-trainer-3"
    a, b = "a" * 62 + "1", "a" * 62 + "2"  # differ only where the cut falls
    assert names.pod_name("SFTJob", a, 0) != names.pod_name("SFTJob", b, 0)
    assert names.pod_name("SFTJob", a, 0).startswith("a" * 20)
    with pytest.raises(ValueError, match="unknown job kind 'Job'"):
        names.pvc_name("Job", "x")
