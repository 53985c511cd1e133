"""Pure rules about a job's children: whose an object is, and what a lost claim or input means
(policies.children, and the planner's use of it)."""

from __future__ import annotations

import datetime as dt

from op_helpers import job, pod
from rlhf_operator.policies import children as cp
from rlhf_operator.status import DepState, plan, pod_view

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
UID = "uid-j"


def claim(name="j-sft-checkpoints", uid=UID, deleting=False, owners=(), kind="SFTJob", job_name="j"):
    labels = {"rlhf.io/job": job_name, "rlhf.io/kind": kind}
    if uid:
        labels["rlhf.io/job-uid"] = uid
    return cp.ObjectView(name, deleting=deleting, labels=tuple(sorted(labels.items())), owners=tuple(owners))


def step(j, pods=(), deps=(), observed=None, now=NOW):
    p = plan(j, [pod_view(x) for x in pods], list(deps), now, observed=observed)
    j["status"] = p.status
    return p


def cond(j, ctype):
    return next((c for c in j["status"].get("conditions", []) if c["type"] == ctype), None)


def test_ownership_goes_by_the_uid_label_for_claims_and_the_owner_reference_otherwise():
    assert cp.ownership(claim(), "claim", "SFTJob", "j", UID, by_label=True) == (cp.OURS, "")
    state, why = cp.ownership(cp.ObjectView("j-sft-checkpoints"), "claim", "SFTJob", "j", UID, by_label=True)
    assert state == cp.CONFLICT and "claim j-sft-checkpoints exists but this job did not create it" in why
    assert "no rlhf.io/job-uid label" in why and "Delete it" in why
    state, why = cp.ownership(claim(uid="uid-old"), "claim", "SFTJob", "j", UID, by_label=True)
    assert state == cp.CONFLICT and "created by an earlier SFTJob j (uid uid-old)" in why  # retained by a deleted job
    # A config map or pod with the job's label but no owner reference is not the job's.
    assert cp.ownership(claim(), "pod", "SFTJob", "j", UID, by_label=False)[0] == cp.CONFLICT
    mine = cp.ObjectView("j-sft-config", owners=(("SFTJob", "j", UID),))
    assert cp.ownership(mine, "config map", "SFTJob", "j", UID, by_label=False) == (cp.OURS, "")
    # On its way out: being deleted, or owned by a deleted job of the same name (the garbage collector's).
    old = cp.ObjectView("j-sft-trainer-0", owners=(("SFTJob", "j", "uid-old"),))
    assert cp.ownership(old, "pod", "SFTJob", "j", UID, by_label=False)[0] == cp.WAIT
    assert cp.ownership(cp.ObjectView("x", deleting=True), "pod", "SFTJob", "j", UID, by_label=False)[0] == cp.WAIT
    other = cp.ObjectView("x", owners=(("Deployment", "web", "u1"),))
    assert "it belongs to Deployment web" in cp.ownership(other, "pod", "SFTJob", "j", UID, by_label=False)[1]


