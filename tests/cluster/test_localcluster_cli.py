"""The cluster's provisioning, process handling and CLI, without a running cluster (fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import kubernetes
import pytest

from localcluster import Cluster, ClusterError, controlplane, processes, provision


def _fake_binaries(bin_dir: Path, printed: str, names=provision.K8S.binaries) -> None:
    bin_dir.mkdir(parents=True)
    for name in names:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\necho '{printed}'\n")
        path.chmod(0o755)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localcluster", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_provision_skips_every_step_when_binaries_are_cached(tmp_path, monkeypatch):
    for name in provision.DEFAULT_COMPONENTS:
        c = provision.COMPONENTS[name]
        _fake_binaries(tmp_path / c.key / "bin", c.expect, c.binaries)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # any go call would fail
    monkeypatch.setenv("RLHF_GO", str(tmp_path / "no-go"))
    lines: list[str] = []
    assert provision.provision(log=lines.append) == tmp_path / f"k8s-{provision.K8S_VERSION}" / "bin"
    assert len(lines) == len(provision.DEFAULT_COMPONENTS) and all("nothing to do" in line for line in lines)
    assert not list(tmp_path.glob("*/build"))
    assert set(provision.binary_paths()) == {"kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd",
                                             "coredns"}


def test_provision_check_rejects_binaries_of_another_version(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_binaries(bin_dir, "Kubernetes v1.19.0")
    reason = provision.check_binaries(bin_dir)
    assert reason and "kube-apiserver" in reason and "v1.19.0" in reason and provision.K8S_VERSION in reason
    out = _cli("provision", "--check", "--cache-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and "missing" in out.stdout


def test_the_loopback_patch_applies_once_or_refuses_the_file():
    source = "func ValidateEndpointIP() {\n" + provision.LOOPBACK_PATCH_OLD + "\treturn allErrs\n}\n"
    patched = provision.patched_source(source)
    assert "IsLoopback" not in patched and "return allErrs" in patched
    with pytest.raises(ValueError, match="not found exactly once"):
        provision.patched_source(patched)


def test_a_too_old_go_is_refused_naming_the_version_needed(tmp_path, monkeypatch):
    fake = tmp_path / "go"
    fake.write_text("#!/bin/sh\necho 'go version go1.19.8 linux/amd64'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RLHF_GO", str(fake))
    with pytest.raises(provision.ProvisionError) as err:
        provision.step_go(provision.K8S, log=lambda _m: None)
    assert "step 'go'" in str(err.value) and "go1.19.8" in str(err.value) and "Go >= 1.24" in str(err.value)
    assert provision.parse_go_version("go version go1.26.8 linux/amd64") == (1, 26)


def test_a_failing_step_names_step_command_output_and_remedy():
    with pytest.raises(provision.ProvisionError) as err:
        provision.run_step("unpack", ["sh", "-c", "echo disk full >&2; exit 4"], "free some disk space",
                           log=lambda _m: None)
    text = str(err.value)
    assert "step 'unpack'" in text and "sh -c" in text and "exit code 4" in text
    assert "disk full" in text and "what to do: free some disk space" in text
    with pytest.raises(provision.ProvisionError, match="could not start"):
        provision.run_step("build", ["/nonexistent/make"], "install make", log=lambda _m: None)


def test_stop_ends_a_process_tree_including_escaped_children(tmp_path):
    tag = uuid.uuid4().hex
    sleeper = tmp_path / f"sleep-{tag}"  # a copy of sleep whose command line names this test
    shutil.copy(shutil.which("sleep"), sleeper)
    script = tmp_path / "tree.sh"
    # A child that ignores SIGTERM, and a grandchild that leaves the tree (new session, parent exits): only the
    # environment marker still ties it to the cluster.
    script.write_text(textwrap.dedent(f"""\
        trap '' TERM
        {sleeper} 300 &
        sh -c 'setsid {sleeper} 301 & exit 0'
        wait
        """))
    marker = uuid.uuid4().hex
    rec = processes.spawn("tree", ["sh", str(script)], tmp_path / "tree.log",
                          {**os.environ, processes.MARKER_ENV: marker})
    deadline = time.monotonic() + 30  # generous: the machine may be loaded by other tests
    while len(_pids_with(tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_pids_with(tag)) == 2
    left = processes.stop([[rec]], marker, [1.0])
    assert left == {}
    assert not processes.record_alive(rec)
    deadline = time.monotonic() + 5  # SIGKILLed processes can take a moment to be reaped on a loaded machine
    while _pids_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_with(tag) == []


def _pids_with(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "cmdline").read_bytes().decode(errors="replace") and processes.alive(
                        int(entry.name), processes.start_ticks(int(entry.name)) or -1):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_recycled_pid_is_not_ours():
    rec = processes.ProcRecord("x", os.getpid(), (processes.start_ticks(os.getpid()) or 0) + 1, "", ())
    assert not processes.record_alive(rec)


def test_kubeconfig_is_read_by_the_python_client(tmp_path):
    cfg = controlplane.kubeconfig_dict("c1", "https://127.0.0.1:6443", b"-----BEGIN CERTIFICATE-----\n", "tok")
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(cfg))
    conf = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=conf)
    assert conf.host == "https://127.0.0.1:6443"
    assert [s["value"] for s in conf.auth_settings().values()] == ["Bearer tok"]
    assert conf.verify_ssl and conf.ssl_ca_cert


def test_free_ports_are_distinct_and_bindable():
    ports = controlplane.free_ports(3)
    assert len(set(ports)) == 3 and all(controlplane.port_free(p) for p in ports)


def test_up_without_binaries_says_to_provision(tmp_path):
    out = _cli("up", "--state-dir", str(tmp_path / "c"), env={"RLHF_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 1
    assert "python -m localcluster provision" in out.stderr and "kube-apiserver" in out.stderr


def test_status_env_and_down_of_a_cluster_never_started(tmp_path):
    state = tmp_path / "c"
    out = _cli("status", "--state-dir", str(state))
    assert out.returncode == 1 and "no cluster runs" in out.stdout
    out = _cli("env", env={"RLHF_CLUSTER_DIR": str(state)})
    assert out.returncode == 0 and out.stdout.strip() == f"export KUBECONFIG={state / 'kubeconfig'}"
    out = _cli("down", "--state-dir", str(state), "--purge")
    assert out.returncode == 0 and "no cluster" in out.stdout


def test_logs_reads_the_node_agents_files_and_names_what_is_missing(tmp_path):
    c = Cluster(tmp_path)
    pod_dir = tmp_path / "node" / "pods" / "ns1" / "p1"
    pod_dir.mkdir(parents=True)
    (pod_dir / "main.log").write_text("hello from main\n")
    assert c.logs("ns1", "p1") == "hello from main\n"
    (pod_dir / "sidecar.log").write_text("side\n")
    with pytest.raises(ClusterError, match="main, sidecar: name one"):
        c.logs("ns1", "p1")
    assert c.logs("ns1", "p1", "sidecar") == "side\n"
    with pytest.raises(ClusterError, match="no log for container 'other'"):
        c.logs("ns1", "p1", "other")
    out = _cli("logs", "ns1", "nope", "--state-dir", str(tmp_path))
    assert out.returncode == 1 and "no logs for pod ns1/nope" in out.stderr
    out = _cli("logs", "ns1", "p1", "-c", "main", "--state-dir", str(tmp_path))
    assert out.returncode == 0 and out.stdout == "hello from main\n"
