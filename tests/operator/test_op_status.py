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
    assert st["trainerPod"] == "j-sft-trainer-0" and st["attempt"] == 0 and st["phase"] == "Pending"
    assert st["startTime"] == "2025-01-01T12:00:00Z" and st["observedGeneration"] == 1
    assert st["checkpoint"]["claim"] == "j-sft-checkpoints"
    assert cond(st, "Created")["status"] == "True"
    assert ("Normal", "TrainerPodCreated") in [(t, r) for t, r, _ in p.events]

    p = step(j, [pod("j-sft-trainer-0", phase="Running")], progress={"step": 5, "totalSteps": 20, "loss": 0.5, "reward": 9.0},
             now=later(5))
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Running" and cond(st, "Running")["status"] == "True"
    assert st["progress"] == {"step": 5, "totalSteps": 20, "loss": 0.5, "percent": 25.0, "summary": "5/20"}  # no PPO keys for SFT

    p = step(j, [pod("j-sft-trainer-0", phase="Succeeded", exit_code=0,
                     message='{"rlhf_trainer_step": 20, "rlhf_trainer_total_steps": 20, "rlhf_trainer_loss": 0.1}')],
             now=later(10))
    st = j["status"]
    assert st["phase"] == "Succeeded" and cond(st, "Succeeded")["reason"] == "TrainingComplete"
    assert cond(st, "Running")["status"] == "False"
    assert st["output"] == {"claim": "j-sft-checkpoints", "path": "final"}
    assert st["completionTime"].startswith("2025-01-01T12:00:10.")
    assert st["progress"]["summary"] == "20/20" and st["progress"]["percent"] == 100.0 and st["progress"]["loss"] == 0.1


def test_last_transition_time_kept_while_status_unchanged():
    j = job()
    step(j)
    step(j, [pod("j-sft-trainer-0", phase="Running")], now=later(5))
    first = cond(j["status"], "Running")["lastTransitionTime"]
    p = step(j, [pod("j-sft-trainer-0", phase="Running")], now=later(50))
    assert cond(j["status"], "Running")["lastTransitionTime"] == first == "2025-01-01T12:00:05Z"
    assert p.events == [] and p.create_pod is None


def ended(p, seconds):
    """A pod dict whose trainer container terminated at later(seconds)."""
    p["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = later(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")
    return p


def test_failed_pod_is_replaced_after_an_exponential_back_off_and_counted():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "backoffLimit": 2})
    step(j)
    failed0 = ended(pod("j-sft-trainer-0", phase="Failed", exit_code=137, message="Killed"), 4)
    p = step(j, [failed0], now=later(5))
    st = j["status"]
    # Not at once: 10 s (the default base) after the pod ended; the condition says when.
    assert p.create_pod is None and p.requeue_at == later(14) and st["nextAttemptTime"].startswith("2025-01-01T12:00:14")
    c = cond(st, "Restarting")
    assert st["phase"] == "Restarting" and c["status"] == "True" and c["reason"] == "PodFailed"
    assert "exit code 137" in c["message"] and "Killed" in c["message"]
    assert "restart 1 of 2 at 2025-01-01T12:00:14Z (back-off 10s)" in c["message"]
    assert ("Warning", "PodFailed") in [(t, r) for t, r, _ in p.events]
    p = step(j, [failed0], now=later(13))
    assert p.create_pod is None and p.events == []
    p = step(j, [failed0], now=later(14))
    st = j["status"]
    assert p.create_pod == (1, 1) and p.restarted and "nextAttemptTime" not in st
    assert st["trainerPod"] == "j-sft-trainer-1" and st["restartCount"] == 1
    assert "started j-sft-trainer-1 (restart 1 of 2)" in cond(st, "Restarting")["message"]
    assert "resum" not in cond(st, "Restarting")["message"]  # the trainer reports where it starts
    assert [(t, r) for t, r, _ in p.events] == [("Normal", "TrainerRestarted")]
    pods = [failed0, pod("j-sft-trainer-1", attempt=1, restarts=1)]
    step(j, pods, now=later(16))
    assert j["status"]["phase"] == "Running" and cond(j["status"], "Restarting")["status"] == "False"
    pods[1] = ended(pod("j-sft-trainer-1", attempt=1, restarts=1, phase="Failed", exit_code=1), 17)
    p = step(j, pods, now=later(18))
    assert p.create_pod is None and p.requeue_at == later(37)  # the second restart waits twice as long
    assert step(j, pods, now=later(36)).create_pod is None
    p = step(j, pods, now=later(37))
    assert p.create_pod == (2, 2) and j["status"]["restartCount"] == 2
    pods.append(pod("j-sft-trainer-2", attempt=2, restarts=2, phase="Failed", exit_code=1, message="boom"))
    p = step(j, pods, now=later(38))  # restarts used up: no back-off before failing
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Failed"
    assert cond(st, "Failed")["reason"] == "BackoffLimitExceeded" and "boom" in cond(st, "Failed")["message"]


