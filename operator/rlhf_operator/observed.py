"""What the planner sees of the world: trainer pods and upstream jobs, as small immutable views."""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_trainer import contract
from rlhf_trainer.runtime.failure import parse_failure

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
    exit_code: int | None = None  # the trainer's own (trainer_exit), else the container's
    reason: str = ""  # terminated reason (Error, OOMKilled) or pod reason (Evicted)
    message: str = ""  # termination message
    unschedulable: str = ""  # the scheduler's message while the pod cannot be placed
    scheduled: bool = False
    pod_reason: str = ""  # status.reason of the pod itself (Evicted, Preempting, Shutdown, NodeLost)
    pod_message: str = ""
    disruption: str = ""  # "reason: message" of a DisruptionTarget=True condition
    finished_at: str = ""  # when the trainer container terminated
    gates: tuple[str, ...] = ()  # spec.schedulingGates names (Kueue's admission gate while queued)
    held_by_queue: bool = False  # Kueue's finalizer is on the pod (it keeps a stopped pod until a replacement joins)
    stopped_by_queue: str = ""  # "reason: message" of the TerminationTarget condition Kueue sets when it stops the pod
    rank: int | None = None  # a multi-node job's pod: its node rank (label rlhf.io/rank)
    container_exit_code: int | None = None  # as the kubelet reports it (torchrun's own code under torchrun)


def trainer_exit(container_code: int | None, message: str) -> tuple[int | None, str]:
    """(exit code, message) of a finished trainer container. Under torchrun the container ends with torchrun's
    code, 1 for any failed worker, so a permanent error would be retried; the trainer records its own code in
    the termination message (runtime.failure, the first failing rank wins), and that code counts when the
    container's is 1 or the same. Other container codes are signals from outside, after the record (the OOM
    killer, the end of the grace period), and stay: the OOM and disruption policies read them. A recorded 143 (a
    stop on SIGTERM) does not replace a 1 either: torchrun also stops its workers that way when a peer node failed,
    and that pod must not pass for a disruption; a disrupted pod's own conditions say so."""
    recorded, rank, text = parse_failure(message)
    if recorded is None:
        return container_code, message
    text = text.strip()
    if container_code != recorded:  # say whose code is whose: the pod's status shows the container's
        who = f"rank {rank}" if rank is not None else "the trainer"
        text = f"{text} ({who} exited with {recorded}, the container with {container_code})"
    takes = container_code == recorded or (container_code == 1 and recorded != contract.EXIT_PREEMPTED)
    return (recorded if takes else container_code), text


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, spec_status = pod.get("metadata") or {}, pod.get("status") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    owners = [o.get("uid", "") for o in meta.get("ownerReferences") or [] if o.get("controller")]
    exit_code, reason, message = None, spec_status.get("reason", ""), spec_status.get("message", "")
    container_exit_code = None
    finished_at = ""
    for cs in spec_status.get("containerStatuses") or []:
        if cs.get("name") != builders.CONTAINER:
            continue
        term = (cs.get("state") or {}).get("terminated")
        if term:
            container_exit_code = term.get("exitCode")
            reason = term.get("reason") or reason
            exit_code, message = trainer_exit(container_exit_code, (term.get("message") or message or "").strip())
            finished_at = term.get("finishedAt") or ""
    unschedulable, scheduled, disrupted, stopped = "", False, "", ""
    for cond in spec_status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disrupted = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x) or "DisruptionTarget"
        if cond.get("type") == "TerminationTarget" and cond.get("status") == "True":
            stopped = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x) or "TerminationTarget"
        if cond.get("type") == "PodScheduled":
            scheduled = cond.get("status") == "True"
            if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable = cond.get("message") or "the scheduler found no node for the pod"
    try:
        attempt = int(labels.get(builders.LABEL_ATTEMPT, "0"))
        restarts = int(ann.get(builders.ANN_RESTART_COUNT, "0"))
    except ValueError:
        attempt, restarts = 0, 0
    rank_label = labels.get(builders.LABEL_RANK, "")
    rank = int(rank_label) if rank_label.isdigit() else None
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
        gates=tuple(g.get("name", "") for g in (pod.get("spec") or {}).get("schedulingGates") or []),
        stopped_by_queue=stopped,
        held_by_queue="kueue.x-k8s.io/managed" in (meta.get("finalizers") or []),
        rank=rank,
        container_exit_code=container_exit_code,
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
