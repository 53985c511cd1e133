"""policies.status_rejection: what is written when the API server refuses a status (422)."""

from __future__ import annotations

from rlhf_operator.policies import status_rejection

BODY = {  # the shape of a 422 Invalid answer of kube-apiserver (metav1.Status)
    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
    "message": 'SFTJob.rlhf.io "j" is invalid: status.progress.totalSteps: Invalid value: "number": '
               'status.progress.totalSteps in body must be of type integer: "number"',
    "details": {"name": "j", "group": "rlhf.io", "kind": "SFTJob", "causes": [
        {"reason": "FieldValueTypeInvalid", "message": 'Invalid value: "number": must be of type integer',
         "field": "status.progress.totalSteps"}]},
}
STATUS = {"phase": "Succeeded", "progress": {"step": 10, "totalSteps": 10**19, "summary": "10/10000000000000000000"},
          "conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "done"}]}


def test_refused_fields_from_causes_or_message():
    assert status_rejection.rejected_fields(BODY) == ["status.progress.totalSteps"]
    no_causes = {**BODY, "details": {}}
    assert status_rejection.rejected_fields(no_causes) == ["status.progress.totalSteps"]
    assert status_rejection.rejected_fields({"message": "something else"}) == []


def test_trimmed_status_keeps_the_terminal_state_and_says_what_was_left_out():
    out, message = status_rejection.trimmed(STATUS, BODY, "2025-01-01T00:00:00Z", 3)
    assert out["phase"] == "Succeeded" and out["progress"] == {"step": 10, "summary": "10/10000000000000000000"}
    cond = {c["type"]: c for c in out["conditions"]}
    assert cond["Succeeded"]["status"] == "True"
    assert cond["StatusRejected"]["status"] == "True" and cond["StatusRejected"]["reason"] == "FieldRejected"
    assert message.startswith("the API server refused status.progress.totalSteps: SFTJob.rlhf.io")
    assert cond["StatusRejected"]["message"] == message and STATUS["progress"]["totalSteps"] == 10**19  # input kept
    # Nothing named: progress (values from outside the operator) is left out.
    out, message = status_rejection.trimmed(STATUS, {"message": "bad"}, "t", 3)
    assert "progress" not in out and "not named" in message
    # The next accepted write clears the condition.
    again = status_rejection.accepted(out, "t2", 4)
    assert {c["type"]: c["status"] for c in again["conditions"]}["StatusRejected"] == "False"
    assert status_rejection.accepted(STATUS, "t", 3)["conditions"] == STATUS["conditions"]
