"""A finished job (Succeeded or Failed, both terminal) only waits for spec.ttlSecondsAfterFinished.

Its leftover pods are deleted (e.g. one that outlived a deadline failure); once the TTL has passed since
status.completionTime the job itself is deleted, as batch/v1 Job's TTL controller does.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from rlhf_operator.conditions import parse_time

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    if not (ps.conds.is_true("Succeeded") or ps.conds.is_true("Failed")):
        return None
    ps.plan.delete_pods = ps.active
    ttl, done = ps.spec.get("ttlSecondsAfterFinished"), parse_time(ps.st.get("completionTime"))
    if ttl is not None and done is not None:
        due = done + dt.timedelta(seconds=ttl)
        if ps.now >= due:
            ps.plan.delete_job = True
        else:
            ps.plan.requeue_at = due
    return ps.finish()
