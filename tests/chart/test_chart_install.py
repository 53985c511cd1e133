"""`helm install` of the chart into the embedded cluster (real Helm engine, real API server), then the real
operator running with exactly the chart's ServiceAccount permissions (a token of that ServiceAccount from
the TokenRequest API, as a pod would get it) completes a job, and what its Roles do not grant is denied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from chart_helpers import CHART_DIR, ROOT
from rlhf_operator import names
from support.polling import wait_for
from support.ports import free_port

STANDIN_TRAINER = ROOT / "tests" / "support" / "standin_trainer.py"
# The Deployment's pod cannot run here (no image registry, no container runtime): keep it unscheduled, and
# run the same program with the same settings as a local process instead.
NOWHERE = {"operator": {"nodeSelector": {"rlhf.io/test-no-such-node": "true"}}}
CRD_NAMES = ["sftjobs.rlhf.io", "rewardmodeljobs.rlhf.io", "ppojobs.rlhf.io", "dpojobs.rlhf.io"]


class Release:
    """One `helm install` of the chart; uninstalled (and its webhook configurations removed) at the end."""

    def __init__(self, cluster, k8s, namespace: str, values: dict):
        self.cluster, self.k8s, self.namespace = cluster, k8s, namespace
        self.name = f"t{uuid.uuid4().hex[:6]}"
        self.config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
        result = self.config.install(str(CHART_DIR), self.name, values, namespace=namespace, timeout=120)
        assert result["status"] == "deployed", result
        self.docs = [d for d in yaml.safe_load_all(result["manifest"]) if d]

    def one(self, kind: str) -> dict:
        (found,) = [d for d in self.docs if d["kind"] == kind]
        return found

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def uninstall(self) -> None:
        from kubernetes import client

        self.config.uninstall(self.name, ignore_not_found=True, timeout=60)
        self.config.close()
        name = self.webhook_config_name()
        if name is None:
            return
        adm = client.AdmissionregistrationV1Api(self.k8s)
        for delete in (adm.delete_validating_webhook_configuration, adm.delete_mutating_webhook_configuration):
            try:
                delete(name)
            except client.ApiException as e:
                if e.status != 404:
                    raise

    def webhook_config_name(self) -> str | None:
        env = {e["name"]: e.get("value") for e in self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env.get("RLHF_WEBHOOK_CONFIG_NAME")

    def service_account_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig holding a token of the chart's ServiceAccount, nothing else."""
        from kubernetes import client

        sa = self.one("ServiceAccount")["metadata"]["name"]
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
        token = client.CoreV1Api(self.k8s).create_namespaced_service_account_token(sa, self.namespace, request).status.token
        config = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        config["users"] = [{"name": "operator-sa", "user": {"token": token}}]
        for ctx in config["contexts"]:
            ctx["context"]["user"] = "operator-sa"
        path.write_text(yaml.safe_dump(config))
        return path


class LocalOperator:
    """`python -m rlhf_operator` with the env of the release's Deployment and the ServiceAccount's token."""

    def __init__(self, release: Release, kubeconfig: Path, log: Path):
        container = release.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # Only what a pod gets from its environment, or what needs this machine's loopback, differs:
        env.update(
            KUBECONFIG=str(kubeconfig),  # in a pod: the mounted ServiceAccount token
            POD_NAMESPACE=release.namespace, POD_NAME="operator-local",  # in a pod: fieldRefs
            RLHF_METRICS_PORT=str(free_port()), RLHF_HEALTH_PORT=str(free_port()),
            RLHF_TRAINER_COMMAND=json.dumps([sys.executable, str(STANDIN_TRAINER)]),  # fast stand-in trainer
            RLHF_RESYNC_SECONDS="1",
            PYTHONUNBUFFERED="1",
        )
        env.update({k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ})
        if env.get("RLHF_WEBHOOK_ENABLED") == "true":
            # No Service routing without kube-proxy: the API server calls the webhook by URL instead.
            env.pop("RLHF_WEBHOOK_SERVICE")
            env.update(RLHF_WEBHOOK_HOST="127.0.0.1", RLHF_WEBHOOK_PORT=str(free_port()))
        self.env, self.log_path = env, log
        self.sa_user = f"system:serviceaccount:{release.namespace}:{release.one('ServiceAccount')['metadata']['name']}"
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_operator"], env=env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for("the operator to start", lambda: self.proc.poll() is not None or "Initial authentication has finished"
                 in self.log(), 60)
        assert self.proc.poll() is None, f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def rbac_denials(self) -> list[str]:
        """Requests of the operator that the API server refused for lack of RBAC."""
        return [ln for ln in self.log().splitlines() if f'User "{self.sa_user}" cannot' in ln]


