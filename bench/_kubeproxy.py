"""A counting reverse proxy in front of the Kubernetes API server (for the operator benchmark).

Plain HTTP on 127.0.0.1 towards its client, TLS (verified against the cluster CA) towards the API
server; every request is counted by (verb, resource[/subresource]); watch responses are streamed.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import ssl
import sys
import threading
from collections import Counter
from pathlib import Path

import yaml

HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}


def classify(method: str, path: str, query: dict[str, str]) -> tuple[str, str]:
    """(verb, resource[/subresource]) of a Kubernetes API request path."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return method.lower(), path
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    if not rest:
        return "discovery", "/".join(parts[:3])
    named = len(rest) >= 2
    if method == "GET":
        verb = "watch" if query.get("watch") in ("1", "true") else ("get" if named else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
    return verb, rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")


class CountingProxy:
    """Plain-HTTP reverse proxy on 127.0.0.1 in front of the API server; counts requests (watches streamed)."""

    def __init__(self, upstream: str, cafile: str):
        self.upstream, self.cafile = upstream, cafile
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()

    def start(self) -> int:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)
        return self.port

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self.counts)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self.session = ClientSession(connector=TCPConnector(ssl=ssl.create_default_context(cafile=self.cafile), limit=0),
                                     timeout=ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()

    async def _handle(self, request):
        from aiohttp import web

        with self._lock:
            self.counts[classify(request.method, request.path, dict(request.query))] += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=body or None, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                                 if k.lower() not in HOP_HEADERS})
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            return resp

    def stop(self) -> None:
        """Cancel the open streams (watches of the stopped operator), close the session, stop the loop."""
        async def close():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()
            await self.runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(15)
        except Exception as e:  # noqa: BLE001 - only the bench's own proxy; report and go on
            print(f"[operator] proxy shutdown: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def ca_file(kubeconfig: str, out: Path) -> str:
    """The API server's CA from ``kubeconfig``, written to a file (the proxy verifies the real server)."""
    cfg = yaml.safe_load(Path(kubeconfig).read_text())
    ca = out / "ca.crt"
    ca.write_bytes(base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]))
    return str(ca)


def proxied_kubeconfig(kubeconfig: str, port: int, out: Path) -> str:
    """A copy of ``kubeconfig`` that reaches the API server through the proxy (plain HTTP on loopback)."""
    cfg = copy.deepcopy(yaml.safe_load(Path(kubeconfig).read_text()))
    cfg["clusters"][0]["cluster"] = {"server": f"http://127.0.0.1:{port}"}
    path = out / "kubeconfig-proxied"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
