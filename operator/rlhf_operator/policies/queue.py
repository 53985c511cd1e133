"""Kueue: a queued job waits for admission, and a preemption is a pause, not a failure.

A job labelled kueue.x-k8s.io/queue-name has pods that Kueue holds behind its admission gate (queueing.py).
While the current attempt's pods are gated the condition Queued=True names the LocalQueue. When Kueue evicts the
job's Workload (preemption by a higher-priority workload, or any other eviction) it marks the pods
TerminationTarget and deletes them: the trainer checkpoints on SIGTERM; once every pod of the attempt has stopped,
the next attempt's pods are created at once (no back-off, spec.backoffLimit untouched) and wait, gated, for
readmission; they resume from the checkpoint. Kueue keeps its finalizer on stopped pods until their replacements
join the group, so here a stopped (terminal) pod that is being deleted counts as gone: after a suspend, and when
someone else deleted a single-pod job's pod (a disruption, as in policies.disruption). Where no replacement comes
(a deleted, finished or suspended job) the reconciler lifts that finalizer (queueing.release_hold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_operator import queueing
from rlhf_operator.policies import disruption, trainer_pod

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan

CONDITION = "Queued"
TERMINAL = ("Succeeded", "Failed")


def apply(ps: Pass) -> Plan | None:
    queue = queueing.queue_name(ps.job)
    if not queue:
        return None
    conds, attempt = ps.conds, ps.st.get("attempt")
    pods = [x for x in ps.own if attempt is not None and x.attempt == attempt]
    if not ps.current:
        return _start_after_stop(ps)
    stopped = next((x for x in pods if x.stopped_by_queue), None)
    if stopped is not None and ps.pod is not None and all(x.phase == "Succeeded" for x in pods):
        return trainer_pod.succeeded(ps, ps.pod)  # finished as Kueue stopped it
    if stopped is not None:
        # Kueue stops a workload's pods for any eviction; a preemption says so in its message.
        reason = "Preempted" if "preempt" in stopped.stopped_by_queue.lower() else "Evicted"
        why = f"{reason.lower()} by Kueue ({stopped.stopped_by_queue})"
        conds.clear("Running", reason, why)
        if any(x.phase not in TERMINAL for x in pods):
            conds.set(CONDITION, True, reason, f"{why}; the trainer is writing a checkpoint")
            return ps.finish()
        return _requeue(ps, reason, why, queue)
    if ps.nodes == 1 and ps.pod is not None and queueing.held_only(ps.pod):
        # Deleted by someone else (not Kueue) and stopped: policies.trainer_pod would wait for it to go, Kueue
        # keeps it until its replacement exists. A disruption: the next attempt now, no back-off.
        if ps.pod.phase == "Succeeded":
            return trainer_pod.succeeded(ps, ps.pod)
        why = disruption.disruption(ps.pod, ps.pod.name) or disruption.disruption(None, ps.pod.name)
        return disruption.replace(ps, why or "")
    if any(queueing.ADMISSION_GATE in x.gates and x.phase == "Pending" for x in pods):
        before = conds.get(CONDITION) or {}
        if before.get("status") == "True" and before.get("reason") in ("Preempted", "Evicted"):
            conds.set(CONDITION, True, before["reason"], _waiting(before.get("message", ""), queue))
        else:
            conds.set(CONDITION, True, "WaitingForAdmission", f"waiting for Kueue admission in LocalQueue {queue}")
        return None
    if pods:
        conds.clear(CONDITION, "Admitted", f"admitted by Kueue from LocalQueue {queue}")
    return None


def _waiting(message: str, queue: str) -> str:
    head = message.split("; ")[0]
    return f"{head}; checkpoint kept, waiting for readmission in LocalQueue {queue}"


def _requeue(ps: Pass, reason: str, why: str, queue: str) -> Plan:
    """Every pod of the preempted attempt stopped: the next attempt's pods now, gated until readmission."""
    if lost := ps.inputs_lost():
        return ps.fail("DependencyDeleted", f"{why}; {lost}")
    ps.st["disruptionCount"] = (ps.st.get("disruptionCount") or 0) + 1
    ps.start(ps.next_attempt, ps.restarts)
    ps.conds.set(CONDITION, True, reason, _waiting(why, queue))
    ps.conds.clear("Restarting", reason, why)
    return ps.finish()


def _start_after_stop(ps: Pass) -> Plan | None:
    """No current attempt (the first start, or after a suspend): pods Kueue still holds with its finalizer do not
    block the next start once they have stopped (policies.trainer_pod waits for deleting pods to go)."""
    deleting = [x for x in ps.own if x.deleting]
    if not deleting or any(x.phase not in TERMINAL for x in deleting):
        return None
    if lost := ps.inputs_lost():
        return ps.fail("DependencyDeleted", lost)
    ps.start(ps.next_attempt, ps.restarts)
    return ps.finish()