def test_permanent_exit_code_fails_at_once_with_the_termination_message():
    j = job()
    step(j)
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=3, message="dataset.path: /d does not exist")])
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Failed" and st["restartCount"] == 0
    c = cond(st, "Failed")
    assert c["reason"] == "DataError" and "exit code 3" in c["message"] and "/d does not exist" in c["message"]


def test_restart_back_off_base_is_a_setting_and_zero_restarts_at_once():
    j = job()
    step(j)
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1)], now=later(5), backoff_base=0)
    assert p.create_pod == (1, 1) and p.restarted
    assert [(t, r) for t, r, _ in p.events] == [("Warning", "PodFailed")]  # one event: the transition
    j = job()
    step(j)
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1)], now=later(5), backoff_base=2)
    assert p.requeue_at == later(7)


def test_deleted_or_evicted_pods_are_disruptions_not_failures():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "backoffLimit": 0})
    step(j)
    step(j, [pod("j-sft-trainer-0")])
    p = step(j, [], now=later(1))  # deleted by someone (kubectl delete, a drain): replaced at once
    st = j["status"]
    assert p.create_pod == (1, 0) and not p.restarted and st["restartCount"] == 0 and st["disruptionCount"] == 1
    c = cond(st, "Restarting")
    assert c["reason"] == "PodDisrupted" and "j-sft-trainer-0 was deleted by someone other than the operator" in c["message"]
    assert "not counted against spec.backoffLimit (disruption 1); started j-sft-trainer-1" in c["message"]
    assert ("Warning", "PodDisrupted") in [(t, r) for t, r, _ in p.events]
    # Evicted by the kubelet (pod reason), before it ever ran: still a disruption, with its own event.
    evicted = pod("j-sft-trainer-1", attempt=1, phase="Failed", exit_code=137)
    evicted["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    p = step(j, [evicted], now=later(2))
    st = j["status"]
    assert p.create_pod == (2, 0) and st["disruptionCount"] == 2 and st["restartCount"] == 0 and st["phase"] == "Restarting"
    assert "j-sft-trainer-1 was evicted by its node (The node was low on resource: memory.)" in cond(st, "Restarting")["message"]
    assert [(t, r) for t, r, _ in p.events] == [("Warning", "PodDisrupted")]  # Restarting was already True
    # DisruptionTarget (preemption, taint eviction: Kubernetes >= 1.26) and a SIGTERM exit count the same.
    preempted = pod("j-sft-trainer-2", attempt=2, phase="Failed", exit_code=137)
    preempted["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                              "message": "preempted by a higher-priority pod"})
    assert step(j, [preempted], now=later(3)).create_pod == (3, 0)
    assert "was disrupted: PreemptionByScheduler: preempted" in cond(j["status"], "Restarting")["message"]
    assert step(j, [pod("j-sft-trainer-3", attempt=3, phase="Failed", exit_code=143)], now=later(4)).create_pod == (4, 0)
    assert j["status"]["disruptionCount"] == 4 and j["status"]["restartCount"] == 0
    # A running pod already marked as a disruption target is left to stop first.
    marked = pod("j-sft-trainer-4", attempt=4)
    marked["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"})
    assert step(j, [marked], now=later(5)).create_pod is None and j["status"]["phase"] == "Running"
    # A failed pod removed while its replacement waits out the back-off stays a failure.
    j2 = job(name="k", spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}})
    step(j2)
    step(j2, [pod("k-sft-trainer-0", owner="uid-k", phase="Failed", exit_code=1)], now=later(1))
    p = step(j2, [], now=later(2))
    assert p.create_pod is None and "disruptionCount" not in j2["status"] and p.requeue_at == later(11)
    assert step(j2, [], now=later(11)).create_pod == (1, 1)
    # A real failure still counts (and with backoffLimit 0 fails the job).
    p = step(j, [pod("j-sft-trainer-4", attempt=4, phase="Failed", exit_code=1)], now=later(6))
    assert j["status"]["phase"] == "Failed" and cond(j["status"], "Failed")["reason"] == "BackoffLimitExceeded"


