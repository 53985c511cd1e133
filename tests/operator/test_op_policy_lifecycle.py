"""The planner's small policies, one at a time, on a planning.Pass: TTL, deadline, suspend, refused jobs,
retain policy, upstream jobs, claim loss and attempt counting (status.plan runs them in order)."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator.observed import DepState, pod_view
from rlhf_operator.planning import Pass
from rlhf_operator.policies import children, claim_loss, deadline, refused, restart, retain, suspend, ttl, upstream

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
RUNNING = {"attempt": 0, "trainerPod": "j-sft-trainer-0", "startTime": "2025-01-01T11:00:00Z",
           "checkpoint": {"claim": "j-sft-checkpoints", "retainPolicy": "Retain"}}


def make(status=None, spec=None, pods=(), deps=(), **kw) -> Pass:
    j = job(status=status, spec=spec)
    if spec is None:
        j["spec"].update(kw.pop("extra", {}))
    return Pass(j, [pod_view(p) for p in pods], list(deps), NOW, **kw)


def cond(plan, ctype):
    return next((c for c in plan.status.get("conditions", []) if c["type"] == ctype), None)


def finished(ttl_seconds):
    st = {**RUNNING, "completionTime": "2025-01-01T11:59:00.000000Z",
          "conditions": [{"type": "Succeeded", "status": "True"}]}
    return make(st, extra={"ttlSecondsAfterFinished": ttl_seconds}, pods=[pod("j-sft-trainer-0")])


def test_ttl_only_for_finished_jobs_deletes_leftover_pods_and_the_job_when_due():
    assert ttl.apply(make(RUNNING, extra={"ttlSecondsAfterFinished": 0})) is None
    waiting = ttl.apply(finished(120))
    assert waiting.delete_pods == ["j-sft-trainer-0"] and not waiting.delete_job
    assert waiting.requeue_at == NOW + dt.timedelta(seconds=60)
    assert ttl.apply(finished(60)).delete_job


def test_deadline_counts_from_the_start_and_not_while_resuming():
    assert deadline.apply(make(RUNNING)) is None
    ps = make(RUNNING, extra={"activeDeadlineSeconds": 7200})
    assert deadline.apply(ps) is None and ps.plan.requeue_at == NOW + dt.timedelta(hours=1)
    failed = deadline.apply(make(RUNNING, extra={"activeDeadlineSeconds": 600}))
    assert cond(failed, "Failed")["reason"] == "DeadlineExceeded" and "(600s)" in cond(failed, "Failed")["message"]
    resuming = {**RUNNING, "conditions": [{"type": "Suspended", "status": "True"}]}
    assert deadline.apply(make(resuming, extra={"activeDeadlineSeconds": 600})) is None


def test_suspend_stops_the_pod_and_keeps_the_checkpoints():
    assert suspend.apply(make(RUNNING)) is None
    p = suspend.apply(make(RUNNING, extra={"suspend": True}, pods=[pod("j-sft-trainer-0")]))
    assert p.delete_pods == ["j-sft-trainer-0"] and p.status["phase"] == "Suspended" and "trainerPod" not in p.status
    assert cond(p, "Suspended")["reason"] == "JobSuspended"


def test_refused_jobs_fail_first_with_the_reason():
    assert refused.apply(make()) is None
    assert cond(refused.apply(make(invalid="spec.x: bad")), "Failed")["message"] == "spec.x: bad"
    conflict = children.Observed(conflict="claim j-sft-checkpoints exists but this job did not create it")
    assert cond(refused.apply(make(observed=conflict)), "Failed")["reason"] == "ChildNameConflict"


def test_retain_policy_edit_reaches_only_a_claim_the_job_created():
    mine = children.ObjectView("j-sft-checkpoints", labels=(("rlhf.io/job-uid", "uid-j"),))
    ps = make(RUNNING, extra={"checkpoint": {"retainPolicy": "Delete"}}, observed=children.Observed(claim=mine))
    assert retain.apply(ps) is None and ps.plan.claim_owned is True
    assert ps.st["checkpoint"]["retainPolicy"] == "Delete"
    other = children.Observed(claim=children.ObjectView("j-sft-checkpoints"))
    ps = make(RUNNING, extra={"checkpoint": {"retainPolicy": "Delete"}}, observed=other)
    assert retain.apply(ps) is None and ps.plan.claim_owned is None


def test_upstream_jobs_hold_a_job_back_until_it_started():
    dep = DepState(("model",), "SFTJob", "up", exists=True, uid="uid-up", phase="Running")
    p = upstream.apply(make(deps=[dep]))
    assert cond(p, "WaitingForDependencies")["message"] == "waiting for SFTJob up (Running)"
    assert p.status["dependencies"][0]["uid"] == "uid-up"
    assert upstream.apply(make(RUNNING, deps=[dep])) is None  # started: not rechecked
    assert cond(upstream.apply(make(deps=[dep], cycle="dependency cycle x")), "Failed")["reason"] == "DependencyCycle"
    done = DepState(("model",), "SFTJob", "up", exists=True, uid="uid-up", phase="Succeeded")
    ps = make(deps=[done])
    assert upstream.apply(ps) is None and ps.conds.get("WaitingForDependencies")["status"] == "False"


def test_claim_loss_fails_or_starts_over_in_a_new_claim():
    lost = children.Observed(claim=children.missing("j-sft-checkpoints"))
    assert cond(claim_loss.check(make(RUNNING, observed=lost)), "Failed")["reason"] == "CheckpointClaimLost"
    ps = make(RUNNING, extra={"checkpoint": {"onClaimLoss": "StartOver"}}, observed=lost)
    assert claim_loss.check(ps) is None and restart.count(ps) is None
    p = claim_loss.act(ps)
    assert p.create_pod == (1, 0) and p.status["checkpoint"] == {"claim": "j-sft-checkpoints", "retainPolicy": "Retain"}
    assert ("Warning", "CheckpointClaimLost") in [(t, r) for t, r, _ in p.events]
    assert claim_loss.act(make(RUNNING)) is None


def test_restarts_count_only_pods_of_recorded_attempts():
    ps = make({**RUNNING, "restartCount": 1}, pods=[pod("j-sft-trainer-0", restarts=2), pod("j-sft-trainer-1", attempt=1,
                                                                                          restarts=5)])
    assert restart.count(ps) is None
    assert (ps.restarts, ps.next_attempt, ps.current, ps.pod.name) == (2, 1, "j-sft-trainer-0", "j-sft-trainer-0")
