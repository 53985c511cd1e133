"""fromJob resolution: who a job waits for, and who waits for a job. Pure functions over the
operator's in-memory index of jobs (one summary per job)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rlhf_operator import jobspec
from rlhf_operator.status import DepState

JobKey = tuple[str, str, str]  # (namespace, kind, name)


def summarize(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The few facts other jobs need about a job (stored in the index)."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), None)
    return {
        "kind": kind,
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
        "generation": meta.get("generation"),
        "phase": status.get("phase", ""),
        "message": (failed or {}).get("message", ""),
        "claim": (status.get("output") or {}).get("claim") or (status.get("checkpoint") or {}).get("claim", ""),
        "completionTime": status.get("completionTime", ""),
        "ttl": spec.get("ttlSecondsAfterFinished"),
        "deps": [(ref.kind, ref.name) for ref in jobspec.dependencies(kind, spec)],
    }


def resolve(kind: str, spec: dict[str, Any], lookup: Callable[[str, str], dict[str, Any] | None]) -> list[DepState]:
    """The upstream jobs of a spec as they are now; lookup(kind, name) returns a summary or None."""
    out = []
    for ref in jobspec.dependencies(kind, spec):
        s = lookup(ref.kind, ref.name)
        if s is None:
            out.append(DepState(ref.roles, ref.kind, ref.name, exists=False))
        else:
            out.append(DepState(ref.roles, ref.kind, ref.name, exists=True, uid=s["uid"], phase=s["phase"],
                                message=s["message"], claim=s["claim"], completion_time=s["completionTime"]))
    return out


def dependents(namespace: str, kind: str, name: str, jobs: Iterable[dict[str, Any]]) -> list[JobKey]:
    """Jobs in the namespace that name (kind, name) in a fromJob and have not finished."""
    return [
        (j["namespace"], j["kind"], j["name"])
        for j in jobs
        if j["namespace"] == namespace and (kind, name) in j["deps"] and j["phase"] not in ("Succeeded", "Failed")
    ]


def wrong_kind_errors(kind: str, spec: dict[str, Any], lookup: Callable[[str, str], dict[str, Any] | None]) -> list[str]:
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
        others = [k for k in ("SFTJob", "RewardModelJob", "PPOJob") if k != want and lookup(k, ref["name"]) is not None]
        if others:
            errors.append(
                f"spec.{role}.fromJob: {ref['name']!r} is a {others[0]}, but {role} needs a {want}; "
                f"name a {want} or set fromJob.kind"
            )
    return errors
