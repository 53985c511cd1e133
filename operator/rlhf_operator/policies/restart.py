"""A trainer pod that failed is replaced after a back-off, up to spec.backoffLimit restarts.

Exit codes the trainer uses for wrong input (contract.PERMANENT_EXIT_CODES) fail the job at once: a retry
would fail the same way. The code is the trainer's own, recorded in its termination message, also where torchrun
ends the container with its own 1 (observed.trainer_exit). Before a replacement starts, its inputs are checked
again (children.lost_input). The wait doubles with each restart (restart_backoff); status.nextAttemptTime says
when, and survives an operator restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_trainer import contract

from rlhf_operator.conditions import fmt_time, parse_time
from rlhf_operator.crd_schema import DEFAULT_BACKOFF_LIMIT
from rlhf_operator.policies import restart_backoff

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan

# Permanent exit codes of the trainer -> the job's Failed reason.
EXIT_REASONS = {
    contract.EXIT_CONFIG_ERROR: "InvalidConfig",
    contract.EXIT_DATA_ERROR: "DataError",
    contract.EXIT_MODEL_ERROR: "ModelError",
    contract.EXIT_CHECKPOINT_ERROR: "CheckpointInvalid",
    contract.EXIT_REWARD_ENDPOINT_REFUSED: "RewardEndpointRefused",
    contract.EXIT_NONFINITE: "NonFiniteGradients",
}


def count(ps: Pass) -> Plan | None:
    """The current attempt and the restarts used so far. Pods newer than the recorded attempt were made by a
    pass whose status write was lost; the same pass is planned again (same name: the create is answered 409
    and adopts it), so their restart counts do not count yet."""
    st = ps.st
    last_attempt = st["attempt"] if st.get("attempt") is not None else -1
    ps.restarts = max([st.get("restartCount") or 0] + [x.restart_count for x in ps.own if x.attempt <= last_attempt])
    st["restartCount"] = ps.restarts
    ps.backoff = ps.spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)
    ps.current = st.get("trainerPod") or ""
    ps.pod = next((x for x in ps.own if x.name == ps.current), None)
    ps.next_attempt = 0 if st.get("attempt") is None else st["attempt"] + 1
    return None


def replace(ps: Pass, why: str, exit_code: int | None, failed_at: str = "") -> Plan:
    """The current pod failed (`why`): fail the job, wait out the back-off, or start the next attempt."""
    if exit_code in contract.PERMANENT_EXIT_CODES:
        return ps.fail(EXIT_REASONS[exit_code], f"{why}; this error is permanent, fix the spec or the inputs")
    if ps.restarts >= ps.backoff:
        return ps.fail("BackoffLimitExceeded", f"{why}; spec.backoffLimit ({ps.backoff}) restarts used up")
    if lost := ps.inputs_lost():
        return ps.fail("DependencyDeleted", f"{why}; {lost}")
    n, wait, backoff = ps.restarts + 1, restart_backoff.delay_seconds(ps.restarts + 1, ps.backoff_base), ps.backoff
    ps.conds.clear("Running", "PodFailed", why)
    due = parse_time(ps.st.get("nextAttemptTime"))
    if any(x.attempt == ps.next_attempt for x in ps.own):  # made by a pass whose status write was lost: adopt it
        due = ps.now
    elif due is None:  # first sight of this failure: the back-off counts from the pod's end
        due = restart_backoff.next_attempt(parse_time(failed_at) or ps.now, n, ps.backoff_base)
        ps.st["nextAttemptTime"] = fmt_time(due, precise=True)
    if ps.now < due:
        ps.conds.set("Restarting", True, "PodFailed",
                     f"{why}; restart {n} of {backoff} at {fmt_time(due)} (back-off {wait:g}s)")
        ps.requeue(due)
        return ps.finish()
    ps.start(ps.next_attempt, n)
    ps.plan.restarted = True
    pod = ps.st["trainerPod"]
    ps.conds.set("Restarting", True, "PodFailed", f"{why}; started {pod} (restart {n} of {backoff})")
    ps.announce("Restarting", "Normal", "TrainerRestarted",
                f"started {pod} (restart {n} of {backoff}) after a {wait:g}s back-off")
    return ps.finish()
