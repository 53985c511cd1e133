"""Helpers of the operator tests: builders of job and pod objects for the pure unit tests, and the stand-in
trainer's process, metrics and webhook refusals for the cluster tests (polling and ports come from
tests/support). A helper module, not conftest: with several test directories in one run, `from conftest
import` would find another directory's conftest."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_operator import builders
from support.kube import or_none
from support.polling import wait_for
from support.ports import free_port
from support.processes import pod_process

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_trainer.py"


def trainer_pid(jobs: Any, pod: str) -> int:  # jobs: conftest.Jobs
    """PID of a pod's stand-in trainer process on this machine (the local node agent runs it)."""
    pid = pod_process(jobs.ns, pod, STANDIN.name)
    if pid is None:
        raise AssertionError(f"no trainer process of pod {pod} found")
    return pid


def webhooks(read: Any, name: str) -> list:
    """The webhooks of a webhook configuration (read: the API's read method); [] until kopf has created it."""
    found = or_none(read, name)
    return (found.webhooks or []) if found else []


def delete_webhook_configurations(adm: Any, name: str) -> None:
    """Remove the validating and mutating webhook configurations a test's operator made (if any)."""
    for delete in (adm.delete_validating_webhook_configuration, adm.delete_mutating_webhook_configuration):
        or_none(delete, name)


@contextlib.contextmanager
def webhook_operator(operator_factory: Any, k8s: Any, namespace: str) -> Iterator[Any]:
    """An operator serving its admission webhook (failure policy Fail) under a configuration named for the test's
    namespace; yields it once the API server has the webhook, then stops it and removes the configurations."""
    from kubernetes import client

    name = f"rlhf-test-{namespace}.rlhf.io"
    op = operator_factory(RLHF_WEBHOOK_ENABLED="1", RLHF_WEBHOOK_PORT=str(free_port()), RLHF_WEBHOOK_CONFIG_NAME=name,
                          RLHF_WEBHOOK_FAILURE_POLICY="Fail")
    adm = client.AdmissionregistrationV1Api(k8s)
    try:
        wait_for("webhook configuration", lambda: webhooks(adm.read_validating_webhook_configuration, name), 30)
        yield op
    finally:
        op.stop()
        delete_webhook_configurations(adm, name)


def webhook_rejection(jobs: Any, kind: str, name: str, spec: dict[str, Any], timeout: float = 20) -> Any:
    """The ApiException of creating a job that the admission webhook refuses. Until the webhook serves, a
    job may be admitted: it is deleted and the create tried again."""
    from kubernetes.client.rest import ApiException

    def attempt():
        try:
            jobs.create(kind, name, spec)
        except ApiException as e:
            return e
        jobs.delete(kind, name)  # the webhook was not serving yet
        return None
    err = wait_for(f"{name} rejected", attempt, timeout, 0.5)
    assert err.status in (400, 422) and "admission webhook" in err.body, err.body
    return err


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
