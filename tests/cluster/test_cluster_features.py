"""What the embedded cluster offers since it runs a current Kubernetes: cluster DNS (headless Services and pod
hostnames resolve inside pods), scheduling gates, two GPU nodes, and CRD validation rules (CEL) at apply time."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from support.polling import wait_for
from support.processes import pid_alive

from localcluster.nodeagent.node import DEFAULT_NODES, GPU, parse_node_spec

PY = "python"  # resolved on the container's PATH: the project's venv comes first


def pod(name: str, script: str, *, labels: dict | None = None, restart: str = "Never", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "main", "image": "rlhf/test:dev", "command": [PY, "-c", script]}],
                     **spec}}


def phase(core, namespace: str, name: str, *phases: str):
    def check():
        p = core.read_namespaced_pod(name, namespace)
        return p if p.status.phase in phases else None
    return check


@pytest.fixture
def core(k8s):
    return client.CoreV1Api(k8s)


# A client that retries until the names resolve (the EndpointSlice reaches CoreDNS a moment after the pod is Ready).
RESOLVER = """
import json, socket, sys, time
names = sys.argv[1:]
deadline = time.time() + 45
while True:
    try:
        found = {n: sorted({a[4][0] for a in socket.getaddrinfo(n, 80, socket.AF_INET)}) for n in names}
        break
    except socket.gaierror as e:
        if time.time() > deadline:
            print("unresolved:", e, flush=True)
            sys.exit(1)
        time.sleep(0.5)
print(json.dumps({"found": found, "hostname": socket.gethostname(), "resolv": open("/etc/resolv.conf").read()}))
"""


def test_headless_service_and_pod_hostname_resolve_inside_a_pod(core, namespace, cluster):
    core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}})
    core.create_namespaced_pod(namespace, pod("web-server", "import time; time.sleep(600)", labels={"app": "web"},
                                              hostname="web-0", subdomain="web"))
    server = wait_for("the web pod running", phase(core, namespace, "web-server", "Running"))
    ip = server.status.pod_ip
    client_pod = pod("resolver", RESOLVER, hostname="asker")
    client_pod["spec"]["containers"][0]["command"] += [
        f"web.{namespace}.svc.cluster.local", "web-0.web", f"web-0.web.{namespace}.svc.cluster.local"]
    core.create_namespaced_pod(namespace, client_pod)
    done = wait_for("the resolver pod to finish", phase(core, namespace, "resolver", "Succeeded", "Failed"), 90)
    log = cluster.logs(namespace, "resolver")
    assert done.status.phase == "Succeeded", log
    out = json.loads(log.strip().splitlines()[-1])
    assert out["found"] == {f"web.{namespace}.svc.cluster.local": [ip], "web-0.web": [ip],
                            f"web-0.web.{namespace}.svc.cluster.local": [ip]}
    assert out["hostname"] == "asker"
    assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in out["resolv"]


def test_gated_pod_stays_pending_until_its_gate_is_removed(core, namespace):
    core.create_namespaced_pod(namespace, pod("gated", "print('ran')", schedulingGates=[{"name": "rlhf.io/hold"}]))
    cond = wait_for("PodScheduled=False SchedulingGated", lambda: next(
        (c for c in core.read_namespaced_pod("gated", namespace).status.conditions or []
         if c.type == "PodScheduled" and c.reason == "SchedulingGated"), None))
    assert cond.status == "False"
    time.sleep(3)  # several scheduling rounds: still not bound
    held = core.read_namespaced_pod("gated", namespace)
    assert held.status.phase == "Pending" and held.spec.node_name is None
    core.patch_namespaced_pod("gated", namespace, [{"op": "remove", "path": "/spec/schedulingGates"}])
    done = wait_for("the released pod to succeed", phase(core, namespace, "gated", "Succeeded"))
    assert done.spec.node_name


def test_two_gpu_nodes_each_run_a_pod_that_takes_all_their_gpus(core, namespace, cluster):
    nodes = {n.metadata.name: n for n in core.list_node(label_selector="rlhf.io/local-node=true").items}
    defaults = [parse_node_spec(s) for s in DEFAULT_NODES]
    assert {s.name for s in defaults} <= set(nodes)
    for spec in defaults:
        assert nodes[spec.name].status.allocatable[GPU] == "2"
    script = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(3)"
    for spec in defaults:
        body = pod(f"all-gpus-{spec.name}", script, nodeSelector={"kubernetes.io/hostname": spec.name})
        body["spec"]["containers"][0]["resources"] = {"limits": {GPU: "2"}}
        core.create_namespaced_pod(namespace, body)
    running = [wait_for(f"the pod on {s.name} running", phase(core, namespace, f"all-gpus-{s.name}", "Running",
                                                              "Succeeded")) for s in defaults]
    assert sorted(p.spec.node_name for p in running) == sorted(s.name for s in defaults)
    for spec in defaults:
        wait_for("done", phase(core, namespace, f"all-gpus-{spec.name}", "Succeeded"))
        assert cluster.logs(namespace, f"all-gpus-{spec.name}").strip() == "0,1"


def _install_crds(k8s) -> None:
    from rlhf_operator.crd_schema import all_crds

    ext = client.ApiextensionsV1Api(k8s)
    for body in all_crds().values():
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as e:
            if e.status != 409:
                raise
        name = body["metadata"]["name"]
        wait_for(f"CRD {name} established", lambda n=name: any(
            c.type == "Established" and c.status == "True" for c in ext.read_custom_resource_definition(n).status.conditions or []))


def test_a_cel_rule_refuses_a_bad_spec_at_apply_time_with_its_message(k8s, namespace):
    _install_crds(k8s)
    api = client.CustomObjectsApi(k8s)
    spec = {"model": {"path": "/m"}, "dataset": {"path": "/d"}, "deepspeed": {"bf16": True, "fp16": True}}
    body = {"apiVersion": "rlhf.io/v1alpha1", "kind": "SFTJob", "metadata": {"name": "both-precisions"}, "spec": spec}
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, "sftjobs", body)
    assert err.value.status == 422
    assert "spec.deepspeed: bf16 and fp16 are both true; choose one" in err.value.body
    spec["deepspeed"] = {"bf16": True}
    api.create_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, "sftjobs", body)  # the fixed spec is taken


def test_an_evicted_pod_is_stopped_and_removed(core, namespace, cluster):
    core.create_namespaced_pod(namespace, pod("evictee", "import os, time; print(os.getpid(), flush=True); time.sleep(600)"))
    running = wait_for("the pod running", phase(core, namespace, "evictee", "Running"))
    pid = int(running.status.container_statuses[0].container_id.rsplit("/", 1)[1])
    core.create_namespaced_pod_eviction("evictee", namespace, {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "evictee", "namespace": namespace}})

    def gone():
        try:
            core.read_namespaced_pod("evictee", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("the evicted pod removed", gone, timeout=30)
    assert not pid_alive(pid), "the evicted pod's process still runs"

