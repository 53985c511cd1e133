"""A job's life after its pod starts, through a real operator process and the embedded cluster: spec
edits while running, disruptions, the restart back-off, OOM kills, a status the API server refuses,
and where a replaced trainer really resumed."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal

import yaml
from op_helpers import trainer_pid, wait_for
from rlhf_trainer import config as tc


def spec(steps=10, step_seconds=0.05, every=3, **extra):
    s = {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": steps},
         "resources": {"gpus": 0}, "checkpoint": {"everySteps": every},
         "env": [{"name": "STANDIN_STEP_SECONDS", "value": str(step_seconds)}]}
    for key, value in extra.items():
        s[key] = s["env"] + value if key == "env" else value
    return s


def running_pod(jobs, kind, name, min_step=1):
    """Name of the job's trainer pod once it runs and has reported `min_step`."""
    st = wait_for(f"{name} running at step >= {min_step}", lambda: (s := jobs.status(kind, name)).get("phase") == "Running"
                  and s.get("progress", {}).get("step", 0) >= min_step and s, 60)
    return st["trainerPod"]


def history(jobs, name):
    claim = jobs.status("SFTJob", name)["checkpoint"]["claim"]
    return [json.loads(line) for line in (jobs.claim_dir(claim) / "standin-history.jsonl").read_text().splitlines()]


def test_spec_edit_while_running_is_refused_and_a_crash_keeps_the_original_config(operator, jobs, namespace):
    jobs.create("SFTJob", "edit", spec(steps=100, step_seconds=0.1, every=5))
    first = running_pod(jobs, "SFTJob", "edit", 2)
    jobs.patch("SFTJob", "edit", {"spec": {"training": {"maxSteps": 30}, "backoffLimit": 4}})
    c = wait_for("SpecChangeRefused", lambda: (c := jobs.condition("SFTJob", "edit", "SpecChangeRefused")) and c["status"] == "True" and c, 20)
    assert c["reason"] == "ImmutableWhileRunning" and c["message"].startswith("spec.training changed while the trainer runs")
    st = jobs.status("SFTJob", "edit")
    assert st["observedGeneration"] == 2 and st["runningGeneration"] == 1 and st["runningSpec"]["training"]["maxSteps"] == 100
    assert st["phase"] == "Running" and "backoffLimit" not in c["message"]
    # A crash: the replacement belongs to the same run and uses the same config (maxSteps 100).
    os.kill(trainer_pid(jobs, first), signal.SIGKILL)
    st = jobs.wait_phase("SFTJob", "edit", "Succeeded", 90)
    assert st["restartCount"] == 1 and st["trainerPod"] != first and st["progress"]["totalSteps"] == 100
    assert "restart 1 of 4" in [e.message for e in jobs.events("edit") if e.reason == "PodFailed"][0]  # backoffLimit was taken
    pods = {p.metadata.name: p for p in jobs.pods("edit")}
    hashes = {p.metadata.annotations["rlhf.io/config-hash"] for p in pods.values()}
    assert len(pods) == 2 and len(hashes) == 1
    config = next(v for v in pods[first].spec.volumes if v.config_map).config_map.name
    cfg = tc.from_dict(yaml.safe_load(jobs.core.read_namespaced_config_map(config, namespace).data["config.yaml"]))
    assert cfg.training.max_steps == 100
    assert jobs.condition("SFTJob", "edit", "SpecChangeRefused")["status"] == "True"  # it never applied
    assert "ImmutableWhileRunning" in {e.reason for e in jobs.events("edit")}


def test_deleted_pods_are_disruptions_not_failures(operator, jobs):
    jobs.create("SFTJob", "drain", spec(steps=60, step_seconds=0.1, every=2, backoffLimit=1))
    seen = []
    for _ in range(2):  # what `kubectl drain` does to the node's pods, twice
        pod = running_pod(jobs, "SFTJob", "drain", (jobs.status("SFTJob", "drain").get("progress", {}).get("step") or 0) + 2)
        seen.append(pod)
        jobs.core.delete_namespaced_pod(pod, jobs.ns)
        wait_for("a new trainer pod", lambda old=pod: jobs.status("SFTJob", "drain").get("trainerPod") not in (None, old), 60)
    st = jobs.wait_phase("SFTJob", "drain", "Succeeded", 90)
    assert st["restartCount"] == 0 and st["disruptionCount"] == 2, st
    disrupted = [e.message for e in jobs.events("drain") if e.reason == "PodDisrupted"]
    assert len(disrupted) == 2 and all("not counted against spec.backoffLimit" in m for m in disrupted), disrupted
    assert f"trainer pod {seen[0]} was deleted by someone other than the operator" in " ".join(disrupted)
    starts = [h["start_step"] for h in history(jobs, "drain")]
    assert len(starts) == 3 and starts[0] == 0 and 0 < starts[1] < starts[2]  # each resumed from its checkpoint


