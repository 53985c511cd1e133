"""A small JSON client for the Kubernetes API: plain dicts in and out, list+watch with relist.

The generated `kubernetes` models are slow to (de)serialize and awkward for patches; the agent
only needs raw requests, so it reuses the official client's kubeconfig loader and TLS pool and
speaks JSON itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlencode

import kubernetes.client
import kubernetes.config
import urllib3

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.status = status
        self.body = body
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{method} {path} -> HTTP {status}: {message}")


class Kube:
    """Requests against one API server, authenticated from a kubeconfig file."""

    def __init__(self, kubeconfig: str, pool_size: int = 64):
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = pool_size
        self._host = cfg.host.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "rlhf-local-node-agent"}
        for setting in cfg.auth_settings().values():
            if setting["in"] == "header" and setting["value"]:
                self._headers[setting["key"]] = setting["value"]
        # The official REST client builds the urllib3 pool with the kubeconfig's TLS settings.
        self._pool = kubernetes.client.rest.RESTClientObject(cfg).pool_manager

    # -- plain requests -------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, query: dict | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> dict:
        url = self._host + path + ("?" + urlencode(query) if query else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(method, url, body=data, headers=headers,
                                  timeout=urllib3.Timeout(connect=10, read=timeout), retries=False)
        text = resp.data.decode("utf-8", "replace")
        if resp.status >= 300:
            raise ApiError(method, path, resp.status, text)
        return json.loads(text) if text else {}

    def get(self, path: str, query: dict | None = None) -> dict:
        return self.request("GET", path, query=query)

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, kind: str = MERGE_PATCH) -> dict:
        return self.request("PATCH", path, body, content_type=kind)

    def delete(self, path: str, body: dict | None = None) -> dict | None:
        try:
            return self.request("DELETE", path, body)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    # -- watches --------------------------------------------------------------------------
    def watch(self, path: str, resource_version: str, query: dict | None = None,
              timeout_seconds: int = 240) -> Iterator[tuple[str, dict]]:
        """Yield (type, object) events; raises ApiError(410) when the version is too old."""
        q = dict(query or {})
        q.update(watch="true", resourceVersion=resource_version, allowWatchBookmarks="true",
                 timeoutSeconds=str(timeout_seconds))
        url = self._host + path + "?" + urlencode(q)
        resp = self._pool.request("GET", url, headers=self._headers, preload_content=False, retries=False,
                                  timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30))
        try:
            if resp.status >= 300:
                raise ApiError("WATCH", path, resp.status, resp.read().decode("utf-8", "replace"))
            buf = b""
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise ApiError("WATCH", path, int(obj.get("code") or 500), json.dumps(obj))
                    yield event["type"], obj
        finally:
            resp.release_conn()


def path_for(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    """REST path of a collection or object, e.g. path_for("v1", "pods", "ns", "p", "status")."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(plural)
    if name:
        parts.append(quote(name))
    if sub:
        parts.append(sub)
    return "/".join(parts)


def obj_key(obj: dict) -> str:
    md = obj.get("metadata") or {}
    return md.get("uid") or f"{md.get('namespace', '')}/{md.get('name', '')}"


class Reflector:
    """List, then watch from the list's resourceVersion; relist on expiry or errors.

    `handler(type, obj)` sees ADDED/MODIFIED/DELETED. After a relist, objects that vanished
    while the watch was down are reported as DELETED (with their last known state), so the
    handler never misses a deletion.
    """

    def __init__(self, kube: Kube, path: str, handler: Callable[[str, dict], None],
                 stop: threading.Event, query: dict | None = None, name: str = "reflector"):
        self.kube, self.path, self.handler, self.stop = kube, path, handler, stop
        self.query = query or {}
        self.name = name
        self.synced = threading.Event()
        self._known: dict[str, dict] = {}

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name=self.name, daemon=True)
        t.start()
        return t

    def run(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                rv = self._relist()
                self.synced.set()
                delay = 0.5
                while not self.stop.is_set():
                    for etype, obj in self.kube.watch(self.path, rv, self.query):
                        if self.stop.is_set():
                            return
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if etype == "BOOKMARK":
                            continue
                        self._dispatch(etype, obj)
            except ApiError as e:
                if e.status != 410:
                    log.warning("%s: %s; relisting in %.1fs", self.name, e, delay)
                    self.stop.wait(delay)
                    delay = min(delay * 2, 10)
            except Exception as e:  # connection drops, API server restarts
                if self.stop.is_set():
                    return
                log.warning("%s: watch failed (%s: %s); relisting in %.1fs", self.name, type(e).__name__, e, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 10)

    def _relist(self) -> str:
        listing = self.kube.get(self.path, self.query)
        seen = set()
        for obj in listing.get("items") or []:
            key = obj_key(obj)
            seen.add(key)
            old = self._known.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._dispatch("MODIFIED" if old else "ADDED", obj)
        for key in [k for k in self._known if k not in seen]:
            self._dispatch("DELETED", self._known[key])
        return listing["metadata"]["resourceVersion"]

    def _dispatch(self, etype: str, obj: dict) -> None:
        key = obj_key(obj)
        if etype == "DELETED":
            self._known.pop(key, None)
        else:
            self._known[key] = obj
        try:
            self.handler(etype, obj)
        except Exception:
            log.exception("%s: handler failed for %s %s", self.name, etype, key)


def now_rfc3339(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def now_micro(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"
