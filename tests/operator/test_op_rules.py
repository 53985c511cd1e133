"""Rules beyond the schema (jobspec), fromJob resolution, progress parsing and admission."""

from __future__ import annotations

import json

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
    ("PPOJob", {"actor": {"fromJob": {"name": "same"}}, "rewardModel": {"fromJob": {"name": "same"}}},
     "spec.rewardModel.fromJob: RewardModelJob same and SFTJob same (spec.actor) share a name"),
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


def summary(kind, name, phase="Running", ns="ns", deps=(), started=False):
    return {"kind": kind, "name": name, "namespace": ns, "uid": f"u-{name}", "phase": phase, "message": "",
            "started": started, "completionTime": "", "ttl": None, "deps": list(deps), "generation": 1}


def test_resolve_dependents_and_wrong_kind():
    jobs = [summary("SFTJob", "s", "Succeeded", started=True), summary("PPOJob", "p", "Waiting", deps=[("SFTJob", "s")]),
            summary("PPOJob", "done", "Succeeded", deps=[("SFTJob", "s")]),
            summary("PPOJob", "other-ns", "Waiting", ns="x", deps=[("SFTJob", "s")])]
    lookup = lambda kind, name: next((j for j in jobs if j["kind"] == kind and j["name"] == name and j["namespace"] == "ns"), None)  # noqa: E731
    spec = {"actor": {"fromJob": {"name": "s"}}, "rewardModel": {"fromJob": {"name": "missing"}}}
    states = dependencies.resolve("PPOJob", spec, lookup)
    assert [(d.name, d.exists, d.phase, d.claim) for d in states] == [("s", True, "Succeeded", "s-sft-checkpoints"), ("missing", False, "", "")]
    assert dependencies.dependents("ns", "SFTJob", "s", jobs) == [("ns", "PPOJob", "p")]
    errs = dependencies.wrong_kind_errors("PPOJob", {"rewardModel": {"fromJob": {"name": "s"}}}, lookup)
    assert errs == ["spec.rewardModel.fromJob: 's' is a SFTJob, but rewardModel needs a RewardModelJob; name a RewardModelJob or set fromJob.kind"]
    assert dependencies.wrong_kind_errors("PPOJob", spec, lookup) == []  # missing names just wait


