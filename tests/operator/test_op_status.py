"""The pure planner: every status transition and the actions it asks for."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator.status import Conditions, DepState, final_progress, plan, pod_view

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def later(seconds):
    return NOW + dt.timedelta(seconds=seconds)


def cond(status, ctype):
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), None)


def step(j, pods=(), deps=(), now=NOW, **kw):
    """Plan, then apply the status (as the reconciler would) and return the plan."""
    p = plan(j, [pod_view(x) for x in pods], list(deps), now, **kw)
    j["status"] = p.status
    return p


def test_new_job_creates_first_pod_then_runs_and_succeeds():
    j = job()
    p = step(j)
    assert p.create_pod == (0, 0)
    st = j["status"]
    assert st["trainerPod"] == "j-trainer-0" and st["attempt"] == 0 and st["phase"] == "Pending"
    assert st["startTime"] == "2025-01-01T12:00:00Z" and st["observedGeneration"] == 1
    assert st["checkpoint"]["claim"] == "j-checkpoints"
    assert cond(st, "Created")["status"] == "True"
    assert ("Normal", "TrainerPodCreated") in [(t, r) for t, r, _ in p.events]

    p = step(j, [pod("j-trainer-0", phase="Running")], progress={"step": 5, "totalSteps": 20, "loss": 0.5, "reward": 9.0},
             now=later(5))
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Running" and cond(st, "Running")["status"] == "True"
    assert st["progress"] == {"step": 5, "totalSteps": 20, "loss": 0.5, "percent": 25.0, "summary": "5/20"}  # no PPO keys for SFT

    p = step(j, [pod("j-trainer-0", phase="Succeeded", exit_code=0,
                     message='{"rlhf_trainer_step": 20, "rlhf_trainer_total_steps": 20, "rlhf_trainer_loss": 0.1}')],
             now=later(10))
    st = j["status"]
    assert st["phase"] == "Succeeded" and cond(st, "Succeeded")["reason"] == "TrainingComplete"
    assert cond(st, "Running")["status"] == "False"
    assert st["output"] == {"claim": "j-checkpoints", "path": "final"}
    assert st["completionTime"].startswith("2025-01-01T12:00:10.")
    assert st["progress"]["summary"] == "20/20" and st["progress"]["percent"] == 100.0 and st["progress"]["loss"] == 0.1


def test_last_transition_time_kept_while_status_unchanged():
    j = job()
    step(j)
    step(j, [pod("j-trainer-0", phase="Running")], now=later(5))
    first = cond(j["status"], "Running")["lastTransitionTime"]
    p = step(j, [pod("j-trainer-0", phase="Running")], now=later(50))
    assert cond(j["status"], "Running")["lastTransitionTime"] == first == "2025-01-01T12:00:05Z"
    assert p.events == [] and p.create_pod is None


def test_failed_pod_is_replaced_with_next_attempt_and_counted():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "backoffLimit": 2})
    step(j)
    p = step(j, [pod("j-trainer-0", phase="Failed", exit_code=137, message="Killed")], now=later(5))
    st = j["status"]
    assert p.create_pod == (1, 1) and p.restarted
    assert st["trainerPod"] == "j-trainer-1" and st["restartCount"] == 1 and st["phase"] == "Restarting"
    c = cond(st, "Restarting")
    assert c["status"] == "True" and c["reason"] == "PodFailed"
    assert "exit code 137" in c["message"] and "restart 1 of 2" in c["message"] and "Killed" in c["message"]
    assert ("Warning", "PodFailed") in [(t, r) for t, r, _ in p.events]
    pods = [pod("j-trainer-0", phase="Failed", exit_code=137), pod("j-trainer-1", attempt=1, restarts=1)]
    step(j, pods, now=later(6))
    assert j["status"]["phase"] == "Running" and cond(j["status"], "Restarting")["status"] == "False"
    pods[1] = pod("j-trainer-1", attempt=1, restarts=1, phase="Failed", exit_code=1)
    p = step(j, pods, now=later(7))
    assert p.create_pod == (2, 2) and j["status"]["restartCount"] == 2
    pods.append(pod("j-trainer-2", attempt=2, restarts=2, phase="Failed", exit_code=1, message="boom"))
    p = step(j, pods, now=later(8))
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Failed"
    assert cond(st, "Failed")["reason"] == "BackoffLimitExceeded" and "boom" in cond(st, "Failed")["message"]


def test_permanent_exit_code_fails_at_once_with_the_termination_message():
    j = job()
    step(j)
    p = step(j, [pod("j-trainer-0", phase="Failed", exit_code=3, message="dataset.path: /d does not exist")])
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Failed" and st["restartCount"] == 0
    c = cond(st, "Failed")
    assert c["reason"] == "DataError" and "exit code 3" in c["message"] and "/d does not exist" in c["message"]


def test_vanished_pod_counts_as_failure():
    j = job()
    step(j)
    step(j, [pod("j-trainer-0")])
    p = step(j, [])  # deleted by someone
    assert p.create_pod == (1, 1) and "disappeared" in cond(j["status"], "Restarting")["message"]


def test_pods_of_another_owner_and_terminating_pods_are_ignored():
    j = job()
    p = step(j, [pod("j-trainer-0", owner="uid-old")])  # a previous job of the same name
    assert p.create_pod == (0, 0)
    p = step(j, [pod("j-trainer-0", deleting=True, phase="Failed", exit_code=143)])
    assert p.create_pod is None and p.delete_pods == []  # wait until it is gone


def test_restarted_operator_adopts_by_deterministic_name():
    # Status says attempt 0 failed, but pod 1 (restart 1) was created before the operator died.
    j = job()
    step(j)
    pods = [pod("j-trainer-0", phase="Failed", exit_code=1), pod("j-trainer-1", attempt=1, restarts=1, phase="Running")]
    p = step(j, pods)
    assert p.create_pod == (1, 1)  # the same name: the create returns 409 and the pod is adopted
    assert j["status"]["restartCount"] == 1


def test_unschedulable_pod_surfaces_the_scheduler_reason():
    j = job()
    step(j)
    p = step(j, [pod("j-trainer-0", phase="Pending", unschedulable="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")])
    st = j["status"]
    c = cond(st, "PodScheduled")
    assert st["phase"] == "Pending" and c["status"] == "False" and c["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in c["message"]
    assert ("Warning", "Unschedulable") in [(t, r) for t, r, _ in p.events]


def test_suspend_then_resume_keeps_restart_count_and_takes_next_attempt():
    j = job()
    step(j)
    step(j, [pod("j-trainer-0")], now=later(1))
    j["spec"]["suspend"] = True
    j["metadata"]["generation"] = 2
    p = step(j, [pod("j-trainer-0")], now=later(2))
    st = j["status"]
    assert p.delete_pods == ["j-trainer-0"] and p.create_pod is None
    assert st["phase"] == "Suspended" and "trainerPod" not in st and cond(st, "Running")["status"] == "False"
    assert cond(st, "Suspended")["observedGeneration"] == 2
    p = step(j, [], now=later(3))
    assert p.create_pod is None and p.events == []
    j["spec"]["suspend"] = False
    p = step(j, [pod("j-trainer-0", deleting=True)], now=later(50))
    assert p.create_pod is None  # the stopping pod may still be writing its checkpoint
    p = step(j, [], now=later(100))
    st = j["status"]
    assert p.create_pod == (1, 0) and not p.restarted
    assert cond(st, "Suspended")["status"] == "False" and cond(st, "Suspended")["reason"] == "JobResumed"
    assert st["startTime"] == "2025-01-01T12:01:40Z"  # the deadline counts from the resume


def test_active_deadline():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "activeDeadlineSeconds": 30})
    step(j)
    p = step(j, [pod("j-trainer-0")], now=later(10))
    assert p.requeue_at == later(30)
    p = step(j, [pod("j-trainer-0")], now=later(31))
    st = j["status"]
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "DeadlineExceeded"
    assert p.delete_pods == ["j-trainer-0"] and "completionTime" in st


def test_terminal_conditions_are_sticky_and_ttl_deletes():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "ttlSecondsAfterFinished": 60})
    step(j)
    step(j, [pod("j-trainer-0", phase="Succeeded", exit_code=0)])
    done = dict(j["status"])
    p = step(j, [pod("j-trainer-0", phase="Failed", exit_code=1)], now=later(10))
    assert j["status"]["phase"] == "Succeeded" and cond(j["status"], "Failed") is None
    assert j["status"]["conditions"] == done["conditions"] and p.create_pod is None
    assert p.requeue_at is not None and not p.delete_job
    assert step(j, [], now=later(61)).delete_job


def test_invalid_spec_fails_with_reason():
    j = job()
    p = step(j, invalid="spec.resources.gpus: 3 GPUs per pod cannot be used")
    c = cond(j["status"], "Failed")
    assert c["reason"] == "InvalidSpec" and "spec.resources.gpus" in c["message"] and p.create_pod is None


def dep(kind, name, exists=True, phase="", uid="", message="", done=""):
    uid = uid or (f"uid-{name}" if exists else "")
    return DepState(("actor",) if kind == "SFTJob" else ("rewardModel",), kind, name, exists, uid,
                    phase, message, f"{name}-checkpoints", done)


def test_waits_for_dependencies_then_starts_and_records_handoff():
    j = job("PPOJob", "p")
    p = step(j, deps=[dep("SFTJob", "sft", phase="Running"), dep("RewardModelJob", "rm", exists=False)])
    st = j["status"]
    c = cond(st, "WaitingForDependencies")
    assert p.create_pod is None and st["phase"] == "Waiting" and c["status"] == "True"
    assert "RewardModelJob rm (not found)" in c["message"] and "SFTJob sft (Running)" in c["message"]
    done = "2025-01-01T11:59:59.500000Z"
    p = step(j, deps=[dep("SFTJob", "sft", phase="Succeeded", done="2025-01-01T11:00:00Z"),
                      dep("RewardModelJob", "rm", phase="Succeeded", done=done)])
    assert p.create_pod == (0, 0) and cond(j["status"], "WaitingForDependencies")["status"] == "False"
    assert p.handoff_from == dt.datetime(2025, 1, 1, 11, 59, 59, 500000, tzinfo=dt.UTC)
    assert {d["name"]: d["uid"] for d in j["status"]["dependencies"]} == {"sft": "uid-sft", "rm": "uid-rm"}


def test_failed_dependency_fails_the_job():
    j = job("PPOJob", "p")
    step(j, deps=[dep("SFTJob", "sft", phase="Failed", message="trainer exited with code 3")])
    c = cond(j["status"], "Failed")
    assert c["reason"] == "DependencyFailed" and "SFTJob sft (actor) failed: trainer exited with code 3" in c["message"]


def test_deleted_dependency_fails_the_job():
    j = job("PPOJob", "p")
    step(j, deps=[dep("RewardModelJob", "rm", phase="Running")])
    step(j, deps=[dep("RewardModelJob", "rm", exists=False)])
    c = cond(j["status"], "Failed")
    assert c["reason"] == "DependencyDeleted" and "RewardModelJob rm" in c["message"]
    j = job("PPOJob", "p")
    step(j, deps=[dep("RewardModelJob", "rm", phase="Running")])
    step(j, deps=[dep("RewardModelJob", "rm", phase="Running", uid="uid-other")])
    assert cond(j["status"], "Failed")["reason"] == "DependencyDeleted"


def test_dependencies_are_not_rechecked_after_start():
    j = job("PPOJob", "p")
    step(j, deps=[dep("SFTJob", "sft", phase="Succeeded")])
    p = step(j, [pod("p-trainer-0", owner="uid-p")], deps=[dep("SFTJob", "sft", exists=False)])
    assert j["status"]["phase"] == "Running" and p.delete_pods == []


def test_conditions_helper_and_final_progress():
    c = Conditions([], "t1", 3)
    c.set("Running", True, "A", "a")
    c.set("Running", True, "B", "b")
    assert c.items == [{"type": "Running", "status": "True", "reason": "B", "message": "b", "lastTransitionTime": "t1",
                        "observedGeneration": 3}]
    assert len(c.transitions) == 1
    c.clear("Restarting", "X", "x")
    assert c.get("Restarting") is None
    assert final_progress("not json") == {} and final_progress('{"rlhf_ppo_kl": 0.5, "rlhf_trainer_step": 3}') == {"kl": 0.5, "step": 3}


def test_status_never_carries_empty_strings_and_patch_removes_keys():
    from rlhf_operator.status import merge_patch, prune_empty

    assert prune_empty({"a": "", "b": {"c": ""}, "d": [{"e": "", "f": 1}], "g": 0}) == {"d": [{"f": 1}], "g": 0}
    old = {"trainerPod": "j-trainer-0", "progress": {"step": 1, "loss": 0.5}, "conditions": [{"type": "A"}]}
    new = {"progress": {"step": 2, "loss": 0.5}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert merge_patch(old, new) == {"trainerPod": None, "progress": {"step": 2}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert merge_patch(new, new) == {}
    j = job()
    step(j)
    step(j, [pod("j-trainer-0")])
    j["spec"]["suspend"] = True
    step(j, [pod("j-trainer-0")])
    assert "trainerPod" not in j["status"]  # cleared by omission (patched as null)


def test_retain_policy_change_updates_the_claim_owner():
    j = job()
    step(j)
    assert j["status"]["checkpoint"] == {"claim": "j-checkpoints", "retainPolicy": "Retain"}
    step(j, [pod("j-trainer-0", phase="Succeeded", exit_code=0)])
    j["spec"]["checkpoint"] = {"retainPolicy": "Delete"}
    p = step(j, [pod("j-trainer-0", phase="Succeeded", exit_code=0)])
    assert p.claim_owned is True and j["status"]["checkpoint"]["retainPolicy"] == "Delete"
    assert step(j, []).claim_owned is None


def test_failure_message_keeps_the_end_of_a_log_tail():
    from rlhf_operator.status import short_message

    log = "\n".join(f"step {i}" for i in range(50)) + "\nTraceback ...\n  File x\nValueError: dataset row 7 is not JSON\n"
    assert short_message(log) == "Traceback ... / File x / ValueError: dataset row 7 is not JSON"
    long = "config error: model.init_from_config: Unrecognized model " + "x, " * 1500 + "gpt2"
    short = short_message(long)
    assert len(short) == 805 and short.startswith("config error: model.init_from_config") and short.endswith("gpt2")
