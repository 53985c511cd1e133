"""One Pod's life on the node: volumes, init containers, containers, restarts, status, stop.

Each pod gets one worker thread that owns all of the pod's state and is its only status
writer, so status patches go out in order. Everything reaches the worker as an event on its
queue: container exits (from a waiter thread per process), deletion, node shutdown.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
import queue
import shutil
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from .addresses import HOST_IP, AddressPool, GpuPool
from .dns import pod_hostname
from .env import ContainerConfigError, PodContext, command_line, resolve_env
from .kube import STRATEGIC_PATCH, ApiError, Kube, path_for
from .node import GPU
from .processes import ContainerProcess
from .quantity import parse_quantity
from .security import container_security
from .status import ContainerState, backoff_seconds, pod_phase, pod_status, should_restart, terminated_reason
from .volumes import Mount, Volume, VolumeBuilder, VolumeError, container_mounts, runtime_paths

if TYPE_CHECKING:
    from .cgroups import Cgroup
    from .storage import Provisioner

log = logging.getLogger(__name__)

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
RETRY_SETUP_SECONDS = 2.0
KILL_WAIT_SECONDS = 10.0  # after SIGKILL: how long to wait for the exit to be reported
LONG_RUN_SECONDS = 60.0  # a run this long resets the crash-loop backoff
UNKNOWN_MESSAGE = ("The container could not be located when the pod was terminated: the local node agent "
                   "restarted while it was running")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return float(calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")))


def gpu_count(container: dict) -> int:
    res = container.get("resources") or {}
    value = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU) or "0"
    return int(parse_quantity(value))


def memory_limit(container: dict) -> int | None:
    """resources.limits.memory in bytes (None: unlimited); a bad quantity is a CreateContainerConfigError."""
    value = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if value is None:
        return None
    try:
        return max(1, math.ceil(parse_quantity(value)))
    except ValueError as e:
        raise ContainerConfigError(f"container {container.get('name')!r} resources.limits.memory: {e}") from None


def was_started(pod: dict) -> bool:
    """True when a (previous) agent already ran this pod's containers."""
    status = pod.get("status") or {}
    for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        if (cs.get("state") or {}).get("running") or (cs.get("state") or {}).get("terminated") or cs.get("lastState"):
            return True
    return False


class PodHost(Protocol):
    """What a pod worker needs from the node agent that runs it (agent.Agent is one): the API client, the node's
    address and GPU pools, claims, per-pod paths, ConfigMap/Secret lookups, events and the agent's bookkeeping.
    Passed in, so that this module does not import the agent."""

    kube: Kube
    addresses: AddressPool
    provisioner: Provisioner
    base_env: dict[str, str]
    shared_cache: str
    default_workdir: str

    def pod_dir(self, uid: str) -> str: ...
    def log_path(self, namespace: str, pod: str, container: str) -> str: ...
    def container_cgroup(self, name: str, memory_limit: int | None) -> Cgroup | None: ...
    def name_files(self, pod: dict, pod_ip: str, run_dir: str) -> list[Mount]: ...
    def gpu_pool(self, node: str) -> GpuPool: ...
    def get_configmap(self, namespace: str, name: str) -> dict | None: ...
    def get_secret(self, namespace: str, name: str) -> dict | None: ...
    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def emit(self, pod: dict, reason: str, message: str, warning: bool = False,
             container: str | None = None) -> None: ...
    def worker_finished(self, worker: PodWorker) -> list[tuple]: ...
    def finalize_deleted_pod(self, pod: dict) -> None: ...


