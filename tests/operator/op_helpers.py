"""Small builders of job and pod objects for the operator's pure unit tests."""

from __future__ import annotations

import copy
from typing import Any

from rlhf_operator import builders


def job(kind: str = "SFTJob", name: str = "j", spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
        generation: int = 1) -> dict[str, Any]:
    if spec is None:
        spec = {"model": {"path": "/models/base"}, "dataset": {"path": "/data/train.jsonl"}}
        if kind == "PPOJob":
            spec = {"actor": {"fromJob": {"name": "sft"}}, "rewardModel": {"fromJob": {"name": "rm"}},
                    "dataset": {"path": "/data/prompts.jsonl"}}
    return {
        "apiVersion": "rlhf.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": generation},
        "spec": copy.deepcopy(spec), "status": copy.deepcopy(status or {}),
    }


def pod(name: str, attempt: int = 0, phase: str = "Running", owner: str = "uid-j", exit_code: int | None = None,
        message: str = "", deleting: bool = False, restarts: int = 0, unschedulable: str = "", ip: str = "127.0.1.1") -> dict:
    status: dict[str, Any] = {"phase": phase, "podIP": ip, "conditions": []}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable})
    elif phase != "Pending":
        status["conditions"].append({"type": "PodScheduled", "status": "True"})
    if exit_code is not None:
        status["containerStatuses"] = [{"name": builders.CONTAINER, "state": {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}}}]
    meta: dict[str, Any] = {
        "name": name, "labels": {builders.LABEL_ATTEMPT: str(attempt)},
        "annotations": {builders.ANN_RESTART_COUNT: str(restarts)},
        "ownerReferences": [{"uid": owner, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta, "status": status}
