"""Kueue on the embedded cluster (`up --with kueue`): a queued batch Job is admitted within the ClusterQueue's
quota, the next one that would exceed it stays suspended. Needs `python -m localcluster provision --with kueue`."""

from __future__ import annotations

import time

import pytest
from kubernetes import client, config
from support.kueue import require_kueue

from localcluster import Cluster, kueue
from localcluster.nodeagent.node import GPU


def wait_for(what: str, fn, timeout: float = 90.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory):
    require_kueue()
    c = Cluster(tmp_path_factory.mktemp("kueue") / "cluster", name="kueue", nodes=["kq-0:gpu=2"], addons=("kueue",))
    try:
        c.up(log=lambda _m: None)
        yield c
    finally:
        c.down(purge=True, log=lambda _m: None)


def _job(name: str, gpus: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": kueue.LOCAL_QUEUE}},
            "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": "rlhf/test:dev", "command": ["sleep", "60"],
                                "resources": {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": gpus}}}]}}}}


@pytest.mark.cluster
def test_kueue_admits_a_job_within_quota_and_holds_the_next(kueue_cluster):
    api = config.new_client_from_config(config_file=kueue_cluster.kubeconfig)
    batch, custom = client.BatchV1Api(api), client.CustomObjectsApi(api)
    batch.create_namespaced_job("default", _job("first", "2"))
    wait_for("the first job admitted (unsuspended)", lambda: batch.read_namespaced_job("first", "default").spec.suspend
             is False)
    batch.create_namespaced_job("default", _job("second", "2"))  # the queue's 2 GPUs are taken

    def pending_workload():
        items = custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", "default", "workloads")["items"]
        mine = [w for w in items if any(o.get("name") == "second" for o in w["metadata"].get("ownerReferences", []))]
        conds = {c["type"]: c for w in mine for c in (w.get("status") or {}).get("conditions", [])}
        quota = conds.get("QuotaReserved")
        return quota if quota and quota["status"] == "False" else None

    cond = wait_for("the second job's workload pending for quota", pending_workload)
    assert "nvidia.com/gpu" in cond["message"], cond
    time.sleep(2)
    assert batch.read_namespaced_job("second", "default").spec.suspend is True
    assert batch.read_namespaced_job("first", "default").spec.suspend is False


KUEUE_WEBHOOKS = """\
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}}
  rules: [{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}]
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
"""


def test_kueue_webhooks_point_at_loopback_and_hold_only_queued_pods():
    (hooks,) = kueue.webhook_configurations(KUEUE_WEBHOOKS, 9443, b"CA")
    assert hooks["metadata"]["name"] == "kueue-mutating-webhook-configuration"
    assert [h["name"] for h in hooks["webhooks"]] == ["mjob.kb.io", "mpod.kb.io"]
    job, pod = hooks["webhooks"]
    assert job["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": "Q0E="}
    assert "objectSelector" not in job
    # A pod webhook with failurePolicy Fail would hold up every pod while Kueue is down: only queued pods see it.
    assert pod["clientConfig"]["url"] == "https://127.0.0.1:9443/mutate--v1-pod"
    assert pod["objectSelector"] == {"matchExpressions": [{"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]}
    assert pod["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system", "kueue-system"]
    assert "pod" in kueue.config(1, 2, 3, "/certs")["integrations"]["frameworks"]
    assert kueue.quota(["a:gpu=2,cpu=4,memory=1Gi", "b:gpu=2,cpu=4,memory=1Gi"]) == {
        "cpu": "8", "memory": str(2 * 2**30), GPU: "4"}
