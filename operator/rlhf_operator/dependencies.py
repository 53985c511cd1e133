"""fromJob resolution: who a job waits for, and who waits for a job. Pure functions over the
operator's in-memory index of jobs (one summary per job)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rlhf_operator import jobspec, names
from rlhf_operator.crd_schema import KINDS
from rlhf_operator.observed import DepState

JobKey = tuple[str, str, str]  # (namespace, kind, name)
Node = tuple[str, str]  # (kind, name) within one namespace
Lookup = Callable[[str, str], dict[str, Any] | None]  # (kind, name) -> the job's summary, None if there is none


def summarize(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The few facts other jobs need about a job (stored in the index)."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    conds = status.get("conditions") or []
    failed = next((c for c in conds if c.get("type") == "Failed" and c.get("status") == "True"), None)
    return {
        "kind": kind,
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
        "generation": meta.get("generation"),
        "phase": status.get("phase", ""),
        "message": (failed or {}).get("message", ""),
        "completionTime": status.get("completionTime", ""),
        "ttl": spec.get("ttlSecondsAfterFinished"),
        "started": status.get("attempt") is not None,  # its upstream jobs no longer hold it back
        "deps": [(ref.kind, ref.name) for ref in jobspec.dependencies(kind, spec)],
    }


def resolve(kind: str, spec: dict[str, Any], lookup: Lookup) -> list[DepState]:
    """The upstream jobs of a spec as they are now; lookup(kind, name) returns a summary or None. An upstream
    job's claim is named by names.pvc_name, known once it started (its first pod creates the claim)."""
    out = []
    for ref in jobspec.dependencies(kind, spec):
        s = lookup(ref.kind, ref.name)
        if s is None:
            out.append(DepState(ref.roles, ref.kind, ref.name, exists=False))
        else:
            out.append(DepState(ref.roles, ref.kind, ref.name, exists=True, uid=s["uid"], phase=s["phase"],
                                message=s["message"], claim=names.pvc_name(ref.kind, ref.name) if s["started"] else "",
                                completion_time=s["completionTime"]))
    return out


def dependents(namespace: str, kind: str, name: str, jobs: Iterable[dict[str, Any]]) -> list[JobKey]:
    """Jobs in the namespace that name (kind, name) in a fromJob and have not finished."""
    return [
        (j["namespace"], j["kind"], j["name"])
        for j in jobs
        if j["namespace"] == namespace and (kind, name) in j["deps"] and j["phase"] not in ("Succeeded", "Failed")
    ]


def wrong_kind_errors(kind: str, spec: dict[str, Any], lookup: Lookup) -> list[str]:
    """A fromJob whose name exists only as a job of another kind (e.g. a reward model taken from an
    SFTJob). A name that does not exist at all is fine: the job waits for it."""
    errors = []
    for role, source in jobspec.model_sources(kind, spec).items():
        ref = source.get("fromJob")
        if not isinstance(ref, dict) or not ref.get("name"):
            continue
        want = jobspec.from_job_kind(kind, role, ref)
        if lookup(want, ref["name"]) is not None:
            continue
        others = [k for k in KINDS if k != want and lookup(k, ref["name"]) is not None]
        if others:
            errors.append(
                f"spec.{role}.fromJob: {ref['name']!r} is a {others[0]}, but {role} needs a {want}; "
                f"name a {want} or set fromJob.kind"
            )
    return errors


def find_cycle(start: Node, deps_of: Callable[[Node], Iterable[Node]]) -> list[Node] | None:
    """A path of waits from `start` back to itself ([start, ..., start]), or None. Depth-first, in
    the order deps_of gives; a cycle that `start` only leads into is not its own (it fails as a
    DependencyFailed once that cycle's jobs have failed)."""
    path, seen = [start], {start}
    stack = [iter(deps_of(start))]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            path.pop()
        elif nxt == start:
            return [*path, start]
        elif nxt not in seen:
            seen.add(nxt)
            path.append(nxt)
            stack.append(iter(deps_of(nxt)))
    return None


def _holds_back(summary: dict[str, Any]) -> bool:
    """A job still waits for its upstream jobs: it never started and has not succeeded."""
    return summary.get("phase") != "Succeeded" and not summary.get("started")


def cycle(kind: str, name: str, spec: dict[str, Any], lookup: Lookup) -> list[Node] | None:
    """The dependency cycle through this job (its own spec, the others from the index), or None."""
    own = [(ref.kind, ref.name) for ref in jobspec.dependencies(kind, spec)]

    def deps_of(node: Node) -> list[Node]:
        if node == (kind, name):
            return own
        s = lookup(*node)
        return [tuple(d) for d in s["deps"]] if s is not None and _holds_back(s) else []  # type: ignore[misc]

    return find_cycle((kind, name), deps_of)


def describe_cycle(path: list[Node]) -> str:
    return " -> ".join(f"{k} {n}" for k, n in path)


def cycle_message(path: list[Node],
                  fix: str = "delete the jobs of the cycle and create them again without the loop") -> str:
    return f"dependency cycle {describe_cycle(path)}: each job waits for the next, so none can ever start; {fix}"


def cycle_errors(kind: str, name: str, spec: dict[str, Any], lookup: Lookup) -> list[str]:
    """Admission: refuse the job that closes a cycle (a job naming itself is jobspec.validate's)."""
    path = cycle(kind, name, spec, lookup)
    if not path or path[1] == (kind, name):
        return []
    role = next(ref.roles[0] for ref in jobspec.dependencies(kind, spec) if (ref.kind, ref.name) == path[1])
    return [f"spec.{role}.fromJob: {cycle_message(path, 'name a job outside the cycle')}"]
