"""spec.checkpoint.retainPolicy may change at any time; the claim's owner reference follows it.

Delete: the job owns its claim (deleted with the job); Retain: no owner reference, the claim outlives the
job. Only a claim the job created (its rlhf.io/job-uid label) is ever given or stripped of an owner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_operator.policies import children

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    cp = ps.st.get("checkpoint") or {}
    if cp.get("claim") and cp.get("retainPolicy", "Retain") != ps.retain_policy \
            and children.owns_claim(ps.own_claim, ps.uid):
        ps.plan.claim_owned = ps.retain_policy == "Delete"
        cp["retainPolicy"] = ps.retain_policy
    return None
