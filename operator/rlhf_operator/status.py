"""The job's status, computed from what is observed: a pure function of (job, pods, dependencies).

:func:`plan` returns the new status and the actions that bring the children in line (create the
next trainer pod, delete pods, delete the finished job). It never talks to the API, so every
transition is unit-tested; the reconciler executes the plan. It is a pipeline of small policies
(rlhf_operator.policies), each one rule, run in order over one :class:`planning.Pass` until one of
them ends the pass. Conditions follow the Kubernetes API conventions (rlhf_operator.conditions); the
terminal ones (Succeeded, Failed) never revert.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rlhf_operator.conditions import Conditions, fmt_time, parse_time, phase_of  # noqa: F401 (re-exported)
from rlhf_operator.observed import DepState, PodView, pod_view  # noqa: F401 (re-exported)
from rlhf_operator.patches import merge_patch, prune_empty  # noqa: F401 (re-exported)
from rlhf_operator.planning import Pass, Plan
from rlhf_operator.policies import (
    children,
    claim_loss,
    deadline,
    gang,
    queue,
    refused,
    restart,
    restart_backoff,
    retain,
    running_spec,
    suspend,
    trainer_pod,
    ttl,
    upstream,
)
from rlhf_operator.policies.restart import EXIT_REASONS  # noqa: F401 (re-exported)
from rlhf_operator.policies.trainer_pod import short_message  # noqa: F401 (re-exported)
from rlhf_operator.progress import from_termination_message as final_progress  # noqa: F401 (re-exported)

# In order; each returns a Plan to end the pass, or None to let the next decide. The last always ends it.
POLICIES = (
    retain.apply,  # retainPolicy edits reach the claim, even on a finished job
    ttl.apply,  # a finished job only waits for its TTL
    refused.apply,  # invalid spec, a child name taken by another object
    claim_loss.check,  # the checkpoint claim is not the job's, or was lost (onClaimLoss Fail)
    upstream.apply,  # fromJob: cycles, failed/deleted upstream jobs, waiting
    suspend.apply,
    running_spec.apply,  # edits a running job cannot take are refused
    deadline.apply,  # activeDeadlineSeconds
    restart.count,  # the current attempt and the restarts used
    claim_loss.act,  # a claim in the way is going away, or starting over in a new claim
    queue.apply,  # Kueue: waiting for admission; a preemption checkpoints, waits and resumes without back-off
    gang.apply,  # a multi-node job's pods: released together, run together, restarted together
    trainer_pod.apply,  # start, follow or replace the trainer pod
)


def plan(
    job: dict[str, Any],
    pods: list[PodView],
    deps: list[DepState],
    now: dt.datetime,
    invalid: str | None = None,
    progress: dict[str, Any] | None = None,
    cycle: str | None = None,
    observed: children.Observed | None = None,
    backoff_base: float = restart_backoff.DEFAULT_BASE_SECONDS,
) -> Plan:
    """Compute the next status and actions. `invalid` is a spec error found before planning;
    `progress` is freshly scraped trainer progress (status.progress keys); `cycle` describes a
    dependency cycle through this job (dependencies.cycle_message); `observed`: the job's claims
    and its inputs' claims as seen now (policies.children); `backoff_base`: seconds before the first
    restart after a failure (policies.restart_backoff)."""
    ps = Pass(job, pods, deps, now, invalid, progress, cycle, observed, backoff_base)
    for policy in POLICIES:
        if (done := policy(ps)) is not None:
            return done
    return ps.finish()
