"""Kueue: what a queued job's pods carry so that Kueue admits the job as one pod group.

A job labelled `kueue.x-k8s.io/queue-name` is admitted through Kueue's pod integration as a pod group: every pod
of the job carries the queue label, the group label `kueue.x-k8s.io/pod-group-name` (one name for the job's whole
life, so a replacement pod joins the same Workload) and the annotation `kueue.x-k8s.io/pod-group-total-count`
(the job's node count). Kueue's pod webhook then adds its `kueue.x-k8s.io/managed` label, finalizer and the
scheduling gate `kueue.x-k8s.io/admission`; Kueue creates one Workload for the N pods once all exist and lifts the
gate from all of them at admission. A WorkloadPriorityClass (label `kueue.x-k8s.io/priority-class`) passes from the
job to its pods, where Kueue reads it; spec.scheduling.priorityClassName is the pods' own priorityClassName.

Pure functions: the reconciler stamps the pods with :func:`apply`, the planner (policies.queue) reads
:func:`queue_name` and the pod views' gates and termination reasons.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from rlhf_operator import names

if TYPE_CHECKING:
    from rlhf_operator.observed import PodView

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass
GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
MANAGED_LABEL = "kueue.x-k8s.io/managed"  # set by Kueue's webhook, also the name of its pod finalizer
FINALIZER = MANAGED_LABEL
ADMISSION_GATE = "kueue.x-k8s.io/admission"  # Kueue's scheduling gate, lifted at admission
TERMINATION_TARGET = "TerminationTarget"  # the pod condition Kueue sets on the pods it stops (eviction, preemption)
PASSED_LABELS = (QUEUE_LABEL, PRIORITY_LABEL)
MAX_GROUP_NAME = 63  # Kueue names the Workload after the group and checks it as a CRD name; a label value too


def queue_name(job: dict[str, Any]) -> str:
    """The job's LocalQueue ('' when the job is not queued)."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL, "")


def group_name(job: dict[str, Any]) -> str:
    """The pod group (and Workload) name of a job: `<kind abbreviation>-<name>-<uid[:8]>`, unique per job object,
    so a job deleted and created again under its name does not join the old Workload."""
    meta = job["metadata"]
    kind = names.kind_abbreviation(job["kind"])
    uid = re.sub(r"[^a-z0-9]", "", (meta.get("uid") or "").lower())[:8]
    tail = f"-{uid}" if uid else ""
    head = re.sub(r"[^a-z0-9-]", "-", f"{kind}-{meta['name']}".lower())
    if len(head) + len(tail) > MAX_GROUP_NAME:
        digest = hashlib.sha256(head.encode()).hexdigest()[:8]
        head = f"{head[:MAX_GROUP_NAME - len(tail) - len(digest) - 1].rstrip('-')}-{digest}"
    return head + tail


def pod_metadata(job: dict[str, Any], nodes: int) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) a queued job's pods carry for Kueue; empty for a job without a queue."""
    if not queue_name(job):
        return {}, {}
    job_labels = (job.get("metadata") or {}).get("labels") or {}
    labels = {k: job_labels[k] for k in PASSED_LABELS if job_labels.get(k)}
    labels[GROUP_LABEL] = group_name(job)
    return labels, {GROUP_COUNT_ANNOTATION: str(max(1, nodes))}


def held_only(pod: PodView) -> bool:
    """A pod that has stopped and is being deleted, kept only by Kueue's finalizer: gone, as far as a restart goes
    (Kueue lets it go once the replacement joins the group)."""
    return pod.held_by_queue and pod.deleting and pod.phase in ("Succeeded", "Failed")


def release_hold(pod: PodView, job: dict[str, Any] | None, current_attempt: int | None) -> bool:
    """Whether to take Kueue's finalizer off a stopped pod of ours. Kueue keeps it on a pod group's stopped pods
    until replacements join the group, and keeps the Workload admitted meanwhile: a job that was deleted, finished
    or suspended (or whose attempt moved on) sends no replacement, so its pods would stay Terminating and its quota
    reserved. `job`: the job's index summary (None when gone); `current_attempt`: status.attempt if known."""
    if not held_only(pod):
        return False
    if job is None or job.get("uid") != pod.owner_uid or job.get("phase") in ("Succeeded", "Failed", "Suspended"):
        return True
    return current_attempt is not None and pod.attempt < current_attempt


def nodes_of(job: dict[str, Any]) -> int:
    return int(((job.get("spec") or {}).get("resources") or {}).get("nodes") or 1)


def apply(job: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with the job's Kueue labels and annotation added (the pod itself, changed in place)."""
    labels, annotations = pod_metadata(job, nodes_of(job))
    if labels:
        meta = pod.setdefault("metadata", {})
        meta.setdefault("labels", {}).update(labels)
        meta.setdefault("annotations", {}).update(annotations)
    return pod
