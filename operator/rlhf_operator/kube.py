"""The few Kubernetes API calls the reconciler makes, as plain dicts, off the event loop.

The official client is synchronous; calls run in a thread pool so the kopf loop never blocks.
Creation is repeat-safe: 409 AlreadyExists returns the object that is there, for the caller to check
whose it is (policies.children) before using it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import urllib.parse
from typing import Any

import kubernetes

from rlhf_operator.crd_schema import GROUP, KINDS, VERSION

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: dict[str, Any] | None):
        self.status, self.body = status, body or {}
        super().__init__(f"{method} {path}: HTTP {status}: {self.body.get('message', '')}")


def load_client(pool_size: int = 32) -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(cfg)


def job_path(kind: str, namespace: str, name: str = "", sub: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{KINDS[kind].plural}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def core_path(resource: str, namespace: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/{resource}" + (f"/{name}" if name else "")


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        self.client = client or load_client()
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    def _request_sync(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      query: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        m, url, h, b, _ = self.client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        resp = self.client.call_api(m, url, header_params=h, body=b, _request_timeout=30)
        resp.read()
        try:
            data = json.loads(resp.data) if resp.data else None
        except ValueError:
            data = {"message": resp.data[:200].decode(errors="replace")}
        return resp.status, data

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      ok: tuple[int, ...] = ()) -> tuple[int, dict[str, Any] | None]:
        """Returns (status, body); raises ApiError unless 2xx or listed in `ok`."""
        status, data = await asyncio.to_thread(self._request_sync, method, path, body, content_type)
        if not (200 <= status < 300 or status in ok):
            raise ApiError(status, method, path, data)
        return status, data

    # --- jobs --------------------------------------------------------------------------------
    async def get_job(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, data = await self.request("GET", job_path(kind, namespace, name), ok=(404,))
        return None if status == 404 else data

    async def patch_job_status(self, kind: str, namespace: str, name: str,
                               status: dict[str, Any]) -> dict[str, Any] | None:
        """The job as written (None when it is gone): the reconciler's newest view of it, no GET needed."""
        path = job_path(kind, namespace, name, "status")
        code, data = await self.request("PATCH", path, {"status": status}, MERGE_PATCH, ok=(404,))
        return None if code == 404 else data

    async def delete_job(self, kind: str, namespace: str, name: str, uid: str) -> None:
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        await self.request("DELETE", job_path(kind, namespace, name), body, ok=(404, 409))

    # --- children ----------------------------------------------------------------------------
    async def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create a namespaced core object: None when created, else the object already under its name
        ({} if that one was deleted in between)."""
        meta = obj["metadata"]
        status, _ = await self.request("POST", core_path(resource, meta["namespace"]), obj, ok=(409,))
        if status != 409:
            return None
        return await self.get(resource, meta["namespace"], meta["name"]) or {}

    async def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, data = await self.request("GET", core_path(resource, namespace, name), ok=(404,))
        return None if status == 404 else data

    async def patch(self, resource: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self.request("PATCH", core_path(resource, namespace, name), patch, MERGE_PATCH, ok=(404,))

    async def remove_scheduling_gate(self, namespace: str, name: str, gate: str, index: int) -> None:
        """Removes one scheduling gate by position, only if it is still `gate` there: other controllers (Kueue) lift
        their own gates meanwhile, and a merge patch of the whole list would put theirs back (refused: 422)."""
        where = f"/spec/schedulingGates/{index}"
        patch = [{"op": "test", "path": f"{where}/name", "value": gate}, {"op": "remove", "path": where}]
        await self.request("PATCH", core_path("pods", namespace, name), patch, JSON_PATCH, ok=(404, 409, 422))

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        await self.request("DELETE", core_path(resource, namespace, name), ok=(404, 409))

    async def post_event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = job["metadata"]
        now = dt.datetime.now(dt.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": job.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": job["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "rlhf-operator"},
            "reportingComponent": "rlhf-operator",
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.request("POST", core_path("events", meta["namespace"]), event)
        except Exception as e:  # an event is best-effort: never fail a reconcile for it
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e)