def _sa_api(kubeconfig: Path):
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


def _denied(call) -> str:
    from kubernetes.client import ApiException

    with pytest.raises(ApiException) as err:
        call()
    assert err.value.status == 403, err.value
    return json.loads(err.value.body)["message"]


def _crds_established(k8s) -> bool:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(k8s)
    for name in CRD_NAMES:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        if not any(c.type == "Established" and c.status == "True" for c in conds):
            return False
    return True


def _sft_job(name: str) -> dict:
    return {"apiVersion": "rlhf.io/v1alpha1", "kind": "SFTJob", "metadata": {"name": name},
            "spec": {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": 6},
                     "checkpoint": {"everySteps": 3}, "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.05"}]}}


def _run_job(k8s, namespace: str, name: str, timeout: float = 40) -> dict:
    """Create a short SFTJob and wait until it finishes. The stand-in trainer needs a few seconds; the
    timeout also catches an operator that starts watching late (e.g. stuck retrying forbidden requests)."""
    from kubernetes import client

    jobs = client.CustomObjectsApi(k8s)
    jobs.create_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, "sftjobs", _sft_job(name))

    def finished():
        st = jobs.get_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, "sftjobs", name).get("status") or {}
        return st.get("phase") in ("Succeeded", "Failed") and st
    return wait_for(f"SFTJob {namespace}/{name} to finish", finished, timeout)


def _assert_installed(release: Release, k8s) -> None:
    from kubernetes import client

    wait_for("the CRDs to be Established", lambda: _crds_established(k8s), 30)
    core, rbac = client.CoreV1Api(k8s), client.RbacAuthorizationV1Api(k8s)
    ns = release.namespace
    core.read_namespaced_service_account(release.one("ServiceAccount")["metadata"]["name"], ns)
    for svc in release.all("Service"):
        core.read_namespaced_service(svc["metadata"]["name"], ns)
    client.AppsV1Api(k8s).read_namespaced_deployment(release.one("Deployment")["metadata"]["name"], ns)
    for cr in release.all("ClusterRole"):
        live = rbac.read_cluster_role(cr["metadata"]["name"])
        assert len(live.rules) == len(cr["rules"])
    for crb in release.all("ClusterRoleBinding"):
        rbac.read_cluster_role_binding(crb["metadata"]["name"])
    for role in release.all("Role"):
        rbac.read_namespaced_role(role["metadata"]["name"], role["metadata"]["namespace"])
    for rb in release.all("RoleBinding"):
        rbac.read_namespaced_role_binding(rb["metadata"]["name"], rb["metadata"]["namespace"])


@pytest.fixture
def extra_namespace(k8s):
    from kubernetes import client

    core = client.CoreV1Api(k8s)
    created = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": name, "labels": {"rlhf.io/test": "1"}}})
        created.append(name)
        return name
    yield make
    for name in created:
        core.delete_namespace(name)


