"""`python -m rlhf_operator`: run the operator (kopf embedded) with settings from RLHF_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

import kopf

from rlhf_operator import handlers, metrics, webhook
from rlhf_operator.reconciler import Reconciler
from rlhf_operator.settings import Settings, SettingsError, from_env


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.posting.enabled = False  # the reconciler posts its own Events, one per transition
    s.watching.server_timeout = 300  # re-list now and then: a lost watch event cannot stall a job
    s.watching.client_timeout = 330
    s.batching.batch_window = 0.05  # react to pod changes fast (stage hand-off latency)
    s.networking.request_timeout = 60
    if settings.webhook_enabled:
        webhook.configure(s, settings)
    return s


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Reconciler]:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(settings)
    handlers.register(registry, reconciler)
    if settings.webhook_enabled:
        webhook.register(registry, settings, reconciler.lookup)
    return registry, reconciler


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as e:
        print(f"rlhf-operator: bad setting: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    registry, _ = build(settings)
    metrics.serve(settings.metrics_port)
    namespaces = list(settings.watch_namespaces)
    asyncio.run(kopf.operator(
        registry=registry,
        settings=kopf_settings(settings),
        standalone=True,  # one replica; restarts are safe because children have deterministic names
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