def test_summarize_reads_status():
    j = job("RewardModelJob", "rm", status={"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "message": "bad data"}], "checkpoint": {"claim": "c"}})
    s = dependencies.summarize("RewardModelJob", j)
    assert (s["phase"], s["message"], s["uid"]) == ("Failed", "bad data", "uid-rm")
    assert "claim" not in s  # an upstream claim is named by names.pvc_name, not read back from its status


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


# --- paths stay inside their mount ------------------------------------------------------------

TRAVERSALS = [
    ("SFTJob", {"model": {"claim": "models", "path": "../../../etc/passwd"}}, "spec.model.path"),
    ("SFTJob", {"model": {"claim": "models", "initFromConfig": {"model_type": "gpt2"}, "tokenizerPath": "tok/../../x"}},
     "spec.model.tokenizerPath"),
    ("SFTJob", {"model": {"claim": ".."}}, "spec.model.claim"),
    ("SFTJob", {"model": {"fromJob": {"name": "../../etc"}}}, "spec.model.fromJob.name"),
    ("SFTJob", {"dataset": {"claim": "data", "path": "a/../../../etc/shadow"}}, "spec.dataset.path"),
    ("SFTJob", {"dataset": {"configMap": {"name": "d", "key": "../../etc/passwd"}}}, "spec.dataset.configMap.key"),
    ("SFTJob", {"dataset": {"configMap": {"name": "d", "key": ".."}}}, "spec.dataset.configMap.key"),
    ("SFTJob", {"dataset": {"configMap": {"name": "../x", "key": "k"}}}, "spec.dataset.configMap.name"),
    ("PPOJob", {"actor": {"claim": "m", "path": "/../x"}}, "spec.actor.path"),
    ("PPOJob", {"ptxDataset": {"claim": "c", "path": "../p.jsonl"}}, "spec.ptxDataset.path"),
]


@pytest.mark.parametrize("kind, patch, field", TRAVERSALS, ids=[f"{f}:{i}" for i, (_, _, f) in enumerate(TRAVERSALS)])
def test_paths_that_leave_their_mount_are_refused_naming_the_field(kind, patch, field):
    spec = {**(job(kind)["spec"] if kind == "PPOJob" else BASE), **patch}
    errors = jobspec.check(kind, "j", spec, Settings())
    assert any(e.startswith(f"{field}:") for e in errors), errors
    assert any(e.startswith(f"{field}:") for e in webhook.admission_errors(kind, job(kind, "j", spec), None, Settings(), lookup_none))


@pytest.mark.parametrize("kind, patch, field", TRAVERSALS, ids=[f"{f}:{i}" for i, (_, _, f) in enumerate(TRAVERSALS)])
def test_builders_never_resolve_a_path_outside_its_mount(kind, patch, field):
    """Safe by construction: even a spec that skipped the rules renders no path outside its volume."""
    from rlhf_operator import builders
    from rlhf_trainer.config import ConfigError

    spec = {**(job(kind)["spec"] if kind == "PPOJob" else BASE), **patch}
    if "ptxDataset" in spec:
        spec["ppo"] = {"ptxCoef": 0.1}
    with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}:"):
        builders.render_config(job(kind, "j", spec), Settings())


def test_schema_patterns_agree_with_the_rules():
    import re

    from rlhf_operator import crd_schema

    path = re.compile(crd_schema.PATH_PATTERN)
    for ok in ("/a/b", "a", "/", "a//b", ".", "./a", "...", "..a", "a/..b/c", "a/.x", "final/"):
        assert path.match(ok) and jobspec.validate("SFTJob", "j", {**BASE, "model": {"path": ok}}) == [], ok
    for bad in ("..", "../a", "a/..", "/a/../b", "a/b/../../..", "x/../"):
        assert not path.match(bad) and jobspec.validate("SFTJob", "j", {**BASE, "model": {"path": bad}}), bad
    key = re.compile(crd_schema.CONFIGMAP_KEY_PATTERN)
    assert all(key.match(k) for k in ("train.jsonl", ".hidden", "a..b", "x-y_Z.9"))
    assert not any(key.match(k) for k in (".", "..", "..a", "a/b", "../etc", "a b"))
    name = re.compile(crd_schema.OBJECT_NAME_PATTERN)
    assert all(name.match(n) for n in ("models", "a.b-c", "x1"))
    assert not any(name.match(n) for n in ("..", ".a", "A", "a/b", "a-", ""))


# --- what creating a job may grant -------------------------------------------------------------

def test_default_settings_grant_only_the_trainer_image_and_no_secrets_or_code_loading_env():
    s = Settings()
    assert jobspec.check("SFTJob", "j", {**BASE, "image": s.trainer_image}, s) == []
    spec = {**BASE, "image": "docker.io/evil/miner:1", "env": [
        {"name": "PYTHONPATH", "value": "/mnt/claims/x"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "LD_PRELOAD", "value": "/mnt/claims/x/evil.so"},
        {"name": "HOME", "value": "/mnt/claims/x"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "model"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "x"}, "secretKeyRef": {"name": "a", "key": "b"}}},
    ], "scheduling": {"priorityClassName": "system-node-critical",
                      "tolerations": [{"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists"},
                                      {"key": "node-role.kubernetes.io/master", "operator": "Exists"}]}}
    errors = jobspec.check("SFTJob", "j", spec, s)
    fields = [e.split(":")[0] for e in errors]
    assert fields == [
        "spec.image", "spec.env[0].name", "spec.env[1].valueFrom.secretKeyRef", "spec.env[2].name", "spec.env[3].name",
        "spec.env[7].valueFrom", "spec.env[7].valueFrom.secretKeyRef", "spec.scheduling.priorityClassName",
        "spec.scheduling.tolerations[0]", "spec.scheduling.tolerations[2]",
    ], errors
    assert "RLHF_ALLOWED_TRAINER_IMAGES" in errors[0] and "trainer.allowedImages" in errors[0]
    assert "RLHF_ALLOW_SECRET_ENV" in errors[2] and "PYTHONPATH changes which code the trainer runs" in errors[1]


