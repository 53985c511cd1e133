"""Helpers of the operator tests: builders of job and pod objects for the pure unit tests, and polling,
ports, metrics and process lookup for the cluster tests. (A helper module, not conftest: with several
test directories in one run, `from conftest import` would find another directory's conftest.)"""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path
from typing import Any

from rlhf_operator import builders

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_trainer.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn, timeout: float = 60.0, interval: float = 0.2):
    """Poll fn() until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def trainer_pid(jobs: Any, pod: str) -> int:  # jobs: conftest.Jobs
    """PID of a pod's trainer process on this machine (the local node agent runs it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"POD_NAME={pod}".encode() in environ and f"RLHF_JOB_NAMESPACE={jobs.ns}".encode() in environ \
                and STANDIN.name.encode() in cmdline:
            return int(proc.name)
    raise AssertionError(f"no trainer process of pod {pod} found")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


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