def test_cluster_wide_install_runs_a_job_with_only_the_chart_permissions(cluster, k8s, namespace, tmp_path):
    from kubernetes import client

    release = Release(cluster, k8s, namespace, NOWHERE)
    operator = None
    try:
        _assert_installed(release, k8s)
        assert not release.all("Role") and len(release.all("ClusterRole")) == 1
        sa_config = release.service_account_kubeconfig(tmp_path / "sa-kubeconfig")
        operator = LocalOperator(release, sa_config, tmp_path / "operator.log")
        status = _run_job(k8s, namespace, "sft-rbac")
        assert status["phase"] == "Succeeded", (status, operator.log()[-3000:])
        # The operator created and keeps its webhook configurations: the named create/patch rights work.
        adm = client.AdmissionregistrationV1Api(k8s)
        assert adm.read_validating_webhook_configuration(release.webhook_config_name()).webhooks
        assert not operator.rbac_denials(), "\n".join(operator.rbac_denials())

        sa = _sa_api(sa_config)
        core, rbac, jobs = client.CoreV1Api(sa), client.RbacAuthorizationV1Api(sa), client.CustomObjectsApi(sa)
        # Everything the Roles do not list is refused by the real API server.
        assert "cannot list resource \"secrets\"" in _denied(lambda: core.list_namespaced_secret(namespace))
        _denied(lambda: core.delete_namespaced_persistent_volume_claim(names.pvc_name("SFTJob", "sft-rbac"), namespace))
        _denied(lambda: core.delete_namespaced_config_map(names.configmap_name("SFTJob", "sft-rbac"), namespace))
        _denied(lambda: jobs.patch_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, "sftjobs", "sft-rbac",
                                                            {"spec": {"suspend": True}}))
        _denied(lambda: rbac.create_cluster_role_binding({
            "metadata": {"name": f"escalate-{namespace}"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                                       "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}]}))
        _denied(lambda: adm_patch_other(sa))
    finally:
        if operator:
            operator.stop()
        release.uninstall()
    assert not [r for r in client.RbacAuthorizationV1Api(k8s).list_cluster_role().items
                if r.metadata.name == release.one("ClusterRole")["metadata"]["name"]]


def adm_patch_other(api):
    """Patch a webhook configuration the chart does not name (the API server's own would do)."""
    from kubernetes import client

    return client.AdmissionregistrationV1Api(api).patch_validating_webhook_configuration(
        "someone-elses-webhook", {"metadata": {"labels": {"x": "y"}}})


def test_namespaced_install_is_confined_to_the_watched_namespaces(cluster, k8s, namespace, extra_namespace, tmp_path):
    from kubernetes import client

    watched, other = extra_namespace("watched"), extra_namespace("other")
    release = Release(cluster, k8s, namespace, {**NOWHERE, "operator": {**NOWHERE["operator"], "watchNamespaces": [watched]},
                                                "webhook": {"enabled": False}})
    operator = None
    try:
        _assert_installed(release, k8s)
        assert [r["metadata"]["namespace"] for r in release.all("Role")] == [watched]
        cluster_wide = {res for rule in release.one("ClusterRole")["rules"] for res in rule["resources"]}
        assert cluster_wide == {"customresourcedefinitions", "namespaces"}  # cluster-scoped reads only
        sa_config = release.service_account_kubeconfig(tmp_path / "sa-kubeconfig")
        operator = LocalOperator(release, sa_config, tmp_path / "operator.log")
        status = _run_job(k8s, watched, "sft-ns")
        assert status["phase"] == "Succeeded", (status, operator.log()[-3000:])
        assert not operator.rbac_denials(), "\n".join(operator.rbac_denials())
        # A job outside the watched namespaces is not touched ...
        client.CustomObjectsApi(k8s).create_namespaced_custom_object("rlhf.io", "v1alpha1", other, "sftjobs",
                                                                    _sft_job("ignored"))
        time.sleep(3)
        assert not client.CoreV1Api(k8s).list_namespaced_pod(other).items
        # ... and the ServiceAccount could not touch it anyway.
        sa = client.CoreV1Api(_sa_api(sa_config))
        pod = {"metadata": {"name": "intruder"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        assert 'in the namespace "' + other + '"' in _denied(lambda: sa.create_namespaced_pod(other, pod))
        _denied(lambda: sa.list_pod_for_all_namespaces())
        _denied(lambda: sa.list_namespaced_pod(namespace))  # not even the release namespace
    finally:
        if operator:
            operator.stop()
        release.uninstall()