def test_settings_open_up_images_secrets_env_priority_and_tolerations():
    from rlhf_operator.settings import from_env

    s = from_env({"RLHF_ALLOWED_TRAINER_IMAGES": "registry.example.com/rlhf/, ghcr.io/team/trainer:, exact/img:1",
                  "RLHF_ALLOW_SECRET_ENV": "true", "RLHF_ALLOWED_ENV": "TORCH_EXTENSIONS_DIR,NCCL_*",
                  "RLHF_ALLOWED_PRIORITY_CLASSES": "training-high", "RLHF_ALLOWED_TOLERATION_KEYS": "*"})
    for image in ("registry.example.com/rlhf/trainer:0.2", "ghcr.io/team/trainer:dev", "exact/img:1"):
        assert jobspec.check("SFTJob", "j", {**BASE, "image": image}, s) == [], image
    for image in ("registry.example.com/other/trainer:1", "ghcr.io/team/trainer-evil:1", "exact/img:2"):
        assert [e.split(":")[0] for e in jobspec.check("SFTJob", "j", {**BASE, "image": image}, s)] == ["spec.image"], image
    spec = {**BASE, "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                            {"name": "TORCH_EXTENSIONS_DIR", "value": "/cache"}, {"name": "NCCL_NET_PLUGIN", "value": "x"}],
            "scheduling": {"priorityClassName": "training-high", "tolerations": [{"operator": "Exists"}]}}
    assert jobspec.check("SFTJob", "j", spec, s) == []
    assert "spec.env[0].name" in jobspec.check("SFTJob", "j", {**BASE, "env": [{"name": "PYTHONPATH", "value": "/x"}]}, s)[0]
    anything = from_env({"RLHF_ALLOWED_TRAINER_IMAGES": "*", "RLHF_ALLOWED_ENV": "*"})
    assert jobspec.check("SFTJob", "j", {**BASE, "image": "any/thing:1", "env": [{"name": "PYTHONPATH", "value": "/x"}]}, anything) == []
    # The variables the operator itself sets stay refused whatever the settings say.
    assert "is set by the operator" in jobspec.check("SFTJob", "j", {**BASE, "env": [{"name": "RLHF_CONFIG", "value": "/x"}]}, anything)[0]


# --- dependency cycles -------------------------------------------------------------------------

def index_of(*summaries):
    by_key = {(s["kind"], s["name"]): s for s in summaries}
    return lambda kind, name: by_key.get((kind, name))


def test_find_cycle_returns_the_loop_through_the_start_only():
    edges = {"a": ["b"], "b": ["c", "a"], "c": ["b"], "d": ["b"]}
    deps_of = lambda n: [("K", x) for x in edges[n[1]]]  # noqa: E731
    assert dependencies.find_cycle(("K", "a"), deps_of) == [("K", "a"), ("K", "b"), ("K", "a")]
    assert dependencies.find_cycle(("K", "c"), deps_of) == [("K", "c"), ("K", "b"), ("K", "c")]
    assert dependencies.find_cycle(("K", "d"), deps_of) is None  # leads into a cycle, is not in one
    assert dependencies.describe_cycle([("PPOJob", "a"), ("RewardModelJob", "b"), ("PPOJob", "a")]) == \
        "PPOJob a -> RewardModelJob b -> PPOJob a"


def test_cycle_across_kinds_from_the_index():
    spec_p = {"actor": {"path": "/a"}, "rewardModel": {"fromJob": {"name": "r"}}, "dataset": {"path": "/d"}}
    r = summary("RewardModelJob", "r", "Waiting", deps=[("SFTJob", "s")])
    s = summary("SFTJob", "s", "Failed", deps=[("PPOJob", "p")])
    assert dependencies.cycle("PPOJob", "p", spec_p, index_of(r, s)) == [
        ("PPOJob", "p"), ("RewardModelJob", "r"), ("SFTJob", "s"), ("PPOJob", "p")]
    errs = dependencies.cycle_errors("PPOJob", "p", spec_p, index_of(r, s))
    assert errs == ["spec.rewardModel.fromJob: dependency cycle PPOJob p -> RewardModelJob r -> SFTJob s -> PPOJob p: "
                    "each job waits for the next, so none can ever start; name a job outside the cycle"]
    # A job that succeeded or started no longer waits: no cycle through it.
    assert dependencies.cycle("PPOJob", "p", spec_p, index_of(r, {**s, "phase": "Succeeded"})) is None
    assert dependencies.cycle("PPOJob", "p", spec_p, index_of(r, {**s, "phase": "Running", "started": True})) is None
    # A job naming itself is jobspec.validate's error, not a second one here.
    assert dependencies.cycle_errors("SFTJob", "j", {"model": {"fromJob": {"name": "j"}}}, lookup_none) == []


