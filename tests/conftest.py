"""Shared fixtures: one embedded Kubernetes cluster per test session, a fresh namespace per test, an API client.

The cluster starts only when a test asks for it (directly or through `namespace`/`k8s`); such tests get the
`cluster` marker, so `pytest -m "not cluster"` runs the rest. Each session gets its own state directory
under /tmp and its own ports, so parallel sessions do not collide. To reuse a running cluster instead:

    RLHF_TEST_CLUSTER_DIR=<state dir of `python -m localcluster up`>   (logs work; not stopped at the end)
    RLHF_TEST_KUBECONFIG=<kubeconfig of any cluster>                   (cluster.logs() is unavailable)
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid

import pytest

from localcluster import Cluster

_UP_SECONDS: list[float] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


def pytest_terminal_summary(terminalreporter):
    if _UP_SECONDS:
        terminalreporter.write_line(f"embedded cluster: up in {_UP_SECONDS[0]:.1f} s")


class KubeconfigCluster:
    """A cluster known only by its kubeconfig (RLHF_TEST_KUBECONFIG)."""

    state_dir = None

    def __init__(self, kubeconfig: str):
        self.kubeconfig = os.path.abspath(kubeconfig)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        raise RuntimeError("pod logs live in the node agent's state directory, unknown with RLHF_TEST_KUBECONFIG: "
                           "set RLHF_TEST_CLUSTER_DIR to the cluster's state directory instead")


@pytest.fixture(scope="session")
def cluster(request):
    """The session's cluster: `.kubeconfig`, `.env`, `.state_dir`, `.logs(namespace, pod, container=None)`."""
    if os.environ.get("RLHF_TEST_CLUSTER_DIR"):
        reused = Cluster(os.environ["RLHF_TEST_CLUSTER_DIR"])
        if not reused.running():
            pytest.fail(f"RLHF_TEST_CLUSTER_DIR={reused.state_dir}: no running cluster there "
                        f"(start one: python -m localcluster up --state-dir {reused.state_dir})")
        yield reused
        return
    if os.environ.get("RLHF_TEST_KUBECONFIG"):
        yield KubeconfigCluster(os.environ["RLHF_TEST_KUBECONFIG"])
        return
    session = Cluster(tempfile.mkdtemp(prefix="rlhf-test-cluster-"), name="rlhf-test")
    started = False
    try:
        # watch_pid: if this pytest process is killed hard, a watchdog still stops the cluster.
        _UP_SECONDS.append(session.up(watch_pid=os.getpid()))
        started = True
        yield session
    finally:
        keep = not started or request.session.testsfailed > 0
        session.down(purge=not keep, log=lambda _msg: None)
        if keep:
            print(f"\nembedded cluster stopped; its logs are kept in {session.state_dir}")


@pytest.fixture(scope="session")
def k8s(cluster):
    """A `kubernetes.client.ApiClient` for the session's cluster (admin)."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(config_file=cluster.kubeconfig)
    yield api
    api.close()


def _dns_label(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "t"


@pytest.fixture
def namespace(k8s, request):
    """A fresh namespace named after the test; deleted afterwards (its pods are stopped by the node agent)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    name = f"{_dns_label(request.node.name, 48)}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"rlhf.io/test": "1"})))
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
