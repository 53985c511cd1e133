"""Reading a job's spec: its model sources, its upstream jobs, and the rules a schema cannot express.

Pure functions. The admission webhook rejects with these messages at apply time; the reconciler
applies the same rules and reports a violation as a Failed condition (reason InvalidSpec), so a
cluster without the webhook still gets the same, clear answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rlhf_trainer import config as tc
from rlhf_trainer import contract

from rlhf_operator import dpo_spec, grants, ppo_spec
from rlhf_operator.crd_schema import (
    CONFIGMAP_KEY_PATTERN,
    FROM_JOB_KINDS,
    MAX_NODES,
    MODEL_ROLES,
    OBJECT_NAME_PATTERN,
    spec_path,
)
from rlhf_operator.settings import Settings

MAX_NAME_LENGTH = 63  # the job name is a label value on every child
ALLOWED_GPUS = (0, 1, 2, 4, 8)  # per pod: ZeRO partitions and GPU nodes come in powers of two
RESERVED_ENV = frozenset({
    contract.ENV_CONFIG, contract.ENV_JOB_NAME, contract.ENV_JOB_NAMESPACE, contract.ENV_JOB_KIND,
    contract.ENV_POD_NAME, contract.ENV_POD_IP, contract.ENV_TERMINATION_LOG,
})
# The schema's patterns, checked here too: a job stored under an older CRD meets the same rules.
OBJECT_NAME = re.compile(OBJECT_NAME_PATTERN)
CONFIGMAP_KEY = re.compile(CONFIGMAP_KEY_PATTERN)
# Fields that may change while a trainer pod exists (batch/v1 Job allows the same ones).
MUTABLE_WHILE_RUNNING = frozenset({"suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "backoffLimit"})
MUTABLE_WHEN_FINISHED = frozenset({"ttlSecondsAfterFinished"})
CHECKPOINT_MUTABLE = frozenset({"retainPolicy", "everySteps", "keepLast", "onClaimLoss", "saveGraceSeconds"})


@dataclasses.dataclass(frozen=True)
class DepRef:
    """An upstream job named by `fromJob`."""

    roles: tuple[str, ...]  # e.g. ("actor", "reference") when both come from one job
    kind: str
    name: str


def model_sources(kind: str, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """role -> model source, for the roles that are set (a dotted role such as `online.rewardModel` is nested)."""
    out = {}
    for role in MODEL_ROLES[kind]:
        node: Any = spec
        for part in role.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            out[role] = node
    return out


def from_job_kind(kind: str, role: str, ref: dict[str, Any]) -> str:
    return ref.get("kind") or FROM_JOB_KINDS[(kind, role)][0]


def dependencies(kind: str, spec: dict[str, Any]) -> list[DepRef]:
    """Upstream jobs in a stable order, one entry per (kind, name)."""
    roles: dict[tuple[str, str], list[str]] = {}
    for role, source in model_sources(kind, spec).items():
        ref = source.get("fromJob")
        if isinstance(ref, dict) and ref.get("name"):
            roles.setdefault((from_job_kind(kind, role, ref), ref["name"]), []).append(role)
    return [DepRef(tuple(r), k, n) for (k, n), r in roles.items()]


def _path_errors(where: str, path: Any) -> list[str]:
    """A path resolved under a mount (or in the container) may not climb out of it."""
    if isinstance(path, str) and ".." in path.split("/"):
        return [f"{where}: {path!r} contains a '..' segment; name a path inside the volume without '..'"]
    return []


def _name_errors(where: str, name: Any, what: str) -> list[str]:
    if isinstance(name, str) and name and not OBJECT_NAME.match(name):
        return [f"{where}: {name!r} is not a valid {what} name (lower-case letters, digits, '-' and '.')"]
    return []


def _model_errors(kind: str, role: str, source: dict[str, Any]) -> list[str]:
    where = f"spec.{role}"
    chosen = [k for k in ("path", "hubId", "fromJob", "initFromConfig") if source.get(k)]
    if source.get("claim") and "path" not in chosen and not source.get("initFromConfig"):
        chosen.insert(0, "path")  # a claim alone: the claim's root directory (with initFromConfig: the tokenizer's)
    errors = []
    if not chosen:
        errors.append(f"{where}: set one of path (optionally with claim), hubId, fromJob or initFromConfig")
    elif len(chosen) > 1:
        errors.append(f"{where}: set only one of {', '.join(chosen)}")
    ref = source.get("fromJob")
    if isinstance(ref, dict):
        allowed = FROM_JOB_KINDS[(kind, role)]
        ref_kind = from_job_kind(kind, role, ref)
        if ref_kind not in allowed:
            errors.append(f"{where}.fromJob.kind: a {ref_kind} cannot be used as {role}; "
                          f"use one of {', '.join(allowed)}")
    if source.get("initFromConfig") and not source.get("tokenizerPath"):
        errors.append(f"{where}.tokenizerPath: required with initFromConfig (a fresh model still needs a tokenizer)")
    errors += _name_errors(f"{where}.claim", source.get("claim"), "PersistentVolumeClaim")
    if isinstance(ref, dict):
        errors += _name_errors(f"{where}.fromJob.name", ref.get("name"), "job")
    for key in ("path", "tokenizerPath"):
        errors += _path_errors(f"{where}.{key}", source.get(key))
    return errors


def _dataset_errors(where: str, ds: dict[str, Any]) -> list[str]:
    errors = _name_errors(f"{where}.claim", ds.get("claim"), "PersistentVolumeClaim")
    errors += _path_errors(f"{where}.path", ds.get("path"))
    cm = ds.get("configMap")
    if isinstance(cm, dict):
        errors += _name_errors(f"{where}.configMap.name", cm.get("name"), "ConfigMap")
        key = cm.get("key")
        if isinstance(key, str) and not CONFIGMAP_KEY.match(key):
            errors.append(f"{where}.configMap.key: {key!r} is not a ConfigMap key (letters, digits, '-', '_' and '.'; "
                          "no '/', not starting with '..'); name a key of the ConfigMap")
    return errors + _dataset_choice_errors(where, ds)


def _dataset_choice_errors(where: str, ds: dict[str, Any]) -> list[str]:
    chosen = [k for k in ("path", "configMap", "hubId") if ds.get(k)]
    if ds.get("claim") and "path" not in chosen:
        chosen.insert(0, "path")
    if ds.get("configMap") and ds.get("claim"):
        return [f"{where}: claim and configMap cannot be combined"]
    if ds.get("configMap") and "path" in chosen:
        chosen.remove("path")  # path is not used with a ConfigMap (the key names the file)
    if not chosen:
        return [f"{where}: set one of path (optionally with claim), configMap or hubId"]
    if len(chosen) > 1:
        return [f"{where}: set only one of {', '.join(chosen)}"]
    return []


def validate(kind: str, name: str, spec: dict[str, Any], max_gpus: int = 8) -> list[str]:
    """Errors of rules the schema cannot express, each naming the field and the fix."""
    errors: list[str] = []
    if len(name) > MAX_NAME_LENGTH:
        errors.append(f"metadata.name: at most {MAX_NAME_LENGTH} characters (it is a label value on the job's pods), "
                      f"got {len(name)}")
    for role, source in model_sources(kind, spec).items():
        errors += _model_errors(kind, role, source)
    seen: dict[str, DepRef] = {}
    for ref in dependencies(kind, spec):
        if ref.kind == kind and ref.name == name:
            errors.append(f"spec.{ref.roles[0]}.fromJob.name: a job cannot depend on itself")
        other = seen.setdefault(ref.name, ref)
        if other.kind != ref.kind:  # both would mount at /inputs/<name>
            errors.append(
                f"spec.{ref.roles[0]}.fromJob: {ref.kind} {ref.name} and {other.kind} {other.name} "
                f"(spec.{other.roles[0]}) share a name; inputs are mounted by job name, so use jobs with different "
                "names"
            )
    if isinstance(spec.get("dataset"), dict):
        errors += _dataset_errors("spec.dataset", spec["dataset"])
    if kind == "PPOJob" and spec.get("ptxDataset"):
        errors += _dataset_errors("spec.ptxDataset", spec["ptxDataset"])
    gpus = (spec.get("resources") or {}).get("gpus", 1)
    if gpus not in ALLOWED_GPUS or gpus > max_gpus:
        allowed = ", ".join(str(g) for g in ALLOWED_GPUS if g <= max_gpus)
        errors.append(f"spec.resources.gpus: {gpus} GPUs per pod cannot be used; choose one of {allowed}")
    errors += _nodes_errors(spec)
    ds = ppo_spec.config_section(tc.DeepSpeedConfig, spec.get("deepspeed"))
    if ds is not None:  # the trainer's rule, named as spec fields
        errors += tc.deepspeed_errors(ds, spec_path)
    if kind == "PPOJob":
        errors += ppo_spec.errors(spec)
    if kind == "DPOJob":
        errors += dpo_spec.errors(spec)
    for i, var in enumerate(spec.get("env") or []):
        if var.get("name") in RESERVED_ENV:
            errors.append(f"spec.env[{i}].name: {var['name']} is set by the operator; remove it")
    return errors


def _nodes_errors(spec: dict[str, Any]) -> list[str]:
    """resources.nodes: within bounds, and (more than one) a claim every pod can mount."""
    nodes = (spec.get("resources") or {}).get("nodes", 1)
    if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        return [f"spec.resources.nodes: {nodes!r} is not a pod count from 1 to {MAX_NODES}"]
    mode = (spec.get("checkpoint") or {}).get("accessMode", "ReadWriteOnce")
    if nodes > 1 and mode != "ReadWriteMany":
        return [f"spec.checkpoint.accessMode: {mode} cannot serve {nodes} pods on different nodes (every pod of a "
                "multi-node job mounts the checkpoint claim); set it to ReadWriteMany"]
    return []


def check(kind: str, name: str, spec: dict[str, Any], settings: Settings) -> list[str]:
    """Every rule the webhook and the reconciler apply to a spec: `validate` plus what the operator's
    settings allow a job to grant (images, env, scheduling)."""
    return validate(kind, name, spec, settings.max_gpus_per_pod) + grants.errors(spec, settings)


def is_running(status: dict[str, Any]) -> bool:
    """A trainer pod exists or is being replaced (so the rendered config is in use)."""
    phase = (status or {}).get("phase")
    return bool((status or {}).get("trainerPod")) and phase in ("Pending", "Running", "Restarting")


def is_finished(status: dict[str, Any]) -> bool:
    return (status or {}).get("phase") in ("Succeeded", "Failed")


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level spec fields that differ (checkpoint sub-fields listed one by one)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "checkpoint":
            o, n = old.get(key) or {}, new.get(key) or {}
            out += [f"checkpoint.{k}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
        else:
            out.append(key)
    return out


def update_errors(old_spec: dict[str, Any], new_spec: dict[str, Any], status: dict[str, Any]) -> list[str]:
    """Changes not allowed for a job in its current state."""
    changed = changed_fields(old_spec or {}, new_spec or {})
    if is_finished(status):
        bad = [f for f in changed if f not in MUTABLE_WHEN_FINISHED and f != "checkpoint.retainPolicy"]
        return [f"spec.{f}: cannot change a finished job (only ttlSecondsAfterFinished and checkpoint.retainPolicy "
                "can)" for f in bad]
    errors = []
    claim_exists = bool((status or {}).get("checkpoint", {}).get("claim"))
    for f in changed:
        if claim_exists and f.startswith("checkpoint.") and f.split(".", 1)[1] not in CHECKPOINT_MUTABLE:
            errors.append(f"spec.{f}: the checkpoint claim exists already; its storage cannot change")
        elif is_running(status) and f not in MUTABLE_WHILE_RUNNING and f != "checkpoint.retainPolicy":
            errors.append(f"spec.{f}: cannot change while the job is running; set spec.suspend: true first, "
                          "then change it")
    return errors
