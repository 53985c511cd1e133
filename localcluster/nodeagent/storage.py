"""The default StorageClass `local-path` and its dynamic provisioner.

Works like an external provisioner: for a pending claim of the class it creates a PV (a
hostPath directory under <state-dir>/volumes/<pv>) pre-bound through claimRef, and the
controller-manager's PV controller completes the binding. When a claim is deleted its PV
turns Released; with reclaim policy Delete the provisioner removes the directory and the PV.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

from .kube import ApiError, Kube, Reflector, path_for
from .volumes import VolumeError

log = logging.getLogger(__name__)

STORAGE_CLASS = "local-path"
PROVISIONER = "rlhf.io/local-path"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


def storage_class_object() -> dict:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}


def wants_provisioning(pvc: dict) -> bool:
    """A pending claim of our class (or of no class: we are the default) that no PV serves yet."""
    spec, status = pvc.get("spec") or {}, pvc.get("status") or {}
    cls = spec.get("storageClassName")
    return (status.get("phase", "Pending") == "Pending" and not spec.get("volumeName")
            and not (pvc.get("metadata") or {}).get("deletionTimestamp")
            and (cls == STORAGE_CLASS or cls is None) and spec.get("volumeMode", "Filesystem") == "Filesystem")


def pv_name(pvc: dict) -> str:
    return f"pvc-{pvc['metadata']['uid']}"


def pv_object(pvc: dict, directory: str) -> dict:
    md, spec = pvc["metadata"], pvc["spec"]
    size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name(pvc), "annotations": {PROVISIONED_BY: PROVISIONER},
                     "labels": {"rlhf.io/local-path": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "hostPath": {"path": directory, "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": md["namespace"],
                         "name": md["name"], "uid": md["uid"], "resourceVersion": md.get("resourceVersion")},
        },
    }


def pv_directory(pv: dict) -> str | None:
    spec = pv.get("spec") or {}
    return (spec.get("hostPath") or spec.get("local") or {}).get("path")


class Provisioner:
    """Watches claims and volumes; also the agent's cache for resolving a pod's claim to a directory."""

    def __init__(self, kube: Kube, state_dir: str, stop: threading.Event):
        self.kube, self.stop = kube, stop
        self.root = os.path.join(os.path.abspath(state_dir), "volumes")
        self._pvcs: dict[tuple[str, str], dict] = {}
        self._pvs: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.claims = Reflector(kube, path_for("v1", "persistentvolumeclaims"), self._on_claim, stop, name="pvc-watch")
        self.volumes = Reflector(kube, path_for("v1", "persistentvolumes"), self._on_volume, stop, name="pv-watch")

    def ensure_storage_class(self) -> None:
        try:
            self.kube.create(path_for("storage.k8s.io/v1", "storageclasses"), storage_class_object())
            log.info("created default StorageClass %s", STORAGE_CLASS)
        except ApiError as e:
            if e.status != 409:
                raise

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        self.claims.start()
        self.volumes.start()

    # -- events ---------------------------------------------------------------------------
    def _on_claim(self, etype: str, pvc: dict) -> None:
        key = (pvc["metadata"]["namespace"], pvc["metadata"]["name"])
        with self._lock:
            if etype == "DELETED":
                self._pvcs.pop(key, None)
                return
            self._pvcs[key] = pvc
        if wants_provisioning(pvc):
            self._provision(pvc)

    def _provision(self, pvc: dict) -> None:
        name = pv_name(pvc)
        directory = os.path.join(self.root, name)
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o777)  # non-root pods write their checkpoints here
        try:
            self.kube.create(path_for("v1", "persistentvolumes"), pv_object(pvc, directory))
            log.info("provisioned %s for claim %s/%s", name, pvc["metadata"]["namespace"], pvc["metadata"]["name"])
        except ApiError as e:
            if e.status != 409:
                log.warning("could not provision a volume for claim %s/%s: %s",
                            pvc["metadata"]["namespace"], pvc["metadata"]["name"], e)

    def _on_volume(self, etype: str, pv: dict) -> None:
        name = pv["metadata"]["name"]
        ours = (pv["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        with self._lock:
            if etype == "DELETED":
                self._pvs.pop(name, None)
            else:
                self._pvs[name] = pv
        if not ours:
            return
        released = (pv.get("status") or {}).get("phase") == "Released"
        if etype == "DELETED" or (released and pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete"):
            self._reclaim(pv, delete_object=etype != "DELETED")

    def _reclaim(self, pv: dict, delete_object: bool) -> None:
        directory = pv_directory(pv)
        # Only ever remove directories this provisioner made.
        if directory and os.path.dirname(os.path.abspath(directory)) == self.root:
            shutil.rmtree(directory, ignore_errors=True)
        if delete_object:
            self.kube.delete(path_for("v1", "persistentvolumes", name=pv["metadata"]["name"]))
            log.info("deleted released volume %s", pv["metadata"]["name"])

    # -- lookups for pods -------------------------------------------------------------------
    def claim_directory(self, namespace: str, claim: str) -> str:
        """The bound PV's directory for a pod's claim; VolumeError while it is not bound yet."""
        with self._lock:
            pvc = self._pvcs.get((namespace, claim))
        if pvc is None or not (pvc.get("spec") or {}).get("volumeName"):
            pvc = self.kube.get_or_none(path_for("v1", "persistentvolumeclaims", namespace, claim))
        if pvc is None:
            raise VolumeError(f"persistentVolumeClaim {namespace}/{claim} not found")
        volume = (pvc.get("spec") or {}).get("volumeName")
        if not volume or (pvc.get("status") or {}).get("phase") != "Bound":
            raise VolumeError(f"persistentVolumeClaim {namespace}/{claim} is not bound yet "
                              f"(phase {(pvc.get('status') or {}).get('phase', 'Pending')})")
        with self._lock:
            pv = self._pvs.get(volume)
        pv = pv or self.kube.get_or_none(path_for("v1", "persistentvolumes", name=volume))
        directory = pv_directory(pv) if pv else None
        if not directory:
            raise VolumeError(f"persistentVolumeClaim {namespace}/{claim} is bound to {volume}, which has no "
                              "hostPath or local directory; the local node agent can only mount those")
        os.makedirs(directory, exist_ok=True)
        return directory
