"""Multi-node jobs, pure: names, the pods and Service of a gang (builders), the spec rules, and the gang policy
(released together, running only when all run, bounded wait, restarted as one)."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator import builders, jobspec, names
from rlhf_operator.policies import gang
from rlhf_operator.settings import Settings
from rlhf_operator.status import plan, pod_view

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
RWX = {"accessMode": "ReadWriteMany"}


def gang_job(nodes: int = 2, status: dict | None = None, **spec) -> dict:
    j = job(status=status)
    j["spec"].update(resources={"nodes": nodes, "gpus": 2}, checkpoint=dict(RWX), **spec)
    return j


def member(rank: int, attempt: int = 0, phase: str = "Running", gated: bool = False, **kw) -> dict:
    p = pod(names.pod_name("SFTJob", "j", attempt, rank), attempt=attempt, phase=phase, **kw)
    p["metadata"]["labels"][builders.LABEL_RANK] = str(rank)
    p["spec"] = {"schedulingGates": [{"name": builders.GANG_GATE}]} if gated else {}
    return p


def running_status(attempt: int = 0, restarts: int = 0, **extra) -> dict:
    spec = gang_job()["spec"]
    return {"phase": "Pending", "attempt": attempt, "restartCount": restarts,
            "trainerPod": names.pod_name("SFTJob", "j", attempt, 0), "runningSpec": spec, "runningGeneration": 1,
            "checkpoint": {"claim": "j-sft-checkpoints", "retainPolicy": "Retain"}, **extra}


def run(status: dict, pods: list[dict], now: dt.datetime = NOW, **spec):
    return plan(gang_job(status=status, **spec), [pod_view(p) for p in pods], [], now, backoff_base=0)


def conds(p) -> dict:
    return {c["type"]: c for c in p.status.get("conditions", [])}


# --- names and builders ------------------------------------------------------------------------

def test_gang_names_are_dns_labels_and_nodes_1_keeps_the_single_pod_name():
    assert names.gang_pod_names("SFTJob", "j", 3, 1) == ["j-sft-trainer-3"]
    assert names.gang_pod_names("RewardModelJob", "j", 3, 2) == ["j-rm-trainer-3-0", "j-rm-trainer-3-1"]
    assert names.service_name("PPOJob", "j") == "j-ppo-workers"
    assert names.worker_hostname("PPOJob", "j", 1) == "j-ppo-worker-1"
    long = "x" * 63
    for made in (names.pod_name("PPOJob", long, 99, 63), names.service_name("PPOJob", long),
                 names.worker_hostname("PPOJob", long, 63)):
        assert len(made) <= 63 and names._LABEL.match(made), made
    assert names.pod_name("PPOJob", long, 1, 0) != names.pod_name("PPOJob", long, 1, 1)


def test_one_node_pod_is_unchanged_but_takes_its_grace_from_the_spec():
    j = job()
    pods = builders.build_pods(j, Settings(), 0, 0, "h", [])
    assert [p["metadata"]["name"] for p in pods] == ["j-sft-trainer-0"]
    spec = pods[0]["spec"]
    assert "schedulingGates" not in spec and "hostname" not in spec and "subdomain" not in spec
    assert builders.LABEL_RANK not in pods[0]["metadata"]["labels"]
    assert spec["terminationGracePeriodSeconds"] == 120
    assert not any(e["name"] in ("MASTER_ADDR", "PET_NNODES", builders.TORCHRUN_SHUTDOWN_ENV)
                   for e in spec["containers"][0]["env"])
    j["spec"]["checkpoint"] = {"saveGraceSeconds": 900}
    assert builders.build_pod(j, Settings(), 0, 0, "h", [])["spec"]["terminationGracePeriodSeconds"] == 900
    j["spec"]["resources"] = {"gpus": 4}  # one pod under torchrun: its workers get the same grace
    env = {e["name"]: e.get("value") for e in builders.build_pod(j, Settings(), 0, 0, "h", [])["spec"]["containers"][0]["env"]}
    assert env[builders.TORCHRUN_SHUTDOWN_ENV] == "900"


def test_gang_pods_rendezvous_on_rank_0_and_wait_behind_the_gate():
    j = gang_job(nodes=3)
    j["spec"]["checkpoint"]["saveGraceSeconds"] = 600
    pods = builders.build_pods(j, Settings(trainer_command=()), 2, 1, "h", [])
    assert [p["metadata"]["name"] for p in pods] == ["j-sft-trainer-2-0", "j-sft-trainer-2-1", "j-sft-trainer-2-2"]
    master = "j-sft-worker-0.j-sft-workers.ns.svc"
    for rank, p in enumerate(pods):
        spec, c = p["spec"], p["spec"]["containers"][0]
        assert p["metadata"]["labels"][builders.LABEL_RANK] == str(rank)
        assert spec["hostname"] == f"j-sft-worker-{rank}" and spec["subdomain"] == "j-sft-workers"
        assert spec["schedulingGates"] == [{"name": builders.GANG_GATE}]
        assert spec["terminationGracePeriodSeconds"] == 600
        assert c["resources"]["limits"][builders.GPU_RESOURCE] == "2"
        assert c["command"][:7] == ["torchrun", "--nnodes=3", f"--node-rank={rank}", "--nproc-per-node=2",
                                    f"--master-addr={master}", "--master-port=29500", "--max-restarts=0"]
        assert c["command"][7:] == ["-m", "rlhf_trainer", "sft", "--config", builders.CONFIG_PATH]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert {k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "PET_NNODES",
                                    "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT")} == {
            "MASTER_ADDR": master, "MASTER_PORT": "29500", "WORLD_SIZE": "6", "RANK": str(rank),
            "NODE_RANK": str(rank), "PET_NNODES": "3", "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": "2",
            "PET_MASTER_ADDR": master, "PET_MASTER_PORT": "29500"}
        assert env[builders.TORCHRUN_SHUTDOWN_ENV] == "600"  # torchrun waits the grace out before its SIGKILL
        claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "j-sft-checkpoints"}}]
    svc = builders.build_service(j)
    assert svc["metadata"]["name"] == "j-sft-workers" and svc["metadata"]["ownerReferences"][0]["uid"] == "uid-j"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {builders.LABEL_JOB_UID: "uid-j"}
    # The stand-in command of the tests runs on every rank; the env still says which rank it is.
    cmd = builders.build_pods(j, Settings(trainer_command=("python", "t.py")), 0, 0, "h", [])[1]
    assert cmd["spec"]["containers"][0]["command"] == ["python", "t.py", "sft", "--config", builders.CONFIG_PATH]


def test_spec_rules_of_multi_node_jobs():
    spec = gang_job()["spec"]
    assert jobspec.validate("SFTJob", "j", spec) == []
    spec["checkpoint"] = {"accessMode": "ReadWriteOnce"}
    assert jobspec.validate("SFTJob", "j", spec) == [
        "spec.checkpoint.accessMode: ReadWriteOnce cannot serve 2 pods on different nodes (every pod of a multi-node "
        "job mounts the checkpoint claim); set it to ReadWriteMany"]
    spec = {**spec, "checkpoint": dict(RWX), "resources": {"nodes": 65}}
    assert jobspec.validate("SFTJob", "j", spec) == ["spec.resources.nodes: 65 is not a pod count from 1 to 64"]
    assert "saveGraceSeconds" in jobspec.CHECKPOINT_MUTABLE  # not storage: it may change once the claim exists


# --- the gang policy -----------------------------------------------------------------------------

def test_first_pass_creates_the_gang_with_rank_0_as_the_trainer_pod():
    p = plan(gang_job(), [], [], NOW)
    assert p.create_pod == (0, 0)
    assert p.status["trainerPod"] == "j-sft-trainer-0-0"
    assert p.status["gang"] == {"attempt": 0, "size": 2, "ready": 0, "summary": "0/2"}


def test_gate_comes_off_only_when_every_rank_exists():
    half = run(running_status(), [member(0, gated=True, phase="Pending")])
    assert half.release_pods == {} and half.create_pod == (0, 0)  # the missing rank is made (same name)
    whole = run(running_status(), [member(r, gated=True, phase="Pending") for r in range(2)])
    assert whole.release_pods == {"j-sft-trainer-0-0": [], "j-sft-trainer-0-1": []} and whole.create_pod is None
    assert conds(whole)["PodScheduled"]["status"] == "False"
    assert whole.status["gang"]["waitingSince"] == "2025-01-01T12:00:00Z"  # the wait counts from the release
    # Kueue's own gate stays on (it lifts it at admission); the gang's wait does not start while it holds.
    pods = [member(r, gated=True, phase="Pending") for r in range(2)]
    for p in pods:
        p["spec"]["schedulingGates"].append({"name": "kueue.x-k8s.io/admission"})
    queued = run(running_status(), pods)
    assert queued.release_pods == {p["metadata"]["name"]: ["kueue.x-k8s.io/admission"] for p in pods}
    assert "waitingSince" not in queued.status["gang"]
    assert gang.may_release(gang_job(), [pod_view(p) for p in pods])
    assert not gang.may_release(gang_job(), [pod_view(pods[0])])


def test_partial_gang_does_not_run_and_names_the_blocking_pod_until_the_timeout_fails_it():
    why = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    pods = [member(0), member(1, phase="Pending", unschedulable=why)]
    p = run(running_status(), pods)
    c = conds(p)
    assert p.status["phase"] == "Pending" and c.get("Running", {}).get("status") != "True"
    assert c["PodScheduled"]["reason"] == "Unschedulable"
    assert c["PodScheduled"]["message"] == f"1/2 pods of the gang run; pod j-sft-trainer-0-1 (rank 1) cannot be " \
                                           f"scheduled: {why}"
    assert p.status["gang"]["summary"] == "1/2" and p.status["gang"]["waitingSince"] == "2025-01-01T12:00:00Z"
    assert p.requeue_at == NOW + dt.timedelta(seconds=600)
    later = run(p.status, pods, NOW + dt.timedelta(seconds=31), scheduling={"gangTimeoutSeconds": 30})
    assert later.status["phase"] == "Failed"
    failed = conds(later)["Failed"]
    assert failed["reason"] == "GangTimeout" and "gangTimeoutSeconds (30s)" in failed["message"]
    assert "pod j-sft-trainer-0-1 (rank 1) cannot be scheduled: " + why in failed["message"]
    assert later.delete_pods == ["j-sft-trainer-0-0", "j-sft-trainer-0-1"]  # no partial gang keeps its GPUs


def test_the_job_runs_when_every_pod_runs():
    p = run(running_status(), [member(0), member(1)])
    assert p.status["phase"] == "Running" and conds(p)["Running"]["status"] == "True"
    assert p.status["gang"]["summary"] == "2/2"


def test_a_failed_worker_stops_the_gang_which_restarts_as_one_backoff():
    st = running_status()
    first = run(st, [member(0), member(1, phase="Failed", exit_code=137)])
    assert first.delete_pods == ["j-sft-trainer-0-0"] and first.create_pod is None
    assert first.status["gang"]["stop"] == {"pod": "j-sft-trainer-0-1", "disruption": False,
                                            "message": "trainer pod j-sft-trainer-0-1 failed", "exitCode": 137}
    assert conds(first)["Restarting"]["reason"] == "GangStopping" and first.status["restartCount"] == 0
    # Rank 0, stopped by the operator, ends with SIGTERM's 143 while being deleted: the verdict stands.
    stopping = run(first.status, [member(0, phase="Failed", exit_code=143, deleting=True),
                                  member(1, phase="Failed", exit_code=137)])
    assert stopping.create_pod is None and stopping.status["gang"]["stop"]["pod"] == "j-sft-trainer-0-1"
    done = run(stopping.status, [member(1, phase="Failed", exit_code=137)])
    assert done.create_pod == (1, 1) and done.status["restartCount"] == 1  # one restart for the whole gang
    assert done.status["trainerPod"] == "j-sft-trainer-1-0" and done.status["gang"]["attempt"] == 1
    assert "failed with exit code 137" in conds(done)["Restarting"]["message"]
    assert done.status.get("disruptionCount") is None


def test_a_deleted_worker_restarts_the_gang_without_using_backoff():
    st = running_status(restarts=1)
    first = run(st, [member(0)])  # rank 1 was released and is gone: deleted by someone
    assert first.delete_pods == ["j-sft-trainer-0-0"]
    assert first.status["gang"]["stop"]["disruption"] is True
    assert "j-sft-trainer-0-1 was deleted by someone other than the operator" in first.status["gang"]["stop"]["message"]
    done = run(first.status, [])
    assert done.create_pod == (1, 1) and done.status["restartCount"] == 1 and done.status["disruptionCount"] == 1


def test_a_permanent_exit_code_on_any_rank_fails_the_job():
    first = run(running_status(), [member(0, phase="Failed", exit_code=3, message="bad data"), member(1)])
    done = run(first.status, [member(0, phase="Failed", exit_code=3, message="bad data")])
    assert done.status["phase"] == "Failed" and conds(done)["Failed"]["reason"] == "DataError"


def test_the_gang_succeeds_when_rank_0_has_finished_and_no_pod_runs():
    msg = '{"step": 10, "total_steps": 10}'
    waiting = run(running_status(), [member(0, phase="Succeeded", exit_code=0, message=msg), member(1)])
    assert waiting.status["phase"] != "Succeeded" and waiting.delete_pods == []
    done = run(running_status(), [member(0, phase="Succeeded", exit_code=0, message=msg),
                                  member(1, phase="Succeeded", exit_code=0)])
    assert done.status["phase"] == "Succeeded"


def test_suspend_stops_every_pod():
    p = run(running_status(), [member(0), member(1)], suspend=True)
    assert sorted(p.delete_pods) == ["j-sft-trainer-0-0", "j-sft-trainer-0-1"]
