"""Queued jobs on the embedded cluster with a real Kueue v0.17 (`up --with kueue`) and the real operator running the
stand-in trainer: a job labelled kueue.x-k8s.io/queue-name is admitted as one Workload (a pod group); with quota for
one job the second waits, its condition naming the queue, and runs after the first; a higher-priority job preempts
a running one, which checkpoints, waits for readmission and resumes from its checkpoint without back-off; a 2-node
job is one Workload of 2 pods that starts only when the quota holds both.

Each test gets a ClusterQueue of its own with quota for one GPU (preemption within it by priority), a LocalQueue
in its namespace and Kueue WorkloadPriorityClasses. Needs `python -m localcluster provision --with kueue`."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from op_helpers import REPO, wait_for
from rlhf_operator import queueing
from support.kube import or_none
from support.kueue import require_kueue

from localcluster import Cluster

KUEUE_API = ("kueue.x-k8s.io", "v1beta2")
LOCAL_QUEUE = "lq"
PRIORITIES = {"rlhf-test-low": 100, "rlhf-test-high": 10000}


def _operator_fixtures():
    """tests/operator/conftest.py by path (its Operator and Jobs), as tests/e2e loads it: `import conftest`
    would find another directory's conftest in a run of several directories."""
    name = "rlhf_e2e_operator_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("conftest.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


op = _operator_fixtures()


@pytest.fixture(scope="module")
def kq():
    """A cluster of its own with Kueue (one node, 2 GPUs), the project's CRDs and the priority classes."""
    require_kueue()
    import kubernetes

    from rlhf_pipeline.kube import apply_crds

    c = Cluster(tempfile.mkdtemp(prefix="rlhf-test-kueue-"), name="rlhf-kueue", nodes=["kq-0:gpu=2"],
                addons=("kueue",))
    try:
        c.up(log=lambda _m: None)
        api = kubernetes.config.new_client_from_config(config_file=c.kubeconfig)
        apply_crds(api, REPO / "crds", timeout=30)
        custom = kubernetes.client.CustomObjectsApi(api)
        for name, value in PRIORITIES.items():
            custom.create_cluster_custom_object(*KUEUE_API, "workloadpriorityclasses", {
                "apiVersion": "/".join(KUEUE_API), "kind": "WorkloadPriorityClass", "metadata": {"name": name},
                "value": value, "description": "rlhf-platform test"})
        yield c, api
        api.close()
    finally:
        c.down(purge=True, log=lambda _m: None)


@pytest.fixture
def queue(kq, tmp_path, request):
    """(jobs, operator, cluster queue name): a namespace with a LocalQueue `lq` on a ClusterQueue holding one GPU,
    and an operator watching the namespace."""
    from kubernetes import client

    cluster, api = kq
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = f"kq-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    cq = f"cq-{ns}"
    custom.create_cluster_custom_object(*KUEUE_API, "clusterqueues", {
        "apiVersion": "/".join(KUEUE_API), "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [{
                     "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "64"},
                                                             {"name": "memory", "nominalQuota": "256Gi"},
                                                             {"name": "nvidia.com/gpu", "nominalQuota": "1"}]}]}]}})
    custom.create_namespaced_custom_object(*KUEUE_API, ns, "localqueues", {
        "apiVersion": "/".join(KUEUE_API), "kind": "LocalQueue", "metadata": {"name": LOCAL_QUEUE, "namespace": ns},
        "spec": {"clusterQueue": cq}})

    def active():
        got = or_none(custom.get_namespaced_custom_object, *KUEUE_API, ns, "localqueues", LOCAL_QUEUE) or {}
        return any(c["type"] == "Active" and c["status"] == "True" for c in (got.get("status") or {}).get("conditions", []))
    wait_for("the test's LocalQueue Active", active, 60)
    operator = op.Operator(cluster, ns, tmp_path).start()
    yield op.Jobs(api, ns), operator, custom
    operator.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:  # set by conftest
        print("\n--- operator log (tail) ---\n" + "\n".join(operator.log().splitlines()[-80:]))
    core.delete_namespace(ns)
    or_none(custom.delete_cluster_custom_object, *KUEUE_API, "clusterqueues", cq)


