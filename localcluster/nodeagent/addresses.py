"""Pod addresses (distinct 127.x.y.z loopback IPs) and GPU indices handed to pods.

Every 127.0.0.0/8 address answers on Linux loopback, so giving each pod its own one lets two
pods listen on the same port, as on a real pod network. The /16 a cluster uses is derived from
its state directory so two clusters side by side rarely pick the same one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading

HOST_IP = "127.0.0.1"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def default_pod_network(state_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).digest()
    return f"127.{32 + digest[0] % 200}.0.0/16"  # 127.32-231: clear of 127.0.x and 127.255.x


def is_loopback_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text) in LOOPBACK
    except ValueError:
        return False


def parse_pod_network(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"--pod-network {text!r}: {e}; use a loopback CIDR such as 127.42.0.0/16") from None
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(LOOPBACK) or net.num_addresses < 4:
        raise ValueError(f"--pod-network {text!r} must be a loopback IPv4 range of at least 4 addresses "
                         "inside 127.0.0.0/8, such as 127.42.0.0/16")
    if ipaddress.ip_address(HOST_IP) in net:
        raise ValueError(f"--pod-network {text!r} contains the host address {HOST_IP}; pick another range")
    return net


class AddressPool:
    """Hands out addresses round-robin, so a freed address is reused as late as possible."""

    def __init__(self, network: ipaddress.IPv4Network):
        self._hosts = [str(ip) for ip in network.hosts() if not str(ip).endswith((".0", ".255"))]
        self._used: set[str] = set()
        self._next = 0
        self._lock = threading.Lock()

    def allocate(self, preferred: str | None = None) -> str:
        with self._lock:
            if preferred and preferred in self._hosts and preferred not in self._used:
                self._used.add(preferred)
                return preferred
            for _ in range(len(self._hosts)):
                ip = self._hosts[self._next]
                self._next = (self._next + 1) % len(self._hosts)
                if ip not in self._used:
                    self._used.add(ip)
                    return ip
        raise RuntimeError(f"all {len(self._hosts)} pod addresses are in use; widen --pod-network")

    def release(self, ip: str | None) -> None:
        with self._lock:
            self._used.discard(ip)

    def reserve(self, ip: str | None) -> None:
        if ip:
            with self._lock:
                self._used.add(ip)


class GpuPool:
    """Which of a node's GPU indices each pod holds (the device plugin's job on a real node)."""

    def __init__(self, count: int):
        self._free = list(range(count))
        self._lock = threading.Lock()

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, indices: list[int]) -> None:
        with self._lock:
            self._free = sorted(set(self._free) | set(indices))
