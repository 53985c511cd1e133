"""Upstream jobs (fromJob): a job starts only once every one of them Succeeded.

Until its first pod starts, a job waits (WaitingForDependencies, naming who it waits for) and fails when
an upstream job failed, was deleted, or was deleted and created again (a different run's output), or when
it is part of a dependency cycle. Once started, its inputs are mounted and only checked again before a
pod is replaced (children.lost_input). status.dependencies records each upstream job's UID at first sight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    started = ps.st.get("attempt") is not None or bool(ps.own)
    if ps.cycle and not started:
        return ps.fail("DependencyCycle", ps.cycle)
    if started or not ps.deps:
        return None
    recorded = {(d.get("kind"), d.get("name")): d for d in ps.old.get("dependencies") or []}
    waiting: list[str] = []
    seen: list[dict[str, Any]] = []
    for d in ps.deps:
        rec = recorded.get((d.kind, d.name)) or {}
        label = f"{d.kind} {d.name} ({' and '.join(d.roles)})"
        if not d.exists and rec.get("uid"):
            return ps.fail("DependencyDeleted",
                           f"{label} was deleted before this job could start; recreate it or change spec.{d.roles[0]}")
        if d.exists and rec.get("uid") and rec["uid"] != d.uid:
            return ps.fail("DependencyDeleted",
                           f"{label} was deleted and created again; this job will not use a different run's output")
        if d.exists and d.phase == "Failed":
            why = f": {d.message}" if d.message else ""
            return ps.fail("DependencyFailed", f"{label} failed{why}")
        if not d.exists:
            waiting.append(f"{d.kind} {d.name} (not found)")
        elif d.phase != "Succeeded":
            waiting.append(f"{d.kind} {d.name} ({d.phase or 'Pending'})")
        seen.append({"role": " ".join(d.roles), "kind": d.kind, "name": d.name, "uid": d.uid or rec.get("uid", ""),
                     "phase": d.phase if d.exists else "NotFound"})
    ps.st["dependencies"] = seen
    if waiting:
        ps.conds.set("WaitingForDependencies", True, "DependenciesNotReady", "waiting for " + ", ".join(waiting))
        return ps.finish()
    ps.conds.set("WaitingForDependencies", False, "DependenciesSucceeded",
                 "upstream jobs succeeded: " + ", ".join(f"{d.kind} {d.name}" for d in ps.deps))
    return None
