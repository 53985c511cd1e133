"""kopf registrations: thin handlers that only route events to the reconciler.

No change-detection handlers and no finalizers: every handler is an event or index handler, so
kopf writes nothing to the jobs, and a job can be deleted even while the operator is down. What an
event means (a pass, waking dependents, forgetting a job) is the reconciler's decision.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from rlhf_operator import builders, dependencies
from rlhf_operator.crd_schema import GROUP, KINDS, VERSION
from rlhf_operator.observed import pod_view
from rlhf_operator.policies import children as child_policy
from rlhf_operator.reconciler import Reconciler

log = logging.getLogger(__name__)
POD_LABELS = {builders.LABEL_MANAGED_BY: builders.MANAGER, builders.LABEL_JOB: kopf.PRESENT,
              builders.LABEL_KIND: kopf.PRESENT}


API_THREADS = 32


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    # Same credentials as the reconciler's client: in-cluster service account, else $KUBECONFIG.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    for kind in KINDS:
        _register_kind(registry, reconciler, kind)

    @kopf.index("pods", labels=POD_LABELS, id="trainer_pods_index", registry=registry)
    def trainer_pods_index(body: kopf.Body, namespace: str, labels: dict[str, str], **_: Any) -> dict:
        return {(namespace, labels[builders.LABEL_KIND], labels[builders.LABEL_JOB]): pod_view(dict(body))}

    @kopf.on.event("pods", labels=POD_LABELS, id="trainer_pod_event", registry=registry)
    async def trainer_pod_event(body: kopf.Body, **_: Any) -> None:
        await reconciler.on_pod_event(body)

    # Checkpoint claims (same labels): a job and the jobs reading its output notice a claim going away.
    @kopf.index("persistentvolumeclaims", labels=POD_LABELS, id="checkpoint_claims_index", registry=registry)
    def checkpoint_claims_index(body: kopf.Body, namespace: str, labels: dict[str, str], **_: Any) -> dict:
        key = (namespace, labels[builders.LABEL_KIND], labels[builders.LABEL_JOB])
        return {key: child_policy.object_view(dict(body))}

    @kopf.on.event("persistentvolumeclaims", labels=POD_LABELS, id="checkpoint_claim_event", registry=registry)
    async def checkpoint_claim_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        await reconciler.on_claim_event(event, body)

    @kopf.on.startup(registry=registry)
    async def startup(**kwargs: Any) -> None:
        # API calls run in threads (kube.py); the default pool (cpus + 4) caps a burst of new jobs at a few
        # reconciles in flight, each waiting on the API server, not the CPU.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=API_THREADS))
        indices = {k: v for k, v in kwargs.items() if k.endswith("_index")}
        await reconciler.start(indices)
        log.info("rlhf-operator started (namespaces: %s)", ", ".join(reconciler.settings.watch_namespaces) or "all")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await reconciler.stop()


def _register_kind(registry: kopf.OperatorRegistry, reconciler: Reconciler, kind: str) -> None:
    plural = KINDS[kind].plural

    def job_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
        return {(namespace, name): dependencies.summarize(kind, dict(body))}

    async def job_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        await reconciler.on_job_event(kind, event, body)

    kopf.index(GROUP, VERSION, plural, id=f"{plural}_index", registry=registry)(job_index)
    kopf.on.event(GROUP, VERSION, plural, id=f"{plural}_event", registry=registry)(job_event)