def test_crash_loop_backs_off_exponentially(operator_factory, jobs):
    operator_factory(RLHF_RESTART_BACKOFF_SECONDS="2")
    jobs.create("SFTJob", "loop", spec(backoffLimit=3, env=[{"name": "STANDIN_EXIT_AT_START", "value": "1"}]))
    messages = set()

    def failed():
        c = jobs.condition("SFTJob", "loop", "Restarting") or {}
        messages.add(c.get("message", ""))
        return jobs.status("SFTJob", "loop").get("phase") == "Failed"

    wait_for("the crash loop to end", failed, 60, 0.1)
    assert jobs.condition("SFTJob", "loop", "Failed")["reason"] == "BackoffLimitExceeded"
    created = sorted(p.metadata.creation_timestamp for p in jobs.pods("loop"))
    gaps = [(b - a).total_seconds() for a, b in zip(created, created[1:], strict=False)]
    print(f"gaps between trainer pods of a crash loop (back-off base 2 s): {gaps}")
    assert len(created) == 4 and gaps[0] >= 2 and gaps[0] < gaps[1] < gaps[2] and gaps[2] >= 8, gaps
    assert any("(back-off 4s)" in m and "restart 2 of 3 at " in m for m in messages), messages


def test_oom_killed_trainer_fails_the_job_at_once_saying_what_to_change(operator, jobs):
    jobs.create("SFTJob", "oom", spec(steps=500, step_seconds=0.5, resources={"gpus": 0, "memory": "1Gi"},
                                      training={"maxSteps": 500, "batchSize": 8}))
    pod = running_pod(jobs, "SFTJob", "oom")
    # What the kubelet writes for a container the kernel killed at its memory limit (the local node agent only
    # writes a pod's status when its own view changes, so this stays).
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = jobs.core.read_namespaced_pod(pod, jobs.ns)
    jobs.core.patch_namespaced_pod_status(pod, jobs.ns, {"status": {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "ready": False, "restartCount": 0, "image": obj.spec.containers[0].image, "imageID": "",
        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": now, "finishedAt": now}}}]}})
    try:
        st = jobs.wait_phase("SFTJob", "oom", "Failed", 30)
    finally:
        os.kill(trainer_pid(jobs, pod), signal.SIGKILL)
    failed = {c["type"]: c for c in st["conditions"]}["Failed"]
    assert failed["reason"] == "OOMKilled" and st["restartCount"] == 0 and len(jobs.pods("oom")) == 1
    for text in ("ran out of memory", "spec.resources.memory=1Gi", "spec.training.batchSize (now 8)",
                 "gradientAccumulationSteps", "spec.deepspeed.zeroStage"):
        assert text in failed["message"], failed["message"]
    assert "OOMKilled" in {e.reason for e in jobs.events("oom")}


def test_a_status_the_api_server_refuses_does_not_lock_the_job(operator, jobs):
    # A trainer reporting a total beyond int64 (as maxSteps 9223372036854775807 once did): every status write
    # carrying it is refused with 422.
    jobs.create("SFTJob", "huge", spec(steps=20, step_seconds=0.1, env=[{"name": "STANDIN_REPORT_TOTAL_STEPS", "value": "1e19"}]))
    st = jobs.wait_phase("SFTJob", "huge", "Succeeded", 60)
    assert "totalSteps" not in st.get("progress", {}) and st["progress"]["step"] == 20
    c = {c["type"]: c for c in st["conditions"]}["StatusRejected"]
    assert c["status"] == "True" and c["reason"] == "FieldRejected"
    assert c["message"].startswith("the API server refused status.progress.totalSteps"), c["message"]
    assert "StatusRejected" in {e.reason for e in jobs.events("huge")}


def test_where_a_replaced_trainer_resumed_is_what_the_trainer_reported(operator, jobs):
    jobs.create("SFTJob", "resume", spec(steps=40, step_seconds=0.1, every=4))
    first = running_pod(jobs, "SFTJob", "resume")
    wait_for("a checkpoint", lambda: jobs.status("SFTJob", "resume").get("checkpoint", {}).get("latestStep", 0) >= 8, 30)
    os.kill(trainer_pid(jobs, first), signal.SIGKILL)
    st = jobs.wait_phase("SFTJob", "resume", "Succeeded", 60)
    restored = history(jobs, "resume")[1]["start_step"]
    assert restored >= 8 and st["progress"]["resumedFromStep"] == restored
    events = {e.reason: e.message for e in jobs.events("resume")}
    assert events["StartedFresh"] == f"trainer pod {first} started from step 0 (no checkpoint to resume from)"
    assert events["ResumedFromCheckpoint"] == f"trainer pod {st['trainerPod']} resumed from step {restored} (checkpoint restored)"
    assert "checkpoint" not in events["PodFailed"]  # the operator does not promise what the trainer decides
