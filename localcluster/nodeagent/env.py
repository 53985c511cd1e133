"""A container's environment and command line, resolved the way the kubelet does it."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .quantity import parse_quantity

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ContainerConfigError(Exception):
    """The pod asks for something that cannot be resolved (yet): kubelet's CreateContainerConfigError."""


@dataclass
class PodContext:
    """What fieldRefs may read beyond the pod object itself."""

    pod: dict
    pod_ip: str
    host_ip: str


# (namespace, name) -> data dict with str values, or None when the object does not exist.
Lookup = Callable[[str, str], dict | None]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined names are replaced, $$ escapes, unknown refs stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, text)


def field_value(path: str, ctx: PodContext) -> str:
    md, spec = ctx.pod.get("metadata") or {}, ctx.pod.get("spec") or {}
    simple = {
        "metadata.name": md.get("name", ""),
        "metadata.namespace": md.get("namespace", ""),
        "metadata.uid": md.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": ctx.pod_ip,
        "status.podIPs": ctx.pod_ip,
        "status.hostIP": ctx.host_ip,
    }
    if path in simple:
        return simple[path]
    m = _FIELD_INDEX.match(path)
    if m:
        return (md.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = md.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ContainerConfigError(f"fieldRef {path!r} is not supported (supported: {', '.join(sorted(simple))}, "
                               "metadata.labels['KEY'], metadata.annotations['KEY'])")


def resource_value(ref: dict, container: dict) -> str:
    """resourceFieldRef: limits.cpu / requests.memory ... divided by the divisor, rounded up."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or not name:
        raise ContainerConfigError(f"resourceFieldRef {resource!r} must look like limits.cpu or requests.memory")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(name)
    if raw is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


def decode_secret(data: dict | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (data or {}).items()}


def resolve_env(container: dict, ctx: PodContext, configmap: Lookup, secret: Lookup) -> dict[str, str]:
    """envFrom first, then env in order (later entries may reference earlier ones with $(VAR))."""
    ns = ctx.pod["metadata"]["namespace"]
    where = f"container {container.get('name')!r}"
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, lookup in (("configMapRef", configmap), ("secretRef", secret)):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(ns, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f"{where}: envFrom {kind} {ns}/{ref.get('name')} not found; "
                                           "create it or mark the reference optional")
            for key, value in data.items():
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", prefix + key):
                    env[prefix + key] = value
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        value_from = item["valueFrom"]
        if "fieldRef" in value_from:
            env[name] = field_value(value_from["fieldRef"].get("fieldPath", ""), ctx)
        elif "resourceFieldRef" in value_from:
            env[name] = resource_value(value_from["resourceFieldRef"], container)
        else:
            kind = "configMapKeyRef" if "configMapKeyRef" in value_from else "secretKeyRef"
            ref = value_from.get(kind)
            if ref is None:
                raise ContainerConfigError(f"{where}: env {name}: unsupported valueFrom {sorted(value_from)}")
            data = (configmap if kind == "configMapKeyRef" else secret)(ns, ref.get("name", ""))
            if data is None or ref.get("key") not in data:
                if ref.get("optional"):
                    continue
                what = "not found" if data is None else f"has no key {ref.get('key')!r}"
                raise ContainerConfigError(f"{where}: env {name}: {kind} {ns}/{ref.get('name')} {what}")
            env[name] = data[ref["key"]]
    return env


def command_line(container: dict, env: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; images are not pulled, so there is no image entrypoint."""
    argv = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not container.get("command"):
        raise ContainerConfigError(
            f"container {container.get('name')!r} has no command: the local node agent runs containers as "
            f"local processes and does not pull image {container.get('image')!r}, so it cannot know the image's "
            "entrypoint; set `command` explicitly")
    return argv

