"""Multi-node jobs (spec.resources.nodes > 1): N pods that run together or not at all.

The pods of an attempt are created behind the scheduling gate `rlhf.io/gang` (builders.GANG_GATE) and released
together once all N exist (:func:`may_release`; a queued job's pods also wait for Kueue's own gate). The job runs
when all N run; until then the condition PodScheduled names the pod that blocks and why, and the wait is bounded
by spec.scheduling.gangTimeoutSeconds, counted from the release: past it the job fails (GangTimeout) and its pods
are deleted, so a partial gang never holds GPUs for longer. Capacity waits belong in a queue (Kueue admits the
whole gang at once), not in pods that sit on GPUs.

When any pod fails, is deleted or is evicted, every other pod of the attempt is stopped (SIGTERM: the trainer
checkpoints) and the gang restarts as one: a failure uses one restart of spec.backoffLimit (policies.restart), a
disruption none (policies.disruption), as for a single pod - JobSet's failure policy, one count per gang. The
verdict is recorded (status.gang.stop) when first seen, so the pods stopped because of it never change it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from rlhf_operator import builders, names, queueing
from rlhf_operator.conditions import parse_time
from rlhf_operator.crd_schema import DEFAULT_GANG_TIMEOUT_SECONDS
from rlhf_operator.policies import disruption, restart, trainer_pod

if TYPE_CHECKING:
    from rlhf_operator.observed import PodView
    from rlhf_operator.planning import Pass, Plan

ACTIVE = ("Pending", "Running", "Unknown")


def may_release(job: dict[str, Any], pods: list[PodView]) -> bool:
    """Whether the gang's gate may come off: every rank of the attempt exists and none is going away.
    `pods`: the attempt's pods. (A queued job's pods keep Kueue's admission gate until Kueue admits them.)"""
    status = job.get("status") or {}
    spec = status.get("runningSpec") if status.get("trainerPod") and status.get("runningSpec") else job.get("spec")
    nodes = builders.nodes_of(spec or {})
    return {x.rank for x in pods if not x.deleting} == set(range(nodes))


def members(ps: Pass) -> dict[int, PodView]:
    """The current attempt's pods by rank."""
    attempt = ps.st.get("attempt")
    if not ps.current or attempt is None:
        return {}
    return {x.rank: x for x in ps.own if x.attempt == attempt and x.rank is not None}


def apply(ps: Pass) -> Plan | None:
    if ps.nodes <= 1 or not ps.current:
        return None  # one pod, or no attempt yet: policies.trainer_pod starts it (Pass.start makes the gang)
    n, attempt, pods = ps.nodes, ps.st["attempt"], members(ps)
    gang = ps.st.get("gang") or {}
    if gang.get("attempt") != attempt:
        gang = {"attempt": attempt}
    ready = sum(1 for x in pods.values() if x.phase in ("Running", "Succeeded") and not x.deleting)
    gang.update(size=n, ready=ready, summary=f"{ready}/{n}")
    ps.st["gang"] = gang
    first = pods.get(0)
    if first is not None and first.phase == "Succeeded" and not _active(pods):
        return trainer_pod.succeeded(ps, first)  # rank 0 exported the model and reported the final metrics
    missing = [r for r in range(n) if r not in pods]
    released = any(builders.GANG_GATE not in x.gates for x in pods.values())
    if missing and not released and not gang.get("stop"):  # creation was cut short: make the rest (same names)
        ps.plan.create_pod = (attempt, ps.restarts)
        return ps.finish()
    stop = gang.get("stop") or verdict(ps, pods, missing)
    if stop:
        gang["stop"] = stop
        return _restart(ps, pods, stop)
    if first is not None and first.phase == "Succeeded":
        return ps.finish()  # the other ranks are finishing
    return _wait_or_run(ps, pods, gang)


def _active(pods: dict[int, PodView]) -> list[str]:
    return [x.name for x in pods.values() if not x.deleting and x.phase in ACTIVE]


def verdict(ps: Pass, pods: dict[int, PodView], missing: list[int]) -> dict[str, Any] | None:
    """Why the attempt must stop (None while it is whole): a disruption of any pod (deleted, evicted, preempted:
    its peers then fail too, as a consequence), else the first pod that failed."""
    for x in sorted(pods.values(), key=lambda x: x.rank or 0):
        if x.phase == "Failed" and (why := disruption.disruption(x, x.name)):
            return {"pod": x.name, "disruption": True, "message": why}
    gone = [names.pod_name(ps.kind, ps.name, ps.st["attempt"], r) for r in missing]
    gone += [x.name for x in pods.values() if x.deleting]
    if gone:
        return {"pod": gone[0], "disruption": True, "message": disruption.disruption(None, gone[0]) or ""}
    failed = [x for x in pods.values() if x.phase == "Failed"]
    if not failed:
        return None
    # The first to end; on a tie, not the one that merely lost its peer (exit 1) but e.g. the killed one (137).
    root = min(failed, key=lambda x: (x.finished_at or "~", x.exit_code == 1, x.rank or 0))
    out: dict[str, Any] = {"pod": root.name, "disruption": False, "message": f"trainer pod {root.name} failed"}
    if root.exit_code is not None:
        out["exitCode"] = root.exit_code
    if root.finished_at:
        out["finishedAt"] = root.finished_at
    return out


