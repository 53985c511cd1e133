"""A pod's name resolution, as the kubelet sets it up: /etc/resolv.conf from dnsPolicy and dnsConfig, and
/etc/hosts naming the pod's own address under its hostname (and FQDN with a subdomain). Pure functions."""

from __future__ import annotations

MAX_NAMESERVERS = 3
MAX_SEARCHES = 32
DEFAULT_NDOTS = "5"


def host_resolv(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, search domains, options) of a resolv.conf."""
    servers, searches, options = [], [], []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if fields[0] == "nameserver" and len(fields) > 1:
            servers.append(fields[1])
        elif fields[0] in ("search", "domain"):
            searches = fields[1:]
        elif fields[0] == "options":
            options += fields[1:]
    return servers, searches, options


def _merge_options(base: list[str], extra: list[dict]) -> list[str]:
    merged = {o.split(":", 1)[0]: o for o in base}
    for opt in extra:
        name = opt.get("name")
        if name:
            merged[name] = f"{name}:{opt['value']}" if opt.get("value") not in (None, "") else name
    return list(merged.values())


def pod_resolv_conf(pod: dict, cluster_dns: str, domain: str, host_text: str) -> str | None:
    """The pod's resolv.conf, or None when the pod uses the host's file unchanged (dnsPolicy Default, or
    ClusterFirst on the host network, or no cluster DNS on this node), as the kubelet decides."""
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    config = spec.get("dnsConfig") or {}
    host_servers, host_searches, host_options = host_resolv(host_text)
    if policy == "ClusterFirst" and spec.get("hostNetwork"):
        policy = "Default"
    if policy in ("ClusterFirst", "ClusterFirstWithHostNet") and not cluster_dns:
        policy = "Default"
    if policy == "None":
        servers, searches, options = [], [], []
    elif policy == "Default":
        if not config:
            return None
        servers, searches, options = host_servers, host_searches, host_options
    else:
        ns = pod["metadata"]["namespace"]
        servers = [cluster_dns]
        searches = [f"{ns}.svc.{domain}", f"svc.{domain}", domain, *host_searches]
        options = [f"ndots:{DEFAULT_NDOTS}"]
    servers = (servers + list(config.get("nameservers") or []))[:MAX_NAMESERVERS]
    searches = list(dict.fromkeys(searches + list(config.get("searches") or [])))[:MAX_SEARCHES]
    options = _merge_options(options, list(config.get("options") or []))
    lines = [f"nameserver {s}" for s in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def pod_hostname(pod: dict) -> str:
    """spec.hostname, else the pod's name (cut to a 63-character label, as the kubelet does)."""
    name = (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]
    return name[:63].rstrip("-.")


def pod_fqdn(pod: dict, domain: str) -> str | None:
    spec = pod.get("spec") or {}
    if not spec.get("subdomain"):
        return None
    return f"{pod_hostname(pod)}.{spec['subdomain']}.{pod['metadata']['namespace']}.svc.{domain}"


def pod_hosts_file(pod: dict, pod_ip: str, domain: str) -> str:
    """/etc/hosts of a pod with its own network identity: localhost, its address and names, hostAliases."""
    lines = ["# Kubernetes-managed hosts file (local node agent).", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    fqdn = pod_fqdn(pod, domain)
    names = [fqdn, pod_hostname(pod)] if fqdn else [pod_hostname(pod)]
    lines.append(f"{pod_ip}\t" + "\t".join(names))
    for alias in (pod.get("spec") or {}).get("hostAliases") or []:
        if alias.get("ip") and alias.get("hostnames"):
            lines.append(f"{alias['ip']}\t" + "\t".join(alias["hostnames"]))
    return "\n".join(lines) + "\n"
