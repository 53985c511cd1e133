"""The operator against the embedded cluster: a real `python -m rlhf_operator` process, real API
server, scheduler and node agent; the stand-in trainer speaks the trainer contract."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import pytest
import yaml
from op_helpers import (
    delete_webhook_configurations,
    free_port,
    metric_value,
    trainer_pid,
    wait_for,
    webhook_operator,
    webhook_rejection,
    webhooks,
)
from rlhf_operator import names
from rlhf_trainer import config as tc
from support.kube import or_none


def spec(steps=10, step_seconds=0.05, every=3, **extra):
    # CPU-only unless a test is about GPUs: the 1.20 scheduler retries a pod that waited for the
    # node's one GPU only every 60 s after the holder merely completes.
    s = {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": steps},
         "resources": {"gpus": 0},
         "checkpoint": {"everySteps": every}, "env": [{"name": "STANDIN_STEP_SECONDS", "value": str(step_seconds)}]}
    for key, value in extra.items():
        if key == "env":
            s["env"] = s["env"] + value
        else:
            s[key] = value
    return s


def ppo_spec(actor, reward, steps=10, **extra):
    s = spec(steps, **extra)
    del s["model"]
    s.update(actor=actor, rewardModel=reward, ppo={"rolloutBatchSize": 4, "minibatchSize": 2})
    return s


def checksums(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_each_kind_runs_to_succeeded(operator, jobs, namespace):
    jobs.create("SFTJob", "sft", spec(steps=30, step_seconds=0.15, resources={"gpus": 1}))  # the node's one GPU
    jobs.create("RewardModelJob", "rm", spec(steps=8, reward={"margin": 0.1}))
    jobs.create("PPOJob", "ppo", ppo_spec({"path": "/tmp"}, {"path": "/tmp"}, steps=6))
    # Progress is scraped from the running trainer's metrics endpoint.
    running = wait_for("live progress of sft", lambda: (s := jobs.status("SFTJob", "sft")).get("phase") == "Running"
                       and 0 < s.get("progress", {}).get("step", 0) < 30 and s, 30)
    assert running["progress"]["totalSteps"] == 30 and "/30" in running["progress"]["summary"]
    for kind, name, key in (("SFTJob", "sft", "loss"), ("RewardModelJob", "rm", "accuracy"), ("PPOJob", "ppo", "reward")):
        st = jobs.wait_phase(kind, name, "Succeeded", 60)
        assert st["output"] == {"claim": names.pvc_name(kind, name), "path": "final"}
        assert st["progress"]["percent"] == 100.0 and key in st["progress"] and st["restartCount"] == 0
        assert st["checkpoint"]["latestStep"] == st["progress"]["totalSteps"]
        assert st["observedGeneration"] == 1 and st["startTime"] and st["completionTime"]
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Succeeded"]["status"] == "True" and conds["Created"]["status"] == "True"
        pods = jobs.pods(name)
        assert [p.metadata.name for p in pods] == [names.pod_name(kind, name, 0)]
        if name == "sft":
            assert pods[0].spec.containers[0].resources.limits == {"nvidia.com/gpu": "1"}
            assert pods[0].spec.node_name  # placed by the real scheduler on the GPU node
        pod = pods[0]
        assert pod.metadata.labels["rlhf.io/kind"] == kind and pod.metadata.labels["rlhf.io/job"] == name
        assert pod.metadata.owner_references[0].kind == kind and pod.spec.automount_service_account_token is False
        pvc = jobs.core.read_namespaced_persistent_volume_claim(names.pvc_name(kind, name), namespace)
        assert not pvc.metadata.owner_references  # retainPolicy Retain (default)
        cm = jobs.core.read_namespaced_config_map(names.configmap_name(kind, name), namespace)
        cfg = tc.from_dict(yaml.safe_load(cm.data["config.yaml"]))
        assert cfg.job.name == name and cfg.job.kind == kind
        out = jobs.claim_dir(names.pvc_name(kind, name))
        meta = json.loads((out / "final" / tc.METADATA_FILE).read_text())
        assert meta["steps"] == st["progress"]["totalSteps"]
        pointer = (out / "checkpoints" / "latest").read_text()
        assert (out / "checkpoints" / pointer / "state.json").is_file()
        reasons = {e.reason for e in jobs.events(name)}
        assert {"TrainerPodCreated", "TrainerRunning", "TrainingComplete"} <= reasons, reasons
    text = operator.metrics()
    assert metric_value(text, "rlhf_operator_jobs", kind="SFTJob", phase="Succeeded") == 1
    assert metric_value(text, "rlhf_operator_up") == 1
    assert metric_value(text, "rlhf_operator_reconcile_total", kind="PPOJob") >= 3
    assert metric_value(text, "rlhf_operator_reconcile_duration_seconds_count", kind="RewardModelJob") >= 3


def test_chain_waits_for_missing_job_and_hands_over_exact_files_read_only(operator, jobs):
    # The PPOJob comes first: its upstream jobs do not exist yet.
    jobs.create("PPOJob", "ppo", ppo_spec({"fromJob": {"name": "sft"}}, {"fromJob": {"name": "rm"}}, steps=4))
    waiting = wait_for("PPO waiting", lambda: (c := jobs.condition("PPOJob", "ppo", "WaitingForDependencies"))
                       and c["status"] == "True" and c, 20)
    assert waiting["reason"] == "DependenciesNotReady"
    assert "SFTJob sft (not found)" in waiting["message"] and "RewardModelJob rm (not found)" in waiting["message"]
    assert jobs.status("PPOJob", "ppo")["phase"] == "Waiting" and jobs.pods("ppo") == []
    jobs.create("SFTJob", "sft", spec(steps=4))
    jobs.create("RewardModelJob", "rm", spec(steps=40, step_seconds=0.1))
    jobs.wait_phase("SFTJob", "sft", "Succeeded")
    time.sleep(1.0)  # rm is still running: the PPOJob must keep waiting
    assert jobs.pods("ppo") == [] and "RewardModelJob rm" in jobs.condition("PPOJob", "ppo", "WaitingForDependencies")["message"]
    jobs.wait_phase("RewardModelJob", "rm", "Succeeded")
    st = jobs.wait_phase("PPOJob", "ppo", "Succeeded")
    assert {d["name"]: d["phase"] for d in st["dependencies"]} == {"sft": "Succeeded", "rm": "Succeeded"}
    assert jobs.condition("PPOJob", "ppo", "WaitingForDependencies")["reason"] == "DependenciesSucceeded"

    pod = jobs.pods("ppo")[0]
    mounts = {m.mount_path: m for m in pod.spec.containers[0].volume_mounts}
    assert mounts["/inputs/sft"].read_only and mounts["/inputs/rm"].read_only
    meta = json.loads((jobs.claim_dir(names.pvc_name("PPOJob", "ppo")) / "final" / tc.METADATA_FILE).read_text())
    assert meta["config_inputs"] == {"sft": "/inputs/sft/final", "rm": "/inputs/rm/final"}
    for role, upstream, up_kind in (("actor", "sft", "SFTJob"), ("reward_model", "rm", "RewardModelJob")):
        seen = meta["inputs"][role]
        assert seen["path"] == f"/inputs/{upstream}/final" and seen["read_only"] is True
        assert seen["sha256"] == checksums(jobs.claim_dir(names.pvc_name(up_kind, upstream)) / "final")  # the exact files
        assert "model.safetensors" in seen["sha256"]
    # Hand-off latency: from rm's success to the PPO pod's creation.
    text = operator.metrics()
    assert metric_value(text, "rlhf_operator_stage_handoff_seconds_count", kind="PPOJob") == 1
    handoff = metric_value(text, "rlhf_operator_stage_handoff_seconds_sum", kind="PPOJob")
    print(f"stage hand-off RewardModelJob -> PPOJob: {handoff:.3f} s")
    assert 0 <= handoff < 2.0


def test_failed_or_deleted_dependency_fails_the_waiting_job(operator, jobs):
    jobs.create("RewardModelJob", "bad-rm", spec(env=[{"name": "STANDIN_EXIT_AT_START", "value": "3"}]))
    jobs.create("PPOJob", "ppo-a", ppo_spec({"path": "/tmp"}, {"fromJob": {"name": "bad-rm"}}))
    jobs.create("RewardModelJob", "slow-rm", spec(steps=200, step_seconds=0.2))
    jobs.create("PPOJob", "ppo-b", ppo_spec({"path": "/tmp"}, {"fromJob": {"name": "slow-rm"}}))
    st = jobs.wait_phase("RewardModelJob", "bad-rm", "Failed")
    failed = {c["type"]: c for c in st["conditions"]}["Failed"]
    assert failed["reason"] == "DataError" and "STANDIN_EXIT_AT_START" in failed["message"]  # termination message
    assert st["restartCount"] == 0 and len(jobs.pods("bad-rm")) == 1  # permanent: not retried
    jobs.wait_phase("PPOJob", "ppo-a", "Failed")
    c = jobs.condition("PPOJob", "ppo-a", "Failed")
    assert c["reason"] == "DependencyFailed" and "RewardModelJob bad-rm (rewardModel) failed" in c["message"]
    wait_for("ppo-b waiting on slow-rm", lambda: "slow-rm (Running)" in (jobs.condition("PPOJob", "ppo-b", "WaitingForDependencies") or {}).get("message", ""), 20)
    jobs.delete("RewardModelJob", "slow-rm")
    jobs.wait_phase("PPOJob", "ppo-b", "Failed", 20)
    c = jobs.condition("PPOJob", "ppo-b", "Failed")
    assert c["reason"] == "DependencyDeleted" and "slow-rm" in c["message"]
    assert jobs.pods("ppo-a") == [] and jobs.pods("ppo-b") == []


def test_operator_killed_mid_run_restarts_without_duplicates(operator_factory, jobs):
    first = operator_factory()
    jobs.create("SFTJob", "long", spec(steps=40, step_seconds=0.1, every=5))
    jobs.wait_phase("SFTJob", "long", "Running", 30)
    first.kill()
    time.sleep(1)
    second = operator_factory()
    st = jobs.wait_phase("SFTJob", "long", "Succeeded", 60)
    assert [p.metadata.name for p in jobs.pods("long")] == [names.pod_name("SFTJob", "long", 0)]
    assert st["restartCount"] == 0 and st["attempt"] == 0
    assert second.proc.poll() is None


def test_killed_trainer_is_replaced_and_resumes(operator, jobs):
    # The series exists at zero before the first restart, so increase() over the restart sees it.
    assert metric_value(operator.metrics(), "rlhf_operator_pod_restarts_total", kind="SFTJob") == 0
    jobs.create("SFTJob", "crash", spec(steps=40, step_seconds=0.1, every=4))
    wait_for("a checkpoint", lambda: jobs.status("SFTJob", "crash").get("checkpoint", {}).get("latestStep", 0) >= 8, 30)
    os.kill(trainer_pid(jobs, names.pod_name("SFTJob", "crash", 0)), signal.SIGKILL)
    st = jobs.wait_phase("SFTJob", "crash", "Succeeded", 60)
    assert st["restartCount"] == 1 and st["trainerPod"] == names.pod_name("SFTJob", "crash", 1)
    assert jobs.condition("SFTJob", "crash", "Restarting")["status"] == "False"
    failed = [e.message for e in jobs.events("crash") if e.reason == "PodFailed"]
    assert len(failed) == 1 and f"{names.pod_name('SFTJob', 'crash', 0)} failed with exit code 137" in failed[0] and "restart 1 of 3" in failed[0]
    history = [json.loads(line) for line in (jobs.claim_dir(names.pvc_name("SFTJob", "crash")) / "standin-history.jsonl").read_text().splitlines()]
    assert [h["pod"] for h in history] == [names.pod_name("SFTJob", "crash", i) for i in (0, 1)]
    assert history[0]["start_step"] == 0 and history[1]["start_step"] >= 8  # resumed from the latest checkpoint
    assert {p.metadata.name: p.status.phase for p in jobs.pods("crash")} == {
        names.pod_name("SFTJob", "crash", 0): "Failed", names.pod_name("SFTJob", "crash", 1): "Succeeded"}
    assert metric_value(operator.metrics(), "rlhf_operator_pod_restarts_total", kind="SFTJob") == 1


def test_backoff_limit_and_failed_pods(operator, jobs):
    jobs.create("SFTJob", "flaky", spec(steps=6, backoffLimit=1, env=[{"name": "STANDIN_FAIL_AT_STEP", "value": "2"}]))
    st = jobs.wait_phase("SFTJob", "flaky", "Failed", 40)
    failed = {c["type"]: c for c in st["conditions"]}["Failed"]
    assert failed["reason"] == "BackoffLimitExceeded" and "told to fail at step 2" in failed["message"]
    assert st["restartCount"] == 1 and sorted(p.metadata.name for p in jobs.pods("flaky")) == [names.pod_name("SFTJob", "flaky", i) for i in (0, 1)]


def test_suspend_resume_and_deadline(operator, jobs, namespace):
    jobs.create("SFTJob", "pause", spec(steps=40, step_seconds=0.1, every=4))
    wait_for("a checkpoint", lambda: jobs.status("SFTJob", "pause").get("checkpoint", {}).get("latestStep", 0) >= 4, 30)
    jobs.patch("SFTJob", "pause", {"spec": {"suspend": True}})
    st = jobs.wait_phase("SFTJob", "pause", "Suspended", 20)
    wait_for("pods gone", lambda: all(p.metadata.deletion_timestamp or p.status.phase in ("Succeeded", "Failed")
                                      for p in jobs.pods("pause")) and True, 30)
    assert jobs.core.read_namespaced_persistent_volume_claim(names.pvc_name("SFTJob", "pause"), namespace)  # checkpoints kept
    assert {c["type"]: c for c in st["conditions"]}["Suspended"]["reason"] == "JobSuspended"
    jobs.patch("SFTJob", "pause", {"spec": {"suspend": False}})
    st = jobs.wait_phase("SFTJob", "pause", "Succeeded", 60)
    assert st["restartCount"] == 0 and st["trainerPod"] == names.pod_name("SFTJob", "pause", 1)
    history = [json.loads(line) for line in (jobs.claim_dir(names.pvc_name("SFTJob", "pause")) / "standin-history.jsonl").read_text().splitlines()]
    assert history[1]["start_step"] >= 4  # resumed, progress kept
    assert {"JobSuspended", "JobResumed"} <= {e.reason for e in jobs.events("pause")}

    jobs.create("SFTJob", "slow", spec(steps=500, step_seconds=0.1, activeDeadlineSeconds=3))
    st = jobs.wait_phase("SFTJob", "slow", "Failed", 30)
    assert {c["type"]: c for c in st["conditions"]}["Failed"]["reason"] == "DeadlineExceeded"
    wait_for("deadline pod stopped", lambda: all(p.metadata.deletion_timestamp or p.status.phase != "Running" for p in jobs.pods("slow")) and True, 30)


def test_unschedulable_invalid_and_ttl(operator, jobs, namespace):
    jobs.create("SFTJob", "big", spec(resources={"gpus": 8}))
    # The claim may still be binding at the first try ("unbound immediate PersistentVolumeClaims"): wait for the GPU reason.
    c = wait_for("Unschedulable", lambda: (c := jobs.condition("SFTJob", "big", "PodScheduled")) and c["status"] == "False"
                 and "nvidia.com/gpu" in c["message"] and c, 30)
    assert c["reason"] == "Unschedulable" and "nvidia.com/gpu" in c["message"]
    assert jobs.status("SFTJob", "big")["phase"] == "Pending"
    # Without the webhook, rules beyond the schema end as a condition naming the field.
    jobs.create("SFTJob", "odd", spec(resources={"gpus": 3}))
    st = jobs.wait_phase("SFTJob", "odd", "Failed", 20)
    failed = {c["type"]: c for c in st["conditions"]}["Failed"]
    assert failed["reason"] == "InvalidSpec" and "spec.resources.gpus" in failed["message"] and jobs.pods("odd") == []
    jobs.create("SFTJob", "short-lived", spec(steps=2, ttlSecondsAfterFinished=1))
    wait_for("TTL deletion", lambda: jobs.get("SFTJob", "short-lived") is None, 30)
    assert jobs.core.read_namespaced_persistent_volume_claim(names.pvc_name("SFTJob", "short-lived"), namespace)  # retained


BAD_SPECS = [
    ("SFTJob", {"training": {"batchSize": 0}}, "spec.training.batchSize"),
    ("SFTJob", {"training": {"maxSteps": "ten"}}, "spec.training.maxSteps"),
    ("SFTJob", {"training": {"lrSchedule": "cosine2"}}, "spec.training.lrSchedule"),
    ("SFTJob", {"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ("SFTJob", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ("SFTJob", {"checkpoint": {"retainPolicy": "Keep"}}, "spec.checkpoint.retainPolicy"),
    ("SFTJob", {"model": {"fromJob": {"name": "x", "kind": "Job"}}}, "spec.model.fromJob.kind"),
    ("SFTJob", {"dataset": None}, "spec.dataset"),
    ("PPOJob", {"ppo": {"gamma": 1.5}}, "spec.ppo.gamma"),
    ("PPOJob", {"rewardModel": None}, "spec.rewardModel"),
]


@pytest.mark.parametrize("kind, patch, field", BAD_SPECS, ids=[f for _, _, f in BAD_SPECS])
def test_schema_rejects_bad_specs_naming_the_field(jobs, crds, kind, patch, field):
    from kubernetes.client.rest import ApiException

    s = ppo_spec({"path": "/m"}, {"path": "/r"}) if kind == "PPOJob" else spec()
    for key, value in patch.items():
        if value is None:
            s.pop(key)
        else:
            s[key] = {**s.get(key, {}), **value}
    with pytest.raises(ApiException) as e:
        jobs.create(kind, "bad", s)
    assert e.value.status == 422 and field in e.value.body, e.value.body


def test_webhook_rejects_at_apply_time(operator_factory, jobs, k8s, namespace):
    from kubernetes.client.rest import ApiException

    with webhook_operator(operator_factory, k8s, namespace):
        jobs.create("SFTJob", "base", spec(steps=200, step_seconds=0.1))

        def rejected(kind, job_name, s):
            return webhook_rejection(jobs, kind, job_name, s).body

        assert "spec.resources.gpus: 3 GPUs per pod cannot be used" in rejected("SFTJob", "gpu3", spec(resources={"gpus": 3}))
        body = rejected("PPOJob", "wrongkind", ppo_spec({"path": "/m"}, {"fromJob": {"name": "base"}}))
        assert "spec.rewardModel.fromJob: 'base' is a SFTJob, but rewardModel needs a RewardModelJob" in body
        # (Cross-field rules the CRD's CEL rules cover, e.g. bf16 with fp16, are refused before the webhook is asked.)
        assert "spec.model.fromJob.name: a job cannot depend on itself" in rejected(
            "SFTJob", "selfdep", spec(model={"fromJob": {"name": "selfdep"}}))
        assert "spec.env[1].name: RLHF_CONFIG is set by the operator" in rejected(
            "SFTJob", "reserved", spec(env=[{"name": "RLHF_CONFIG", "value": "/tmp/x.yaml"}]))
        # A running job's spec is immutable except suspend (and the batch-like knobs).
        jobs.wait_phase("SFTJob", "base", "Running", 30)
        with pytest.raises(ApiException) as e:
            jobs.patch("SFTJob", "base", {"spec": {"training": {"maxSteps": 5}}})
        assert "spec.training: cannot change while the job is running" in e.value.body
        jobs.patch("SFTJob", "base", {"spec": {"suspend": True}})
        jobs.wait_phase("SFTJob", "base", "Suspended", 20)


def test_operator_works_with_exactly_its_rbac_rules(operator_factory, jobs, k8s, cluster, namespace, tmp_path):
    """The rules in rlhf_operator.rbac are enough (a job runs to the end, kopf manages its webhook
    configurations) and nothing more is granted."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from rlhf_operator import rbac

    rbac_api, core, adm = client.RbacAuthorizationV1Api(k8s), jobs.core, client.AdmissionregistrationV1Api(k8s)
    webhook_config = f"rlhf-rbac-{namespace}.rlhf.io"
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "rlhf-operator"}})
    subject = [{"kind": "ServiceAccount", "name": "rlhf-operator", "namespace": namespace}]
    rbac_api.create_namespaced_role(namespace, {"metadata": {"name": "rlhf-operator"}, "rules": rbac.k8s_rules(rbac.NAMESPACED_RULES)})
    rbac_api.create_namespaced_role_binding(namespace, {"metadata": {"name": "rlhf-operator"}, "subjects": subject,
                                                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "rlhf-operator"}})
    cluster_role = f"rlhf-operator-{namespace}"
    rbac_api.create_cluster_role({"metadata": {"name": cluster_role}, "rules": rbac.k8s_rules(rbac.CLUSTER_RULES + rbac.webhook_rules(webhook_config))})
    rbac_api.create_cluster_role_binding({"metadata": {"name": cluster_role}, "subjects": subject,
                                          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role}})
    op = None
    try:
        token = core.create_namespaced_service_account_token(
            "rlhf-operator", namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}}).status.token
        kubeconfig = yaml.safe_load(open(cluster.kubeconfig))  # JSON is YAML too
        for user in kubeconfig["users"]:
            user["user"] = {"token": token}
        path = tmp_path / "operator-kubeconfig"
        path.write_text(json.dumps(kubeconfig))
        op = operator_factory(KUBECONFIG=str(path), RLHF_WEBHOOK_ENABLED="1", RLHF_WEBHOOK_PORT=str(free_port()),
                              RLHF_WEBHOOK_CONFIG_NAME=webhook_config)
        # kopf creates both configurations (it retries a forbidden create, then stops), then patches in our webhooks.
        wait_for("kopf's validating (with webhooks) and mutating configurations", lambda: op.proc.poll() is not None or (
            webhooks(adm.read_validating_webhook_configuration, webhook_config)
            and _exists(adm.read_mutating_webhook_configuration, webhook_config)), 30)
        assert op.proc.poll() is None, op.log()[-3000:]
        jobs.create("RewardModelJob", "rbac-rm", spec(steps=4, ttlSecondsAfterFinished=2))
        jobs.create("PPOJob", "rbac-ppo", ppo_spec({"path": "/tmp"}, {"fromJob": {"name": "rbac-rm"}}, steps=3))
        jobs.wait_phase("PPOJob", "rbac-ppo", "Succeeded", 60)
        wait_for("TTL deletion with the operator's rights", lambda: jobs.get("RewardModelJob", "rbac-rm") is None, 30)
        assert "Forbidden" not in op.log() and "403" not in op.log(), op.log()[-3000:]
        import kubernetes

        limited = client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(path)))
        with pytest.raises(ApiException) as e:
            limited.list_namespaced_secret(namespace)
        assert e.value.status == 403
    finally:
        if op is not None:
            op.stop()  # while it still has the rights to clean up its webhook configurations
        rbac_api.delete_cluster_role_binding(cluster_role)
        rbac_api.delete_cluster_role(cluster_role)
        delete_webhook_configurations(adm, webhook_config)