def test_summarize_knows_whether_a_job_started():
    assert dependencies.summarize("SFTJob", job(status={"phase": "Pending", "attempt": 0}))["started"] is True
    assert dependencies.summarize("SFTJob", job(status={"phase": "Waiting"}))["started"] is False


def test_admission_refuses_cycles_grants_and_traversals():
    s = Settings()
    r = summary("RewardModelJob", "r", "Waiting", deps=[("PPOJob", "p")])
    body = job("PPOJob", "p", spec={"actor": {"path": "/a"}, "rewardModel": {"fromJob": {"name": "r"}}, "dataset": {"path": "/d"}})
    assert "dependency cycle PPOJob p -> RewardModelJob r -> PPOJob p" in webhook.admission_errors("PPOJob", body, None, s, index_of(r))[0]
    done = {**body, "status": {"phase": "Failed"}}
    ttl = {**body, "spec": {**body["spec"], "ttlSecondsAfterFinished": 60}}
    assert webhook.admission_errors("PPOJob", ttl, done, s, index_of(r)) == []  # a failed cycle's job still gets its TTL
    body = job("SFTJob", "j", spec={**BASE, "env": [{"name": "PYTHONPATH", "value": "/x"}]})
    assert webhook.admission_errors("SFTJob", body, None, s, lookup_none)[0].startswith("spec.env[0].name: PYTHONPATH")


# --- through the operator, on the embedded cluster ---------------------------------------------

def standin_spec(steps=2, **extra):
    s = {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": steps},
         "resources": {"gpus": 0}, "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.05"}]}
    s.update(extra)
    return s


def failed(jobs, kind, name, timeout=30):
    st = jobs.wait_phase(kind, name, "Failed", timeout)
    return {c["type"]: c for c in st["conditions"]}["Failed"]


def test_schema_refuses_traversals_and_huge_numbers_at_apply_time(jobs, crds):
    from kubernetes.client.rest import ApiException

    cases = [("SFTJob", {"training": {"maxSteps": 2**63 - 1}}, "spec.training.maxSteps", "less than or equal to 10000000"),
             ("SFTJob", {"activeDeadlineSeconds": 2**62}, "spec.activeDeadlineSeconds", "less than or equal to")]
    cases += [(kind, patch, field, "should match") for kind, patch, field in TRAVERSALS]
    for kind, patch, field, says in cases:
        s = {**(standin_spec() if kind != "PPOJob" else {**job("PPOJob")["spec"], "resources": {"gpus": 0}}), **patch}
        with pytest.raises(ApiException) as e:
            jobs.create(kind, "bad", s)
        assert e.value.status == 422 and field in e.value.body and says in e.value.body, (field, e.value.body)