def test_oom_killed_fails_at_once_saying_what_to_change():
    spec = {"model": {"path": "/m"}, "dataset": {"path": "/d"}, "resources": {"memory": "4Gi", "gpus": 0},
            "training": {"batchSize": 16}}
    j = job(spec=spec)
    step(j)
    oom = pod("j-sft-trainer-0", phase="Failed", exit_code=137)
    oom["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    p = step(j, [oom], now=later(5))
    st = j["status"]
    c = cond(st, "Failed")
    assert p.create_pod is None and st["phase"] == "Failed" and st["restartCount"] == 0 and c["reason"] == "OOMKilled"
    for text in ("ran out of memory", "exit code 137", "spec.resources.memory=4Gi", "spec.training.batchSize (now 16)",
                 "spec.training.gradientAccumulationSteps", "spec.deepspeed.zeroStage 2 or 3 with offloadOptimizer",
                 "without using spec.backoffLimit", "kept in claim j-sft-checkpoints"):
        assert text in c["message"], (text, c["message"])
    assert ("Warning", "OOMKilled") in [(t, r) for t, r, _ in p.events]
    # Exit code 137 without the OOMKilled reason is a plain kill (e.g. SIGKILL): retried.
    j = job(spec=spec)
    step(j)
    assert step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=137)], now=later(5), backoff_base=0).create_pod == (1, 1)


def test_pods_of_another_owner_and_terminating_pods_are_ignored():
    j = job()
    p = step(j, [pod("j-sft-trainer-0", owner="uid-old")])  # a previous job of the same name
    assert p.create_pod == (0, 0)
    p = step(j, [pod("j-sft-trainer-0", deleting=True, phase="Failed", exit_code=143)])
    assert p.create_pod is None and p.delete_pods == []  # wait until it is gone


def test_restarted_operator_adopts_by_deterministic_name():
    # Status says attempt 0 failed, but pod 1 (restart 1) was created before the operator died.
    j = job()
    step(j)
    pods = [pod("j-sft-trainer-0", phase="Failed", exit_code=1), pod("j-sft-trainer-1", attempt=1, restarts=1, phase="Running")]
    p = step(j, pods)
    assert p.create_pod == (1, 1)  # the same name: the create returns 409 and the pod is adopted
    assert j["status"]["restartCount"] == 1


