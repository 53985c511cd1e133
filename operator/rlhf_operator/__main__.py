"""`python -m rlhf_operator`: run the operator (kopf embedded) with settings from RLHF_* variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping

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


SETTINGS_HELP = """\
settings (environment variables; the Helm chart sets them, the options above override them):
  RLHF_TRAINER_IMAGE, RLHF_WATCH_NAMESPACES (comma list; empty = all), RLHF_METRICS_PORT (8080),
  RLHF_HEALTH_PORT (8081), RLHF_LOG_LEVEL (INFO), RLHF_CHECKPOINT_STORAGE_CLASS, RLHF_CHECKPOINT_SIZE,
  RLHF_WEBHOOK_ENABLED, RLHF_WEBHOOK_HOST, RLHF_WEBHOOK_PORT, RLHF_WEBHOOK_SERVICE (name.namespace),
  RLHF_WEBHOOK_CERT_FILE, RLHF_WEBHOOK_KEY_FILE, RLHF_WEBHOOK_CA_FILE, RLHF_WEBHOOK_CONFIG_NAME,
  RLHF_WEBHOOK_FAILURE_POLICY, RLHF_WEBHOOK_LISTEN, RLHF_TRAINER_SECURITY_CONTEXT (JSON),
  RLHF_TRAINER_METRICS_PORT (9400), RLHF_TRAINER_COMMAND (JSON list; tests), RLHF_RESYNC_SECONDS (10),
  RLHF_MAX_GPUS_PER_POD (8), RLHF_RESTART_BACKOFF_SECONDS (10; doubles per restart after a failure, max 6 min).
  What a job may ask for (comma lists; "*" = anything): RLHF_ALLOWED_TRAINER_IMAGES (besides
  RLHF_TRAINER_IMAGE; exact or a prefix ending in / or :), RLHF_ALLOW_SECRET_ENV (false),
  RLHF_ALLOWED_ENV (code-loading env names to allow, e.g. TORCH_EXTENSIONS_DIR), RLHF_ALLOWED_PRIORITY_CLASSES
  (none), RLHF_ALLOWED_TOLERATION_KEYS (nvidia.com/gpu).
  Cluster credentials: the in-cluster service account, else $KUBECONFIG.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlhf_operator",
        description="Run the RLHF operator: reconcile SFTJob, RewardModelJob, PPOJob and DPOJob resources.",
        epilog=SETTINGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                   help="watch this namespace (repeatable; sets RLHF_WATCH_NAMESPACES; default: all namespaces)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (sets RLHF_LOG_LEVEL=DEBUG)")
    p.add_argument("--metrics-port", metavar="PORT", help="Prometheus port, 0 = off (sets RLHF_METRICS_PORT)")
    return p


def settings_env(argv: list[str] | None, env: Mapping[str, str]) -> dict[str, str]:
    """The environment with the command-line options applied on top (options win)."""
    args = parser().parse_args(argv)
    out = dict(env)
    if args.namespace:
        out["RLHF_WATCH_NAMESPACES"] = ",".join(args.namespace)
    if args.verbose:
        out["RLHF_LOG_LEVEL"] = "DEBUG"
    if args.metrics_port is not None:
        out["RLHF_METRICS_PORT"] = args.metrics_port
    return out


def main(argv: list[str] | None = None) -> int:
    env = settings_env(argv, os.environ)  # --help and bad options exit here, before anything starts
    try:
        settings = from_env(env)
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
