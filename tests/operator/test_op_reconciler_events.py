"""Reconciler.on_*_event: which watch events make a pass or wake dependents, and the state they keep.

The handlers only route events here; the reconciler's own trigger methods are replaced by recorders
(no API server: what is tested is the decision).
"""

from __future__ import annotations

import asyncio

from rlhf_operator.reconciler import Reconciler
from rlhf_operator.settings import Settings

KEY = ("ns", "SFTJob", "j")


class Recording(Reconciler):
    def __init__(self):
        super().__init__(Settings())
        self.passes: list[tuple[str, str, str]] = []
        self.woken: list[tuple[str, str, str]] = []

    async def trigger(self, key, scrape=False):
        self.passes.append(key)

    def trigger_dependents(self, namespace, kind, name):
        self.woken.append((namespace, kind, name))


def body(phase="", generation=1, observed=None, uid="uid-j"):
    status = {"phase": phase} if phase else {}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"namespace": "ns", "name": "j", "uid": uid, "generation": generation}, "status": status}


def event(r, type_, b, kind="SFTJob"):
    asyncio.run(r.on_job_event(kind, {"type": type_}, b))
    return len(r.passes), len(r.woken)


def test_job_events_pass_on_first_sight_and_new_specs_and_wake_dependents_on_phase_changes():
    r = Recording()
    assert event(r, "ADDED", body()) == (1, 1)  # first sight: a pass; dependents learn its phase
    assert event(r, None, body()) == (2, 1)  # kopf's initial listing: a pass too
    assert event(r, "MODIFIED", body(observed=1)) == (2, 1)  # our own status write: nothing to do
    assert event(r, "MODIFIED", body(phase="Running", observed=1)) == (2, 2)  # a new phase: dependents only
    assert r.seen_phases == {"uid-j": "Running"}
    assert event(r, "MODIFIED", body(phase="Running", generation=2, observed=1)) == (3, 2)  # a spec edit
    assert r.passes == [KEY] * 3 and r.woken == [KEY] * 2


def test_a_deleted_job_is_forgotten_and_its_dependents_woken():
    r = Recording()
    event(r, "ADDED", body(phase="Running"))
    assert r.phases._phases == {"uid-j": ("SFTJob", "Running")}
    assert event(r, "DELETED", body(phase="Running")) == (1, 2)
    assert r.seen_phases == {} and r.phases._phases == {}


def test_pod_and_claim_events_route_to_their_job():
    r = Recording()
    labels = {"rlhf.io/kind": "SFTJob", "rlhf.io/job": "j"}
    asyncio.run(r.on_pod_event({"metadata": {"namespace": "ns", "labels": labels}}))
    asyncio.run(r.on_pod_event({"metadata": {"namespace": "ns", "labels": {**labels, "rlhf.io/kind": "Other"}}}))
    assert r.passes == [KEY] and r.woken == []
    claim = {"metadata": {"namespace": "ns", "labels": labels}}
    asyncio.run(r.on_claim_event({"type": "MODIFIED"}, claim))  # a claim that stays: nothing
    assert r.passes == [KEY] and r.woken == []
    asyncio.run(r.on_claim_event({"type": "MODIFIED"}, {"metadata": {**claim["metadata"], "deletionTimestamp": "x"}}))
    asyncio.run(r.on_claim_event({"type": "DELETED"}, claim))
    assert r.passes == [KEY] * 3 and r.woken == [KEY] * 2