class PodWorker:
    def __init__(self, host: PodHost, pod: dict):
        self.host = host
        self.pod = pod
        md, spec = pod["metadata"], pod["spec"]
        self.uid, self.namespace, self.name = md["uid"], md["namespace"], md["name"]
        self.node = spec["nodeName"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.specs = {c["name"]: c for c in (spec.get("initContainers") or []) + spec["containers"]}
        self.init = [ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        self.main = [ContainerState(c["name"], c.get("image", "")) for c in spec["containers"]]
        self.procs: dict[str, ContainerProcess] = {}
        self.due: dict[str, float] = {}  # container -> monotonic time it may (re)start
        self.events: queue.Queue = queue.Queue()
        self.pod_dir = host.pod_dir(self.uid)
        self.run_dir = os.path.join(self.pod_dir, "run")
        self.volumes: dict[str, Volume] | None = None
        self.pod_ip = ""
        self.name_mounts: list[Mount] = []  # /etc/resolv.conf and /etc/hosts of this pod
        self.gpus: list[int] = []
        self.start_time = time.time()
        self.deadline = None  # monotonic time of spec.activeDeadlineSeconds
        self.phase_override = ""
        self.reason = self.message = ""
        self.stopping = False
        self.shutdown_grace: float | None = None  # set when the agent itself is stopping
        self.gone = False
        self.accepting = True  # the agent may still post events (guarded by the agent's lock)
        self.last_status: dict | None = None
        self.status_dirty = True
        self.thread = threading.Thread(target=self.run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    # -- entry points used by the agent ----------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def post(self, event: tuple) -> None:
        self.events.put(event)

    # -- the worker thread -----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._setup_identity()
            if was_started(self.pod):
                self._adopt(self.pod.get("status") or {})
            self._loop()
        except Exception as e:
            log.exception("pod %s/%s: worker failed", self.namespace, self.name)
            self._kill_all()
            self.procs.clear()
            self.phase_override, self.reason = "Failed", "NodeAgentError"
            self.message = f"the local node agent failed running this pod: {type(e).__name__}: {e}"
            try:
                self._post_status()
            except Exception:
                log.exception("pod %s/%s: could not report the failure", self.namespace, self.name)
        finally:
            self._finish()

    def _setup_identity(self) -> None:
        spec, status = self.pod["spec"], self.pod.get("status") or {}
        if spec.get("hostNetwork"):
            self.pod_ip = HOST_IP
        else:
            self.pod_ip = self.host.addresses.allocate(preferred=status.get("podIP"))
        n = max([sum(gpu_count(self.specs[c.name]) for c in self.main)] +
                [gpu_count(self.specs[c.name]) for c in self.init])
        self.gpus = self.host.gpu_pool(self.node).allocate(n) if n else []
        if len(self.gpus) < n:
            log.warning("pod %s/%s wants %d GPU(s) but only %s are free on %s", self.namespace, self.name, n,
                        self.gpus, self.node)
        self.start_time = parse_time(status.get("startTime")) or time.time()
        if spec.get("activeDeadlineSeconds"):
            elapsed = max(0.0, time.time() - self.start_time)
            self.deadline = time.monotonic() + float(spec["activeDeadlineSeconds"]) - elapsed
        os.makedirs(self.run_dir, exist_ok=True)
        self.name_mounts = self.host.name_files(self.pod, self.pod_ip, self.run_dir)

    def _loop(self) -> None:
        setup_due = 0.0
        while True:
            self._drain(self._wait_seconds(setup_due))
            if self.gone:
                self._terminate(2.0)
                return
            if self.stopping:
                self._stop_and_report()
                return
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.phase_override, self.reason = "Failed", "DeadlineExceeded"
                self.message = "Pod was active on the node longer than the specified deadline"
                self._terminate(self._grace())
                self._post_status()
                return
            if self.volumes is None and time.monotonic() >= setup_due:
                if not self._setup_volumes():
                    setup_due = time.monotonic() + RETRY_SETUP_SECONDS
            if self.volumes is not None:
                self._start_due()
            phase = self._post_status()
            if phase in ("Succeeded", "Failed") and not self.procs and not self.status_dirty:
                return

    def _wait_seconds(self, setup_due: float) -> float | None:
        if self.status_dirty:
            return 0.0
        times = [t for name, t in self.due.items() if name not in self.procs]
        if self.volumes is None:
            times.append(setup_due)
        if self.deadline is not None:
            times.append(self.deadline)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _drain(self, timeout: float | None) -> None:
        try:
            event = self.events.get(timeout=timeout) if timeout != 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "exit":
            self._on_exit(event[1])
        elif kind == "delete":
            self.pod = event[1]
            self.stopping = True
        elif kind == "shutdown":
            self.stopping = True
            self.phase_override, self.reason = "Failed", "Shutdown"
            self.message = "Pod was terminated in response to imminent node shutdown."
            self.shutdown_grace = event[1]
        elif kind == "gone":
            self.gone = True
        self.status_dirty = True

    # -- volumes and containers ------------------------------------------------------------
    def _context(self) -> PodContext:
        return PodContext(self.pod, self.pod_ip, HOST_IP)

    def _setup_volumes(self) -> bool:
        builder = VolumeBuilder(self.pod_dir, self.host.get_configmap, self.host.get_secret,
                                self.host.provisioner.claim_directory)
        try:
            self.volumes = builder.build(self._context())
            return True
        except (VolumeError, ApiError, OSError) as e:
            self._not_started("ContainerCreating", f"MountVolume.SetUp failed: {e}", "FailedMount")
            return False

    def _not_started(self, reason: str, message: str, event_reason: str) -> None:
        for c in self.init + self.main:
            if c.state == "waiting":
                if (c.reason, c.message) != (reason, message):
                    self.host.emit(self.pod, event_reason, message, warning=True)
                c.reason, c.message = reason, message

    def _start_due(self) -> None:
        now = time.monotonic()
        pending_init = next((c for c in self.init if not c.succeeded), None)
        if pending_init is not None:
            if pending_init.name not in self.procs and pending_init.state == "waiting" \
                    and self.due.get(pending_init.name, 0) <= now:
                self._start(pending_init)
            return
        for c in self.main:
            if c.state == "waiting" and c.name not in self.procs and self.due.get(c.name, 0) <= now:
                self._start(c)

    def _base_env(self, container: dict) -> dict[str, str]:
        env = dict(self.host.base_env)
        env["HOSTNAME"] = pod_hostname(self.pod)
        mine = self._container_gpus(container)
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(map(str, mine)) or "void"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
        return env

    def _container_gpus(self, container: dict) -> list[int]:
        want = gpu_count(container)
        if not want:
            return []
        if container["name"] in {c.name for c in self.init}:
            return self.gpus[:want]
        offset = 0
        for c in self.main:
            if c.name == container["name"]:
                return self.gpus[offset:offset + want]
            offset += gpu_count(self.specs[c.name])
        return []

    def _start(self, c: ContainerState) -> None:
        spec = self.specs[c.name]
        try:
            env = self._base_env(spec)
            env.update(resolve_env(spec, self._context(), self.host.configmap_data, self.host.secret_data))
            argv = command_line(spec, env)
            mounts = container_mounts(spec, self.volumes or {}, env)
            security = {**container_security(self.pod, spec), "expose": runtime_paths()}
            if not self.pod["spec"].get("hostNetwork"):  # its own UTS namespace, named as the pod
                security["hostname"] = pod_hostname(self.pod)
            limit = memory_limit(spec)
        except (ContainerConfigError, VolumeError, ApiError) as e:
            if (c.reason, c.message) != ("CreateContainerConfigError", str(e)):  # one event per distinct error
                self.host.emit(self.pod, "Failed", f"Error: {e}", warning=True, container=c.name)
            c.reason, c.message = "CreateContainerConfigError", str(e)
            self.due[c.name] = time.monotonic() + RETRY_SETUP_SECONDS
            self.status_dirty = True
            return
        if self.host.shared_cache:
            mounts.append(Mount(self.host.shared_cache, self.host.shared_cache, False, False))
        mounts.extend(self.name_mounts)
        term_path = os.path.join(self.run_dir, f"{c.name}.termination-log")
        mounts.append(Mount(term_path, spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, False, True))
        log_path = self.host.log_path(self.namespace, self.name, c.name)
        fresh_log_for_pod(log_path, self.uid)
        cgroup = None
        try:
            cgroup = self.host.container_cgroup(f"{self.uid}-{c.name}-{uuid.uuid4().hex[:8]}", limit)
            rlimit = limit if cgroup is None and not gpu_count(spec) else None  # CUDA maps huge address ranges
            proc = ContainerProcess(self.run_dir, c.name, argv, env, spec.get("workingDir") or self.host.default_workdir,
                                    [m.to_json() for m in mounts], log_path, security, cgroup, rlimit)
        except OSError as e:
            if cgroup is not None:
                cgroup.destroy()
            c.reason, c.message = "CreateContainerError", f"could not start the container process: {e}"
            self.due[c.name] = time.monotonic() + RETRY_SETUP_SECONDS
            self.status_dirty = True
            return
        if c.last_terminated is not None:
            c.restart_count += 1
        self.procs[c.name] = proc
        c.state, c.reason, c.message = "running", "", ""
        c.started_at, c.finished_at, c.exit_code = proc.started_at, None, None
        c.container_id = f"local://{self.uid}/{c.name}/{proc.pid}"
        self.due.pop(c.name, None)
        self.status_dirty = True
        proc.wait_in_thread(lambda p: self.events.put(("exit", p)))
        self.host.emit(self.pod, "Started", f"Started container {c.name} (pid {proc.pid})", container=c.name)

    def _on_exit(self, proc: ContainerProcess) -> None:
        if self.procs.get(proc.name) is not proc:
            return
        del self.procs[proc.name]
        c = next(x for x in self.init + self.main if x.name == proc.name)
        is_init = c in self.init
        start_error = proc.start_error()
        c.state, c.exit_code, c.finished_at = "terminated", proc.returncode, time.time()
        c.reason = terminated_reason(proc.returncode, start_error, proc.oom_killed)
        c.message = start_error if start_error is not None else proc.termination_message()
        policy = self.specs[c.name].get("terminationMessagePolicy", "File")
        if not c.message and proc.returncode != 0 and policy == "FallbackToLogsOnError":
            c.message = proc.log_tail()
        restart = (proc.returncode != 0 and self.restart_policy != "Never") if is_init \
            else should_restart(self.restart_policy, proc.returncode)
        if restart and not self.stopping and not self.gone:
            ran = c.finished_at - (c.started_at or c.finished_at)
            delay = backoff_seconds(1 if ran >= LONG_RUN_SECONDS else c.restart_count + 1)
            c.last_terminated = c.terminated_dict()
            c.state, c.reason = "waiting", "CrashLoopBackOff"
            c.message = f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}"
            self.due[c.name] = time.monotonic() + delay
            self.host.emit(self.pod, "BackOff", "Back-off restarting failed container", warning=True,
                            container=c.name)

    # -- stopping --------------------------------------------------------------------------
    def _grace(self) -> float:
        md, spec = self.pod["metadata"], self.pod["spec"]
        grace = md.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return float(grace)

    def _terminate(self, grace: float) -> None:
        """SIGTERM every container's process group, SIGKILL what is left after `grace` seconds."""
        self.stopping = True
        for c in self.init + self.main:  # never started: nothing to stop, say so truthfully
            if c.state == "waiting":
                self.due.pop(c.name, None)
        if not self.procs:
            return
        for name, proc in list(self.procs.items()):
            self.host.emit(self.pod, "Killing", f"Stopping container {name}", container=name)
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.procs and time.monotonic() < deadline:
            self._drain(deadline - time.monotonic())
        for proc in list(self.procs.values()):
            proc.signal(signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while self.procs and time.monotonic() < deadline:
            self._drain(deadline - time.monotonic())

    def _stop_and_report(self) -> None:
        grace = self._grace()
        shutdown = self.shutdown_grace
        if shutdown is not None:
            grace = min(grace, shutdown)
        self._terminate(grace)
        self._post_status()
        if shutdown is None and not self.gone:
            # Like the kubelet: once the containers are gone, remove the pod object for good.
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                    "preconditions": {"uid": self.uid}}
            try:
                self.host.kube.delete(path_for("v1", "pods", self.namespace, self.name), body)
            except ApiError as e:
                if e.status != 409:  # 409: a newer pod of the same name; ours is gone already
                    log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.name, e)

    def _kill_all(self) -> None:
        for proc in self.procs.values():
            proc.signal(signal.SIGKILL)

    # -- status ----------------------------------------------------------------------------
    def _post_status(self) -> str:
        phase = self.phase_override or pod_phase(self.restart_policy, self.init, self.main)
        if not self.procs and (self.stopping or self.gone or phase in ("Succeeded", "Failed")):
            # Free the GPUs before the scheduler can learn (from this status) that they are free.
            self._release_gpus()
        if self.gone:
            return phase
        status = pod_status(self.pod, phase, self.init, self.main, self.pod_ip, HOST_IP, self.start_time,
                            self.reason, self.message)
        if status == self.last_status:
            self.status_dirty = False
            return phase
        try:
            self.pod = self.host.kube.patch(path_for("v1", "pods", self.namespace, self.name, "status"),
                                             {"metadata": {"uid": self.uid}, "status": status}, kind=STRATEGIC_PATCH)
            self.last_status = status
            self.status_dirty = False
        except ApiError as e:
            if e.status in (404, 409):  # 409: the uid precondition - the pod was replaced
                self.gone = True
            else:
                log.warning("pod %s/%s: status update failed (will retry): %s", self.namespace, self.name, e)
                time.sleep(0.5)
        return phase

    def _adopt(self, status: dict) -> None:
        """Take over a pod a previous agent was running: its processes are gone (killed at start)."""
        before = {s["name"]: s for s in (status.get("containerStatuses") or [])
                  + (status.get("initContainerStatuses") or [])}
        lost = False
        for c in self.init + self.main:
            s = before.get(c.name)
            if not s:
                continue
            c.restart_count = s.get("restartCount", 0)
            state = s.get("state") or {}
            term = state.get("terminated") or (state.get("waiting") and (s.get("lastState") or {}).get("terminated"))
            if not term:
                lost = True
                term = {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": UNKNOWN_MESSAGE,
                        "startedAt": (state.get("running") or {}).get("startedAt")}
                term = {k: v for k, v in term.items() if v is not None}
                term["finishedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            is_init = c in self.init
            code = term.get("exitCode", 1)
            restart = (code != 0 and self.restart_policy != "Never") if is_init \
                else should_restart(self.restart_policy, code)
            if restart:
                c.state, c.reason, c.last_terminated = "waiting", "ContainerCreating", term
            else:
                c.state, c.exit_code = "terminated", code
                c.reason, c.message = term.get("reason", ""), term.get("message", "")
                c.started_at, c.finished_at = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        if lost and self.restart_policy == "Never":
            self.reason, self.message = "NodeAgentRestarted", UNKNOWN_MESSAGE
        log.info("pod %s/%s: adopted from a previous agent (%s)", self.namespace, self.name,
                 "containers lost" if lost else "restarting")

    # -- cleanup ---------------------------------------------------------------------------
    def _release_gpus(self) -> None:
        if self.gpus:
            self.host.gpu_pool(self.node).release(self.gpus)
            self.gpus = []

    def _finish(self) -> None:
        self._kill_all()
        leftovers = self.host.worker_finished(self)
        for event in leftovers:
            if event[0] == "delete" and not self.gone:
                self.host.finalize_deleted_pod(event[1])
        if self.pod_ip != HOST_IP:
            self.host.addresses.release(self.pod_ip)
        self._release_gpus()
        shutil.rmtree(self.pod_dir, ignore_errors=True)


def fresh_log_for_pod(log_path: str, uid: str) -> None:
    """Logs are kept by pod name; a new pod object with the same name (another UID) starts a new log,
    while container restarts within one pod keep appending, as `kubectl logs` would show them."""
    owner = log_path + ".uid"
    try:
        with open(owner) as f:
            same = f.read().strip() == uid
    except OSError:
        same = False
    if not same:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        open(log_path, "w").close()  # noqa: SIM115 - truncate only
        with open(owner, "w") as f:
            f.write(uid)
