"""DPOJob: the spec rendered into the trainer's `dpo` section (policy, reference and the online reward model
resolved like PPO's models, with their mounts), the rules the webhook and the reconciler apply, the CRD
(fields, CEL rules, printer columns), and through the real API server and operator: a bad DPOJob refused at
apply time naming the field, and a DPOJob that waits for its SFTJob and reward model, then runs with the right
mounts, config and progress (the stand-in trainer speaks the DPO part of the contract)."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml
from op_helpers import job, wait_for, webhook_operator, webhook_rejection
from rlhf_operator import builders, crd_schema, dependencies, jobspec, names, progress, rbac
from rlhf_operator.settings import Settings
from rlhf_trainer import config as tc
from rlhf_trainer import contract

S = Settings()


def dpo_spec(**over):
    spec = {"policy": {"fromJob": {"name": "sft"}},
            "dataset": {"claim": "inputs", "path": "data/pairs.jsonl", "format": "hh_rlhf"}}
    spec.update(over)
    return spec


ONLINE = {"rounds": 3, "promptsPerRound": 8, "samplesPerPrompt": 4, "rewardModel": {"fromJob": {"name": "rm"}},
          "lengthPenalty": 0.01, "temperature": 0.9, "topK": 20, "topP": 0.95, "maxPromptLength": 48,
          "maxNewTokens": 16, "epochsPerRound": 2.0}


# --- rendering -----------------------------------------------------------------------------------------------

def test_online_spec_renders_every_field_and_mounts_each_input_once():
    spec = dpo_spec(reference={"fromJob": {"name": "sft"}}, online=ONLINE,
                    dpo={"beta": 0.2, "loss": "sigmoid", "labelSmoothing": 0.1, "referenceMode": "each_round"})
    assert jobspec.validate("DPOJob", "d", spec) == []
    j = job("DPOJob", "d", spec)
    cfg, mounts = builders.render_config(j, S)
    d, o = cfg.dpo, cfg.dpo.online
    assert cfg.stage == "dpo" and cfg.job.kind == "DPOJob"
    assert d.policy.path == d.reference.path == "/inputs/sft/final" and o.reward_model.path == "/inputs/rm/final"
    assert (d.beta, d.loss, d.label_smoothing, d.reference_mode) == (0.2, "sigmoid", 0.1, "each_round")
    assert (o.rounds, o.prompts_per_round, o.samples_per_prompt, o.length_penalty, o.temperature, o.top_k, o.top_p,
            o.max_prompt_length, o.max_new_tokens, o.epochs_per_round) == (3, 8, 4, 0.01, 0.9, 20, 0.95, 48, 16, 2.0)
    assert cfg.dataset.path == "/mnt/claims/inputs/data/pairs.jsonl" and cfg.dataset.format == "hh_rlhf"
    assert cfg.inputs == {"sft": "/inputs/sft/final", "rm": "/inputs/rm/final"}
    # policy and reference come from one job: one volume; each upstream claim by its kind's name
    assert sorted((m.path, m.volume["persistentVolumeClaim"]["claimName"]) for m in mounts) == [
        ("/inputs/rm", names.pvc_name("RewardModelJob", "rm")), ("/inputs/sft", names.pvc_name("SFTJob", "sft")),
        ("/mnt/claims/inputs", "inputs")]
    assert all(m.volume["persistentVolumeClaim"]["readOnly"] for m in mounts)
    pod = builders.build_pod(j, S, 0, 0, "h", mounts)
    assert pod["metadata"]["name"] == "d-dpo-trainer-0" == names.pod_name("DPOJob", "d", 0)
    assert pod["metadata"]["labels"][builders.LABEL_STAGE] == "dpo"
    assert pod["spec"]["containers"][0]["command"][-3:] == ["dpo", "--config", builders.CONFIG_PATH]
    ro = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"] if m.get("readOnly")}
    assert {"/inputs/sft", "/inputs/rm", "/mnt/claims/inputs"} <= ro
    assert builders.build_pvc(j, S)["metadata"]["name"] == "d-dpo-checkpoints"
    assert [(r.kind, r.name, r.roles) for r in jobspec.dependencies("DPOJob", spec)] == [
        ("SFTJob", "sft", ("policy", "reference")), ("RewardModelJob", "rm", ("online.rewardModel",))]


def test_offline_spec_renders_without_rounds_and_a_path_reference():
    spec = dpo_spec(policy={"claim": "models", "path": "sft-out"}, reference={"hubId": "gpt2"},
                    dpo={"loss": "ipo", "beta": 0.5, "referenceFree": True})
    cfg, mounts = builders.render_config(job("DPOJob", "off", spec), S)
    assert cfg.dpo.policy.path == "/mnt/claims/models/sft-out" and cfg.dpo.reference.hub_id == "gpt2"
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.reference_free, cfg.dpo.online.rounds) == ("ipo", 0.5, True, 0)
    assert cfg.inputs == {} and {m.path for m in mounts} == {"/mnt/claims/models", "/mnt/claims/inputs"}


def test_rewardfn_scores_online_rounds_without_a_reward_model():
    spec = dpo_spec(online={"rounds": 2, "rewardFn": "count:good", "samplesPerPrompt": 2})
    assert jobspec.validate("DPOJob", "d", spec) == []
    cfg, _ = builders.render_config(job("DPOJob", "d", spec), S)
    assert cfg.dpo.online.reward_fn == "count:good" and not cfg.dpo.online.reward_model.path


@pytest.mark.parametrize("over, needle", [
    ({"online": {"rounds": 2}}, "spec.online.rewardModel: online DPO scores its samples with a reward model"),
    ({"online": {"rounds": 2, "rewardFn": "count:a", "samplesPerPrompt": 1}},
     "spec.online.samplesPerPrompt: a pair needs a best and a worst response, so at least 2 per prompt, got 1"),
    ({"online": {"rounds": 0, "rewardFn": "count:a"}}, "spec.online.rounds: got 0; 0 rounds is offline DPO"),
    ({"online": {"rewardFn": "count:a"}}, "spec.online.rounds: got None"),
    ({"online": {**ONLINE, "rewardModel": {"fromJob": {"name": "sft", "kind": "SFTJob"}}}},
     "spec.online.rewardModel.fromJob.kind: a SFTJob cannot be used as online.rewardModel; use one of RewardModelJob"),
    ({"policy": {"fromJob": {"name": "rm", "kind": "RewardModelJob"}}},
     "spec.policy.fromJob.kind: a RewardModelJob cannot be used as policy; use one of SFTJob, DPOJob, PPOJob"),
    ({"online": {**ONLINE, "rewardFn": "count:a"}}, "spec.online.rewardFn: set either rewardFn or rewardModel"),
    ({"dpo": {"loss": "hinge", "labelSmoothing": 0.1}},
     "spec.dpo.labelSmoothing: only the sigmoid loss has label smoothing, the loss is hinge"),
    ({"dpo": {"referenceMode": "each_round"}}, "spec.dpo.referenceMode: each_round needs online rounds"),
    ({"dataset": {"path": "/data/prompts.jsonl", "format": "prompt"}},
     "spec.dataset.format: offline DPO trains on preference pairs, not prompt rows"),
    ({"online": {**ONLINE, "rewardModel": {}}}, "spec.online.rewardModel: set one of path"),
    ({"online": ONLINE, "training": {"maxSteps": 10}},
     "spec.training.maxSteps: online DPO runs maxSteps / rounds steps per round, and 10 is not a multiple of "
     "spec.online.rounds (3)"),
    ({"online": ONLINE, "dataset": {"path": "/d.jsonl", "format": "text"}},
     "spec.dataset.format: online DPO samples answers to prompts, and text rows have none"),
])
def test_what_cannot_work_is_refused_naming_the_field(over, needle):
    errors = jobspec.validate("DPOJob", "d", dpo_spec(**over))
    assert any(needle in e for e in errors), errors


def test_the_trainers_own_rules_come_back_as_spec_fields():
    spec = dpo_spec(online={"rounds": 1, "rewardFn": "bogus"})
    with pytest.raises(tc.ConfigError, match=r"^spec.online.rewardFn: 'bogus' is not a known rule"):
        builders.render_config(job("DPOJob", "d", spec), S)
    with pytest.raises(tc.ConfigError, match=r"^spec.online.rewardModel.fromJob.name: '\.\.' would leave /inputs"):
        builders.render_config(job("DPOJob", "d", dpo_spec(online={**ONLINE, "rewardModel": {"fromJob": {
            "name": ".."}}})), S)


def test_a_reward_model_named_by_an_sftjob_is_refused_by_the_webhooks_lookup():
    jobs_seen = {("SFTJob", "base"): {"uid": "u"}}
    lookup = lambda kind, name: jobs_seen.get((kind, name))  # noqa: E731
    spec = dpo_spec(online={**ONLINE, "rewardModel": {"fromJob": {"name": "base"}}})
    assert dependencies.wrong_kind_errors("DPOJob", spec, lookup) == [
        "spec.online.rewardModel.fromJob: 'base' is a SFTJob, but online.rewardModel needs a RewardModelJob; name a "
        "RewardModelJob or set fromJob.kind"]
    # a DPOJob is a policy source for the next stage (PPO, or another DPOJob)
    ppo = {"actor": {"fromJob": {"name": "d", "kind": "DPOJob"}}, "rewardModel": {"path": "/rm"},
           "dataset": {"path": "/p.jsonl"}}
    assert jobspec.validate("PPOJob", "p", ppo) == []


def test_progress_summary_shows_the_round_for_online_runs():
    online = progress.with_summary({"step": 5, "totalSteps": 9, "round": 2, "rounds": 3})
    assert online["summary"] == "round 2/3, step 5/9" and online["percent"] == 55.6
    assert progress.with_summary({"step": 5, "totalSteps": 9, "round": 0, "rounds": 0})["summary"] == "5/9"
    scraped = progress.parse(f"{contract.M_DPO_ROUND} 2\n{contract.M_DPO_ROUNDS} 3\n{contract.M_STEP} 4\n"
                             f"{contract.M_DPO_REWARD_ACCURACY} 0.75\n")
    assert progress.for_stage(scraped, "dpo") == {"round": 2, "rounds": 3, "step": 4, "rewardAccuracy": 0.75}
    assert "round" not in progress.for_stage(scraped, "ppo")


# --- the CRD ----------------------------------------------------------------------------------------------

def _version():
    return crd_schema.crd("DPOJob")["spec"]["versions"][0]


def _spec_schema():
    return _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_crd_names_columns_and_rbac():
    names_ = crd_schema.crd("DPOJob")["spec"]["names"]
    assert (names_["plural"], names_["singular"], names_["shortNames"], names_["categories"]) == (
        "dpojobs", "dpojob", ["dpo"], ["rlhf"])
    columns = {c["name"]: c["jsonPath"] for c in _version()["additionalPrinterColumns"]}
    assert columns["Progress"] == ".status.progress.summary"
    assert columns[contract.printer_column("dpo").column] == f".status.progress.{contract.printer_column('dpo').key}"
    status = _version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["progress"]["properties"]
    assert {"round", "rounds", "rewardAccuracy"} <= set(status)
    ns_resources = {r for rule in rbac.NAMESPACED_RULES for r in rule["resources"]}
    assert {"dpojobs", "dpojobs/status", "dpojobs/finalizers"} <= ns_resources
    assert names.kind_abbreviation("DPOJob") == "dpo"


def test_crd_spec_carries_every_dpo_option_with_bounds():
    spec = _spec_schema()
    props = spec["properties"]
    assert set(spec["required"]) == {"policy", "dataset"}
    assert {"policy", "reference", "dataset", "dpo", "online", "training", "deepspeed", "checkpoint", "resources",
            "scheduling", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend"} <= set(props)
    for cls, section in ((tc.DPOConfig, props["dpo"]), (tc.DPOOnlineConfig, props["online"])):
        hints = typing.get_type_hints(cls)
        fields = {crd_schema.camel(f.name) for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
        assert fields <= set(section["properties"]), fields - set(section["properties"])
    dpo, online = props["dpo"]["properties"], props["online"]["properties"]
    assert dpo["loss"]["enum"] == ["sigmoid", "ipo", "hinge"] and dpo["referenceMode"]["enum"] == ["initial", "each_round"]
    assert dpo["beta"]["exclusiveMinimum"] and dpo["labelSmoothing"]["maximum"] == 0.5
    assert online["rounds"]["minimum"] == 1 and props["online"]["required"] == ["rounds"]
    assert online["samplesPerPrompt"]["minimum"] == 2
    assert online["rewardModel"]["properties"]["fromJob"]["description"].endswith("Allowed kinds here: RewardModelJob.")
    assert "policy" not in dpo and "rewardModel" not in dpo  # model sources are the spec's own fields


def test_crd_cel_rules_say_what_is_wrong_and_where():
    spec = _spec_schema()
    messages = lambda schema: [r.get("message") or r["messageExpression"]  # noqa: E731
                               for r in schema.get("x-kubernetes-validations", [])]
    joined = " | ".join(messages(spec["properties"]["online"]) + messages(spec["properties"]["dpo"]) + messages(spec)
                        + messages(spec["properties"]["online"]["properties"]["rewardModel"]))
    for needle in ("spec.online.rewardModel: online DPO scores its samples", "spec.online.rounds: 0 rounds is offline",
                   "spec.online.rewardFn: set either", "spec.dpo.labelSmoothing: only the sigmoid loss",
                   "spec.dpo.referenceMode: each_round needs online rounds", "spec.dataset.format: offline DPO",
                   "spec.dataset.format: online DPO", "spec.training.maxSteps: online DPO",
                   "spec.online.rewardModel.fromJob.kind: a '"):
        assert needle in joined, needle


# --- through the real API server ---------------------------------------------------------------------------

def standin_spec(**extra):
    s = {"policy": {"fromJob": {"name": "sft"}}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": 15},
         "resources": {"gpus": 0}, "checkpoint": {"everySteps": 5},
         "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.3"}]}
    s.update(extra)
    return s


BAD_AT_APPLY = [
    ({"online": {"rounds": 2}}, "spec.online.rewardModel: online DPO scores its samples with a reward model"),
    ({"online": {"rounds": 2, "rewardFn": "count:a", "samplesPerPrompt": 1}}, "spec.online.samplesPerPrompt"),
    ({"online": {"rounds": 0, "rewardFn": "count:a"}}, "spec.online.rounds: 0 rounds is offline DPO"),
    ({"online": {"rewardFn": "count:a"}}, "spec.online.rounds: Required value"),
    ({"online": {"rounds": 2, "rewardModel": {"fromJob": {"name": "x", "kind": "SFTJob"}}}},
     "spec.online.rewardModel.fromJob.kind: a SFTJob cannot be used as online.rewardModel; use one of RewardModelJob"),
    ({"dpo": {"loss": "ipo", "labelSmoothing": 0.1}}, "spec.dpo.labelSmoothing: only the sigmoid loss"),
    ({"dpo": {"referenceMode": "each_round"}}, "spec.dpo.referenceMode: each_round needs online rounds"),
    ({"dataset": {"path": "/p.jsonl", "format": "prompt"}},
     "spec.dataset.format: offline DPO trains on preference pairs, not prompt rows"),
    ({"policy": None}, "spec.policy: Required value"),
    ({"online": {"rounds": 4, "rewardFn": "count:a"}}, "spec.training.maxSteps: online DPO runs maxSteps / rounds"),
    ({"online": {"rounds": 3, "rewardFn": "count:a"}, "dataset": {"path": "/t.jsonl", "format": "text"}},
     "spec.dataset.format: online DPO samples answers to prompts"),
]


@pytest.mark.parametrize("change, says", BAD_AT_APPLY, ids=[s.split(":")[0] + f"-{i}" for i, (_, s) in
                                                         enumerate(BAD_AT_APPLY)])
def test_bad_dpojob_is_refused_at_apply_time_naming_the_field(jobs, crds, change, says):
    from kubernetes.client.rest import ApiException

    spec = standin_spec(**change)
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ApiException) as e:
        jobs.create("DPOJob", "bad", spec)
    assert e.value.status == 422 and says in e.value.body, e.value.body


def test_dpojob_waits_for_its_upstream_jobs_then_runs_with_their_models(operator, jobs):
    online = {"rounds": 3, "samplesPerPrompt": 2, "rewardModel": {"fromJob": {"name": "rm"}}}
    jobs.create("DPOJob", "dpo", standin_spec(reference={"fromJob": {"name": "sft"}}, online=online))
    waiting = wait_for("DPO waiting", lambda: (c := jobs.condition("DPOJob", "dpo", "WaitingForDependencies"))
                       and c["status"] == "True" and c, 20)
    assert "SFTJob sft (not found)" in waiting["message"] and "RewardModelJob rm (not found)" in waiting["message"]
    assert jobs.status("DPOJob", "dpo")["phase"] == "Waiting" and jobs.pods("dpo") == []
    upstream = {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": 3},
                "resources": {"gpus": 0}}
    jobs.create("SFTJob", "sft", upstream)
    jobs.create("RewardModelJob", "rm", upstream)
    # Live progress from the running trainer, with the round.
    live = wait_for("the round in the live summary", lambda: (p := jobs.status("DPOJob", "dpo").get("progress", {}))
                    .get("summary", "").startswith("round ") and 0 < p.get("step", 0) < 15 and p, 60)
    assert live["summary"] == f"round {live['round']}/3, step {live['step']}/15", live
    st = jobs.wait_phase("DPOJob", "dpo", "Succeeded", 60)
    assert st["progress"]["summary"] == "round 3/3, step 15/15" and st["progress"]["rewardAccuracy"] == pytest.approx(0.9)
    assert {(d["kind"], d["name"], d["role"]) for d in st["dependencies"]} == {
        ("SFTJob", "sft", "policy reference"), ("RewardModelJob", "rm", "online.rewardModel")}
    assert st["output"] == {"claim": names.pvc_name("DPOJob", "dpo"), "path": "final"}

    (pod,) = jobs.pods("dpo")
    assert pod.metadata.name == names.pod_name("DPOJob", "dpo", 0) and pod.metadata.labels["rlhf.io/stage"] == "dpo"
    assert pod.spec.containers[0].command[-3:] == ["dpo", "--config", builders.CONFIG_PATH]
    mounts = {m.mount_path: m for m in pod.spec.containers[0].volume_mounts}
    assert mounts["/inputs/sft"].read_only and mounts["/inputs/rm"].read_only
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
    assert claims[mounts["/inputs/rm"].name] == names.pvc_name("RewardModelJob", "rm")
    cm = jobs.core.read_namespaced_config_map(names.configmap_name("DPOJob", "dpo"), jobs.ns)
    cfg = tc.from_dict(yaml.safe_load(cm.data["config.yaml"]))
    assert cfg.stage == "dpo" and cfg.dpo.policy.path == cfg.dpo.reference.path == "/inputs/sft/final"
    assert cfg.dpo.online.reward_model.path == "/inputs/rm/final" and cfg.dpo.online.rounds == 3
    meta = json.loads((jobs.claim_dir(names.pvc_name("DPOJob", "dpo")) / "final" / tc.METADATA_FILE).read_text())
    assert {role: seen["path"] for role, seen in meta["inputs"].items()} == {
        "policy": "/inputs/sft/final", "reference": "/inputs/sft/final", "reward_model": "/inputs/rm/final"}
    assert all(seen["read_only"] for seen in meta["inputs"].values())


def test_webhook_refuses_a_reward_model_that_is_an_sftjob(operator_factory, jobs, k8s, namespace):
    with webhook_operator(operator_factory, k8s, namespace):
        jobs.create("SFTJob", "base", {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"},
                                       "training": {"maxSteps": 2}, "resources": {"gpus": 0}})
        spec = standin_spec(policy={"path": "/tmp"},
                            online={"rounds": 3, "rewardModel": {"fromJob": {"name": "base"}}})
        body = webhook_rejection(jobs, "DPOJob", "wrongrm", spec).body
        assert "spec.online.rewardModel.fromJob: 'base' is a SFTJob, but online.rewardModel needs a RewardModelJob" \
            in body, body
