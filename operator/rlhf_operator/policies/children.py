"""Whose object is it: a job only uses children it created, and notices when its claims go away.

An object found under a child's name is the job's own when it carries the job's UID: the label
`rlhf.io/job-uid` on a claim (a retained claim has no owner reference), the owner reference on a pod
or config map. Anything else is never taken over: the job fails with ChildNameConflict, or waits
while the object is already on its way out (being deleted, or owned by a deleted job of the same
name, which the garbage collector removes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_operator.builders import LABEL_JOB, LABEL_JOB_UID, LABEL_KIND

OURS, WAIT, CONFLICT = "ours", "wait", "conflict"


@dataclasses.dataclass(frozen=True)
class ObjectView:
    """What ownership needs to know about an object (a claim, a config map, a pod)."""

    name: str
    exists: bool = True
    deleting: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    owners: tuple[tuple[str, str, str], ...] = ()  # (kind, name, uid) of each owner reference

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


def object_view(obj: dict[str, Any]) -> ObjectView:
    meta = obj.get("metadata") or {}
    return ObjectView(
        name=meta.get("name", ""),
        deleting=bool(meta.get("deletionTimestamp")),
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        owners=tuple((o.get("kind", ""), o.get("name", ""), o.get("uid", ""))
                     for o in meta.get("ownerReferences") or []),
    )


def missing(name: str) -> ObjectView:
    return ObjectView(name, exists=False)


@dataclasses.dataclass(frozen=True)
class Observed:
    """The job's claims as the reconciler saw them (plan() skips these checks when not given)."""

    claim: ObjectView | None = None  # the job's own checkpoint claim, under its name
    inputs: dict[str, ObjectView] = dataclasses.field(default_factory=dict)  # upstream output claims by name
    conflict: str = ""  # an object found under a child's name while creating it, not the job's


def ownership(view: ObjectView, what: str, kind: str, name: str, uid: str, by_label: bool) -> tuple[str, str]:
    """(OURS | WAIT | CONFLICT, why) for an object found under the name of a child of job (kind, name, uid)."""
    mine = view.label(LABEL_JOB_UID) == uid if by_label else any(o[2] == uid for o in view.owners)
    if mine:
        return OURS, ""
    where = f"{what} {view.name}"
    if view.deleting:
        return WAIT, f"{where} is being deleted; waiting for it to go"
    if any(o[0] == kind and o[1] == name for o in view.owners):
        return WAIT, f"{where} belongs to a deleted {kind} {name}; waiting for the garbage collector to remove it"
    other = view.label(LABEL_JOB_UID)
    if other and view.label(LABEL_JOB) == name and view.label(LABEL_KIND) == kind:
        why = f"it was created by an earlier {kind} {name} (uid {other})"
    elif view.owners:
        why = "it belongs to " + ", ".join(f"{k} {n}" for k, n, _ in view.owners)
    else:
        why = f"it has no {'rlhf.io/job-uid label' if by_label else 'owner reference'} naming this job"
    return CONFLICT, (f"{where} exists but this job did not create it ({why}); the operator never takes over an "
                      f"object it did not create. Delete it if it is not needed, or give the job another name")


def owns_claim(view: ObjectView | None, uid: str) -> bool:
    """The claim carries the job's UID label (or was not observed: nothing to go by)."""
    return view is None or (view.exists and view.label(LABEL_JOB_UID) == uid)


def lost_input(deps: list[Any], recorded: list[dict[str, Any]], inputs: dict[str, ObjectView]) -> str:
    """Why a (re)started trainer could not read an upstream job's model ('' when it can). `deps`:
    status.DepState of each upstream job; `recorded`: status.dependencies."""
    seen = {(r.get("kind"), r.get("name")): r for r in recorded}
    fix = "recreate it (keep its model with spec.checkpoint.retainPolicy: Retain) and then this job"
    for d in deps:
        label = f"{d.kind} {d.name} ({' and '.join(d.roles)})"
        uid = (seen.get((d.kind, d.name)) or {}).get("uid")
        if not d.exists:
            return f"{label} was deleted after this job started; a new trainer pod could not read its model: {fix}"
        if uid and d.uid != uid:
            return f"{label} was deleted and created again; this job will not continue with a different run's output"
        view = inputs.get(d.claim)
        if view is not None and (not view.exists or view.deleting):
            what = "was deleted" if not view.exists else "is being deleted"
            return f"claim {d.claim}, the output of {label}, {what}; a new trainer pod could not mount it: {fix}"
    return ""
