"""Training progress read from the trainer's Prometheus endpoint at the pod IP.

Trainer pods carry no Kubernetes credentials, so the operator pulls: it scrapes
http://<podIP>:<port>/metrics and copies the contract's metrics into status.progress.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rlhf_trainer import contract

log = logging.getLogger(__name__)
INT_KEYS = ("step", "totalSteps", "checkpointStep", "resumedFromStep")


def parse(text: str) -> dict[str, Any]:
    """Prometheus text -> status.progress keys (contract.PROGRESS_FIELDS); NaN/Inf are dropped."""
    wanted = {metric: key for key, metric in contract.PROGRESS_FIELDS.items()}
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is None or key in out or not math.isfinite(sample.value):
                continue
            out[key] = int(sample.value) if key in INT_KEYS else float(sample.value)
    return out


async def scrape(session: aiohttp.ClientSession, pod_ip: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """Progress of a running trainer, or None when its endpoint does not answer (yet)."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    try:
        async with session.get(f"http://{host}:{port}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return parse(await resp.text())
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.debug("scrape of %s:%s failed: %s", pod_ip, port, e)
        return None
