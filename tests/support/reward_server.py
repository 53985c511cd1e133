"""A stand-in reward service on 127.0.0.1 for the trainer's endpoint reward source (the documented protocol:
POST {"prompts", "responses", "fields", "job"} -> {"rewards": [...]}), with scripted failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Score = Callable[[str, dict[str, Any]], float]  # (response, the row's other fields) -> reward
Failure = Callable[[int, str | None], int | None]  # (request number from 1, Authorization header) -> HTTP status


class RewardServer:
    """Scores each response with `score`; `fail` may answer a request with an error status instead; `answer`
    replaces the whole reply (e.g. a malformed one). Records every request and the most requests in flight."""

    def __init__(self, score: Score, fail: Failure | None = None, delay: float = 0.0, answer: Any = None,
                 path: str = "/score"):
        self.score, self.fail, self.delay, self.answer = score, fail, delay, answer
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                with outer.lock:
                    outer.requests.append({"body": body, "auth": auth})
                    status = outer.fail(len(outer.requests), auth) if outer.fail else None
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(outer.delay)
                with outer.lock:
                    outer.in_flight -= 1
                if status is not None:
                    return self.reply(status, b"busy")
                fields = body.get("fields") or [{} for _ in body["responses"]]
                answer = outer.answer if outer.answer is not None else {
                    "rewards": [outer.score(r, f) for r, f in zip(body["responses"], fields, strict=True)]}
                return self.reply(200, json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scripted(plan: list[Any]) -> Failure:
    """Failures from a per-request plan: an HTTP status to fail that request with, or "ok"."""
    plan = list(plan)
    return lambda _n, _auth: None if not plan or (step := plan.pop(0)) == "ok" else step
