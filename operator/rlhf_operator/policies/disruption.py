"""Disruptions are not failures: a trainer pod that went away because of its node or an admin.

A pod deleted by someone other than the operator (kubectl delete, a node drain's eviction), evicted
by the kubelet, preempted by the scheduler, stopped for a node shutdown or lost with its node is
replaced at once without counting against spec.backoffLimit - the rule batch/v1 Job applies with a
podFailurePolicy that ignores the DisruptionTarget condition. The trainer checkpoints on SIGTERM
(exit code 143), so the replacement resumes where it stopped. Such pods are counted apart
(status.disruptionCount).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer import contract

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan

# Pod status reasons set by the kubelet, the scheduler and the node lifecycle controller.
POD_REASONS = {
    "Evicted": "was evicted by its node",
    "Preempting": "was preempted by a higher-priority pod",
    "Preempted": "was preempted by a higher-priority pod",
    "Shutdown": "was stopped for a node shutdown",
    "Terminated": "was stopped for a node shutdown",
    "NodeShutdown": "was stopped for a node shutdown",
    "NodeLost": "was lost with its node",
    "UnexpectedAdmissionError": "was refused by its node",
}


def disruption(pod: Any | None, name: str) -> str | None:
    """Why the current trainer pod `name` ended without the trainer failing (a sentence starting
    with "trainer pod <name>"), or None when it is a failure (or still running). `pod` is a
    status.PodView, None when the pod is gone."""
    head = f"trainer pod {name}"
    if pod is None:
        return f"{head} was deleted by someone other than the operator (e.g. kubectl delete or a node drain)"
    if pod.phase != "Failed":
        return None  # a pod marked DisruptionTarget still runs until it is stopped: wait for that
    if pod.disruption:
        return f"{head} was disrupted: {pod.disruption}"
    if pod.pod_reason in POD_REASONS:
        detail = f" ({pod.pod_message})" if pod.pod_message else ""
        return f"{head} {POD_REASONS[pod.pod_reason]}{detail}"
    if pod.exit_code == contract.EXIT_PREEMPTED:
        return f"{head} was stopped with SIGTERM (exit code {contract.EXIT_PREEMPTED}) after writing a checkpoint"
    return None


def announce(why: str, new_pod: str, count: int) -> str:
    return f"{why}; not counted against spec.backoffLimit (disruption {count}); started {new_pod}"


def replace(ps: Pass, why: str) -> Plan:
    """The current pod was disrupted (`why`): a new pod at once, restarts not used."""
    if lost := ps.inputs_lost():
        return ps.fail("DependencyDeleted", f"{why}; {lost}")
    count = (ps.st.get("disruptionCount") or 0) + 1
    ps.st["disruptionCount"] = count
    ps.start(ps.next_attempt, ps.restarts)
    message = announce(why, ps.st["trainerPod"], count)
    ps.conds.set("Restarting", True, "PodDisrupted", message)
    ps.conds.clear("Running", "PodDisrupted", why)
    ps.announce("Restarting", "Warning", "PodDisrupted", message)
    return ps.finish()