def spec(steps: int, step_seconds: float, every: int) -> dict:
    return {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"},
            "training": {"maxSteps": steps}, "checkpoint": {"everySteps": every}, "resources": {"gpus": 1},
            "env": [{"name": "STANDIN_STEP_SECONDS", "value": str(step_seconds)}]}


def queued(priority: str = "") -> dict:
    labels = {queueing.QUEUE_LABEL: LOCAL_QUEUE}
    if priority:
        labels[queueing.PRIORITY_LABEL] = priority
    return {"labels": labels}


def condition(jobs, name: str, ctype: str) -> dict:
    return jobs.condition("SFTJob", name, ctype) or {}


def workloads(custom, ns: str) -> list[dict]:
    return custom.list_namespaced_custom_object(*KUEUE_API, ns, "workloads")["items"]


@pytest.mark.cluster
def test_with_quota_for_one_job_the_second_waits_naming_its_queue_and_runs_after_the_first(queue):
    jobs, _operator, custom = queue
    jobs.create("SFTJob", "first", spec(30, 0.1, 10), **queued())
    jobs.wait_phase("SFTJob", "first", "Running", 60)
    jobs.create("SFTJob", "second", spec(5, 0.05, 5), **queued())
    waiting = wait_for("the second job queued", lambda: (c := condition(jobs, "second", "Queued")).get("status")
                       == "True" and c, 30)
    assert waiting["reason"] == "WaitingForAdmission"
    assert waiting["message"] == f"waiting for Kueue admission in LocalQueue {LOCAL_QUEUE}"
    (pod,) = jobs.pods("second")
    assert queueing.ADMISSION_GATE in [g.name for g in pod.spec.scheduling_gates or []]
    assert pod.metadata.labels[queueing.GROUP_LABEL] and pod.metadata.annotations[queueing.GROUP_COUNT_ANNOTATION] == "1"
    assert jobs.status("SFTJob", "second")["phase"] == "Pending"
    assert jobs.status("SFTJob", "first")["phase"] == "Running"
    # One Workload per job: a pod group of 1 pod x 1 GPU.
    mine = {w["metadata"]["name"]: w for w in workloads(custom, jobs.ns)}
    first = mine[jobs.pods("first")[0].metadata.labels[queueing.GROUP_LABEL]]
    assert [ps["count"] for ps in first["spec"]["podSets"]] == [1]
    assert pod.metadata.labels[queueing.GROUP_LABEL] in mine  # the waiting job's Workload exists, not admitted

    first_done = jobs.wait_phase("SFTJob", "first", "Succeeded", 90)
    jobs.wait_phase("SFTJob", "second", ("Running", "Succeeded"), 60)
    second = jobs.wait_phase("SFTJob", "second", "Succeeded", 60)
    assert second["startTime"] >= first_done["startTime"]
    admitted = condition(jobs, "second", "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")
    assert second.get("restartCount", 0) == 0


@pytest.mark.cluster
def test_a_higher_priority_job_preempts_a_running_one_which_checkpoints_waits_and_resumes(queue):
    jobs, _operator, _custom = queue
    every = 5
    jobs.create("SFTJob", "low", {**spec(120, 0.1, every), "backoffLimit": 0}, **queued("rlhf-test-low"))
    jobs.wait_phase("SFTJob", "low", "Running", 60)
    before = wait_for("low's trainer past step 10", lambda: (s := (jobs.status("SFTJob", "low").get("progress") or {})
                                                              .get("step", 0)) >= 10 and s, 60)
    jobs.create("SFTJob", "high", spec(10, 0.05, 5), **queued("rlhf-test-high"))

    preempted = wait_for("low preempted and waiting", lambda: (c := condition(jobs, "low", "Queued")).get("reason")
                         == "Preempted" and "waiting for readmission" in c.get("message", "") and c, 60)
    assert preempted["status"] == "True" and f"LocalQueue {LOCAL_QUEUE}" in preempted["message"]
    assert "preempted by Kueue" in preempted["message"]
    assert jobs.status("SFTJob", "low")["phase"] == "Pending"
    jobs.wait_phase("SFTJob", "high", "Succeeded", 90)

    low = jobs.wait_phase("SFTJob", "low", "Succeeded", 180)
    assert low.get("restartCount", 0) == 0 and low["disruptionCount"] == 1  # backoffLimit 0: a failure would end it
    assert low["trainerPod"].endswith("trainer-1")
    history = jobs.claim_dir(low["checkpoint"]["claim"]) / "standin-history.jsonl"
    starts = [json.loads(line) for line in history.read_text().splitlines()]
    assert [s["pod"][-1] for s in starts] == ["0", "1"] and starts[0]["start_step"] == 0
    # Resumed from the checkpoint written at SIGTERM: nothing lost beyond one checkpoint interval.
    assert starts[1]["start_step"] >= before - every, (before, starts)
    assert low["progress"]["step"] == 120


