"""The current trainer pod decides the rest: start one, follow it, or judge how it ended.

No pod yet (or the last one stopped for a suspend): start the next attempt once stopping pods are gone
(a SIGTERM checkpoint may still be written). A pod that vanished or was disrupted is replaced at once
(policies.disruption); Pending and Running are mirrored in conditions; Succeeded takes the trainer's
final progress from its termination message; a failure is OOM (policies.oom) or a restart
(policies.restart).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_trainer import config as tc

from rlhf_operator import progress
from rlhf_operator.conditions import fmt_time
from rlhf_operator.policies import disruption, oom, restart

if TYPE_CHECKING:
    from rlhf_operator.observed import PodView
    from rlhf_operator.planning import Pass, Plan


def short_message(text: str, lines: int = 3, limit: int = 800) -> str:
    """The end of a termination message (or of the log tail kubelet puts there): the last few
    non-empty lines, where the error usually is."""
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    out = " / ".join(tail)
    # Keep both ends: the head names the field (e.g. "model.init_from_config: ..."), the tail the detail.
    return out if len(out) <= limit else out[: limit // 2] + " ... " + out[-limit // 2:]


def apply(ps: Pass) -> Plan:
    current, pod = ps.current, ps.pod
    if current and pod is None:
        if ps.st.get("nextAttemptTime"):  # a failed pod removed while its replacement waits out the back-off
            return restart.replace(ps, f"trainer pod {current} failed (and was then removed)", None)
        return disruption.replace(ps, disruption.disruption(None, current) or "")
    if pod is None:
        if not any(x.deleting for x in ps.own):
            if lost := ps.inputs_lost():
                return ps.fail("DependencyDeleted", lost)
            ps.start(ps.next_attempt, ps.restarts)
        return ps.finish()
    if pod.deleting:
        return ps.finish()
    conds = ps.conds
    if pod.phase == "Pending":
        if pod.unschedulable:
            conds.set("PodScheduled", False, "Unschedulable", f"pod {pod.name}: {pod.unschedulable}")
        elif pod.scheduled:
            conds.set("PodScheduled", True, "Scheduled", f"pod {pod.name} is bound to a node")
    elif pod.phase == "Running":
        conds.set("PodScheduled", True, "Scheduled", f"pod {pod.name} is bound to a node")
        conds.set("Running", True, "TrainerRunning", f"trainer pod {pod.name} is running")
        conds.clear("Restarting", "TrainerRunning", f"trainer pod {pod.name} is running")
    elif pod.phase == "Succeeded":
        return succeeded(ps, pod)
    elif pod.phase == "Failed":
        return failed(ps, pod)
    return ps.finish()


def succeeded(ps: Pass, pod: PodView) -> Plan:
    final = progress.for_stage(progress.from_termination_message(pod.message), ps.stage)
    progress.merge_into(ps.st, final)
    ps.conds.set("Succeeded", True, "TrainingComplete",
                 f"trainer pod {pod.name} finished; the model is in claim {ps.claim_name} at {tc.FINAL_SUBDIR}/")
    ps.conds.clear("Running", "TrainingComplete", "the trainer finished")
    ps.conds.clear("Restarting", "TrainingComplete", "the trainer finished")
    ps.st["completionTime"] = fmt_time(ps.now, precise=True)
    ps.st["output"] = {"claim": ps.claim_name, "path": tc.FINAL_SUBDIR}
    return ps.finish()


def failed(ps: Pass, pod: PodView) -> Plan:
    if disrupted := disruption.disruption(pod, pod.name):
        return disruption.replace(ps, disrupted)
    if oom.is_oom(pod):
        kept = (ps.st.get("checkpoint") or {}).get("claim", ps.claim_name) if ps.retain_policy == "Retain" else ""
        return ps.fail(oom.REASON, oom.message(pod.name, pod.exit_code, ps.spec, kept))
    code = f"exit code {pod.exit_code}" if pod.exit_code is not None else (pod.reason or "no exit code")
    detail = f" ({pod.reason})" if pod.reason and pod.exit_code is not None and pod.reason != "Error" else ""
    msg = f": {short_message(pod.message)}" if pod.message else ""
    why = f"trainer pod {pod.name} failed with {code}{detail}{msg}"
    return restart.replace(ps, why, pod.exit_code, pod.finished_at)
