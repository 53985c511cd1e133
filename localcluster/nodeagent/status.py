"""Container states and the Pod status computed from them (pure functions, kubelet rules)."""

from __future__ import annotations

from dataclasses import dataclass

from .kube import now_rfc3339


@dataclass
class ContainerState:
    name: str
    image: str
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_terminated: dict | None = None  # a status `terminated` dict of the previous run
    container_id: str = ""

    def terminated_dict(self) -> dict:
        d = {"exitCode": self.exit_code, "reason": self.reason,
             "startedAt": now_rfc3339(self.started_at) if self.started_at else None,
             "finishedAt": now_rfc3339(self.finished_at) if self.finished_at else None,
             "containerID": self.container_id or None}
        if self.message:
            d["message"] = self.message
        return {k: v for k, v in d.items() if v is not None}

    def to_status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": now_rfc3339(self.started_at)}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_dict()}
        else:
            state = {"waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}}
        out = {"name": self.name, "image": self.image, "imageID": "", "restartCount": self.restart_count,
               "ready": self.state == "running", "started": self.state == "running", "state": state,
               "lastState": {"terminated": self.last_terminated} if self.last_terminated else {}}
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    @property
    def succeeded(self) -> bool:
        return self.state == "terminated" and self.exit_code == 0


def terminated_reason(exit_code: int, start_error: str | None, oom_killed: bool = False) -> str:
    """oom_killed: the kernel's OOM killer struck in the container's memory cgroup (the runtime's OOM event)."""
    if start_error is not None:
        return "StartError"
    if exit_code == 0:
        return "Completed"
    return "OOMKilled" if oom_killed else "Error"


def should_restart(restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def backoff_seconds(restarts: int, base: float = 1.0, cap: float = 10.0) -> float:
    """Short crash-loop backoff: 1, 2, 4, 8, 10, 10 ... seconds."""
    return min(cap, base * 2 ** max(0, restarts - 1))


def pod_phase(restart_policy: str, init: list[ContainerState], main: list[ContainerState]) -> str:
    """The kubelet's getPhase, with init containers run one after another."""
    for c in init:
        if c.state == "terminated" and c.exit_code != 0 and restart_policy == "Never":
            return "Failed"
    if not all(c.succeeded for c in init):
        return "Pending"
    # A container waiting to be restarted counts as stopped, one never started as pending.
    pending = sum(1 for c in main if c.state == "waiting" and not c.last_terminated)
    running = sum(1 for c in main if c.state == "running")
    stopped = [c for c in main if c.state == "terminated" or (c.state == "waiting" and c.last_terminated)]
    succeeded = sum(1 for c in stopped if (c.exit_code if c.state == "terminated"
                                            else c.last_terminated.get("exitCode")) == 0)
    if pending:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if succeeded == len(stopped):
        return "Succeeded"
    return "Running" if restart_policy == "OnFailure" else "Failed"


def pod_conditions(phase: str, init: list[ContainerState], main: list[ContainerState], now: str,
                   previous: list[dict]) -> list[dict]:
    """Initialized / ContainersReady / Ready (PodScheduled stays the scheduler's)."""
    initialized = all(c.succeeded for c in init)
    ready = bool(main) and all(c.state == "running" for c in main)
    before = {c.get("type"): c for c in previous or []}
    out = []
    for ctype, ok in (("Initialized", initialized), ("ContainersReady", ready), ("Ready", ready)):
        # Conditions are merged by type in a strategic merge patch: None clears a stale field.
        cond = {"type": ctype, "status": "True" if ok else "False", "reason": None, "message": None}
        if not ok:
            if phase == "Succeeded" or (phase == "Failed" and ctype != "Initialized"):
                cond["reason"] = "PodCompleted"
            elif ctype == "Initialized":
                cond["reason"] = "ContainersNotInitialized"
            else:
                cond["reason"] = "ContainersNotReady"
                waiting = sorted(c.name for c in main if c.state != "running")
                cond["message"] = f"containers with unready status: [{' '.join(waiting)}]"
        old = before.get(ctype)
        same = old is not None and old.get("status") == cond["status"]
        cond["lastTransitionTime"] = old.get("lastTransitionTime") if same else now
        out.append(cond)
    return out


def pod_status(pod: dict, phase: str, init: list[ContainerState], main: list[ContainerState], pod_ip: str,
               host_ip: str, start_time: float, reason: str = "", message: str = "") -> dict:
    now = now_rfc3339()
    status = {
        "phase": phase,
        "conditions": pod_conditions(phase, init, main, now, (pod.get("status") or {}).get("conditions") or []),
        "hostIP": host_ip,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": now_rfc3339(start_time),
        "containerStatuses": [c.to_status() for c in main],
    }
    if init:
        status["initContainerStatuses"] = [c.to_status() for c in init]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status
