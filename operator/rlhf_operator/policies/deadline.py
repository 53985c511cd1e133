"""spec.activeDeadlineSeconds: a run that lasts longer fails (DeadlineExceeded), as batch/v1 Job's does.

Counted from status.startTime, which a resume resets; while the job resumes it is not checked. The
reconciler is woken at the deadline.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from rlhf_operator.conditions import parse_time

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    deadline = ps.spec.get("activeDeadlineSeconds")
    started_at = parse_time(ps.st.get("startTime"))
    if not (deadline and started_at) or ps.resuming:
        return None
    due = started_at + dt.timedelta(seconds=deadline)
    if ps.now >= due:
        return ps.fail("DeadlineExceeded", f"the job ran longer than spec.activeDeadlineSeconds ({deadline}s)")
    ps.requeue(due)
    return None
