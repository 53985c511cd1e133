"""Status documents as the API server stores them, and the merge patch between two of them."""

from __future__ import annotations

from typing import Any


def prune_empty(obj: Any) -> Any:
    """Drop empty strings and nulls (and the emptied dicts): "unset" is an absent key, which keeps a status
    small (and the embedded 1.20 API server refuses "" in custom resources)."""
    if isinstance(obj, dict):
        out = {k: prune_empty(v) for k, v in obj.items() if v != "" and v is not None}
        return {k: v for k, v in out.items() if v != {}}
    if isinstance(obj, list):
        return [prune_empty(v) for v in obj]
    return obj


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new` (removed keys become null)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch
