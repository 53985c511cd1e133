"""The job's own checkpoint claim: in the way, lost, or being replaced (verdict says which).

`check` runs early: a claim the job did not create, or (onClaimLoss Fail) a lost claim, fails the job.
`act` runs once the job would otherwise (re)start its trainer: a claim in the way that is going away
makes the job wait (Created=False); with onClaimLoss StartOver the trainer is stopped and, once the old
claim is gone, a new pod starts from step 0 in a new claim.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from rlhf_operator.policies import children

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan

RECHECK_SECONDS = 5


def verdict(kind: str, name: str, uid: str, recorded: bool, view: children.ObjectView | None,
            on_loss: str) -> tuple[str, str, str] | None:
    """What the job's own checkpoint claim means for the job: None (fine, or not created yet), else
    (action, reason, message) with action "fail", "wait" or "start_over". `recorded`: the job created
    its claim before (status.checkpoint.claim)."""
    if view is None:
        return None
    if not view.exists and not recorded:
        return None  # created with the first pod
    state = children.ownership(view, "claim", kind, name, uid, by_label=True) if view.exists else (children.OURS, "")
    if view.exists and state[0] == children.CONFLICT:
        return "fail", "ChildNameConflict", state[1]
    if view.exists and state[0] == children.WAIT and not recorded:
        return "wait", "ChildNameInUse", state[1]
    if view.exists and not view.deleting and state[0] == children.OURS:
        return None
    what = "was deleted" if not view.exists else "is being deleted"
    if on_loss == "StartOver":
        return ("start_over", "CheckpointClaimLost",
                f"checkpoint claim {view.name} {what}; spec.checkpoint.onClaimLoss is StartOver: stopping the trainer "
                f"and starting over from step 0 with a new claim")
    return ("fail", "CheckpointClaimLost",
            f"checkpoint claim {view.name} {what}, with the job's checkpoints; the job cannot finish without it. "
            f"Recreate the job to train from step 0, or set spec.checkpoint.onClaimLoss: StartOver to do that "
            f"automatically")


def check(ps: Pass) -> Plan | None:
    on_loss = (ps.spec.get("checkpoint") or {}).get("onClaimLoss", "Fail")
    recorded = bool((ps.st.get("checkpoint") or {}).get("claim"))
    ps.claim_check = verdict(ps.kind, ps.name, ps.uid, recorded, ps.own_claim, on_loss)
    if ps.claim_check and ps.claim_check[0] == "fail":
        return ps.fail(ps.claim_check[1], ps.claim_check[2])
    return None


def act(ps: Pass) -> Plan | None:
    if not ps.claim_check:
        return None
    ps.plan.delete_pods = ps.active
    ps.requeue(ps.now + dt.timedelta(seconds=RECHECK_SECONDS))
    action, reason, message = ps.claim_check
    if action == "wait":
        ps.conds.set("Created", False, reason, message)
        return ps.finish()
    ps.conds.set("Restarting", True, reason, message)
    ps.conds.clear("Running", reason, message)
    old_gone = not (ps.own_claim and ps.own_claim.exists)
    if old_gone and not ps.active and not any(x.deleting for x in ps.own):
        ps.st.pop("progress", None)
        ps.st["checkpoint"] = {}  # start() records the new claim
        ps.start(ps.next_attempt, ps.restarts)
        ps.plan.events.append(("Warning", reason, f"starting over from step 0 with a new claim {ps.claim_name} "
                                                  f"and pod {ps.st['trainerPod']}"))
    return ps.finish()
