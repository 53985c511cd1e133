"""Node registration, status heartbeats and the node Lease: what keeps a node Ready.

The node lifecycle controller marks a node NotReady (and later evicts its pods) when neither
its status nor its Lease in kube-node-lease has been renewed for --node-monitor-grace-period
(40 s by default), so both are renewed every heartbeat.
"""

from __future__ import annotations

import logging
import platform
import threading
from dataclasses import dataclass, field

from ..provision import K8S_VERSION
from .kube import STRATEGIC_PATCH, ApiError, Kube, now_micro, now_rfc3339, path_for
from .quantity import parse_quantity

log = logging.getLogger(__name__)

GPU = "nvidia.com/gpu"
DEFAULT_NODE_NAME = "local-gpu-0"
# Two GPU nodes, so that scheduling across nodes (and a pod per node) is exercised as on a real cluster.
DEFAULT_NODES = ("local-gpu-0:gpu=2", "local-gpu-1:gpu=2")
DEFAULT_CAPACITY = {"cpu": "16", "memory": "64Gi", GPU: "1", "pods": "110", "ephemeral-storage": "200Gi"}
RESOURCE_ALIASES = {"gpu": GPU, "gpus": GPU, "mem": "memory"}
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
# Taints the node lifecycle controller / admission put on a node that is not (yet) Ready.
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
AGENT_VERSION = f"{K8S_VERSION}-local"


@dataclass
class NodeSpec:
    name: str
    capacity: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CAPACITY))
    taints: list[dict] = field(default_factory=list)  # set only at registration, like --register-with-taints

    @property
    def gpus(self) -> int:
        return int(parse_quantity(self.capacity.get(GPU, "0")))


def parse_node_spec(text: str) -> NodeSpec:
    """"NAME:cpu=16,memory=64Gi,gpu=1" -> NodeSpec; unnamed resources keep their defaults."""
    name, _, resources = text.partition(":")
    name = name.strip()
    if not name or name.lower() != name or " " in name:
        raise ValueError(f"--node {text!r}: node name must be a non-empty lower-case DNS name, "
                         "e.g. local-gpu-0:cpu=16,memory=64Gi,gpu=1")
    spec = NodeSpec(name)
    for item in filter(None, (p.strip() for p in resources.split(","))):
        key, eq, value = item.partition("=")
        key = RESOURCE_ALIASES.get(key.strip(), key.strip())
        if not eq or not key:
            raise ValueError(f"--node {text!r}: {item!r} is not RESOURCE=QUANTITY (e.g. gpu=2, memory=64Gi)")
        try:
            parse_quantity(value)
        except ValueError as e:
            raise ValueError(f"--node {text!r}: resource {key}: {e}") from None
        spec.capacity[key] = value.strip()
    return spec


def parse_taint(text: str) -> dict:
    """"KEY=VALUE:EFFECT" or "KEY:EFFECT" -> a taint."""
    key_value, _, effect = text.rpartition(":")
    key, _, value = key_value.partition("=")
    if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"--taint {text!r} must be KEY[=VALUE]:EFFECT with EFFECT NoSchedule, PreferNoSchedule "
                         "or NoExecute")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def node_labels(spec: NodeSpec) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "local",
        "rlhf.io/local-node": "true",
    }
    if spec.gpus:
        labels["nvidia.com/gpu.present"] = "true"
        labels["nvidia.com/gpu.count"] = str(spec.gpus)
    return labels