def test_operator_refuses_what_a_job_may_not_grant_without_the_webhook(operator_factory, jobs):
    operator_factory(RLHF_ALLOWED_TRAINER_IMAGES="registry.example.com/rlhf/")
    bad = {
        "other-image": ({"image": "docker.io/evil/miner:1"}, "spec.image: 'docker.io/evil/miner:1' is not an allowed trainer image"),
        "python-path": ({"env": [{"name": "PYTHONPATH", "value": "/mnt/claims/x"}]}, "spec.env[0].name: PYTHONPATH"),
        "secret-env": ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]},
                       "spec.env[0].valueFrom.secretKeyRef: jobs may not read Secrets"),
        "priority": ({"scheduling": {"priorityClassName": "system-node-critical"}}, "spec.scheduling.priorityClassName"),
    }
    for name, (extra, _) in bad.items():
        jobs.create("SFTJob", name, standin_spec(**extra))
    jobs.create("SFTJob", "allowed-image", standin_spec(image="registry.example.com/rlhf/trainer:0.2"))
    for name, (_, says) in bad.items():
        c = failed(jobs, "SFTJob", name)
        assert c["reason"] == "InvalidSpec" and says in c["message"], c
        assert jobs.pods(name) == []
    jobs.wait_phase("SFTJob", "allowed-image", "Succeeded", 60)
    assert jobs.pods("allowed-image")[0].spec.containers[0].image == "registry.example.com/rlhf/trainer:0.2"


def test_dependency_cycles_fail_every_job_of_the_cycle(operator, jobs):
    def ppo(reward_from):
        s = standin_spec(actor={"path": "/tmp"}, rewardModel={"fromJob": {"name": reward_from}},
                         ppo={"rolloutBatchSize": 4, "minibatchSize": 2})
        del s["model"]
        return s

    def from_job(name, kind):
        return standin_spec(model={"fromJob": {"name": name, "kind": kind}})

    jobs.create("PPOJob", "p", ppo("r"))
    jobs.create("PPOJob", "q", ppo("r"))  # waits for a job of the cycle without being in it
    jobs.create("RewardModelJob", "r", from_job("s", "SFTJob"))
    jobs.wait_phase("RewardModelJob", "r", "Waiting", 20)
    jobs.wait_phase("PPOJob", "p", "Waiting", 20)
    jobs.create("SFTJob", "s", from_job("p", "PPOJob"))  # closes p -> r -> s -> p: every job must learn it
    jobs.create("SFTJob", "x", from_job("y", "SFTJob"))
    jobs.create("SFTJob", "y", from_job("x", "SFTJob"))
    loops = {
        ("PPOJob", "p"): "PPOJob p -> RewardModelJob r -> SFTJob s -> PPOJob p",
        ("RewardModelJob", "r"): "RewardModelJob r -> SFTJob s -> PPOJob p -> RewardModelJob r",
        ("SFTJob", "s"): "SFTJob s -> PPOJob p -> RewardModelJob r -> SFTJob s",
        ("SFTJob", "x"): "SFTJob x -> SFTJob y -> SFTJob x",
        ("SFTJob", "y"): "SFTJob y -> SFTJob x -> SFTJob y",
    }
    for (kind, name), loop in loops.items():
        c = failed(jobs, kind, name)
        assert c["reason"] == "DependencyCycle" and f"dependency cycle {loop}:" in c["message"], c
        assert jobs.pods(name) == []
    c = failed(jobs, "PPOJob", "q")
    assert c["reason"] == "DependencyFailed" and "RewardModelJob r (rewardModel) failed: dependency cycle" in c["message"], c