def test_unschedulable_pod_surfaces_the_scheduler_reason():
    j = job()
    step(j)
    p = step(j, [pod("j-sft-trainer-0", phase="Pending", unschedulable="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")])
    st = j["status"]
    c = cond(st, "PodScheduled")
    assert st["phase"] == "Pending" and c["status"] == "False" and c["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in c["message"]
    assert ("Warning", "Unschedulable") in [(t, r) for t, r, _ in p.events]


def test_suspend_then_resume_keeps_restart_count_and_takes_next_attempt():
    j = job()
    step(j)
    step(j, [pod("j-sft-trainer-0")], now=later(1))
    j["spec"]["suspend"] = True
    j["metadata"]["generation"] = 2
    p = step(j, [pod("j-sft-trainer-0")], now=later(2))
    st = j["status"]
    assert p.delete_pods == ["j-sft-trainer-0"] and p.create_pod is None
    assert st["phase"] == "Suspended" and "trainerPod" not in st and cond(st, "Running")["status"] == "False"
    assert cond(st, "Suspended")["observedGeneration"] == 2
    p = step(j, [], now=later(3))
    assert p.create_pod is None and p.events == []
    j["spec"]["suspend"] = False
    p = step(j, [pod("j-sft-trainer-0", deleting=True)], now=later(50))
    assert p.create_pod is None  # the stopping pod may still be writing its checkpoint
    p = step(j, [], now=later(100))
    st = j["status"]
    assert p.create_pod == (1, 0) and not p.restarted
    assert cond(st, "Suspended")["status"] == "False" and cond(st, "Suspended")["reason"] == "JobResumed"
    assert st["startTime"] == "2025-01-01T12:01:40Z"  # the deadline counts from the resume


def test_active_deadline():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "activeDeadlineSeconds": 30})
    step(j)
    p = step(j, [pod("j-sft-trainer-0")], now=later(10))
    assert p.requeue_at == later(30)
    p = step(j, [pod("j-sft-trainer-0")], now=later(31))
    st = j["status"]
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "DeadlineExceeded"
    assert p.delete_pods == ["j-sft-trainer-0"] and "completionTime" in st


def test_terminal_conditions_are_sticky_and_ttl_deletes():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "ttlSecondsAfterFinished": 60})
    step(j)
    step(j, [pod("j-sft-trainer-0", phase="Succeeded", exit_code=0)])
    done = dict(j["status"])
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1)], now=later(10))
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
    p = step(j, [pod("p-ppo-trainer-0", owner="uid-p")], deps=[dep("SFTJob", "sft", exists=False)])
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
    old = {"trainerPod": "j-sft-trainer-0", "progress": {"step": 1, "loss": 0.5}, "conditions": [{"type": "A"}]}
    new = {"progress": {"step": 2, "loss": 0.5}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert merge_patch(old, new) == {"trainerPod": None, "progress": {"step": 2}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert merge_patch(new, new) == {}
    j = job()
    step(j)
    step(j, [pod("j-sft-trainer-0")])
    j["spec"]["suspend"] = True
    step(j, [pod("j-sft-trainer-0")])
    assert "trainerPod" not in j["status"]  # cleared by omission (patched as null)


def test_retain_policy_change_updates_the_claim_owner():
    j = job()
    step(j)
    assert j["status"]["checkpoint"] == {"claim": "j-sft-checkpoints", "retainPolicy": "Retain"}
    step(j, [pod("j-sft-trainer-0", phase="Succeeded", exit_code=0)])
    j["spec"]["checkpoint"] = {"retainPolicy": "Delete"}
    p = step(j, [pod("j-sft-trainer-0", phase="Succeeded", exit_code=0)])
    assert p.claim_owned is True and j["status"]["checkpoint"]["retainPolicy"] == "Delete"
    assert step(j, []).claim_owned is None


def test_failure_message_keeps_the_end_of_a_log_tail():
    from rlhf_operator.status import short_message

    log = "\n".join(f"step {i}" for i in range(50)) + "\nTraceback ...\n  File x\nValueError: dataset row 7 is not JSON\n"
    assert short_message(log) == "Traceback ... / File x / ValueError: dataset row 7 is not JSON"
    long = "config error: model.init_from_config: Unrecognized model " + "x, " * 1500 + "gpt2"
    short = short_message(long)
    assert len(short) == 805 and short.startswith("config error: model.init_from_config") and short.endswith("gpt2")


def test_a_run_keeps_its_spec_and_refuses_edits_it_cannot_take():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "training": {"maxSteps": 100}, "backoffLimit": 1})
    step(j)
    st = j["status"]
    assert st["runningGeneration"] == 1 and st["runningSpec"]["training"] == {"maxSteps": 100}
    step(j, [pod("j-sft-trainer-0")], now=later(1))
    j["spec"]["training"]["maxSteps"] = 30
    j["spec"]["backoffLimit"] = 2  # may change while running: taken at once
    j["metadata"]["generation"] = 2
    p = step(j, [pod("j-sft-trainer-0")], now=later(2))
    st = j["status"]
    c = cond(st, "SpecChangeRefused")
    assert c["status"] == "True" and c["reason"] == "ImmutableWhileRunning" and c["observedGeneration"] == 2
    assert c["message"].startswith("spec.training changed while the trainer runs (generation 2): not applied")
    assert "keep the spec of generation 1" in c["message"] and "spec.suspend: true" in c["message"]
    assert "backoffLimit" not in c["message"]
    assert st["observedGeneration"] == 2 and st["runningGeneration"] == 1 and st["runningSpec"]["training"]["maxSteps"] == 100
    assert ("Warning", "ImmutableWhileRunning") in [(t, r) for t, r, _ in p.events] and st["phase"] == "Running"
    # A crash does not apply it: the replacement belongs to the same run (the reconciler builds it from runningSpec).
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1)], now=later(3), backoff_base=0)
    st = j["status"]
    assert p.create_pod == (1, 1) and "restart 1 of 2" in cond(st, "Restarting")["message"]  # the new backoffLimit
    assert st["runningGeneration"] == 1 and cond(st, "SpecChangeRefused")["status"] == "True"
    # Reverted: nothing refused any more, the run is at the current generation.
    j["spec"]["training"]["maxSteps"] = 100
    j["metadata"]["generation"] = 3
    p = step(j, [pod("j-sft-trainer-1", attempt=1, restarts=1)], now=later(4))
    st = j["status"]
    assert cond(st, "SpecChangeRefused")["status"] == "False" and cond(st, "SpecChangeRefused")["reason"] == "SpecMatchesRun"
    assert st["runningGeneration"] == 3 and ("Normal", "SpecMatchesRun") in [(t, r) for t, r, _ in p.events]
    # Suspend and resume: a new run, which takes the edited spec.
    j["spec"].update(training={"maxSteps": 30}, suspend=True)
    j["metadata"]["generation"] = 4
    step(j, [pod("j-sft-trainer-1", attempt=1, restarts=1)], now=later(5))
    assert cond(j["status"], "SpecChangeRefused")["reason"] == "JobSuspended" and j["status"]["runningGeneration"] == 3
    j["spec"]["suspend"] = False
    j["metadata"]["generation"] = 5
    p = step(j, [], now=later(6))
    st = j["status"]
    assert p.create_pod == (2, 1) and st["runningGeneration"] == 5 and st["runningSpec"]["training"] == {"maxSteps": 30}
    assert cond(st, "SpecChangeRefused")["status"] == "False"


