"""A checkpoint changed on the claim after the trainer wrote it, end to end: a pickle planted in place of
the engine state must not run when the replacement pod resumes; the job fails permanently with reason
CheckpointInvalid naming the checkpoint and the file (issue: resuming ran code from the claim)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from e2e_helpers import (
    conditions,
    configmap_dataset,
    create_configmap,
    jsonl,
    latest_checkpoint_step,
    real_spec,
    sft_rows,
    trainer_pid,
    wait_for,
    wait_phase,
    wait_status,
)
from rlhf_operator.names import pod_name, pvc_name
from rlhf_trainer import config as tc
from rlhf_trainer import contract


class Payload:
    """Unpickling this runs os.mkdir(marker): what an attacker with write access to the claim plants."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.slow
def test_a_pickle_planted_in_a_checkpoint_never_runs_and_fails_the_job(real_operator, jobs):
    create_configmap(jobs, "data", {"sft.jsonl": jsonl(sft_rows())})
    jobs.create("SFTJob", "planted", real_spec(configmap_dataset("data", "sft.jsonl"), steps=400, every=5, backoffLimit=3))
    out = wait_for("the checkpoint claim", lambda: _claim_dir(jobs, pvc_name("SFTJob", "planted")), 60)
    wait_status(jobs, "SFTJob", "planted", "a checkpoint", lambda _: latest_checkpoint_step(out) >= 5, 180, 0.1)
    pid = wait_for("the trainer process", lambda: trainer_pid(jobs.ns, pod_name("SFTJob", "planted", 0)), 10)
    os.kill(pid, signal.SIGSTOP)  # no checkpoint is written while we plant
    engines = sorted((out / "checkpoints").glob("step-*/**/engine.pt"))
    assert engines, sorted(p.name for p in (out / "checkpoints").iterdir())
    marker = out / "pwned"  # the claim is mounted at /ckpt in the pod
    for engine in engines:
        torch.save({"module": Payload(f"{tc.CHECKPOINT_MOUNT}/pwned")}, engine)
    os.kill(pid, signal.SIGKILL)

    st = wait_phase(jobs, "SFTJob", "planted", "Failed", 240)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "CheckpointInvalid", failed
    assert "engine.pt" in failed["message"] and "does not match its digest" in failed["message"], failed
    assert not marker.exists()  # the payload never ran
    assert st["restartCount"] == 1, st  # the SIGKILL was retried once; the tampered checkpoint is not
    pod = jobs.core.read_namespaced_pod(pod_name("SFTJob", "planted", 1), jobs.ns)
    assert pod.status.container_statuses[0].state.terminated.exit_code == contract.EXIT_CHECKPOINT_ERROR


def _claim_dir(jobs, claim: str):
    try:
        return jobs.claim_dir(claim)
    except Exception:  # not bound yet
        return None
