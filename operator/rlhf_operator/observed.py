"""What the planner sees of the world: trainer pods and upstream jobs, as small immutable views."""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_operator import builders


@dataclasses.dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one trainer pod."""

    name: str
    attempt: int
    owner_uid: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    deleting: bool = False
    restart_count: int = 0
    pod_ip: str = ""
    exit_code: int | None = None
    reason: str = ""  # terminated reason (Error, OOMKilled) or pod reason (Evicted)
    message: str = ""  # termination message
    unschedulable: str = ""  # the scheduler's message while the pod cannot be placed
    scheduled: bool = False
    pod_reason: str = ""  # status.reason of the pod itself (Evicted, Preempting, Shutdown, NodeLost)
    pod_message: str = ""
    disruption: str = ""  # "reason: message" of a DisruptionTarget=True condition
    finished_at: str = ""  # when the trainer container terminated


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, spec_status = pod.get("metadata") or {}, pod.get("status") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    owners = [o.get("uid", "") for o in meta.get("ownerReferences") or [] if o.get("controller")]
    exit_code, reason, message = None, spec_status.get("reason", ""), spec_status.get("message", "")
    finished_at = ""
    for cs in spec_status.get("containerStatuses") or []:
        if cs.get("name") != builders.CONTAINER:
            continue
        term = (cs.get("state") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            reason = term.get("reason") or reason
            message = (term.get("message") or message or "").strip()
            finished_at = term.get("finishedAt") or ""
    unschedulable, scheduled, disrupted = "", False, ""
    for cond in spec_status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disrupted = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x) or "DisruptionTarget"
        if cond.get("type") == "PodScheduled":
            scheduled = cond.get("status") == "True"
            if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable = cond.get("message") or "the scheduler found no node for the pod"
    try:
        attempt = int(labels.get(builders.LABEL_ATTEMPT, "0"))
        restarts = int(ann.get(builders.ANN_RESTART_COUNT, "0"))
    except ValueError:
        attempt, restarts = 0, 0
    return PodView(
        name=meta.get("name", ""),
        attempt=attempt,
        owner_uid=owners[0] if owners else "",
        phase=spec_status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        restart_count=restarts,
        pod_ip=spec_status.get("podIP") or "",
        exit_code=exit_code,
        reason=reason or "",
        message=message or "",
        unschedulable=unschedulable,
        scheduled=scheduled,
        pod_reason=spec_status.get("reason") or "",
        pod_message=spec_status.get("message") or "",
        disruption=disrupted,
        finished_at=finished_at,
    )


@dataclasses.dataclass(frozen=True)
class DepState:
    """An upstream job as seen now."""

    roles: tuple[str, ...]
    kind: str
    name: str
    exists: bool
    uid: str = ""
    phase: str = ""
    message: str = ""
    claim: str = ""  # its checkpoint claim (names.pvc_name), once it created one
    completion_time: str = ""
