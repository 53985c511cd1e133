"""Fixtures for operator tests against the embedded cluster: the CRDs, and a real operator process
(`python -m rlhf_operator`) watching only the test's namespace, running the stand-in trainer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from op_helpers import REPO, STANDIN, free_port, wait_for
from rlhf_operator.crd_schema import GROUP, KINDS, VERSION
from support.kube import or_none

PLURALS = {kind: k.plural for kind, k in KINDS.items()}


@pytest.fixture(scope="session")
def crds(k8s):
    """Install (or update) the project's CRDs and wait until they are Established (as the main job does)."""
    from rlhf_pipeline.kube import apply_crds

    return apply_crds(k8s, REPO / "crds", timeout=30)


class Operator:
    """A real operator process; `kill()` is SIGKILL (no cleanup), `stop()` is a graceful SIGTERM."""

    def __init__(self, cluster, namespace: str, log_dir: Path, **settings: str):
        self.metrics_port = free_port()
        self.env = {
            **cluster.env,
            "RLHF_WATCH_NAMESPACES": namespace,
            "RLHF_TRAINER_COMMAND": json.dumps([sys.executable, str(STANDIN)]),
            "RLHF_METRICS_PORT": str(self.metrics_port),
            "RLHF_HEALTH_PORT": "0",
            "RLHF_RESYNC_SECONDS": "1",
            "RLHF_CHECKPOINT_SIZE": "1Gi",
            "RLHF_RESTART_BACKOFF_SECONDS": "1",  # restarts after a failure: 1 s, 2 s, 4 s ... (default 10 s)
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
        self.log_dir = log_dir
        self.runs = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> Operator:
        self.runs += 1
        self.log_path = self.log_dir / f"operator-{self.runs}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_operator"], env=self.env, cwd=REPO,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_for("the operator to start", lambda: self.proc.poll() is not None or "Initial authentication has finished" in self.log(), 30)
        assert self.proc.poll() is None, f"operator exited with {self.proc.returncode}:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc:
            self.log_file.close()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


@pytest.fixture
def operator_factory(cluster, namespace, crds, tmp_path, request):
    started: list[Operator] = []

    def make(**settings: str) -> Operator:
        op = Operator(cluster, namespace, tmp_path, **settings)
        started.append(op)
        return op.start()

    yield make
    for op in started:
        op.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for op in started:
            print(f"\n--- {op.log_path} (tail) ---\n" + "\n".join(op.log().splitlines()[-60:]))


@pytest.fixture
def operator(operator_factory):
    return operator_factory()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


class Jobs:
    """Create, read and wait for jobs in one namespace."""

    def __init__(self, k8s, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.api = client.CustomObjectsApi(k8s)
        self.core = client.CoreV1Api(k8s)

    def create(self, kind: str, name: str, spec: dict, **meta) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURALS[kind], body)

    def get(self, kind: str, name: str) -> dict | None:
        return or_none(self.api.get_namespaced_custom_object, GROUP, VERSION, self.ns, PLURALS[kind], name)

    def patch(self, kind: str, name: str, patch: dict) -> dict:
        return self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURALS[kind], name, patch)

    def delete(self, kind: str, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURALS[kind], name)

    def status(self, kind: str, name: str) -> dict:
        return (self.get(kind, name) or {}).get("status") or {}

    def condition(self, kind: str, name: str, ctype: str) -> dict | None:
        return next((c for c in self.status(kind, name).get("conditions", []) if c["type"] == ctype), None)

    def wait_phase(self, kind: str, name: str, phases, timeout: float = 60.0) -> dict:
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        st = wait_for(f"{kind} {name} phase in {phases}",
                      lambda: (s := self.status(kind, name)).get("phase") in phases and s, timeout)
        return st

    def pods(self, job: str) -> list:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"rlhf.io/job={job}").items

    def claim_dir(self, claim: str) -> Path:
        """Host directory behind a claim (the local provisioner uses hostPath volumes)."""
        pvc = self.core.read_namespaced_persistent_volume_claim(claim, self.ns)
        pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        return Path((pv.spec.host_path or pv.spec.local).path)

    def events(self, name: str) -> list:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]


@pytest.fixture
def jobs(k8s, namespace):
    return Jobs(k8s, namespace)
