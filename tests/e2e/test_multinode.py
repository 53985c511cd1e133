"""Multi-node jobs on the embedded cluster (two nodes of two GPUs) with the real operator and the real trainer:
torchrun on every pod with rank 0's DNS name as the rendezvous, gloo on the CPU, gang semantics."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from e2e_helpers import (
    MINILM,
    REAL_TRAINER,
    TINY_GPT2,
    conditions,
    configmap_dataset,
    create_configmap,
    jsonl,
    latest_checkpoint_step,
    pair_rows,
    pod_log,
    real_spec,
    resumed_step,
    wait_for,
    wait_phase,
    wait_status,
)
from rlhf_operator.names import pod_name, pvc_name
from rlhf_trainer import contract
from support.processes import pod_process

KIND = "RewardModelJob"
RWX = {"accessMode": "ReadWriteMany", "saveGraceSeconds": 15}
# No dropout: the ranks' random streams differ from one process's, and the comparison is about the gradients.
NO_DROPOUT = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture
def gang_operator(operator_factory):
    return operator_factory(RLHF_RESTART_BACKOFF_SECONDS="1", **REAL_TRAINER)


def pairs(jobs) -> dict:
    create_configmap(jobs, "data", {"pairs.jsonl": jsonl(pair_rows(40))})
    return configmap_dataset("data", "pairs.jsonl")


def spec(data: dict, nodes: int, batch: int, steps: int, every: int, **extra) -> dict:
    s = real_spec(data, steps=steps, every=every, batch=batch, checkpoint=RWX, **extra)
    s["model"] = {"initFromConfig": dict(NO_DROPOUT), "tokenizerPath": MINILM}
    s["resources"] = {"gpus": 0, "nodes": nodes}
    return s


def losses(log: str) -> dict[int, float]:
    out = {}
    for line in log.splitlines():
        if line.startswith("{") and '"step"' in line:
            rec = json.loads(line)
            value = rec.get(contract.M_LOSS, rec.get("loss"))
            if value is not None:
                out[int(rec["step"])] = float(value)
    return out


def worker_pid(namespace: str, pod: str) -> int | None:
    """The trainer process torchrun started in a pod (not torchrun itself)."""
    return pod_process(namespace, pod, "rlhf_trainer", exclude="torchrun")


@pytest.mark.slow
def test_two_nodes_give_the_losses_of_one_node_with_twice_the_batch(gang_operator, jobs, cluster):
    data = pairs(jobs)
    steps = 6
    jobs.create(KIND, "two", spec(data, nodes=2, batch=2, steps=steps, every=3))
    jobs.create(KIND, "one", spec(data, nodes=1, batch=4, steps=steps, every=3))
    running = wait_status(jobs, KIND, "two", "both pods running", lambda st: st.get("gang", {}).get("ready") == 2, 120)
    assert running["gang"]["summary"] == "2/2" and running["trainerPod"] == pod_name(KIND, "two", 0, 0)
    two = wait_phase(jobs, KIND, "two", "Succeeded", 300)
    wait_phase(jobs, KIND, "one", "Succeeded", 300)
    pods = {p.metadata.name: p for p in jobs.pods("two")}
    assert set(pods) == {pod_name(KIND, "two", 0, 0), pod_name(KIND, "two", 0, 1)}
    assert {p.spec.hostname for p in pods.values()} == {"two-rm-worker-0", "two-rm-worker-1"}
    rank0 = pod_log(cluster, jobs.ns, pod_name(KIND, "two", 0, 0))
    rank1 = pod_log(cluster, jobs.ns, pod_name(KIND, "two", 0, 1))
    single = losses(pod_log(cluster, jobs.ns, pod_name(KIND, "one", 0)))
    multi = losses(rank0)
    assert sorted(multi) == sorted(single) == list(range(1, steps + 1)), (rank0[-3000:], rank1[-3000:])
    assert losses(rank1) == {}  # only rank 0 logs (and serves metrics, and exports)
    for step in single:
        assert multi[step] == pytest.approx(single[step], abs=1e-4), (step, multi, single)
    assert len(set(single.values())) > 1  # it trained
    assert two["progress"]["step"] == steps and two["output"]["claim"] == pvc_name(KIND, "two")
    assert (jobs.claim_dir(pvc_name(KIND, "two")) / "final").is_dir()


@pytest.mark.slow
def test_a_killed_worker_restarts_the_whole_gang_from_the_latest_checkpoint(gang_operator, jobs, cluster):
    data = pairs(jobs)
    steps, every = 400, 5
    jobs.create(KIND, "kill", spec(data, nodes=2, batch=2, steps=steps, every=every))
    out = wait_for("the claim", lambda: _claim_dir(jobs, pvc_name(KIND, "kill")), 60)
    wait_status(jobs, KIND, "kill", "a checkpoint at step >= 10", lambda _: latest_checkpoint_step(out) >= 10, 240, 0.1)
    worker = pod_name(KIND, "kill", 0, 1)
    os.kill(wait_for("rank 1's trainer process", lambda: worker_pid(jobs.ns, worker), 10), signal.SIGKILL)
    at_kill = latest_checkpoint_step(out)

    st = wait_status(jobs, KIND, "kill", "the next attempt running",
                     lambda st: st.get("attempt") == 1 and st.get("gang", {}).get("ready") == 2, 240)
    assert st["restartCount"] == 1 and not st.get("disruptionCount"), st  # one back-off for the whole gang
    assert st["trainerPod"] == pod_name(KIND, "kill", 1, 0)
    restarted = [e.message for e in jobs.events("kill") if e.reason == "TrainerRestarted"]
    assert len(restarted) == 1, restarted
    pods = {p.metadata.name: p for p in jobs.pods("kill")}
    assert pod_name(KIND, "kill", 0, 0) not in pods or pods[pod_name(KIND, "kill", 0, 0)].status.phase == "Failed"
    assert {pod_name(KIND, "kill", 1, 0), pod_name(KIND, "kill", 1, 1)} <= set(pods)
    log = wait_for("rank 0 resumed", lambda: (text := pod_log(cluster, jobs.ns, pod_name(KIND, "kill", 1, 0)))
                   and resumed_step(text) is not None and text, 120)
    resumed = resumed_step(log)
    assert resumed >= at_kill >= 10 and resumed % every == 0, (resumed, at_kill)
    jobs.patch(KIND, "kill", {"spec": {"suspend": True}})  # enough: stop the run instead of training 400 steps
    wait_for("the gang stopped", lambda: not [p for p in jobs.pods("kill")
                                             if p.status.phase in ("Pending", "Running")], 90)


def _log_or_none(cluster, namespace: str, pod: str) -> str | None:
    try:
        return cluster.logs(namespace, pod, "trainer")
    except Exception:  # the node agent never started the pod
        return None


def _claim_dir(jobs, claim: str):
    try:
        return jobs.claim_dir(claim)
    except Exception:
        return None


@pytest.mark.slow
def test_a_gang_that_does_not_fit_never_partly_runs_and_says_why(gang_operator, jobs, cluster):
    data = pairs(jobs)
    s = spec(data, nodes=3, batch=2, steps=20, every=5, scheduling={"gangTimeoutSeconds": 25})
    s["resources"]["gpus"] = 2  # 3 pods x 2 GPUs; the cluster has 2 nodes x 2 GPUs
    jobs.create(KIND, "big", s)
    seen: list[dict] = []

    def waiting(st):
        seen.append(st)
        cond = conditions(st).get("PodScheduled", {})
        return cond.get("reason") == "Unschedulable" and st.get("gang", {}).get("ready") == 2

    st = wait_status(jobs, KIND, "big", "two pods running, one unschedulable", waiting, 90)
    message = conditions(st)["PodScheduled"]["message"]
    assert re.fullmatch(r"2/3 pods of the gang run; pod big-rm-trainer-0-\d \(rank \d\) cannot be scheduled: "
                        r".*Insufficient nvidia.com/gpu.*", message), message
    assert st["phase"] == "Pending" and st["gang"]["summary"] == "2/3"
    failed = wait_status(jobs, KIND, "big", "the gang timeout",
                         lambda st: seen.append(st) or st.get("phase") == "Failed", 90)
    cond = conditions(failed)["Failed"]
    assert cond["reason"] == "GangTimeout" and "gangTimeoutSeconds (25s)" in cond["message"], cond
    assert "cannot be scheduled" in cond["message"] and "nvidia.com/gpu" in cond["message"], cond
    assert all(conditions(x).get("Running", {}).get("status") != "True" for x in seen), seen
    assert all(x.get("phase") != "Running" for x in seen)
    wait_for("every pod gone", lambda: not [p for p in jobs.pods("big")
                                            if p.status.phase in ("Pending", "Running")], 60)
    # The two placed pods waited in torchrun's rendezvous for the third: no trainer ever started.
    logs = [_log_or_none(cluster, jobs.ns, pod_name(KIND, "big", 0, rank)) for rank in range(3)]
    assert sum(log is None for log in logs) == 1, logs  # the pod that never fitted never started
    assert all('"step"' not in log for log in logs if log is not None), logs
    claim = _claim_dir(jobs, pvc_name(KIND, "big"))
    assert claim is None or latest_checkpoint_step(claim) == 0
