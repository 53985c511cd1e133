"""Spec edits while a trainer runs: what a running job keeps, and what it takes at once.

A run starts with the spec of one generation; the planner records it (status.runningSpec and
status.runningGeneration). While that run lasts - its pod, and every pod that replaces it after a
crash or a disruption - the trainer config and the pod are built from the recorded spec, overlaid
with the fields that may change while running (the same list the admission webhook allows). Any
other edit is not applied: the job reports it (condition SpecChangeRefused, naming the fields) and
it takes effect only when the job is suspended and resumed, which starts a new run. A crash can
therefore never apply a half-accepted change mid-run.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from rlhf_operator import jobspec
from rlhf_operator.patches import prune_empty

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan

# Top-level spec fields (and checkpoint sub-fields) that a running job takes at once.
MUTABLE_CHECKPOINT = frozenset({"retainPolicy"})


def snapshot(spec: dict[str, Any]) -> dict[str, Any]:
    """What status.runningSpec holds for a spec (as the status stores it: no empty strings or nulls)."""
    return prune_empty(copy.deepcopy(spec or {}))


def in_run(status: dict[str, Any]) -> bool:
    """A run is in progress (a trainer pod exists or is being replaced) and its spec is recorded."""
    status = status or {}
    return bool(status.get("trainerPod")) and isinstance(status.get("runningSpec"), dict) \
        and not jobspec.is_finished(status)


def _mutable(field: str) -> bool:
    if field.startswith("checkpoint."):
        return field.split(".", 1)[1] in MUTABLE_CHECKPOINT
    return field in jobspec.MUTABLE_WHILE_RUNNING


def refused_fields(running: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """spec.* fields changed since the run started that a running job does not take."""
    changed = jobspec.changed_fields(prune_empty(running or {}), snapshot(spec))
    return [f"spec.{f}" for f in changed if not _mutable(f)]


def effective_spec(running: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The spec the run's pods are built from: the recorded one plus the fields that may change."""
    out = copy.deepcopy(running or {})
    for key in jobspec.MUTABLE_WHILE_RUNNING:
        if key in spec:
            out[key] = copy.deepcopy(spec[key])
        else:
            out.pop(key, None)
    new_cp = spec.get("checkpoint") or {}
    for key in MUTABLE_CHECKPOINT:
        cp = out.setdefault("checkpoint", {})
        if key in new_cp:
            cp[key] = new_cp[key]
        else:
            cp.pop(key, None)
        if not cp:
            out.pop("checkpoint")
    return out


def refused_message(fields: list[str], generation: Any, running_generation: Any) -> str:
    return (f"{', '.join(fields)} changed while the trainer runs (generation {generation}): not applied; the trainer "
            f"and any pod that replaces it keep the spec of generation {running_generation}. To apply the change, "
            "suspend the job (spec.suspend: true) and resume it (checkpoints are kept); or revert the edit")


def apply(ps: Pass) -> Plan | None:
    """A run in progress: refuse the edits it cannot take (SpecChangeRefused), else record the spec it runs."""
    if not ps.in_run:
        return None
    generation = ps.generation
    refused = refused_fields(ps.old["runningSpec"], ps.spec)
    if refused:
        ps.conds.set("SpecChangeRefused", True, "ImmutableWhileRunning",
                     refused_message(refused, generation, ps.old.get("runningGeneration")))
    else:
        ps.st.update(runningSpec=snapshot(ps.spec), runningGeneration=generation)
        ps.conds.clear("SpecChangeRefused", "SpecMatchesRun",
                       f"the trainer runs the current spec (generation {generation})")
    return None
