"""spec.suspend: the trainer pod is stopped (it checkpoints on SIGTERM) and the job waits, checkpoints kept.

On resume (Pass.start) the job starts a new run with the spec as it is then, and the next attempt's pod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    if not ps.spec.get("suspend"):
        return None
    ps.plan.delete_pods = ps.active
    conds = ps.conds
    conds.set("Suspended", True, "JobSuspended", "spec.suspend is true: trainer pod stopped, checkpoints kept")
    conds.clear("Running", "JobSuspended", "the job is suspended")
    conds.clear("Restarting", "JobSuspended", "the job is suspended")
    conds.clear("PodScheduled", "JobSuspended", "the job is suspended")
    conds.clear("SpecChangeRefused", "JobSuspended", "the job is suspended: spec changes apply when it resumes")
    ps.st["trainerPod"] = ""
    ps.st.pop("nextAttemptTime", None)
    return ps.finish()