def node_conditions(ready: bool, now: str, transitions: dict[str, str]) -> list[dict]:
    """The four kubelet conditions; lastTransitionTime only moves when a status flips."""
    rows = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "node agent has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "local node agent is posting ready status")
        if ready else ("Ready", "False", "KubeletNotReady", "local node agent stopped"),
    ]
    out = []
    for ctype, status, reason, message in rows:
        key = f"{ctype}={status}"
        transitions.setdefault(key, now)
        for other in [k for k in transitions if k.startswith(ctype + "=") and k != key]:
            del transitions[other]
        out.append({"type": ctype, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": transitions[key]})
    return out


def node_status(spec: NodeSpec, ready: bool, now: str, transitions: dict[str, str]) -> dict:
    return {
        "capacity": dict(spec.capacity),
        "allocatable": dict(spec.capacity),
        "conditions": node_conditions(ready, now, transitions),
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": spec.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
            "osImage": "local processes", "containerRuntimeVersion": "local-process://1",
            "kubeletVersion": AGENT_VERSION, "kubeProxyVersion": AGENT_VERSION,
            "operatingSystem": "linux", "architecture": "amd64",
        },
    }


def node_object(spec: NodeSpec, now: str, transitions: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": spec.name, "labels": node_labels(spec)},
            "spec": {"taints": spec.taints} if spec.taints else {},
            "status": node_status(spec, True, now, transitions)}


def lease_object(node_name: str, node_uid: str, renew: str) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node_name, "namespace": LEASE_NAMESPACE,
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node_name,
                                              "uid": node_uid}]},
            "spec": {"holderIdentity": node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew}}


def without_not_ready_taints(taints: list[dict] | None) -> list[dict] | None:
    """The node's taints minus the not-ready ones, or None when there is nothing to remove."""
    taints = taints or []
    kept = [t for t in taints if t.get("key") not in NOT_READY_TAINTS]
    return kept if len(kept) != len(taints) else None


class NodeKeeper:
    """Registers the agent's nodes and heartbeats them from one thread."""

    def __init__(self, kube: Kube, specs: list[NodeSpec], stop: threading.Event, interval: float = 10.0):
        self.kube, self.specs, self.stop, self.interval = kube, specs, stop, interval
        self._transitions: dict[str, dict[str, str]] = {s.name: {} for s in specs}
        self._uids: dict[str, str] = {}

    def register(self) -> None:
        for spec in self.specs:
            now = now_rfc3339()
            body = node_object(spec, now, self._transitions[spec.name])
            try:
                node = self.kube.create(path_for("v1", "nodes"), body)
                log.info("registered node %s %s", spec.name, spec.capacity)
            except ApiError as e:
                if e.status != 409:
                    raise
                self.kube.patch(path_for("v1", "nodes", name=spec.name), {"metadata": {"labels": body["metadata"]["labels"]}})
                log.info("node %s already registered; updating it", spec.name)
            node = self._post_status(spec, ready=True)
            self._uids[spec.name] = node["metadata"]["uid"]
            self._renew_lease(spec.name)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            for spec in self.specs:
                try:
                    self._post_status(spec, ready=True)
                    self._renew_lease(spec.name)
                except Exception as e:
                    log.warning("heartbeat for node %s failed: %s", spec.name, e)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="node-heartbeat", daemon=True)
        t.start()
        return t

    def mark_not_ready(self) -> None:
        for spec in self.specs:
            try:
                self._post_status(spec, ready=False)
            except Exception as e:
                log.warning("could not mark node %s NotReady: %s", spec.name, e)

    def _post_status(self, spec: NodeSpec, ready: bool) -> dict:
        status = node_status(spec, ready, now_rfc3339(), self._transitions[spec.name])
        node = self.kube.patch(path_for("v1", "nodes", name=spec.name, sub="status"), {"status": status},
                               kind=STRATEGIC_PATCH)
        kept = without_not_ready_taints(node.get("spec", {}).get("taints"))
        if ready and kept is not None:
            self._set_taints(spec.name, node, kept)
        return node

    def _set_taints(self, name: str, node: dict, taints: list[dict]) -> None:
        # resourceVersion makes this a compare-and-swap, so a taint someone adds meanwhile survives.
        body = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": taints}}
        try:
            self.kube.patch(path_for("v1", "nodes", name=name), body)
            log.info("removed not-ready taints from node %s", name)
        except ApiError as e:
            if e.status != 409:
                raise  # on a conflict the next heartbeat tries again

    def _renew_lease(self, name: str) -> None:
        path = path_for("coordination.k8s.io/v1", "leases", LEASE_NAMESPACE, name)
        renew = now_micro()
        try:
            self.kube.patch(path, {"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                                            "renewTime": renew}})
        except ApiError as e:
            if e.status != 404:
                raise
            self.kube.create(path_for("coordination.k8s.io/v1", "leases", LEASE_NAMESPACE),
                             lease_object(name, self._uids.get(name, ""), renew))
