"""Non-finite gradients through the operator with the real trainer: a trainer whose every optimizer step
from step 3 on has NaN gradients (test hook RLHF_INJECT_NONFINITE_GRADS; the loss stays finite, as under a
faulty attention kernel) exits 10 after training.maxSkippedSteps consecutive skipped steps, and the job
fails at once - no restart - with reason NonFiniteGradients naming stage, model, step and last loss."""

from __future__ import annotations

import pytest
from e2e_helpers import (
    assert_operator_healthy,
    conditions,
    configmap_dataset,
    create_configmap,
    jsonl,
    real_spec,
    sft_rows,
    wait_phase,
)


@pytest.mark.slow
def test_repeated_nonfinite_gradients_fail_the_job_with_nonfinite_gradients(real_operator, jobs):
    create_configmap(jobs, "data", {"sft.jsonl": jsonl(sft_rows())})
    spec = real_spec(configmap_dataset("data", "sft.jsonl"), steps=40, every=100, backoffLimit=3,
                     training={"maxSkippedSteps": 3},
                     env=[{"name": "RLHF_INJECT_NONFINITE_GRADS", "value": "policy:3"}])
    jobs.create("SFTJob", "nan-grads", spec)
    st = wait_phase(jobs, "SFTJob", "nan-grads", "Failed", 240)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "NonFiniteGradients", failed
    message = failed["message"]
    assert ("failed with exit code 10: non-finite gradients: sft stage, model policy: 3 consecutive optimizer steps "
            "skipped because the gradients were NaN/Inf, up to policy optimizer step 5 (training step 5); last finite "
            "loss") in message, message
    assert "this error is permanent" in message and st.get("restartCount", 0) == 0, st
    assert st.get("progress", {}).get("skippedSteps") in (None, 0, 1, 2, 3), st.get("progress")  # if scraped
    assert_operator_healthy(real_operator)
