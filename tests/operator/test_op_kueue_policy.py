"""Kueue without a cluster: the labels and annotation a queued job's pods carry (queueing.py), and the planner's
queue policy (policies.queue): waiting for admission names the queue; a preemption checkpoints, waits for
readmission and resumes without back-off."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator import builders, crd_schema, queueing
from rlhf_operator.settings import Settings
from rlhf_operator.status import plan, pod_view

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
QUEUE = {queueing.QUEUE_LABEL: "user-queue"}


def queued(name: str = "j", labels: dict | None = None, **spec) -> dict:
    j = job(name=name)
    j["metadata"]["labels"] = {**QUEUE, **(labels or {})}
    j["spec"].update(spec)
    return j


def step(j, pods=(), seconds: float = 0.0):
    p = plan(j, [pod_view(x) for x in pods], [], NOW + dt.timedelta(seconds=seconds))
    j["status"] = p.status
    return p


def cond(j, ctype: str) -> dict:
    return next(c for c in j["status"]["conditions"] if c["type"] == ctype)


def gated(p: dict) -> dict:
    p["spec"] = {"schedulingGates": [{"name": queueing.ADMISSION_GATE}]}
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]
    return p


def stopped_by_kueue(p: dict) -> dict:
    p["status"]["conditions"].append({"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvicted",
                                      "message": "Preempted to accommodate a workload (UID: u2) due to prioritization "
                                                 "in the ClusterQueue"})
    return p


# --- labels and annotations -------------------------------------------------------------------------

def test_a_job_without_a_queue_label_gets_nothing():
    assert queueing.pod_metadata(job(), 4) == ({}, {})
    assert queueing.apply(job(), {"metadata": {"name": "p"}}) == {"metadata": {"name": "p"}}


def test_queued_pods_carry_the_queue_the_group_its_size_and_the_workload_priority():
    j = queued(labels={queueing.PRIORITY_LABEL: "high", "team": "a"})
    j["metadata"]["uid"] = "0123456789abcdef"
    labels, annotations = queueing.pod_metadata(j, 4)
    assert labels == {"kueue.x-k8s.io/queue-name": "user-queue", "kueue.x-k8s.io/priority-class": "high",
                      "kueue.x-k8s.io/pod-group-name": "sft-j-01234567"}
    assert annotations == {"kueue.x-k8s.io/pod-group-total-count": "4"}
    assert queueing.pod_metadata(j, 0)[1] == {"kueue.x-k8s.io/pod-group-total-count": "1"}


def test_the_group_name_is_one_per_job_object_and_a_valid_name():
    a, b = queued("x" * 80), queued("x" * 80)
    b["metadata"]["uid"] = "ffffffff-other"
    ga, gb = queueing.group_name(a), queueing.group_name(b)
    assert ga != gb and len(ga) <= 63 and len(gb) <= 63
    assert ga == queueing.group_name(queued("x" * 80))  # stable: a replacement pod joins the same Workload
    assert all(c.isalnum() or c == "-" for c in queueing.group_name(queued("My.Job")))


def test_build_and_stamp_a_queued_pod_keeping_the_priority_class_name():
    settings = Settings()
    j = queued(labels={queueing.PRIORITY_LABEL: "low"}, scheduling={"priorityClassName": "batch-low"},
               resources={"gpus": 1, "nodes": 2})
    made = queueing.apply(j, builders.build_pod(j, settings, 3, 0, "h", []))
    assert made["spec"]["priorityClassName"] == "batch-low"
    assert made["metadata"]["labels"][queueing.GROUP_LABEL] == queueing.group_name(j)
    assert made["metadata"]["labels"][builders.LABEL_ATTEMPT] == "3"  # the operator's own labels stay
    assert made["metadata"]["annotations"][queueing.GROUP_COUNT_ANNOTATION] == "2"
    assert builders.ANN_RESTART_COUNT in made["metadata"]["annotations"]


# --- the planner ----------------------------------------------------------------------------------

def test_a_gated_pod_waits_for_admission_naming_the_queue_then_runs():
    j = queued()
    assert step(j).create_pod == (0, 0)
    step(j, [gated(pod("j-sft-trainer-0", phase="Pending"))], 1)
    c = cond(j, "Queued")
    assert (c["status"], c["reason"]) == ("True", "WaitingForAdmission")
    assert c["message"] == "waiting for Kueue admission in LocalQueue user-queue"
    assert j["status"]["phase"] == "Pending"
    assert "Queued" in crd_schema.CONDITION_TYPES  # else the API server refuses the status
    step(j, [pod("j-sft-trainer-0", phase="Running")], 2)
    assert (cond(j, "Queued")["status"], cond(j, "Queued")["reason"]) == ("False", "Admitted")
    assert j["status"]["phase"] == "Running"


def test_a_kueue_preemption_checkpoints_waits_and_resumes_without_back_off():
    j = queued(backoffLimit=1)
    step(j)
    step(j, [pod("j-sft-trainer-0", phase="Running")], 1)
    # Kueue evicts the Workload: TerminationTarget, then the pod is deleted; the trainer is still saving.
    p = step(j, [stopped_by_kueue(pod("j-sft-trainer-0", phase="Running", deleting=True))], 2)
    assert p.create_pod is None and not p.delete_pods
    c = cond(j, "Queued")
    assert (c["status"], c["reason"]) == ("True", "Preempted")
    assert "preempted by Kueue" in c["message"] and "writing a checkpoint" in c["message"]
    assert cond(j, "Running")["status"] == "False"
    # The trainer wrote its checkpoint and exited 143; Kueue keeps the pod (its finalizer) until a replacement
    # joins the group: the next attempt starts at once, restarts not used.
    old = stopped_by_kueue(pod("j-sft-trainer-0", phase="Failed", exit_code=143, deleting=True))
    p = step(j, [old], 3)
    assert p.create_pod == (1, 0)
    st = j["status"]
    assert st["restartCount"] == 0 and st["disruptionCount"] == 1 and "nextAttemptTime" not in st
    assert cond(j, "Queued")["reason"] == "Preempted"
    assert "waiting for readmission in LocalQueue user-queue" in cond(j, "Queued")["message"]
    # The replacement is gated until Kueue readmits the Workload; the status keeps saying why it waits.
    step(j, [old, gated(pod("j-sft-trainer-1", attempt=1, phase="Pending"))], 4)
    c = cond(j, "Queued")
    assert (c["status"], c["reason"]) == ("True", "Preempted") and "LocalQueue user-queue" in c["message"]
    assert j["status"]["phase"] == "Pending" and j["status"]["restartCount"] == 0
    step(j, [old, pod("j-sft-trainer-1", attempt=1, phase="Running")], 5)
    assert (cond(j, "Queued")["status"], j["status"]["phase"]) == ("False", "Running")


def test_a_pod_finishing_as_kueue_stops_it_succeeds():
    j = queued()
    step(j)
    done = stopped_by_kueue(pod("j-sft-trainer-0", phase="Succeeded", exit_code=0, message="{}", deleting=True))
    p = step(j, [done], 1)
    assert p.create_pod is None and j["status"]["phase"] == "Succeeded"


def test_after_a_suspend_pods_held_by_kueues_finalizer_do_not_block_the_resume():
    j = queued()
    step(j)
    j["spec"]["suspend"] = True
    assert step(j, [pod("j-sft-trainer-0", phase="Running")], 1).delete_pods == ["j-sft-trainer-0"]
    assert j["status"]["phase"] == "Suspended"
    j["spec"]["suspend"] = False
    held = pod("j-sft-trainer-0", phase="Failed", exit_code=143, deleting=True)
    assert step(j, [held], 2).create_pod == (1, 0)
    unqueued = job()
    unqueued["status"] = {k: v for k, v in j["status"].items()}
    unqueued["status"].update(trainerPod="", attempt=0)
    assert step(unqueued, [held], 3).create_pod is None  # without Kueue: wait for the pod to go, as before


def test_an_eviction_that_is_not_a_preemption_is_named_as_such():
    j = queued()
    step(j)
    old = pod("j-sft-trainer-0", phase="Failed", exit_code=143, deleting=True)
    old["status"]["conditions"].append({"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvicted",
                                        "message": "The ClusterQueue is stopped"})
    assert step(j, [old], 1).create_pod == (1, 0)
    c = cond(j, "Queued")
    assert c["reason"] == "Evicted" and c["message"].startswith("evicted by Kueue (WorkloadEvicted: The ClusterQueue")
    step(j, [old, gated(pod("j-sft-trainer-1", attempt=1, phase="Pending"))], 2)
    assert cond(j, "Queued")["reason"] == "Evicted" and j["status"]["restartCount"] == 0


def test_kueues_hold_is_lifted_only_where_no_replacement_comes():
    def view(phase="Failed", deleting=True, held=True, attempt=0, owner="uid-j"):
        p = pod(f"j-sft-trainer-{attempt}", attempt=attempt, phase=phase, deleting=deleting, owner=owner)
        if held:
            p["metadata"]["finalizers"] = [queueing.FINALIZER]
        return pod_view(p)
    running = {"uid": "uid-j", "phase": "Running"}
    assert not queueing.release_hold(view(), running, 0)  # preempted: its replacement is coming
    assert queueing.release_hold(view(), running, 1)  # the replacement exists (Kueue would do it too)
    assert queueing.release_hold(view(), None, 0)  # the job was deleted
    assert queueing.release_hold(view(), {"uid": "other", "phase": "Running"}, 0)  # ... and made again
    for phase in ("Failed", "Succeeded", "Suspended"):
        assert queueing.release_hold(view(), {"uid": "uid-j", "phase": phase}, 0)
    assert not queueing.release_hold(view(phase="Running"), None, 0)  # still stopping: the trainer saves
    assert not queueing.release_hold(view(deleting=False), None, 0)
    assert not queueing.release_hold(view(held=False), None, 0)
