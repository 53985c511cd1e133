"""Free TCP ports for servers a test starts."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at `host`; "0.0.0.0" for one free on every address (a wildcard listener
    there would shadow a pod's own address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
