"""Kueue on demand (`python -m localcluster up --with kueue`): the job-queueing controller as a local process.

Its CRDs and webhook manifests are copied from the pinned module at provision time (<cache>/kueue-<v>/manifests).
The webhooks are registered by URL on 127.0.0.1 with a serving certificate from the cluster's CA (no Service
routing, no certificate rotation); only those for Kueue's own kinds, batch/v1 Jobs and Pods, the integrations
turned on. Kueue's pod webhooks (failurePolicy Fail) see only pods labelled kueue.x-k8s.io/queue-name, outside
kube-system and kueue-system: every other pod is created while Kueue is down. That is how the operator's queued
jobs are admitted (a pod group per job: operator/rlhf_operator/queueing.py).
Then a default ResourceFlavor, a ClusterQueue `cluster-queue` holding the nodes' CPU, memory and GPUs, and a
LocalQueue `user-queue` in `default` are created. A Job or a pod joins a queue with the label
kueue.x-k8s.io/queue-name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from .nodeagent.node import GPU, parse_node_spec
from .nodeagent.quantity import parse_quantity

NAMESPACE = "kueue-system"
API = "kueue.x-k8s.io/v1beta2"
FLAVOR, CLUSTER_QUEUE, LOCAL_QUEUE = "default-flavor", "cluster-queue", "user-queue"
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch", ""}  # "": the core group (pods)
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SYSTEM_NAMESPACES = ["kube-system", NAMESPACE]
MANIFEST_DIRS = ("config/components/crd/bases", "config/components/webhook")


# Without its internal certificate management Kueue reads its metrics certificate from this fixed path: the
# manager runs in a private mount namespace where the cluster's Kueue certificate directory is bound there.
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"


def manager_argv(binary: str, config_file: str, cert_dir: str) -> list[str]:
    bind = f'mkdir -p {METRICS_CERT_DIR} && mount --bind "$0" {METRICS_CERT_DIR} && exec "$@"'
    # The on-demand visibility API server is left off: it would need an APIService and its own certificate path.
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, cert_dir,
            binary, f"--config={config_file}", "--feature-gates=VisibilityOnDemand=false"]


def config(webhook_port: int, health_port: int, metrics_port: int, cert_dir: str) -> dict:
    """Kueue's Configuration: loopback ports, our certificate, no leader election, batch/v1 Jobs and pods (the pod
    integration needs a namespace selector: every namespace but the system ones, as the webhooks)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": cert_dir},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job", "pod"]},
        "managedJobsNamespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": SYSTEM_NAMESPACES}]},
    }


def webhook_configurations(manifests: str, port: int, ca_pem: bytes) -> list[dict]:
    """Kueue's webhook configurations, reduced to WEBHOOK_GROUPS and pointed at https://127.0.0.1:port; the pod
    webhooks only for queued pods outside the system namespaces."""
    import base64

    out = []
    for doc in yaml.safe_load_all(manifests):
        if not doc or doc.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook = {**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}",
                                             "caBundle": base64.b64encode(ca_pem).decode()}}
            if "" in groups:
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
                hook["namespaceSelector"] = {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": SYSTEM_NAMESPACES}]}
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                    "metadata": {"name": f"kueue-{doc['metadata']['name']}"}, "webhooks": hooks})
    return out


def quota(node_specs: Iterable[str]) -> dict[str, str]:
    """The nodes' summed cpu, memory and GPUs: what the default ClusterQueue lends."""
    total = {"cpu": 0, "memory": 0, GPU: 0}
    for spec in node_specs:
        node = parse_node_spec(spec)
        for name in total:
            total[name] += parse_quantity(node.capacity.get(name, "0"))
    return {name: str(int(value)) for name, value in total.items()}


def default_queues(node_specs: Iterable[str]) -> list[tuple[str, dict]]:
    """(API path, object) of the default ResourceFlavor, ClusterQueue and LocalQueue."""
    lend = quota(node_specs)
    cq = {"apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
          "spec": {"namespaceSelector": {}, "resourceGroups": [{
              "coveredResources": list(lend),
              "flavors": [{"name": FLAVOR, "resources": [{"name": n, "nominalQuota": q} for n, q in lend.items()]}]}]}}
    base = f"/apis/{API}"
    return [
        (f"{base}/resourceflavors", {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}}),
        (f"{base}/clusterqueues", cq),
        (f"{base}/namespaces/default/localqueues", {"apiVersion": API, "kind": "LocalQueue",
                                                    "metadata": {"name": LOCAL_QUEUE, "namespace": "default"},
                                                    "spec": {"clusterQueue": CLUSTER_QUEUE}}),
    ]


def crds(manifest_dir: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((manifest_dir / "bases").glob("*.yaml"))]


def write_config(path: Path, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