def test_a_claim_the_job_did_not_create_fails_the_job_and_is_never_owned():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}})
    p = step(j, observed=cp.Observed(claim=cp.ObjectView("j-sft-checkpoints")))
    failed = cond(j, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ChildNameConflict" and "j-sft-checkpoints" in failed["message"]
    assert p.create_pod is None and p.claim_owned is None


def test_retain_policy_change_never_adds_an_owner_to_a_foreign_claim():
    spec = {"model": {"path": "/m"}, "dataset": {"path": "/d"}, "checkpoint": {"retainPolicy": "Delete"}}
    status = {"phase": "Succeeded", "checkpoint": {"claim": "j-sft-checkpoints", "retainPolicy": "Retain"},
              "conditions": [{"type": "Succeeded", "status": "True"}]}
    foreign = cp.Observed(claim=claim(uid="uid-other"))
    assert step(job(spec=spec, status=status), observed=foreign).claim_owned is None
    assert step(job(spec=spec, status=status), observed=cp.Observed(claim=claim())).claim_owned is True


def test_a_claim_being_deleted_fails_the_running_job_and_never_lets_it_succeed():
    j = job()
    step(j, observed=cp.Observed(claim=cp.missing("j-sft-checkpoints")))  # first pod; the claim is created with it
    assert j["status"]["checkpoint"]["claim"] == "j-sft-checkpoints"
    p = step(j, [pod("j-sft-trainer-0", phase="Succeeded", exit_code=0)], observed=cp.Observed(claim=claim(deleting=True)))
    failed = cond(j, "Failed")
    assert j["status"]["phase"] == "Failed" and failed["reason"] == "CheckpointClaimLost"
    assert "checkpoint claim j-sft-checkpoints is being deleted" in failed["message"]
    assert "onClaimLoss: StartOver" in failed["message"] and "output" not in j["status"]
    assert cond(j, "Succeeded") is None and p.create_pod is None


def test_a_recorded_claim_that_is_gone_is_lost_not_recreated():
    j = job()
    step(j, observed=cp.Observed(claim=cp.missing("j-sft-checkpoints")))
    p = step(j, [pod("j-sft-trainer-0", phase="Running")], observed=cp.Observed(claim=cp.missing("j-sft-checkpoints")))
    assert p.create_pod is None and p.delete_pods == ["j-sft-trainer-0"]
    assert cond(j, "Failed")["reason"] == "CheckpointClaimLost" and "was deleted" in cond(j, "Failed")["message"]


def test_start_over_stops_the_pod_waits_for_the_claim_to_go_then_starts_from_step_0():
    j = job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"}, "checkpoint": {"onClaimLoss": "StartOver"}})
    step(j, observed=cp.Observed(claim=cp.missing("j-sft-checkpoints")))
    j["status"]["progress"] = {"step": 7, "checkpointStep": 6}
    p = step(j, [pod("j-sft-trainer-0")], observed=cp.Observed(claim=claim(deleting=True)))
    assert p.delete_pods == ["j-sft-trainer-0"] and p.create_pod is None and j["status"]["phase"] == "Restarting"
    assert cond(j, "Restarting")["reason"] == "CheckpointClaimLost" and "starting over from step 0" in cond(j, "Restarting")["message"]
    stopped = [pod("j-sft-trainer-0", phase="Failed", exit_code=143)]
    assert step(j, stopped, observed=cp.Observed(claim=claim(deleting=True))).create_pod is None  # the claim is still there
    p = step(j, stopped, observed=cp.Observed(claim=cp.missing("j-sft-checkpoints")))
    assert p.create_pod == (1, 0) and "progress" not in j["status"]
    assert j["status"]["checkpoint"]["claim"] == "j-sft-checkpoints" and j["status"]["trainerPod"] == "j-sft-trainer-1"
    assert any("starting over from step 0 with a new claim j-sft-checkpoints" in m for _, _, m in p.events)
    # The new claim is the job's own: training goes on.
    p = step(j, [*stopped, pod("j-sft-trainer-1", attempt=1)], observed=cp.Observed(claim=claim()))
    assert j["status"]["phase"] == "Running" and p.delete_pods == []


def test_a_claim_of_a_deleted_job_of_the_same_name_is_waited_for():
    j = job()
    gone_owner = claim(uid="uid-old", owners=(("SFTJob", "j", "uid-old"),))  # retainPolicy Delete: collected soon
    p = step(j, observed=cp.Observed(claim=gone_owner))
    assert p.create_pod is None and cond(j, "Failed") is None
    assert cond(j, "Created")["reason"] == "ChildNameInUse" and p.requeue_at is not None


def dep(kind="SFTJob", name="sft", uid="uid-sft", exists=True, claim_name="sft-sft-checkpoints"):
    return DepState(("actor",), kind, name, exists, uid if exists else "", "Succeeded" if exists else "", "",
                    claim_name if exists else "", "2025-01-01T11:00:00Z" if exists else "")


def test_a_restart_rechecks_the_inputs():
    j = job("PPOJob", "p", spec={"actor": {"fromJob": {"name": "sft"}}, "rewardModel": {"path": "/r"},
                                 "dataset": {"path": "/d"}})
    j["metadata"]["uid"] = UID
    ok = cp.Observed(inputs={"sft-sft-checkpoints": claim("sft-sft-checkpoints", uid="uid-sft")})
    assert step(j, deps=[dep()], observed=ok).create_pod == (0, 0)
    # While the trainer runs, a deleted input does not matter: its claim stays mounted.
    dying = cp.Observed(inputs={"sft-sft-checkpoints": claim("sft-sft-checkpoints", uid="uid-sft", deleting=True)})
    step(j, [pod("p-ppo-trainer-0")], deps=[dep()], observed=dying)
    assert j["status"]["phase"] == "Running"
    p = step(j, [pod("p-ppo-trainer-0", phase="Failed", exit_code=1)], deps=[dep()], observed=dying)
    failed = cond(j, "Failed")
    assert p.create_pod is None and failed["reason"] == "DependencyDeleted"
    assert "claim sft-sft-checkpoints, the output of SFTJob sft (actor), is being deleted" in failed["message"]


def test_lost_input_names_the_job_or_the_claim():
    recorded = [{"kind": "SFTJob", "name": "sft", "uid": "uid-sft"}]
    here = {"sft-sft-checkpoints": claim("sft-sft-checkpoints", uid="uid-sft")}
    assert cp.lost_input([dep()], recorded, here) == ""
    assert "SFTJob sft (actor) was deleted" in cp.lost_input([dep(exists=False)], recorded, {})
    assert "was deleted and created again" in cp.lost_input([dep(uid="uid-new")], recorded, here)
    gone = {"sft-sft-checkpoints": cp.missing("sft-sft-checkpoints")}
    assert "claim sft-sft-checkpoints, the output of SFTJob sft (actor), was deleted" in cp.lost_input([dep()], recorded, gone)
