"""The node agent: wires node heartbeats, the storage provisioner and one watch on bound Pods
to a worker per running Pod."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import cgroups, pod_log_path
from .addresses import AddressPool, GpuPool, parse_pod_network
from .dns import pod_hosts_file, pod_resolv_conf
from .env import decode_secret
from .kube import ApiError, Kube, Reflector, now_rfc3339, path_for
from .node import NodeKeeper, NodeSpec
from .pods import KILL_WAIT_SECONDS, PodWorker
from .processes import kill_leftovers
from .storage import Provisioner
from .volumes import Mount

log = logging.getLogger(__name__)

HOST_RESOLV_CONF = "/etc/resolv.conf"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# LOCALCLUSTER_MARKER lets `cluster down` find pod processes even after the agent itself is gone.
PASSED_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LOCALCLUSTER_MARKER")


def base_environment(passed: list[str], extra: dict[str, str]) -> dict[str, str]:
    """What every container starts from: the project's Python environment first on PATH."""
    venv_bin = os.path.dirname(sys.executable)
    env = {"PATH": f"{venv_bin}:{SYSTEM_PATH}"}
    if os.path.exists(os.path.join(os.path.dirname(venv_bin), "pyvenv.cfg")):
        env["VIRTUAL_ENV"] = os.path.dirname(venv_bin)
    for name in list(PASSED_ENV) + list(passed):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


