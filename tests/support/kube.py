"""Small Kubernetes client helpers for tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def or_none(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args) (a read or a delete), or None when the object does not exist (404)."""
    from kubernetes.client.rest import ApiException

    try:
        return call(*args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
