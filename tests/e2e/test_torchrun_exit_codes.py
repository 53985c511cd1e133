"""A permanent error in a pod that runs torchrun fails the job at once: torchrun ends the container with its own
exit code 1 whatever its worker's was, and the operator reads the trainer's own code from its termination message.
The real operator and the real trainer on the embedded cluster (2 GPUs per node, torchrun with gloo on the CPU)."""

from __future__ import annotations

import pytest
from e2e_helpers import REAL_TRAINER, conditions, real_spec, wait_phase
from rlhf_operator.names import pod_name

KIND = "SFTJob"
MISSING = "/nonexistent/e2e/train.jsonl"


@pytest.fixture
def quick_restarts_operator(operator_factory):
    return operator_factory(RLHF_RESTART_BACKOFF_SECONDS="1", **REAL_TRAINER)


@pytest.mark.slow
def test_a_data_error_under_torchrun_fails_at_once(quick_restarts_operator, jobs):
    spec = real_spec({"path": MISSING})
    spec["resources"] = {"gpus": 2}  # torchrun --nproc_per_node=2 in one pod
    spec["backoffLimit"] = 3
    jobs.create(KIND, "torchrun-data", spec)
    st = wait_phase(jobs, KIND, "torchrun-data", "Failed", 240)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "DataError", failed
    assert f"dataset.path {MISSING} does not exist" in failed["message"], failed
    assert "failed with exit code 3" in failed["message"] and "the container with 1" in failed["message"], failed
    assert st["restartCount"] == 0 and not st.get("nextAttemptTime"), st
    pods = jobs.pods("torchrun-data")
    assert [p.metadata.name for p in pods] == [pod_name(KIND, "torchrun-data", 0)]
    container = pods[0].spec.containers[0]
    assert "torchrun" in (container.command or []) + (container.args or []), container.command
    term = pods[0].status.container_statuses[0].state.terminated
    assert term.exit_code == 1 and term.message.rstrip().endswith("]"), term  # torchrun's code; the trainer's record


@pytest.mark.slow
def test_a_data_error_in_a_multi_node_job_fails_the_gang_at_once(quick_restarts_operator, jobs):
    spec = real_spec({"path": MISSING}, checkpoint={"accessMode": "ReadWriteMany"})
    spec["resources"] = {"gpus": 0, "nodes": 2}  # torchrun on each pod, rendezvous on rank 0's pod
    spec["backoffLimit"] = 3
    jobs.create(KIND, "gang-data", spec)
    st = wait_phase(jobs, KIND, "gang-data", "Failed", 240)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "DataError" and f"dataset.path {MISSING} does not exist" in failed["message"], failed
    assert st["restartCount"] == 0 and st["gang"]["stop"]["exitCode"] == 3, st
    left = {p.metadata.name for p in jobs.pods("gang-data")}  # the operator deletes the stopped peer
    assert left and left <= {pod_name(KIND, "gang-data", 0, 0), pod_name(KIND, "gang-data", 0, 1)}, left  # 1 attempt