class Agent:
    def __init__(self, kube: Kube, state_dir: str, nodes: list[NodeSpec], *, pod_network: str,
                 heartbeat_seconds: float = 10.0, shutdown_grace: float = 10.0, default_workdir: str = "/",
                 pass_env: list[str] | None = None, extra_env: dict[str, str] | None = None,
                 shared_cache: str = "", cluster_dns: str = "", cluster_domain: str = "cluster.local"):
        self.kube = kube
        self.state_dir = os.path.abspath(state_dir)
        self.nodes = nodes
        self.node_names = {n.name for n in nodes}
        self.shutdown_grace = shutdown_grace
        self.default_workdir = default_workdir
        self.base_env = base_environment(pass_env or [], extra_env or {})
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # uids whose worker ended; forgotten when the pod object goes
        self.finalizing: set[str] = set()
        self.addresses = AddressPool(parse_pod_network(pod_network))
        self.cluster_dns, self.cluster_domain = cluster_dns, cluster_domain
        if cluster_dns:
            self.addresses.reserve(cluster_dns)  # the DNS server listens there: never a pod's address
        self._gpus = {n.name: GpuPool(n.gpus) for n in nodes}
        self.cgroups, self.cgroups_how = cgroups.detect()
        self.shared_cache = os.path.abspath(shared_cache) if shared_cache else ""
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent-api")
        self.node_keeper = NodeKeeper(kube, nodes, self.stop, heartbeat_seconds)
        self.provisioner = Provisioner(kube, self.state_dir, self.stop)
        # One watch for all pods bound to our node(s).
        selector = f"spec.nodeName={nodes[0].name}" if len(nodes) == 1 else "spec.nodeName!="
        self.pods = Reflector(kube, path_for("v1", "pods"), self.on_pod_event, self.stop,
                              query={"fieldSelector": selector}, name="pod-watch")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(os.path.join(self.state_dir, "pod-data"), exist_ok=True)
        kill_leftovers(self.state_dir)
        if self.shared_cache:
            os.makedirs(self.shared_cache, exist_ok=True)
            os.chmod(self.shared_cache, 0o1777)  # like /tmp: any pod user may add to it
        deadline = time.monotonic() + 30
        while True:  # the API server may still be settling right after it reported ready
            try:
                self.node_keeper.register()
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("registering node(s) failed, retrying: %s", e)
                time.sleep(1)
        self.provisioner.ensure_storage_class()
        self.provisioner.start()
        self.node_keeper.start()
        self.pods.start()
        threading.Thread(target=self._sweep_after_sync, name="pod-data-sweep", daemon=True).start()
        log.info("node agent ready: nodes %s, state %s", sorted(self.node_names), self.state_dir)
        if self.cgroups:
            log.info("memory limits: enforced with a %s", self.cgroups_how)
        else:
            log.warning("memory limits: no memory cgroup (%s); limits become RLIMIT_AS address-space limits "
                        "(not for GPU containers) and an OOM kill cannot be told from other SIGKILLs",
                        self.cgroups_how)

    def run_until_stopped(self) -> None:
        self.start()
        self.stop.wait()
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every pod within its grace period (capped), then mark the nodes NotReady."""
        self.stop.set()
        with self.lock:
            workers = list(self.workers.values())
        log.info("shutting down: stopping %d pod(s)", len(workers))
        for w in workers:
            w.post(("shutdown", self.shutdown_grace))
        deadline = time.monotonic() + self.shutdown_grace + KILL_WAIT_SECONDS + 5
        for w in workers:
            w.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.node_keeper.mark_not_ready()
        self.executor.shutdown(wait=True, cancel_futures=True)
        log.info("node agent stopped")

    # -- pods ------------------------------------------------------------------------------
    def on_pod_event(self, etype: str, pod: dict) -> None:
        md, spec = pod["metadata"], pod.get("spec") or {}
        if spec.get("nodeName") not in self.node_names:
            return
        uid = md["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if etype == "DELETED":
                self.finished.discard(uid)
                self.finalizing.discard(uid)
                if worker:
                    worker.post(("gone",))
                return
            if worker:
                if md.get("deletionTimestamp"):
                    worker.post(("delete", pod))
                return
            if self.stop.is_set():
                return
            if md.get("deletionTimestamp"):
                if uid not in self.finalizing:
                    self.finalizing.add(uid)
                    self.executor.submit(self.finalize_deleted_pod, pod)
                return
            if uid in self.finished or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def worker_finished(self, worker: PodWorker) -> list[tuple]:
        """Forget a worker; returns events that reached it after its loop ended."""
        with self.lock:
            self.workers.pop(worker.uid, None)
            if not worker.gone:
                self.finished.add(worker.uid)
            leftovers = []
            while not worker.events.empty():
                leftovers.append(worker.events.get_nowait())
        return leftovers

    def finalize_deleted_pod(self, pod: dict) -> None:
        """A pod with nothing running (finished, or never started here) is being deleted: remove it."""
        md = pod["metadata"]
        shutil.rmtree(self.pod_dir(md["uid"]), ignore_errors=True)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": md["uid"]}}
        try:
            self.kube.delete(path_for("v1", "pods", md["namespace"], md["name"]), body)
        except ApiError as e:
            if e.status != 409:
                log.warning("pod %s/%s: final delete failed: %s", md["namespace"], md["name"], e)

    def _sweep_after_sync(self) -> None:
        """Drop pod directories of pods that no longer exist (left by an earlier agent)."""
        if not self.pods.synced.wait(timeout=60):
            return
        root = os.path.join(self.state_dir, "pod-data")
        with self.lock:
            live = set(self.workers)
        for uid in os.listdir(root):
            if uid not in live:
                shutil.rmtree(os.path.join(root, uid), ignore_errors=True)

    # -- helpers for workers -----------------------------------------------------------------
    def pod_dir(self, uid: str) -> str:
        return os.path.join(self.state_dir, "pod-data", uid)

    def log_path(self, namespace: str, pod: str, container: str) -> str:
        return pod_log_path(self.state_dir, namespace, pod, container)

    def container_cgroup(self, name: str, memory_limit: int | None) -> cgroups.Cgroup | None:
        """A new memory cgroup for one container run, or None where the machine offers none."""
        return self.cgroups.create(name, memory_limit) if self.cgroups else None

    def name_files(self, pod: dict, pod_ip: str, run_dir: str) -> list[Mount]:
        """The pod's /etc/resolv.conf (cluster DNS) and /etc/hosts (its own names), written under run_dir and
        bind-mounted into each container, as the kubelet manages them; a host-network pod keeps the host's."""
        mounts = []
        try:
            with open(HOST_RESOLV_CONF) as f:
                host_resolv = f.read()
        except OSError:
            host_resolv = ""
        resolv = pod_resolv_conf(pod, self.cluster_dns, self.cluster_domain, host_resolv)
        files = [("resolv.conf", "/etc/resolv.conf", resolv)]
        if not (pod.get("spec") or {}).get("hostNetwork"):
            files.append(("hosts", "/etc/hosts", pod_hosts_file(pod, pod_ip, self.cluster_domain)))
        for name, dst, text in files:
            if text is None:
                continue
            path = os.path.join(run_dir, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)  # readable whatever the container's user
            mounts.append(Mount(path, dst, False, True))
        return mounts

    def gpu_pool(self, node: str) -> GpuPool:
        return self._gpus[node]

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return self.kube.get_or_none(path_for("v1", "configmaps", namespace, name))

    def get_secret(self, namespace: str, name: str) -> dict | None:
        return self.kube.get_or_none(path_for("v1", "secrets", namespace, name))

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self.get_configmap(namespace, name)
        if obj is None:
            return None
        data = dict(obj.get("data") or {})
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value).decode("utf-8", "replace")
        return data

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self.get_secret(namespace, name)
        return None if obj is None else decode_secret(obj.get("data"))

    def emit(self, pod: dict, reason: str, message: str, warning: bool = False, container: str | None = None) -> None:
        """Post a Pod event in the background (events never hold up a pod)."""
        if self.stop.is_set():
            return
        try:
            self.executor.submit(self._post_event, pod, reason, message, warning, container)
        except RuntimeError:  # shutting down
            pass

    def _post_event(self, pod: dict, reason: str, message: str, warning: bool, container: str | None) -> None:
        md = pod["metadata"]
        now = now_rfc3339()
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": md["namespace"], "name": md["name"],
                    "uid": md["uid"]}
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        node = (pod.get("spec") or {}).get("nodeName", "")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{md['name']}.", "namespace": md["namespace"]},
                "involvedObject": involved, "reason": reason, "message": message[:1024],
                "type": "Warning" if warning else "Normal", "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "local-node-agent", "host": node},
                "reportingComponent": "local-node-agent", "reportingInstance": node}
        try:
            self.kube.create(path_for("v1", "events", md["namespace"]), body)
        except Exception as e:  # a namespace being deleted refuses new events; nothing to do
            log.debug("event %s for pod %s/%s not posted: %s", reason, md["namespace"], md["name"], e)