@pytest.mark.cluster
def test_a_gang_is_one_workload_of_n_pods_admitted_whole_or_not_at_all(queue):
    jobs, _operator, custom = queue
    gang = {**spec(200, 0.1, 50), "resources": {"gpus": 1, "nodes": 2},
            "checkpoint": {"everySteps": 50, "accessMode": "ReadWriteMany"}}
    jobs.create("SFTJob", "pair", gang, **queued())
    waiting = wait_for("the 2-pod job queued", lambda: (c := condition(jobs, "pair", "Queued")).get("status")
                       == "True" and len(jobs.pods("pair")) == 2 and c, 30)
    assert waiting["message"] == f"waiting for Kueue admission in LocalQueue {LOCAL_QUEUE}"
    pods = jobs.pods("pair")
    group = {p.metadata.labels[queueing.GROUP_LABEL] for p in pods}
    assert len(group) == 1 and {p.metadata.annotations[queueing.GROUP_COUNT_ANNOTATION] for p in pods} == {"2"}
    (wl,) = [w for w in workloads(custom, jobs.ns) if w["metadata"]["name"] in group]
    assert [ps["count"] for ps in wl["spec"]["podSets"]] == [2]  # one Workload: 2 pods x 1 GPU
    # The ClusterQueue lends 1 GPU: the gang needs 2, so neither pod may start.
    time.sleep(3)
    assert all(queueing.ADMISSION_GATE in [g.name for g in p.spec.scheduling_gates or []] for p in jobs.pods("pair"))
    assert jobs.status("SFTJob", "pair")["phase"] == "Pending"
    cq = f"cq-{jobs.ns}"  # the queue fixture's
    custom.patch_cluster_custom_object(*KUEUE_API, "clusterqueues", cq, {"spec": {"resourceGroups": [{
        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [{
            "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "64"},
                                                    {"name": "memory", "nominalQuota": "256Gi"},
                                                    {"name": "nvidia.com/gpu", "nominalQuota": "2"}]}]}]}})
    # Quota for both: Kueue admits the Workload and lifts its gate from both pods at once; the gang runs.
    running = jobs.wait_phase("SFTJob", "pair", "Running", 90)
    assert running["gang"]["summary"] == "2/2"
    assert not any(p.spec.scheduling_gates for p in jobs.pods("pair"))
    admitted = condition(jobs, "pair", "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")


@pytest.mark.cluster
def test_a_deleted_or_failed_queued_job_gives_back_its_quota(queue):
    """Kueue keeps its finalizer on a pod group's stopped pods (and the Workload admitted) until replacements join:
    the operator lifts it where none will come, so the next job in the queue runs."""
    jobs, _operator, _custom = queue
    jobs.create("SFTJob", "gone", spec(200, 0.1, 50), **queued())
    jobs.wait_phase("SFTJob", "gone", "Running", 60)
    jobs.create("SFTJob", "next", spec(200, 0.1, 50), **queued())
    wait_for("next queued", lambda: condition(jobs, "next", "Queued").get("status") == "True", 30)
    jobs.delete("SFTJob", "gone")
    wait_for("the deleted job's pod gone", lambda: not jobs.pods("gone"), 60)
    jobs.wait_phase("SFTJob", "next", "Running", 60)
    jobs.patch("SFTJob", "next", {"spec": {"activeDeadlineSeconds": 1}})
    failed = jobs.wait_phase("SFTJob", "next", "Failed", 60)
    assert any(c["reason"] == "DeadlineExceeded" for c in failed["conditions"] if c["type"] == "Failed"), failed
    wait_for("the failed job's pod gone", lambda: not jobs.pods("next"), 60)
    jobs.create("SFTJob", "last", spec(5, 0.05, 5), **queued())
    jobs.wait_phase("SFTJob", "last", "Succeeded", 60)
