"""A status write the API server refuses (422) must not lock the job's status.

A value the CRD schema refuses (e.g. a progress number beyond int64 reported by a trainer) once
made every later status write fail, so the job never showed Succeeded or Failed. The reconciler
then writes the status again without the refused fields, with condition StatusRejected naming
them and the API server's reason; the next full write that is accepted sets it False.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from rlhf_operator.conditions import Conditions

CONDITION = "StatusRejected"
_FIELD = re.compile(r"\bstatus(?:\.[A-Za-z0-9_]+|\[\d+\])+")


def rejected_fields(body: dict[str, Any] | None) -> list[str]:
    """status.* paths the API server named in a 422 Invalid answer (details.causes, else the message)."""
    body = body or {}
    fields = [c.get("field", "") for c in (body.get("details") or {}).get("causes") or []]
    if not any(f.startswith("status.") for f in fields):
        fields = _FIELD.findall(body.get("message", ""))
    return sorted({f for f in fields if f.startswith("status.") and f != "status"})


def _drop(obj: Any, parts: list[str]) -> None:
    """Remove the field at `parts` (from 'status.progress.step': ['progress', 'step']); a list index drops
    the whole list."""
    for i, part in enumerate(parts):
        key = part.split("[", 1)[0]
        if not isinstance(obj, dict) or key not in obj:
            return
        if i == len(parts) - 1 or "[" in part:
            del obj[key]
            return
        obj = obj[key]


def without(status: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """A copy of `status` without `fields`; the whole progress when none could be named (it is the only
    part fed by values from outside the operator)."""
    out = copy.deepcopy(status)
    for field in fields or ["status.progress"]:
        _drop(out, field.split(".")[1:])
    return out


def accepted(status: dict[str, Any], now: str, generation: Any) -> dict[str, Any]:
    """The status to try first: as planned, with a StatusRejected condition set False."""
    conds = Conditions(status.get("conditions"), now, generation)
    conds.clear(CONDITION, "StatusAccepted", "the API server accepts the whole status")
    return {**status, "conditions": conds.items}


def trimmed(status: dict[str, Any], body: dict[str, Any] | None, now: str,
            generation: Any) -> tuple[dict[str, Any], str]:
    """The status to write after a 422, and the condition message (also the event's)."""
    fields = rejected_fields(body)
    reason = (body or {}).get("message", "")[:600]
    what = ", ".join(fields) if fields else "status.progress (the refused field was not named)"
    message = f"the API server refused {what}: {reason}; the status is written without it"
    out = without(status, fields)
    conds = Conditions(out.get("conditions"), now, generation)
    conds.set(CONDITION, True, "FieldRejected", message)
    out["conditions"] = conds.items
    return out, message