def test_webhook_refuses_grants_and_cycles_at_apply_time(operator_factory, jobs, k8s, namespace):
    from kubernetes import client
    from op_helpers import delete_webhook_configurations, free_port, wait_for, webhook_rejection, webhooks

    name = f"rlhf-policy-{namespace}.rlhf.io"
    op = operator_factory(RLHF_WEBHOOK_ENABLED="1", RLHF_WEBHOOK_PORT=str(free_port()), RLHF_WEBHOOK_CONFIG_NAME=name,
                          RLHF_WEBHOOK_FAILURE_POLICY="Fail", RLHF_ALLOWED_TRAINER_IMAGES="registry.example.com/rlhf/")
    adm = client.AdmissionregistrationV1Api(k8s)

    def rejected(kind, job_name, s):
        return json.loads(webhook_rejection(jobs, kind, job_name, s).body)["message"]  # the body escapes '>' as \u003e

    try:
        wait_for("webhook configuration", lambda: webhooks(adm.read_validating_webhook_configuration, name), 30)
        assert "spec.env[0].name: PYTHONPATH" in rejected("SFTJob", "pp", standin_spec(env=[{"name": "PYTHONPATH", "value": "/x"}]))
        assert "spec.image: 'docker.io/evil/miner:1' is not an allowed" in rejected("SFTJob", "img", standin_spec(image="docker.io/evil/miner:1"))
        body = rejected("SFTJob", "sec", standin_spec(env=[{"name": "T", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]))
        assert "spec.env[0].valueFrom.secretKeyRef" in body
        jobs.create("SFTJob", "ok-image", standin_spec(image="registry.example.com/rlhf/trainer:0.2"))
        jobs.create("SFTJob", "x", standin_spec(model={"fromJob": {"name": "y"}}))
        jobs.wait_phase("SFTJob", "x", "Waiting", 20)
        assert "spec.model.fromJob: dependency cycle SFTJob y -> SFTJob x -> SFTJob y" in rejected(
            "SFTJob", "y", standin_spec(model={"fromJob": {"name": "x"}}))
        jobs.wait_phase("SFTJob", "ok-image", "Succeeded", 60)
    finally:
        op.stop()
        delete_webhook_configurations(adm, name)


def test_operator_refuses_traversals_that_an_older_schema_let_through(operator, jobs, k8s, crds):
    """A job stored under a CRD without the path patterns (before an upgrade, or CRDs not re-applied) still
    never reads outside its volume: the reconciler fails it, naming the field."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from op_helpers import wait_for
    from rlhf_operator import crd_schema

    ext = client.ApiextensionsV1Api(k8s)
    crd_name = "sftjobs.rlhf.io"
    patterns = {crd_schema.PATH_PATTERN, crd_schema.CONFIGMAP_KEY_PATTERN, crd_schema.OBJECT_NAME_PATTERN}

    def without_patterns(node):
        if isinstance(node, dict):
            return {k: without_patterns(v) for k, v in node.items() if not (k == "pattern" and v in patterns)}
        return [without_patterns(v) for v in node] if isinstance(node, list) else node

    def replace(body):
        body["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(crd_name).metadata.resource_version
        ext.replace_custom_resource_definition(crd_name, body)

    original = k8s.sanitize_for_serialization(ext.read_custom_resource_definition(crd_name))
    cases = {"path-escape": ({"model": {"claim": "models", "path": "../../../etc/passwd"}}, "spec.model.path: '../../../etc/passwd'"),
             "key-escape": ({"dataset": {"configMap": {"name": "data", "key": "../../etc/passwd"}}}, "spec.dataset.configMap.key"),
             "claim-escape": ({"dataset": {"claim": "..", "path": "x"}}, "spec.dataset.claim: '..'")}
    replace(without_patterns(original))
    try:
        for name, (patch, _) in cases.items():
            def create(name=name, patch=patch):
                try:
                    return jobs.create("SFTJob", name, standin_spec(**patch))
                except ApiException as e:  # the API server may still validate with the old schema
                    assert e.status == 422, e.body
                    return None
            wait_for(f"{name} stored", create, 20, 0.5)
    finally:
        replace(original)
    for name, (_, says) in cases.items():
        c = failed(jobs, "SFTJob", name)
        assert c["reason"] == "InvalidSpec" and says in c["message"], c
        assert jobs.pods(name) == []


def test_plan_fails_a_job_of_a_cycle_until_it_started():
    import datetime as dt

    from rlhf_operator import status

    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    msg = dependencies.cycle_message([("SFTJob", "j"), ("SFTJob", "k"), ("SFTJob", "j")])
    dep = status.DepState(("model",), "SFTJob", "k", exists=True, uid="u-k", phase="Waiting")
    p = status.plan(job("SFTJob", "j", spec={**BASE, "model": {"fromJob": {"name": "k"}}}), [], [dep], now, cycle=msg)
    failed = {c["type"]: c for c in p.status["conditions"]}["Failed"]
    assert (p.status["phase"], failed["reason"], failed["message"]) == ("Failed", "DependencyCycle", msg)
    assert p.create_pod is None and ("Warning", "DependencyCycle", msg) in p.events
    started = job("SFTJob", "j", spec=BASE, status={"attempt": 0, "trainerPod": "j-trainer-0", "phase": "Pending"})
    assert status.plan(started, [], [], now, cycle=msg).status["phase"] != "Failed"
