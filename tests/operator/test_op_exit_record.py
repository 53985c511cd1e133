"""The trainer's own exit code decides, also under torchrun: a pod that runs torchrun (spec.resources.gpus > 1 or
nodes > 1) ends with torchrun's code, 1 for any failed worker, and the trainer records its own code as the last
line of its termination message (``[exit 3, rank 1]``, runtime.failure). Pure: the planner on pod views."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator import builders, names
from rlhf_operator.observed import trainer_exit
from rlhf_operator.status import plan, pod_view

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
DATA_ERROR = "data error: dataset.path /d does not exist\n[exit 3, rank 1]"


def cond(status, ctype):
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), None)


def step(j, pods=(), now=NOW):
    p = plan(j, [pod_view(x) for x in pods], [], now, backoff_base=0)
    j["status"] = p.status
    return p


def torchrun_job() -> dict:
    j = job()
    j["spec"]["resources"] = {"gpus": 2}
    step(j)
    return j


def test_a_data_error_under_torchrun_fails_at_once_without_a_restart():
    j = torchrun_job()
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1, message=DATA_ERROR)])
    st = j["status"]
    assert p.create_pod is None and st["phase"] == "Failed" and st["restartCount"] == 0
    c = cond(st, "Failed")
    assert c["reason"] == "DataError", c
    assert c["message"].startswith("trainer pod j-sft-trainer-0 failed with exit code 3: data error: dataset.path /d "
                                   "does not exist (rank 1 exited with 3, the container with 1); this error is "
                                   "permanent"), c["message"]


def test_a_recorded_sigterm_stop_under_torchrun_is_no_disruption():
    # torchrun stops its workers with SIGTERM also when a peer node failed: a free restart would loop on that
    # failure. A disrupted pod says so in its conditions (DisruptionTarget) or its reason (Evicted).
    j = torchrun_job()
    message = "preempted: stop requested (SIGTERM) at step 4\n[exit 143, rank 0]"
    p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1, message=message)])
    st = j["status"]
    assert p.create_pod == (1, 1) and st["restartCount"] == 1 and not st.get("disruptionCount"), st
    assert trainer_exit(143, message) == (143, "preempted: stop requested (SIGTERM) at step 4")


def test_a_crash_without_a_permanent_code_is_still_retried():
    for message in ("Traceback (most recent call last):\nRuntimeError: boom",  # no record: the kubelet's log tail
                    "unexpected error: RuntimeError: boom\n[exit 1, rank 0]"):
        j = torchrun_job()
        p = step(j, [pod("j-sft-trainer-0", phase="Failed", exit_code=1, message=message)])
        assert j["status"]["phase"] != "Failed" and p.create_pod == (1, 1), j["status"]
        assert "RuntimeError: boom" in cond(j["status"], "Restarting")["message"]
        assert "[exit" not in cond(j["status"], "Restarting")["message"]


def test_a_kill_from_outside_keeps_the_container_code():
    # The OOM killer or the end of the grace period came after the record: the OOM and disruption rules read 137.
    assert trainer_exit(137, DATA_ERROR) == (137, "data error: dataset.path /d does not exist (rank 1 exited with 3, "
                                                  "the container with 137)")
    assert trainer_exit(3, "data error: x\n[exit 3]") == (3, "data error: x")
    assert trainer_exit(1, '{"rlhf_step": 3}') == (1, '{"rlhf_step": 3}')
    view = pod_view(pod("j-sft-trainer-0", phase="Failed", exit_code=1, message=DATA_ERROR))
    assert (view.exit_code, view.container_exit_code) == (3, 1)


def test_a_data_error_on_one_node_of_a_gang_fails_the_job():
    j = job()
    j["spec"].update(resources={"nodes": 2, "gpus": 2}, checkpoint={"accessMode": "ReadWriteMany"})
    step(j)

    def member(rank, **kw):
        p = pod(names.pod_name("SFTJob", "j", 0, rank), **kw)
        p["metadata"]["labels"][builders.LABEL_RANK] = str(rank)
        p["spec"] = {}
        return p

    failed = member(1, phase="Failed", exit_code=1, message=DATA_ERROR)
    first = step(j, [member(0), failed])
    assert first.delete_pods == [names.pod_name("SFTJob", "j", 0, 0)]
    assert j["status"]["gang"]["stop"]["exitCode"] == 3
    done = step(j, [failed])
    assert done.create_pod is None and j["status"]["phase"] == "Failed" and j["status"]["restartCount"] == 0
    assert cond(j["status"], "Failed")["reason"] == "DataError"
