"""A remote reward service (``ppo.rewards.endpoint``): batched JSON over HTTP with bounded concurrency
and retries with exponential back-off.

Request: ``POST <url>`` with ``Content-Type: application/json`` (and ``Authorization: Bearer <token>``
when a token file is configured), one per batch of at most ``batch_size`` responses::

    {"prompts": ["2+3=", ...], "responses": ["5", ...], "fields": [{"answer": "5"}, ...],
     "job": {"namespace": "team-a", "name": "math-grpo"}}

``fields`` holds each prompt row's other fields (the reference answers). Answer: HTTP 200 with
``{"rewards": [1.0, ...]}``, one finite number per response, in order.

Failures: a refused connection, a timeout, HTTP 408, 425, 429 or 5xx is retried up to ``max_retries``
times, waiting ``backoff_seconds * 2^n`` (at most ``max_backoff_seconds``); then the run stops with
exit code 8 (retryable: the operator restarts the trainer, which resumes from its checkpoint). Any other
HTTP status or an answer that is not the documented JSON stops it with exit code 9 (permanent: the
same request would get the same answer). Both messages name the endpoint and the last error; the token
is never printed.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import contract
from .data.formats import Record
from .runtime.failure import TrainerError

RETRYABLE_STATUS = frozenset({408, 425, 429})


class RewardEndpointError(TrainerError):
    """The reward endpoint failed: for good (``permanent``) or after every retry."""

    def __init__(self, url: str, message: str, permanent: bool):
        super().__init__(message)
        self.url, self.permanent = url, permanent
        self.exit_code = contract.EXIT_REWARD_ENDPOINT_REFUSED if permanent else contract.EXIT_REWARD_ENDPOINT_ERROR


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    pass


def backoff_delays(retries: int, base: float, cap: float) -> list[float]:
    """Seconds to wait before each retry: base, 2 base, 4 base, ... each at most ``cap``."""
    return [min(base * 2**n, cap) for n in range(retries)]


class EndpointScorer:
    """Scores responses with a remote reward service (see the module docstring for the protocol)."""

    stats = None
    source = "endpoint"

    def __init__(self, cfg, job: dict[str, str], sleep: Callable[[float], None] = time.sleep):
        self.cfg, self.job, self.sleep = cfg, job, sleep
        self.url = cfg.url
        self.token = Path(cfg.token_file).read_text().strip() if cfg.token_file else ""
        self.retries = 0  # retried requests so far (all batches)
        self._lock = threading.Lock()

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        n, size = len(responses), max(self.cfg.batch_size, 1)
        chunks = [(records[i:i + size], responses[i:i + size]) for i in range(0, n, size)]
        workers = max(1, min(self.cfg.max_in_flight, len(chunks)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-endpoint") as pool:
            parts = list(pool.map(lambda chunk: self._with_retries(*chunk), chunks))
        return torch.tensor([x for part in parts for x in part], dtype=torch.float32)

    def _with_retries(self, records: Sequence[Record], responses: Sequence[str]) -> list[float]:
        body = json.dumps({
            "prompts": [r.prompt for r in records], "responses": list(responses),
            "fields": [dict(r.fields) for r in records], "job": self.job,
        }).encode()
        delays = backoff_delays(self.cfg.max_retries, self.cfg.backoff_seconds, self.cfg.max_backoff_seconds)
        for attempt in range(len(delays) + 1):
            try:
                return self._post(body, len(responses))
            except _Permanent as e:
                raise RewardEndpointError(
                    self.url, f"reward endpoint {self.url} refused the request: {e}; this is not retried "
                    "(fix the endpoint or spec.reward.endpoint)", permanent=True) from None
            except _Retryable as e:
                last = str(e)
                if attempt == len(delays):
                    break
                with self._lock:
                    self.retries += 1
                self.sleep(delays[attempt])
        raise RewardEndpointError(
            self.url, f"reward endpoint {self.url} failed {len(delays) + 1} times in a row; last error: {last}",
            permanent=False)

    def _post(self, body: bytes, expected: int) -> list[float]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_seconds) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e.read() if e.fp else b"")
            what = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
            if e.code in RETRYABLE_STATUS or e.code >= 500:
                raise _Retryable(what) from None
            raise _Permanent(what) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__) from None
        return parse_rewards(raw, expected)


def parse_rewards(raw: bytes, expected: int) -> list[float]:
    """The ``rewards`` list of an answer, checked: JSON, the right length, finite numbers."""
    try:
        data: Any = json.loads(raw)
    except ValueError:
        raise _Permanent(f"the answer is not JSON: {_snippet(raw)!r}") from None
    rewards = data.get("rewards") if isinstance(data, dict) else None
    if not isinstance(rewards, list):
        raise _Permanent('the answer has no "rewards" list (expected {"rewards": [number, ...]})')
    if len(rewards) != expected:
        raise _Permanent(f"the answer has {len(rewards)} rewards for {expected} responses")
    for i, x in enumerate(rewards):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise _Permanent(f"rewards[{i}] is {x!r}, not a finite number")
    return [float(x) for x in rewards]


def _snippet(raw: bytes, limit: int = 200) -> str:
    return raw[:limit].decode("utf-8", "replace").strip()
