"""policies.restart_backoff, policies.disruption and policies.oom: how a trainer pod's end is judged."""

from __future__ import annotations

import datetime as dt

from op_helpers import pod
from rlhf_operator.policies import disruption, oom, restart_backoff, resume_report
from rlhf_operator.status import pod_view


def test_back_off_doubles_from_the_base_and_is_capped():
    assert [restart_backoff.delay_seconds(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 320, 360]
    assert restart_backoff.delay_seconds(500) == 360
    assert [restart_backoff.delay_seconds(n, base=0.5) for n in (1, 2, 3)] == [0.5, 1, 2]
    assert restart_backoff.delay_seconds(3, base=0) == 0
    t = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert restart_backoff.next_attempt(t, 2) == t + dt.timedelta(seconds=20)


def view(**status):
    p = pod("j-sft-trainer-0", phase=status.pop("phase", "Failed"), exit_code=status.pop("exit_code", 137))
    conditions = status.pop("conditions", [])
    p["status"].update(status)
    p["status"]["conditions"] += conditions
    return pod_view(p)


def test_disruptions_are_told_from_failures():
    assert "was deleted by someone other than the operator" in disruption.disruption(None, "x")
    assert disruption.disruption(view(reason="Evicted", message="low on memory"), "x") == \
        "trainer pod x was evicted by its node (low on memory)"
    assert "node shutdown" in disruption.disruption(view(reason="Shutdown"), "x")
    assert "lost with its node" in disruption.disruption(view(reason="NodeLost"), "x")
    target = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API"}
    assert disruption.disruption(view(conditions=[target]), "x") == "trainer pod x was disrupted: EvictionByEvictionAPI: Eviction API"
    assert disruption.disruption(view(conditions=[{**target, "status": "False"}]), "x") is None
    assert disruption.disruption(view(phase="Running", conditions=[target]), "x") is None  # still stopping
    assert "SIGTERM (exit code 143)" in disruption.disruption(view(exit_code=143), "x")
    assert disruption.disruption(view(exit_code=1), "x") is None
    assert disruption.disruption(view(exit_code=137), "x") is None  # SIGKILL, e.g. a crash: a failure


def test_oom_is_recognised_by_the_kubelet_reason_and_the_message_fits_the_spec():
    p = pod("j-sft-trainer-0", phase="Failed", exit_code=137)
    assert not oom.is_oom(pod_view(p))
    p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    assert oom.is_oom(pod_view(p))
    text = oom.message("x", 137, {}, "")
    assert "the node's memory (spec.resources.memory is not set)" in text and "claim" not in text
    staged = oom.message("x", 137, {"deepspeed": {"zeroStage": 3, "offloadOptimizer": True}}, "c")
    assert "offloadParams: true" in staged and "claim c" in staged


def test_resume_report_event_only_for_a_new_report():
    assert resume_report.event({}, {"step": 1}, "p") is None
    assert resume_report.event({}, {"resumedFromStep": 0}, "p")[1] == "ResumedFromCheckpoint"
    assert resume_report.event({}, {"resumedFromStep": -1}, "p")[1] == "StartedFresh"
    assert resume_report.event({"resumedFromStep": 5}, {"resumedFromStep": 5}, "p") is None
