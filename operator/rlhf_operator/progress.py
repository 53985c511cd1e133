"""Training progress: the trainer's metrics -> status.progress, by the contract's table (contract.PROGRESS).

Two sources, one parser (:func:`from_metrics`): the trainer's Prometheus endpoint at the pod IP, scraped
while it runs (trainer pods carry no Kubernetes credentials, so the operator pulls), and the JSON object
of final values a successful trainer writes as its termination message (so a job that ended between
two scrapes still shows its last step).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rlhf_trainer import contract

log = logging.getLogger(__name__)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def from_metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metric name -> value  =>  status.progress key -> int or float (contract.PROGRESS); values that are
    not finite numbers (NaN, Inf, text) are dropped."""
    return {f.key: f.type(values[f.metric]) for f in contract.PROGRESS if _number(values.get(f.metric))}


def parse(text: str) -> dict[str, Any]:
    """Prometheus text -> status.progress keys; the first finite sample of each metric counts, except for a
    field with one series per label value (ProgressField.summed, e.g. skipped steps per model): the sum."""
    summed = {f.metric for f in contract.PROGRESS if f.summed}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isfinite(sample.value):
                continue
            if sample.name in summed:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            else:
                values.setdefault(sample.name, sample.value)
    return from_metrics(values)


def from_termination_message(message: str) -> dict[str, Any]:
    """Progress from a trainer's termination message, when it is the JSON object of final metric values
    (keyed by contract metric names) that the trainer writes on success; {} for anything else."""
    try:
        data = json.loads(message) if message and message.lstrip().startswith("{") else None
    except ValueError:
        return {}
    return from_metrics(data) if isinstance(data, dict) else {}


def for_stage(progress: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """Only the keys that mean something for the stage (e.g. no reward for an SFTJob)."""
    keys = contract.stage_progress_keys(stage)
    return {k: v for k, v in progress.items() if k in keys}


def with_summary(progress: dict[str, Any]) -> dict[str, Any]:
    """Adds percent and the printed "step/total" summary ("round r/R, step s/S" for online DPO)."""
    out = dict(progress)
    step, total = out.get("step"), out.get("totalSteps")
    if step is not None and total:
        out["percent"] = round(100.0 * min(step, total) / total, 1)
        out["summary"] = f"{step}/{total}"
    elif step is not None:
        out["summary"] = str(step)
    if out.get("rounds") and out.get("round") is not None and "summary" in out:
        out["summary"] = f"round {out['round']}/{out['rounds']}, step {out['summary']}"
    return out


def merge_into(status: dict[str, Any], fresh: dict[str, Any]) -> None:
    """Fold fresh progress values into a status (progress and the latest checkpoint step)."""
    if not fresh:
        return
    status["progress"] = with_summary({**status.get("progress", {}), **fresh})
    if fresh.get("checkpointStep") is not None:
        status.setdefault("checkpoint", {})["latestStep"] = fresh["checkpointStep"]


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
