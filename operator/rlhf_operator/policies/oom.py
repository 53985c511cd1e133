"""A trainer killed for running out of memory fails the job at once, saying what to change.

The kubelet reports a kernel OOM kill as exit code 137 with reason OOMKilled. Training needs about
the same memory at every step, so a replacement would run out again: retrying only burns the
backoff budget and the node's time. The job fails with reason OOMKilled (restarts not used) and a
message naming what to change; with checkpoint.retainPolicy Retain (the default) its checkpoints stay
in the claim.
"""

from __future__ import annotations

from typing import Any

REASON = "OOMKilled"


def is_oom(pod: Any) -> bool:
    """`pod` is a status.PodView of a finished pod."""
    return pod.phase == "Failed" and pod.reason == REASON


def message(pod_name: str, exit_code: int | None, spec: dict[str, Any], claim: str) -> str:
    memory = (spec.get("resources") or {}).get("memory")
    limit = f"its memory limit spec.resources.memory={memory}" if memory is not None else \
        "the node's memory (spec.resources.memory is not set)"
    code = f"exit code {exit_code}, " if exit_code is not None else ""
    training = spec.get("training") or {}
    batch = training.get("batchSize")
    now = f" (now {batch})" if batch is not None else ""
    ds = spec.get("deepspeed") or {}
    stage = ds.get("zeroStage", 0)
    if stage < 2 or not ds.get("offloadOptimizer"):
        zero = "set spec.deepspeed.zeroStage 2 or 3 with offloadOptimizer: true"
    else:
        zero = "set spec.deepspeed.offloadParams: true (zeroStage 3)"
    keep = f"; the checkpoints written so far are kept in claim {claim}" if claim else ""
    return (f"trainer pod {pod_name} ran out of memory ({code}OOMKilled): it used more than {limit}. A retry would run "
            f"out of memory again, so the job failed without using spec.backoffLimit. Raise spec.resources.memory, or "
            f"need less: lower spec.training.batchSize{now} and raise spec.training.gradientAccumulationSteps (same "
            f"effective batch), or {zero}{keep}")
