"""Status conditions (Kubernetes API conventions) and the timestamps they carry.

Conditions are keyed by type; lastTransitionTime is kept while a condition's status does not change;
each transition is remembered so that the interesting ones become Events.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

WARNING_TRANSITIONS = {("Failed", "True"), ("Restarting", "True"), ("PodScheduled", "False"),
                       ("SpecChangeRefused", "True")}
# Transitions worth an Event besides every condition becoming True (PodScheduled=True is the pod's own event).
EVENT_FALSE_TRANSITIONS = {"PodScheduled", "Suspended", "WaitingForDependencies", "SpecChangeRefused"}
# The phase is the first of these conditions that is True (else Pending).
PHASE_BY_CONDITION = (("Failed", "Failed"), ("Succeeded", "Succeeded"), ("Suspended", "Suspended"),
                      ("WaitingForDependencies", "Waiting"), ("Restarting", "Restarting"), ("Running", "Running"))


def fmt_time(t: dt.datetime, precise: bool = False) -> str:
    t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


class Conditions:
    """Edits a status.conditions list, remembering transitions (for Events)."""

    def __init__(self, items: list[dict[str, Any]] | None, now: str, generation: int | None):
        self.items = [dict(c) for c in items or []]
        self.now, self.generation = now, generation
        self.transitions: list[tuple[str, str, str, str]] = []  # (type, status, reason, message)

    def get(self, ctype: str) -> dict[str, Any] | None:
        return next((c for c in self.items if c.get("type") == ctype), None)

    def is_true(self, ctype: str) -> bool:
        c = self.get(ctype)
        return bool(c and c.get("status") == "True")

    def set(self, ctype: str, status: bool, reason: str, message: str) -> None:
        value = "True" if status else "False"
        c = self.get(ctype)
        if c is None:
            c = {"type": ctype}
            self.items.append(c)
        if c.get("status") != value:
            c["lastTransitionTime"] = self.now
            self.transitions.append((ctype, value, reason, message))
        c.update(status=value, reason=reason, message=message, observedGeneration=self.generation)

    def clear(self, ctype: str, reason: str, message: str) -> None:
        """Set False only if the condition was ever set (keeps the list short)."""
        if self.get(ctype) is not None:
            self.set(ctype, False, reason, message)

    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of an Event for each transition worth one."""
        out = []
        for ctype, value, reason, message in self.transitions:
            if (value == "True" and ctype != "PodScheduled") or (value == "False" and ctype in EVENT_FALSE_TRANSITIONS):
                out.append(("Warning" if (ctype, value) in WARNING_TRANSITIONS else "Normal", reason, message))
        return out


def phase_of(conds: Conditions) -> str:
    return next((phase for ctype, phase in PHASE_BY_CONDITION if conds.is_true(ctype)), "Pending")
