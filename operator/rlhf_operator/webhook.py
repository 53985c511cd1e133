"""Validating admission webhook (served by kopf): the rules a schema cannot express.

kopf runs the HTTPS server and keeps a ValidatingWebhookConfiguration pointing at it, either by URL
(RLHF_WEBHOOK_HOST:RLHF_WEBHOOK_PORT, e.g. https://127.0.0.1:9443 next to a local API server) or
through an in-cluster Service (RLHF_WEBHOOK_SERVICE=name.namespace, port 443 -> RLHF_WEBHOOK_PORT).
Without certificate files it makes a self-signed one with the openssl CLI. The failure policy
defaults to Ignore: the reconciler applies the same rules and reports a violation as a Failed
condition, so a stopped operator never blocks the API.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import kopf
from rlhf_trainer.config import ConfigError

from rlhf_operator import builders, dependencies, jobspec
from rlhf_operator.crd_schema import GROUP, KINDS, VERSION
from rlhf_operator.settings import Settings


def admission_errors(
    kind: str,
    body: dict[str, Any],
    old: dict[str, Any] | None,
    settings: Settings,
    lookup: Callable[[str, str], dict[str, Any] | None],
) -> list[str]:
    """Why a create or update must be refused (empty: allowed). Pure apart from `lookup`."""
    spec = body.get("spec") or {}
    meta = body.get("metadata") or {}
    errors: list[str] = []
    if old is not None:
        old_spec = old.get("spec") or {}
        if old_spec == spec:
            return []  # metadata-only change
        errors += jobspec.update_errors(old_spec, spec, old.get("status") or {})
    errors += jobspec.check(kind, meta.get("name", ""), spec, settings)
    if not errors:
        job_meta = {"name": meta.get("name") or "x", "namespace": meta.get("namespace", ""), "uid": ""}
        job = {"kind": kind, "metadata": job_meta, "spec": spec}
        try:
            builders.render_config(job, settings)
        except ConfigError as e:
            errors.append(str(e))
    errors += dependencies.wrong_kind_errors(kind, spec, lookup)
    if old is None or not jobspec.is_finished(old.get("status") or {}):  # a failed cycle's jobs stay editable (TTL)
        errors += dependencies.cycle_errors(kind, meta.get("name", ""), spec, lookup)
    return errors


def register(registry: kopf.OperatorRegistry, settings: Settings, lookup_in: Callable[[str], Callable]) -> None:
    """Add a validating handler per kind; lookup_in(namespace) gives the job index lookup."""
    for kind in KINDS:
        _register_kind(registry, settings, lookup_in, kind)


def _register_kind(registry: kopf.OperatorRegistry, settings: Settings, lookup_in: Callable[[str], Callable],
                   kind: str) -> None:
    plural = KINDS[kind].plural

    def validate(body: kopf.Body, old: kopf.Body | None, namespace: str | None, **_: Any) -> None:
        errors = admission_errors(kind, dict(body), dict(old) if old else None, settings, lookup_in(namespace or ""))
        if errors:
            name = body.get("metadata", {}).get("name", "")
            raise kopf.AdmissionError(f"{kind} {name}: " + "; ".join(errors), code=422)

    kopf.on.validate(
        GROUP, VERSION, plural, id=f"validate-{plural}", operations=["CREATE", "UPDATE"],
        ignore_failures=settings.webhook_failure_policy == "Ignore", registry=registry,
    )(validate)


# --- the server -----------------------------------------------------------------------------

def self_signed(hostnames: Collection[str], directory: str) -> tuple[str, str]:
    """(cert file, key file) of a self-signed certificate with the names as SANs (openssl CLI)."""
    sans = []
    for h in hostnames:
        try:
            ip = ipaddress.ip_address(h)
            if not ip.is_unspecified:
                sans.append(f"IP:{ip}")
        except ValueError:
            sans.append(f"DNS:{h}")
    common = next((h for h in hostnames if not _is_ip(h)), next(iter(hostnames)))
    cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-keyout", key, "-out", cert,
         "-subj", f"/CN={common}", "-addext", "subjectAltName=" + ",".join(dict.fromkeys(sans)),
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=digitalSignature,keyEncipherment,keyCertSign",
         "-addext", "extendedKeyUsage=serverAuth"],
        check=True, capture_output=True,
    )
    os.chmod(key, 0o600)
    return cert, key


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


class ServiceWebhookServer(kopf.WebhookServer):
    """Listens like kopf's server, but tells the API server to come through a Service."""

    def __init__(self, *, service: str, namespace: str, service_port: int = 443, **kw: Any):
        super().__init__(**kw)
        self.service, self.service_namespace, self.service_port = service, namespace, service_port

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for config in super().__call__(fn):
            out: dict[str, Any] = {"service": {"name": self.service, "namespace": self.service_namespace,
                                               "port": self.service_port, "path": ""}}
            if config.get("caBundle"):
                out["caBundle"] = config["caBundle"]
            yield out


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    cert, key = settings.webhook_cert_file or None, settings.webhook_key_file or None
    if settings.webhook_service:
        name, namespace = settings.webhook_service.split(".")
        hostnames = [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    else:
        hostnames = [settings.webhook_host, "localhost"]
    if cert is None:
        cert, key = self_signed(hostnames, tempfile.mkdtemp(prefix="rlhf-webhook-"))
    common = dict(port=settings.webhook_port, certfile=cert, pkeyfile=key, cafile=settings.webhook_ca_file or cert)
    if settings.webhook_service:
        server: kopf.WebhookServer = ServiceWebhookServer(
            service=name, namespace=namespace, addr=settings.webhook_listen or None, **common)
    else:
        server = kopf.WebhookServer(addr=settings.webhook_listen or settings.webhook_host, host=settings.webhook_host,
                                    **common)
    kopf_settings.admission.server = server
    kopf_settings.admission.managed = settings.webhook_config_name

