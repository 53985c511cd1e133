"""The cluster DNS: CoreDNS with its kubernetes plugin on port 53 of one loopback address of the pod network.

Every pod's /etc/resolv.conf names that address (the node agent bind-mounts it, see nodeagent/dns.py), so
`<service>.<namespace>.svc.cluster.local`, headless Services (their ready pods' addresses) and
`<hostname>.<subdomain>.<namespace>.svc.cluster.local` resolve as on a real cluster. Other names go to the host's
nameservers. Service ClusterIPs resolve but are not routed (there is no kube-proxy): use headless Services.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from .nodeagent.dns import host_resolv

CLUSTER_DOMAIN = "cluster.local"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def dns_address(pod_network: str) -> str:
    """The DNS server's address: the pod network's last usable one (the node agent never gives it to a pod)."""
    net = ipaddress.ip_network(pod_network)
    return str(net.broadcast_address - 1)


def upstreams(host_text: str, own: str) -> list[str]:
    """The host's nameservers CoreDNS forwards other names to (never itself)."""
    servers, _, _ = host_resolv(host_text)
    return [s for s in servers if s != own and _is_ip(s)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def corefile(address: str, ready_port: int, kubeconfig: str, upstream: list[str],
             domain: str = CLUSTER_DOMAIN) -> str:
    """The Corefile: cluster names from the API server, reverse lookups of pod IPs, the rest upstream."""
    forward = f"    forward . {' '.join(upstream)}\n" if upstream else ""
    return (
        f".:53 {{\n"
        f"    bind {address}\n"
        f"    errors\n"
        f"    ready 127.0.0.1:{ready_port}\n"
        f"    kubernetes {domain} in-addr.arpa {{\n"
        f"        kubeconfig {kubeconfig}\n"
        f"        pods insecure\n"
        f"        fallthrough in-addr.arpa\n"
        f"        ttl 5\n"
        f"    }}\n"
        f"{forward}"
        f"}}\n"
    )
