"""Operator settings, read once from environment variables (the Helm chart sets them).

Every variable is optional; a malformed value stops the operator at start with a message naming
the variable, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

# Hardened defaults for trainer pods. The pod part is a PodSecurityContext, the container part a
# SecurityContext; RLHF_TRAINER_SECURITY_CONTEXT replaces either part.
TRAINER_UID = 10001  # the trainer image's USER (trainer_image/Dockerfile)
DEFAULT_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "fsGroup": TRAINER_UID,  # makes the checkpoint claim writable for that user
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,  # the pod's only writable places: /tmp (an emptyDir) and the claims
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class SettingsError(ValueError):
    """An RLHF_* environment variable has a bad value."""


@dataclasses.dataclass(frozen=True)
class Settings:
    trainer_image: str = "ghcr.io/rlhf-platform/rlhf-trainer:0.1.0"
    watch_namespaces: tuple[str, ...] = ()  # empty = all namespaces
    metrics_port: int = 8080  # operator Prometheus endpoint (0 = off)
    health_port: int = 8081  # kopf liveness endpoint /healthz (0 = off)
    log_level: str = "INFO"
    checkpoint_storage_class: str = ""  # empty = cluster default
    checkpoint_size: str = "10Gi"
    webhook_enabled: bool = False
    webhook_host: str = "127.0.0.1"  # address the API server uses to reach the webhook (URL mode)
    webhook_listen: str = ""  # address to bind; empty = webhook_host in URL mode, all interfaces with a service
    webhook_port: int = 9443
    webhook_service: str = ""  # "name.namespace": in-cluster Service in front of the operator
    webhook_cert_file: str = ""  # serving cert; empty = self-signed (needs the openssl CLI)
    webhook_key_file: str = ""
    webhook_ca_file: str = ""  # CA bundle given to the API server; empty = the cert itself
    webhook_config_name: str = "rlhf-operator.rlhf.io"
    webhook_failure_policy: str = "Ignore"  # the operator re-checks every rule and reports it as a condition
    trainer_pod_security_context: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_POD_SECURITY_CONTEXT)
    )
    trainer_container_security_context: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_CONTAINER_SECURITY_CONTEXT)
    )
    trainer_metrics_port: int = 9400
    trainer_command: tuple[str, ...] = ()  # override of `python -m rlhf_trainer` (tests use a stand-in)
    resync_seconds: float = 10.0  # progress scrape / deadline / TTL period (must stay <= 30 s)
    max_gpus_per_pod: int = 8
    restart_backoff_seconds: float = 10.0  # wait before the first restart after a failure; doubles, capped at 6 min
    # What creating a job may grant (rlhf_operator.grants). Each list entry is exact, or a prefix when it
    # ends in '/' or ':' (images) or '*' (env names); "*" alone allows anything.
    allowed_trainer_images: tuple[str, ...] = ()  # besides trainer_image, which is always allowed
    allow_secret_env: bool = False  # spec.env[].valueFrom.secretKeyRef
    allowed_env: tuple[str, ...] = ()  # exempt from the code-loading names refused in spec.env
    allowed_priority_classes: tuple[str, ...] = ()  # spec.scheduling.priorityClassName
    allowed_toleration_keys: tuple[str, ...] = ("nvidia.com/gpu",)  # spec.scheduling.tolerations[].key


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer between {lo} and {hi}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={raw!r}: must be between {lo} and {hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number between {lo} and {hi}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={raw!r}: must be between {lo} and {hi}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false")


def _json(env: Mapping[str, str], name: str) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{name}: not valid JSON ({e.msg} at column {e.colno})") from None


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...], check: Any = None) -> tuple[str, ...]:
    """A comma-separated list; `check(item)` returns why an item is malformed, or ""."""
    if name not in env:
        return default
    items = tuple(dict.fromkeys(i.strip() for i in env[name].split(",") if i.strip()))
    for item in items:
        why = check(item) if check else ""
        if any(c.isspace() for c in item) or why:
            raise SettingsError(f"{name}: bad entry {item!r}: {why or 'no spaces inside an entry'}")
    return items


def _image_entry(item: str) -> str:
    if item == "*" or item.endswith(("/", ":")):
        return ""
    return "" if "*" not in item else "'*' only alone; a prefix ends with '/' or ':' (e.g. registry.example.com/rlhf/)"


def _env_entry(item: str) -> str:
    name = item[:-1] if item.endswith("*") else item
    if item != "*" and not all(c.isalnum() or c in "_.-" for c in name):
        return "expected an environment variable name, a prefix ending in '*', or '*'"
    return ""


def _security_contexts(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    name = "RLHF_TRAINER_SECURITY_CONTEXT"
    value = _json(env, name)
    pod, container = dict(DEFAULT_POD_SECURITY_CONTEXT), dict(DEFAULT_CONTAINER_SECURITY_CONTEXT)
    if value is None:
        return pod, container
    if not isinstance(value, dict) or not set(value) <= {"pod", "container"}:
        raise SettingsError(f'{name}: expected a JSON object {{"pod": {{...}}, "container": {{...}}}}, got {value!r}')
    for part in ("pod", "container"):
        if part in value and not isinstance(value[part], dict):
            raise SettingsError(f"{name}.{part}: expected a JSON object, got {value[part]!r}")
    return value.get("pod", pod), value.get("container", container)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    command = _json(env, "RLHF_TRAINER_COMMAND")
    strings = isinstance(command, list) and bool(command) and all(isinstance(c, str) for c in command)
    if command is not None and not strings:
        raise SettingsError('RLHF_TRAINER_COMMAND: expected a JSON list of strings like '
                            f'["python", "-m", "rlhf_trainer"], got {command!r}')
    log_level = env.get("RLHF_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"RLHF_LOG_LEVEL={log_level!r}: expected DEBUG, INFO, WARNING or ERROR")
    service = env.get("RLHF_WEBHOOK_SERVICE", "").strip()
    if service and service.count(".") != 1:
        raise SettingsError(f"RLHF_WEBHOOK_SERVICE={service!r}: expected <service-name>.<namespace>")
    policy = env.get("RLHF_WEBHOOK_FAILURE_POLICY", "Ignore").strip() or "Ignore"
    if policy not in ("Ignore", "Fail"):
        raise SettingsError(f"RLHF_WEBHOOK_FAILURE_POLICY={policy!r}: expected Ignore or Fail")
    cert, key = env.get("RLHF_WEBHOOK_CERT_FILE", "").strip(), env.get("RLHF_WEBHOOK_KEY_FILE", "").strip()
    if bool(cert) != bool(key):
        raise SettingsError("RLHF_WEBHOOK_CERT_FILE and RLHF_WEBHOOK_KEY_FILE must be set together")
    pod_sc, container_sc = _security_contexts(env)
    namespaces = tuple(ns.strip() for ns in env.get("RLHF_WATCH_NAMESPACES", "").split(",") if ns.strip())
    return Settings(
        trainer_image=env.get("RLHF_TRAINER_IMAGE", "").strip() or Settings.trainer_image,
        watch_namespaces=namespaces,
        metrics_port=_int(env, "RLHF_METRICS_PORT", Settings.metrics_port, 0, 65535),
        health_port=_int(env, "RLHF_HEALTH_PORT", Settings.health_port, 0, 65535),
        log_level=log_level,
        checkpoint_storage_class=env.get("RLHF_CHECKPOINT_STORAGE_CLASS", "").strip(),
        checkpoint_size=env.get("RLHF_CHECKPOINT_SIZE", "").strip() or Settings.checkpoint_size,
        webhook_enabled=_bool(env, "RLHF_WEBHOOK_ENABLED", False),
        webhook_host=env.get("RLHF_WEBHOOK_HOST", "").strip() or Settings.webhook_host,
        webhook_listen=env.get("RLHF_WEBHOOK_LISTEN", "").strip(),
        webhook_port=_int(env, "RLHF_WEBHOOK_PORT", Settings.webhook_port, 1, 65535),
        webhook_service=service,
        webhook_cert_file=cert,
        webhook_key_file=key,
        webhook_ca_file=env.get("RLHF_WEBHOOK_CA_FILE", "").strip(),
        webhook_config_name=env.get("RLHF_WEBHOOK_CONFIG_NAME", "").strip() or Settings.webhook_config_name,
        webhook_failure_policy=policy,
        trainer_pod_security_context=pod_sc,
        trainer_container_security_context=container_sc,
        trainer_metrics_port=_int(env, "RLHF_TRAINER_METRICS_PORT", Settings.trainer_metrics_port, 1, 65535),
        trainer_command=tuple(command or ()),
        resync_seconds=_float(env, "RLHF_RESYNC_SECONDS", Settings.resync_seconds, 0.5, 30.0),
        max_gpus_per_pod=_int(env, "RLHF_MAX_GPUS_PER_POD", Settings.max_gpus_per_pod, 1, 64),
        restart_backoff_seconds=_float(env, "RLHF_RESTART_BACKOFF_SECONDS", Settings.restart_backoff_seconds,
                                       0.0, 3600.0),
        allowed_trainer_images=_list(env, "RLHF_ALLOWED_TRAINER_IMAGES", (), _image_entry),
        allow_secret_env=_bool(env, "RLHF_ALLOW_SECRET_ENV", False),
        allowed_env=_list(env, "RLHF_ALLOWED_ENV", (), _env_entry),
        allowed_priority_classes=_list(env, "RLHF_ALLOWED_PRIORITY_CLASSES", ()),
        allowed_toleration_keys=_list(env, "RLHF_ALLOWED_TOLERATION_KEYS", Settings.allowed_toleration_keys),
    )