def _exists(read, name):
    return or_none(read, name) is not None



# --- children: names, ownership, lost claims and inputs ------------------------------------------

def _claim_body(name, labels=None):
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def _read_claim(jobs, name):
    return or_none(jobs.core.read_namespaced_persistent_volume_claim, name, jobs.ns)


def _pid_or_none(jobs, pod):
    try:
        return trainer_pid(jobs, pod)
    except AssertionError:  # not started yet, or the machine is slow to show it
        return None


def test_jobs_of_two_kinds_with_one_name_keep_separate_children(operator, jobs, namespace):
    jobs.create("SFTJob", "dup", spec(steps=12, step_seconds=0.1))
    jobs.create("RewardModelJob", "dup", spec(steps=8, step_seconds=0.1, reward={"margin": 0.1}))
    for kind, stage in (("SFTJob", "sft"), ("RewardModelJob", "reward")):
        st = jobs.wait_phase(kind, "dup", "Succeeded", 60)
        claim = names.pvc_name(kind, "dup")
        assert st["output"]["claim"] == claim and st["restartCount"] == 0
        cm = jobs.core.read_namespaced_config_map(names.configmap_name(kind, "dup"), namespace)
        assert yaml.safe_load(cm.data["config.yaml"])["stage"] == stage
        meta = json.loads((jobs.claim_dir(claim) / "final" / tc.METADATA_FILE).read_text())
        assert meta["stage"] == stage and meta["steps"] == st["progress"]["totalSteps"]
        history = [json.loads(line) for line in (jobs.claim_dir(claim) / "standin-history.jsonl").read_text().splitlines()]
        assert history == [{"pod": names.pod_name(kind, "dup", 0), "start_step": 0}]  # nobody else wrote here
    pods = {p.metadata.name for p in jobs.pods("dup")}
    assert pods == {"dup-sft-trainer-0", "dup-rm-trainer-0"}


