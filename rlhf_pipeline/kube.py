"""The few Kubernetes operations the main job needs: connect, apply manifests, wait, read logs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException

GROUP, VERSION = "rlhf.io", "v1alpha1"
PLURALS = {"SFTJob": "sftjobs", "RewardModelJob": "rewardmodeljobs", "PPOJob": "ppojobs", "DPOJob": "dpojobs"}


def api_client(kubeconfig: str) -> client.ApiClient:
    return config.new_client_from_config(config_file=kubeconfig)


def reachable(kubeconfig: str, timeout: float = 5.0) -> str | None:
    """None when the API server answers; otherwise why not."""
    try:
        api = api_client(kubeconfig)
        client.VersionApi(api).get_code(_request_timeout=timeout)
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", reported to the user
        return f"{type(e).__name__}: {e}"


def load_manifests(paths: list[Path]) -> list[dict]:
    docs = []
    for p in paths:
        for doc in yaml.safe_load_all(p.read_text()):
            if doc:
                docs.append(doc)
    return docs


def apply_crds(api: client.ApiClient, crd_dir: Path, timeout: float = 60.0) -> list[str]:
    ext = client.ApiextensionsV1Api(api)
    names = []
    for doc in load_manifests(sorted(crd_dir.glob("*.yaml"))):
        name = doc["metadata"]["name"]
        names.append(name)
        try:
            current = ext.read_custom_resource_definition(name)
            doc["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, doc)
        except ApiException as e:
            if e.status != 404:
                raise
            ext.create_custom_resource_definition(doc)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout:.0f} s: {conds}")
            time.sleep(0.5)
    return names


def apply(api: client.ApiClient, doc: dict, namespace: str) -> None:
    """Create the object, or replace it when it exists (repeatable)."""
    dyn = dynamic.DynamicClient(api)
    res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    doc.setdefault("metadata", {})["namespace"] = namespace
    try:
        res.create(body=doc, namespace=namespace)
    except ApiException as e:
        if e.status != 409:
            raise
        current = res.get(name=doc["metadata"]["name"], namespace=namespace)
        doc["metadata"]["resourceVersion"] = current.metadata.resourceVersion
        res.replace(body=doc, namespace=namespace)


def fresh_namespace(api: client.ApiClient, name: str, timeout: float = 120.0) -> None:
    """Delete the namespace if it exists (a previous run), then create it."""
    core = client.CoreV1Api(api)
    try:
        core.delete_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespace(name)
        except ApiException as e:
            if e.status == 404:
                break
            raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"namespace {name} still terminating after {timeout:.0f} s")
        time.sleep(1)
    core.create_namespace({"metadata": {"name": name}})


def list_jobs(api: client.ApiClient, namespace: str) -> list[dict]:
    co = client.CustomObjectsApi(api)
    out = []
    for kind, plural in PLURALS.items():
        for item in co.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]:
            item.setdefault("kind", kind)
            out.append(item)
    order = list(PLURALS)
    return sorted(out, key=lambda o: (order.index(o["kind"]), o["metadata"]["name"]))


def wait_pod_done(api: client.ApiClient, namespace: str, name: str, timeout: float) -> client.V1Pod:
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase in ("Succeeded", "Failed"):
            return pod
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {namespace}/{name} still {pod.status.phase} after {timeout:.0f} s")
        time.sleep(1)


def log_reader(api: client.ApiClient, local_cluster) -> Callable[[str, str], str]:
    """Pod logs: from the embedded node agent's files, or the API server on a real cluster."""
    core = client.CoreV1Api(api)

    def read(namespace: str, pod: str) -> str:
        if local_cluster is not None:
            try:
                return local_cluster.logs(namespace, pod)
            except (OSError, RuntimeError, FileNotFoundError):
                return ""
        try:
            return core.read_namespaced_pod_log(pod, namespace)
        except ApiException:
            return ""

    return read


def default_kubeconfig() -> str | None:
    path = os.environ.get("KUBECONFIG", "")
    return path.split(os.pathsep)[0] if path else None