def test_resume_is_reported_only_as_the_trainer_reports_it():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}})
    step(j)
    p = step(j, [pod("j-sft-trainer-0")], now=later(1), progress={"step": 2})
    assert [r for _, r, _ in p.events] == ["TrainerRunning"]  # nothing said about where it started yet
    p = step(j, [pod("j-sft-trainer-0")], now=later(2), progress={"step": 3, "resumedFromStep": -1})
    assert j["status"]["progress"]["resumedFromStep"] == -1
    assert p.events == [("Normal", "StartedFresh", "trainer pod j-sft-trainer-0 started from step 0 (no checkpoint to resume from)")]
    assert step(j, [pod("j-sft-trainer-0")], now=later(3), progress={"step": 4, "resumedFromStep": -1}).events == []
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1)], now=later(4), backoff_base=0)
    assert "resumedFromStep" not in j["status"]["progress"]  # the new pod has not said yet
    assert all("resum" not in m for _, _, m in p.events)
    p = step(j, [pod("j-sft-trainer-1", attempt=1, restarts=1)], now=later(5), progress={"step": 4, "resumedFromStep": 4})
    assert ("Normal", "ResumedFromCheckpoint", "trainer pod j-sft-trainer-1 resumed from step 4 (checkpoint restored)") in p.events
    # Reported in the success termination message too.
    msg = '{"rlhf_trainer_step": 9, "rlhf_trainer_resumed_from_step": 8}'
    j2 = job(name="k", spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}})
    step(j2)
    p = step(j2, [pod("k-sft-trainer-0", owner="uid-k", phase="Succeeded", exit_code=0, message=msg)], now=later(1))
    assert j2["status"]["progress"]["resumedFromStep"] == 8 and "ResumedFromCheckpoint" in [r for _, r, _ in p.events]