def _restart(ps: Pass, pods: dict[int, PodView], stop: dict[str, Any]) -> Plan:
    """Stop what still runs; once every pod of the job is gone, restart the gang as one."""
    conds, n = ps.conds, ps.nodes
    ps.plan.delete_pods = _active(pods)
    # A stopped pod that only Kueue's finalizer keeps is gone here: Kueue lets it go once the replacement exists.
    stopping = [x for x in ps.own if x.deleting and not queueing.held_only(x)]
    if ps.plan.delete_pods or stopping:
        why = stop["message"]
        left = len(ps.plan.delete_pods) or len(stopping)
        conds.set("Restarting", True, "GangStopping",
                  f"{why}; stopping the gang's other pods ({left} of {n} left) before all {n} restart from the "
                  "latest checkpoint")
        conds.clear("Running", "GangStopping", why)
        return ps.finish()
    if stop.get("disruption"):
        return disruption.replace(ps, stop["message"])
    root = next((x for x in ps.own if x.name == stop["pod"] and x.phase == "Failed"), None)
    if root is not None:  # its exit code and message decide: OOM, permanent, or a restart after the back-off
        return trainer_pod.failed(ps, root)
    return restart.replace(ps, stop["message"], stop.get("exitCode"), stop.get("finishedAt", ""))


def blocker(pods: dict[int, PodView], n: int, names_of: list[str]) -> tuple[str, str]:
    """(reason, message) about the first rank that does not run yet."""
    for rank in range(n):
        x = pods.get(rank)
        if x is None:
            return "GangIncomplete", f"pod {names_of[rank]} (rank {rank}) does not exist yet"
        if x.phase == "Running":
            continue
        if x.gates:
            return "GangGated", f"pod {x.name} (rank {rank}) is held by scheduling gate {', '.join(x.gates)}"
        if x.unschedulable:
            return "Unschedulable", f"pod {x.name} (rank {rank}) cannot be scheduled: {x.unschedulable}"
        if not x.scheduled:
            return "GangScheduling", f"pod {x.name} (rank {rank}) is waiting for the scheduler"
        return "GangStarting", f"pod {x.name} (rank {rank}) is bound to a node and starting"
    return "", ""


def _wait_or_run(ps: Pass, pods: dict[int, PodView], gang: dict[str, Any]) -> Plan:
    conds, n = ps.conds, ps.nodes
    pod_names = names.gang_pod_names(ps.kind, ps.name, gang["attempt"], n)
    gated = [x for x in pods.values() if builders.GANG_GATE in x.gates]
    if gated and may_release(ps.job, list(pods.values())):
        ps.plan.release_pods = {x.name: [g for g in x.gates if g != builders.GANG_GATE] for x in gated}
    if len(pods) == n and all(x.phase == "Running" for x in pods.values()):
        gang.pop("waitingSince", None)
        conds.set("PodScheduled", True, "Scheduled", f"all {n} pods of the gang are bound to nodes")
        conds.set("Running", True, "TrainerRunning", f"all {n} trainer pods run ({pod_names[0]} ... {pod_names[-1]})")
        conds.clear("Restarting", "TrainerRunning", f"all {n} trainer pods run")
        return ps.finish()
    reason, message = blocker(pods, n, pod_names)
    message = f"{gang['ready']}/{n} pods of the gang run; {message}"
    conds.set("PodScheduled", False, reason, message)
    # The wait counts from the release: a pod behind a gate holds nothing (e.g. while Kueue queues the job).
    kept = [ps.plan.release_pods.get(x.name, x.gates) for x in pods.values()]
    if len(pods) < n or any(kept):
        return ps.finish()
    since = parse_time(gang.get("waitingSince")) or ps.now
    gang.setdefault("waitingSince", ps.stamp)
    limit = (ps.spec.get("scheduling") or {}).get("gangTimeoutSeconds", DEFAULT_GANG_TIMEOUT_SECONDS)
    due = since + dt.timedelta(seconds=limit)
    if ps.now >= due:
        return ps.fail("GangTimeout", (
            f"the {n} pods of the gang did not all run within spec.scheduling.gangTimeoutSeconds ({limit}s): "
            f"{message}. "
            "Deleted all its pods, so none holds GPUs. Make room (or lower spec.resources.nodes or gpus) and create "
            "the job again, or queue it with Kueue (label kueue.x-k8s.io/queue-name), which admits all its pods at "
            "once"))
    ps.requeue(due)
    return ps.finish()
