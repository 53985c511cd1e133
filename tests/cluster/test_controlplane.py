"""The embedded control plane against itself: kubeconfig and TLS, RBAC, garbage collection, GPU scheduling,
a second cluster side by side, `down` leaving nothing, and the watchdog."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from support.polling import wait_for

from localcluster import Cluster, controlplane, processes, provision


def _pod(name: str, command: list[str], *, gpus: str | None = None, owner: dict | None = None,
         node_selector: dict | None = None) -> dict:
    resources = {"limits": {"nvidia.com/gpu": gpus}} if gpus else {}
    meta: dict = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "nodeSelector": node_selector,
                 "containers": [{"name": "main", "image": "python:3.11-slim", "command": command,
                                 "resources": resources}]},
    }


def _gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def test_kubeconfig_serves_kubectl_and_the_python_client_over_verified_tls(cluster, k8s):
    assert Path(cluster.kubeconfig).stat().st_mode & 0o077 == 0, "kubeconfig holds the admin token: owner-only"
    out = subprocess.run(["kubectl", "get", "--raw", "/readyz"], env=cluster.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert client.VersionApi(k8s).get_code().git_version == provision.K8S_VERSION
    assert k8s.configuration.verify_ssl and k8s.configuration.ssl_ca_cert
    # The server's certificate verifies against the kubeconfig's CA, and anonymous requests are refused.
    ctx = ssl.create_default_context(cafile=k8s.configuration.ssl_ca_cert)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(k8s.configuration.host + "/api/v1/namespaces", context=ctx, timeout=10)
    assert err.value.code == 401


def test_rbac_denies_a_token_without_rights_until_a_role_grants_them(k8s, namespace):
    core, rbac = client.CoreV1Api(k8s), client.RbacAuthorizationV1Api(k8s)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": 600}}).status.token
    cfg = client.Configuration(host=k8s.configuration.host)
    cfg.ssl_ca_cert = k8s.configuration.ssl_ca_cert
    cfg.api_key = {"BearerToken": f"Bearer {token}"}
    with client.ApiClient(cfg) as reader_api:
        reader = client.CoreV1Api(reader_api)
        with pytest.raises(ApiException) as err:
            reader.list_namespaced_pod(namespace)
        assert err.value.status == 403
        assert f"system:serviceaccount:{namespace}:reader" in err.value.body

        rbac.create_namespaced_role(namespace, {"metadata": {"name": "pod-reader"}, "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})

        def can_list() -> bool:
            try:
                reader.list_namespaced_pod(namespace)
            except ApiException as exc:
                assert exc.status == 403
                return False
            return True

        wait_for("the role binding to take effect", can_list, timeout=30)
        for forbidden in (lambda: reader.create_namespaced_pod(namespace, _pod("x", ["true"])),
                          lambda: reader.list_namespaced_pod("default"),
                          lambda: reader.list_namespaced_secret(namespace)):
            with pytest.raises(ApiException) as err:
                forbidden()
            assert err.value.status == 403

    cfg.api_key = {"BearerToken": "Bearer not-a-token"}
    with client.ApiClient(cfg) as stranger_api, pytest.raises(ApiException) as err:
        client.CoreV1Api(stranger_api).list_namespaced_pod(namespace)
    assert err.value.status == 401


def test_garbage_collector_deletes_the_pods_an_owner_owns(k8s, namespace):
    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    # One pod runs on the node; one can never be scheduled (it stays unbound, Pending).
    core.create_namespaced_pod(namespace, _pod("runs", [sys.executable, "-c", "import time; time.sleep(600)"],
                                               owner=ref))
    core.create_namespaced_pod(namespace, _pod("pending", ["true"], owner=ref,
                                               node_selector={"no-such-label": "x"}))
    core.create_namespaced_pod(namespace, _pod("unowned", ["true"], node_selector={"no-such-label": "x"}))
    wait_for("pod 'runs' to run", lambda: core.read_namespaced_pod("runs", namespace).status.phase == "Running")

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    wait_for("the owned pods to be deleted",
             lambda: _gone(core, namespace, "runs") and _gone(core, namespace, "pending"), timeout=60)
    assert not _gone(core, namespace, "unowned")


def test_scheduler_binds_a_gpu_job_to_the_gpu_node_and_holds_back_what_does_not_fit(k8s, namespace):
    core, batch = client.CoreV1Api(k8s), client.BatchV1Api(k8s)
    gpu_nodes = {n.metadata.name: n.status.allocatable.get("nvidia.com/gpu", "0")
                 for n in core.list_node().items}
    assert any(int(v) >= 1 for v in gpu_nodes.values()), f"no node offers nvidia.com/gpu: {gpu_nodes}"
    batch.create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gpu-job"},
        "spec": {"backoffLimit": 0, "template": {"spec": _pod(
            "unused", [sys.executable, "-c", "print('gpu job ran')"], gpus="1")["spec"]}}})
    pod = wait_for("the Job's pod to be bound", lambda: next(
        (p for p in core.list_namespaced_pod(namespace, label_selector="job-name=gpu-job").items
         if p.spec.node_name), None))
    assert int(gpu_nodes[pod.spec.node_name]) >= 1
    wait_for("the Job to succeed", lambda: (batch.read_namespaced_job("gpu-job", namespace).status.succeeded or 0) >= 1)

    too_many = str(sum(int(v) for v in gpu_nodes.values()) + 1)
    core.create_namespaced_pod(namespace, _pod("greedy", ["true"], gpus=too_many))

    def unschedulable():
        conds = core.read_namespaced_pod("greedy", namespace).status.conditions or []
        return next((c for c in conds if c.type == "PodScheduled" and c.reason == "Unschedulable"), None)

    cond = wait_for("the scheduler to report the pod unschedulable", unschedulable, timeout=30)
    assert "nvidia.com/gpu" in cond.message
    assert core.read_namespaced_pod("greedy", namespace).spec.node_name is None


def _find_cmdline(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "cmdline").read_bytes():
                    ticks = processes.start_ticks(int(entry.name))
                    if ticks is not None and processes.alive(int(entry.name), ticks):
                        pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_second_cluster_runs_beside_the_first_and_down_leaves_no_process(cluster, k8s, tmp_path, record_property):
    second = Cluster(tmp_path / "second", name="second")
    try:
        seconds = second.up()
        record_property("second_cluster_up_seconds", round(seconds, 1))
        print(f"second cluster up in {seconds:.1f} s")
        assert seconds < 120
        assert second.server != k8s.configuration.host
        assert Path(second.kubeconfig) != Path(cluster.kubeconfig)

        # Separate API servers: a namespace made in the second is absent from the first.
        run = subprocess.run(["kubectl", "create", "namespace", "only-in-second"], env=second.env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "only-in-second" not in {n.metadata.name for n in client.CoreV1Api(k8s).list_namespace().items}

        # A running pod in the second cluster: its process must also be gone after `down`.
        tag = f"pod-{uuid.uuid4().hex}"
        manifest = _pod("sleeper", [sys.executable, "-c", "import time, sys; time.sleep(600)", tag])
        subprocess.run(["kubectl", "apply", "-n", "only-in-second", "-f", "-"], input=json.dumps(manifest),
                       env=second.env, capture_output=True, text=True, timeout=60, check=True)
        wait_for("the pod's process", lambda: _find_cmdline(tag), timeout=60)
        records = second.records()
        assert {r.role for r in records} >= {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                            "node-agent"}
        marker = json.loads((tmp_path / "second" / "cluster.json").read_text())["marker"]
    finally:
        second.down()

    assert not any(processes.record_alive(r) for r in records)
    assert _find_cmdline(tag) == []
    assert processes.marked(marker) == {}
    assert not _find_cmdline(str(tmp_path / "second"))
    # The first cluster is untouched.
    assert client.VersionApi(k8s).get_code().git_version == provision.K8S_VERSION


@pytest.mark.cluster
def test_watchdog_stops_the_cluster_when_its_owner_dies(tmp_path):
    owner = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        c = Cluster(tmp_path / "watched", node_agent=False)
        c.up(watch_pid=owner.pid, log=lambda _m: None)
        records = c.records()
        assert "watchdog" in {r.role for r in records} and all(processes.record_alive(r) for r in records)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        wait_for("the watchdog to stop the cluster",
                 lambda: not any(processes.record_alive(r) for r in records), timeout=40)
        assert not c.running()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        Cluster(tmp_path / "watched").down(log=lambda _m: None)


@pytest.mark.cluster
def test_up_retries_on_new_ports_when_a_picked_port_is_taken(tmp_path, monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks = iter([[squatter.getsockname()[1], *controlplane.free_ports(len(controlplane.PORT_NAMES) - 1)]])
    real_free_ports = controlplane.free_ports
    monkeypatch.setattr(controlplane, "free_ports", lambda n: next(picks, None) or real_free_ports(n))
    lines: list[str] = []
    c = Cluster(tmp_path / "c", node_agent=False)
    try:
        c.up(log=lines.append)
        assert any("retrying on new ports" in line for line in lines)
        assert c.get("/readyz") == (200, "ok")
        assert json.loads((tmp_path / "c" / "cluster.json").read_text())["ports"]["etcd"] != squatter.getsockname()[1]
    finally:
        c.down(log=lambda _m: None)
        squatter.close()


@pytest.mark.cluster
def test_up_moves_aside_etcd_data_of_another_version(tmp_path):
    """A state dir from an older checkout (etcd 3.4's v2 WAL of the v1.20 cluster) made etcd 3.6 panic at start."""
    old = tmp_path / "c" / "etcd" / "member" / "wal"
    old.mkdir(parents=True)
    (old / "0000000000000000-0000000000000000.wal").write_bytes(b"\0not a WAL etcd 3.6 can read")
    lines: list[str] = []
    c = Cluster(tmp_path / "c", node_agent=False)
    try:
        c.up(log=lines.append)
        assert c.get("/readyz") == (200, "ok")
        moved = [line for line in lines if "moved to" in line]
        assert moved and "no etcd.version" in moved[0], lines
        aside = sorted((tmp_path / "c").glob("etcd.old-*"))
        assert len(aside) == 1 and (aside[0] / "member" / "wal").is_dir()
        assert provision.ETCD.version in (tmp_path / "c" / "etcd.version").read_text()
        c.down(log=lambda _m: None)
        lines.clear()
        c.up(log=lines.append)  # same versions: the data stays
        assert not any("moved to" in line for line in lines) and len(list((tmp_path / "c").glob("etcd.old-*"))) == 1
    finally:
        c.down(log=lambda _m: None)