def test_a_63_character_job_name_runs(operator, jobs, namespace):
    name = "a-job-name-as-long-as-kubernetes-allows-for-a-label-value-xxxxx"
    assert len(name) == 63
    jobs.create("SFTJob", name, spec(steps=3))
    st = jobs.wait_phase("SFTJob", name, "Succeeded", 60)
    (pod,) = jobs.pods(name)
    assert pod.metadata.name == st["trainerPod"] and len(pod.metadata.name) <= 63, pod.metadata.name
    for child in (st["output"]["claim"], names.configmap_name("SFTJob", name)):
        assert len(child) <= 63 and child.startswith("a-job-name-"), child
    assert _read_claim(jobs, st["output"]["claim"]) is not None


def test_a_claim_created_beforehand_is_not_adopted(operator, jobs, namespace):
    claim = names.pvc_name("SFTJob", "pre")
    jobs.core.create_namespaced_persistent_volume_claim(namespace, _claim_body(claim, {"team": "a"}))
    jobs.create("SFTJob", "pre", spec(steps=100, checkpoint={"everySteps": 5, "retainPolicy": "Delete"}))
    st = jobs.wait_phase("SFTJob", "pre", ("Failed", "Running", "Succeeded"), 30)
    failed = jobs.condition("SFTJob", "pre", "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "ChildNameConflict", st
    assert f"claim {claim} exists but this job did not create it" in failed["message"]
    assert jobs.pods("pre") == []
    jobs.patch("SFTJob", "pre", {"spec": {"checkpoint": {"retainPolicy": "Retain"}}})  # no ownership either way
    jobs.patch("SFTJob", "pre", {"spec": {"checkpoint": {"retainPolicy": "Delete"}}})
    time.sleep(2)
    after = _read_claim(jobs, claim)
    assert after.metadata.labels == {"team": "a"} and not after.metadata.owner_references
    assert after.metadata.deletion_timestamp is None


def test_a_config_map_created_beforehand_is_not_overwritten(operator, jobs, namespace):
    name = names.configmap_name("SFTJob", "precm")
    jobs.core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": {"config.yaml": "mine: 1\n"}})
    jobs.create("SFTJob", "precm", spec(steps=3))
    st = jobs.wait_phase("SFTJob", "precm", ("Failed", "Succeeded"), 30)
    failed = jobs.condition("SFTJob", "precm", "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "ChildNameConflict", st
    assert f"config map {name} exists but this job did not create it" in failed["message"]
    cm = jobs.core.read_namespaced_config_map(name, namespace)
    assert cm.data == {"config.yaml": "mine: 1\n"} and not cm.metadata.owner_references
    assert jobs.pods("precm") == []


def test_a_deleted_claim_fails_the_running_job_which_never_succeeds(operator, jobs, namespace):
    jobs.create("SFTJob", "lose", spec(steps=200, step_seconds=0.1, every=5))
    wait_for("a checkpoint", lambda: jobs.status("SFTJob", "lose").get("checkpoint", {}).get("latestStep", 0) >= 5, 30)
    claim = names.pvc_name("SFTJob", "lose")
    jobs.core.delete_namespaced_persistent_volume_claim(claim, namespace)  # Terminating while the pod uses it
    st = jobs.wait_phase("SFTJob", "lose", ("Failed", "Succeeded"), 20)
    failed = jobs.condition("SFTJob", "lose", "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "CheckpointClaimLost", st
    assert f"checkpoint claim {claim}" in failed["message"] and "onClaimLoss: StartOver" in failed["message"]
    wait_for("the claim gone once the pod stopped", lambda: _read_claim(jobs, claim) is None, 60)
    time.sleep(2)  # no new, empty claim, no new pod
    assert _read_claim(jobs, claim) is None and jobs.status("SFTJob", "lose")["phase"] == "Failed"
    assert {p.metadata.name for p in jobs.pods("lose")} <= {names.pod_name("SFTJob", "lose", 0)}


def test_start_over_after_a_lost_claim_trains_again_from_step_0(operator, jobs, namespace):
    jobs.create("SFTJob", "again", spec(steps=60, step_seconds=0.1, checkpoint={"everySteps": 5, "onClaimLoss": "StartOver"}))
    wait_for("a checkpoint", lambda: jobs.status("SFTJob", "again").get("checkpoint", {}).get("latestStep", 0) >= 10, 30)
    claim = names.pvc_name("SFTJob", "again")
    old_uid = _read_claim(jobs, claim).metadata.uid
    jobs.core.delete_namespaced_persistent_volume_claim(claim, namespace)
    st = jobs.wait_phase("SFTJob", "again", ("Succeeded", "Failed"), 90)
    assert st["phase"] == "Succeeded" and st["trainerPod"] == names.pod_name("SFTJob", "again", 1), st
    new = _read_claim(jobs, claim)
    assert new.metadata.uid != old_uid
    history = [json.loads(line) for line in (jobs.claim_dir(claim) / "standin-history.jsonl").read_text().splitlines()]
    assert history == [{"pod": names.pod_name("SFTJob", "again", 1), "start_step": 0}]  # a fresh claim, from step 0
    said = [e.message for e in jobs.events("again") if e.reason == "CheckpointClaimLost"]
    assert any("starting over from step 0" in m for m in said), said


def test_a_restart_after_the_upstream_job_was_deleted_fails_with_dependency_deleted(operator, jobs, namespace):
    jobs.create("RewardModelJob", "up", spec(steps=3, checkpoint={"everySteps": 3, "retainPolicy": "Delete"}))
    jobs.create("PPOJob", "down", ppo_spec({"path": "/tmp"}, {"fromJob": {"name": "up"}}, steps=400, step_seconds=0.1))
    jobs.wait_phase("RewardModelJob", "up", "Succeeded", 60)
    jobs.wait_phase("PPOJob", "down", "Running", 60)
    up_claim = names.pvc_name("RewardModelJob", "up")
    jobs.delete("RewardModelJob", "up")  # its claim goes with it (retainPolicy Delete), Terminating while mounted
    wait_for("the upstream claim terminating", lambda: (c := _read_claim(jobs, up_claim)) is None or c.metadata.deletion_timestamp, 30)
    assert jobs.status("PPOJob", "down")["phase"] == "Running"  # the running trainer still has its input mounted
    os.kill(wait_for("the PPO trainer process", lambda: _pid_or_none(jobs, names.pod_name("PPOJob", "down", 0)), 20), signal.SIGKILL)
    st = jobs.wait_phase("PPOJob", "down", ("Failed", "Succeeded"), 30)
    failed = jobs.condition("PPOJob", "down", "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "DependencyDeleted", st
    assert "RewardModelJob up (rewardModel) was deleted" in failed["message"]
    assert {p.metadata.name for p in jobs.pods("down")} <= {names.pod_name("PPOJob", "down", 0)}  # no replacement
