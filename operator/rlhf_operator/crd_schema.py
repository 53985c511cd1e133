"""The CustomResourceDefinitions, built in Python so every field carries a description.

The training sections (``training``, ``deepspeed``, ``sft``, ``reward``, ``ppo`` and the dataset
options) are derived from the trainer's own dataclasses in :mod:`rlhf_trainer.config`: the help text
of each dataclass field becomes the CRD description, its type becomes the OpenAPI type, a ``Literal``
becomes an enum. A new trainer option therefore appears in the CRDs on the next
``python -m rlhf_operator.crdgen`` and the operator renders it without further code.
Everything that is Kubernetes-specific (model sources, volumes, resources, scheduling, the
lifecycle knobs and the status) is declared here by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from rlhf_trainer import config as tc
from rlhf_trainer import contract

GROUP = "rlhf.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "rlhf"


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short: str
    stage: str  # the trainer stage (rlhf_trainer.config.STAGES)

    @property
    def metric_column(self) -> tuple[str, str, str]:
        """(column name, status.progress key, description) of the stage's column (contract.PROGRESS)."""
        field = contract.printer_column(self.stage)
        return field.column, field.key, field.column_help


SFT = Kind("SFTJob", "sftjobs", "sftjob", "sft", "sft")
REWARD = Kind("RewardModelJob", "rewardmodeljobs", "rewardmodeljob", "rmj", "reward")
PPO = Kind("PPOJob", "ppojobs", "ppojob", "ppo", "ppo")
DPO = Kind("DPOJob", "dpojobs", "dpojob", "dpo", "dpo")
KINDS: dict[str, Kind] = {k.kind: k for k in (SFT, REWARD, PPO, DPO)}

# Which kinds a `fromJob` may name, per role; the first is the default when `kind` is omitted.
FROM_JOB_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("SFTJob", "model"): ("SFTJob", "PPOJob"),
    ("RewardModelJob", "model"): ("SFTJob", "RewardModelJob"),
    ("PPOJob", "actor"): ("SFTJob", "PPOJob", "DPOJob"),
    ("PPOJob", "reference"): ("SFTJob", "PPOJob", "DPOJob"),
    ("PPOJob", "rewardModel"): ("RewardModelJob",),
    ("PPOJob", "critic"): ("RewardModelJob",),
    ("DPOJob", "policy"): ("SFTJob", "DPOJob", "PPOJob"),
    ("DPOJob", "reference"): ("SFTJob", "DPOJob", "PPOJob"),
    ("DPOJob", "online.rewardModel"): ("RewardModelJob",),  # a nested role: spec.online.rewardModel
}
MODEL_ROLES: dict[str, tuple[str, ...]] = {
    "SFTJob": ("model",),
    "RewardModelJob": ("model",),
    "PPOJob": ("actor", "rewardModel", "critic", "reference"),
    "DPOJob": ("policy", "reference", "online.rewardModel"),
}
# Roles a job cannot run without (critic and reference have defaults in the trainer).
REQUIRED_ROLES: dict[str, tuple[str, ...]] = {
    "SFTJob": ("model",),
    "RewardModelJob": ("model",),
    "PPOJob": ("actor",),  # the reward may come from spec.reward instead of a reward model
    "DPOJob": ("policy",),  # online rounds may score with online.rewardFn instead of a reward model
}

PHASES = ("Pending", "Waiting", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
CONDITION_TYPES = (
    "Created", "WaitingForDependencies", "PodScheduled", "Running", "Restarting", "Suspended", "Succeeded", "Failed",
    "SpecChangeRefused", "StatusRejected", "Queued",
)
DEFAULT_BACKOFF_LIMIT = 3
# Multi-node jobs: pods per job, and the bounds of the gang's wait and of the checkpoint save on SIGTERM.
MAX_NODES = 64
DEFAULT_GANG_TIMEOUT_SECONDS, MAX_GANG_TIMEOUT_SECONDS = 600, 24 * 3600
DEFAULT_SAVE_GRACE_SECONDS, MAX_SAVE_GRACE_SECONDS = 120, 6 * 3600
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# Names of the objects a pod mounts (claims, ConfigMaps, upstream jobs) are DNS subdomains, which
# also keeps them from being "." or ".." (they become mount directories).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# A ConfigMap key (one file name): no "/", not "." or "..", not starting with "..".
CONFIGMAP_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
# A path with no ".." segment, so a path under a mount stays inside it (RE2 has no lookahead:
# each segment is empty, ".", or starts with a non-dot, ".x" or "..x").
_SEGMENT = r"([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+|\.)?"
PATH_PATTERN = f"^{_SEGMENT}(/{_SEGMENT})*$"

# Upper bounds of the trainer options live with their fields (rlhf_trainer.config: bounds in each field's
# metadata, limits such as MAX_STEPS there); Kubernetes-only durations are bounded here.
MAX_SECONDS = 10 * 365 * 24 * 3600  # deadlines and TTLs stay representable as datetimes

# Trainer fields that the CRD sets some other way (model sources, dataset location, fixed paths).
SKIPPED_FIELDS: dict[type, tuple[str, ...]] = {
    tc.DatasetConfig: ("path", "hub_id"),
    tc.PPOConfig: ("actor", "reward_model", "critic", "reference", "ptx_dataset", "rewards"),
    tc.RewardEndpointConfig: ("token_file",),  # set by the operator from tokenSecret
    tc.DPOConfig: ("policy", "reference", "online"),  # spec.policy, spec.reference, spec.online
    tc.DPOOnlineConfig: ("reward_model",),  # spec.online.rewardModel, a model source
}


# Trainer config sections that a spec sets under another name (the model sources, the reward sources).
FIELD_PATHS = {
    "ppo.actor": "spec.actor", "ppo.reward_model": "spec.rewardModel", "ppo.critic": "spec.critic",
    "ppo.reference": "spec.reference", "ppo.ptx_dataset": "spec.ptxDataset", "ppo.rewards": "spec.reward",
    "dpo.policy": "spec.policy", "dpo.reference": "spec.reference", "dpo.online": "spec.online",
}


def spec_path(config_path: str) -> str:
    """A trainer config field path (`training.batch_size`) -> the CRD field (`spec.training.batchSize`)."""
    for prefix, target in FIELD_PATHS.items():
        if config_path == prefix or config_path.startswith(prefix + "."):
            rest = config_path[len(prefix):]
            return target + ".".join(camel(p) for p in rest.split("."))
    return "spec." + ".".join(camel(p) for p in config_path.split("."))


def _obj(description: str, properties: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": description}
    if properties is not None:
        out["properties"] = properties
    out.update(extra)
    return out


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _int(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "description": description, **extra}


def _num(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, **extra}


def _bool(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "boolean", "description": description, **extra}


def _free(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def _rules(schema: dict[str, Any], *rules: tuple[str, str]) -> dict[str, Any]:
    """Adds CEL rules (x-kubernetes-validations): the API server refuses a spec breaking one at apply time, with
    the message, which names the field (as the operator's own check does, for servers without CEL)."""
    schema["x-kubernetes-validations"] = [
        {"messageExpression" if msg.startswith("'") else "message": msg, "rule": rule} for rule, msg in rules]
    return schema


def _quantity(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if value in ("", {}, []) or value is None:
        return ""
    if isinstance(value, bool):
        value = str(value).lower()
    return f" Default: {value}."


def field_schema(cls: type, f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """OpenAPI schema of one trainer dataclass field (scalars, enums and free-form mappings)."""
    help_text = f.metadata.get("help", "")
    desc = help_text + _default_text(f)
    origin = typing.get_origin(tp)
    if origin is types.UnionType and type(None) in typing.get_args(tp):  # `X | None`: optional, no default
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is Literal:
        schema = _str(desc, enum=list(typing.get_args(tp)))
    elif tp is bool:
        schema = _bool(desc)
    elif tp is int:
        schema = _int(desc)
    elif tp is float:
        schema = _num(desc)
    elif tp is str:
        schema = _str(desc)
    elif origin is dict:
        schema = _free(desc)
    else:  # pragma: no cover - a new kind of field needs a mapping here
        raise TypeError(f"{cls.__name__}.{f.name}: no OpenAPI mapping for {tp!r}")
    schema.update(bounds_of(cls, f))
    return schema


def bounds_of(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    """The field's value rules, from their one home: the field's metadata in rlhf_trainer.config."""
    return dict(f.metadata.get("bounds") or {})


def section_schema(cls: type, description: str) -> dict[str, Any]:
    """Schema of a trainer config section with camelCase property names."""
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED_FIELDS.get(cls, ()):
            continue
        if dataclasses.is_dataclass(hints[f.name]):  # nested sections are mapped by hand
            continue
        props[camel(f.name)] = field_schema(cls, f, hints[f.name])
    return _obj(description, props)


def from_job_schema(kind: str, role: str) -> dict[str, Any]:
    allowed = FROM_JOB_KINDS[(kind, role)]
    return _obj(
        f"Use the final output of another job in this namespace. This job waits until that job has "
        f"Succeeded, then mounts its checkpoint claim read-only at {tc.INPUTS_MOUNT}/<name> and starts from "
        f"{tc.INPUTS_MOUNT}/<name>/{tc.FINAL_SUBDIR}. Allowed kinds here: {', '.join(allowed)}.",
        {
            "name": _str("Name of the job (same namespace).", minLength=1, maxLength=63, pattern=OBJECT_NAME_PATTERN),
            "kind": _str(f"Kind of the job. Default: {allowed[0]}.", enum=list(KINDS)),
        },
        required=["name"],
    )


def model_source_schema(kind: str, role: str, description: str) -> dict[str, Any]:
    # A claim alone means its root directory (with initFromConfig: where the tokenizer is), as jobspec reads it.
    path = "(has(self.path) || (has(self.claim) && !has(self.initFromConfig)))"
    sources = f"({path} ? 1 : 0) + (has(self.hubId) ? 1 : 0) + (has(self.fromJob) ? 1 : 0) + " \
              "(has(self.initFromConfig) ? 1 : 0)"
    return _rules(_obj(
        description + " Set exactly one of path, hubId, fromJob or initFromConfig (claim goes with path).",
        {
            "path": _str(
                "Directory of a Hugging Face model. Relative to the claim's root when `claim` is set, "
                "otherwise an absolute path inside the trainer container. No '..' segments.",
                pattern=PATH_PATTERN,
            ),
            "claim": _str(
                "PersistentVolumeClaim (same namespace) holding the model; mounted read-only at "
                "/mnt/claims/<claim>.",
                maxLength=253, pattern=OBJECT_NAME_PATTERN,
            ),
            "hubId": _str("Hugging Face hub id (needs network access from the pod)."),
            "fromJob": from_job_schema(kind, role),
            "tokenizerPath": _str("Tokenizer directory when it differs from the model's (same rules as `path`).",
                                  pattern=PATH_PATTERN),
            "initFromConfig": _free(
                "Build a fresh model from this transformers config (e.g. {model_type: gpt2, n_layer: 2}) "
                "instead of loading weights; the tokenizer comes from `tokenizerPath`."
            ),
        },
    ), (f"{sources} >= 1", f"spec.{role}: set one of path (optionally with claim), hubId, fromJob or initFromConfig"),
        (f"{sources} <= 1", f"spec.{role}: set only one of path (with or without claim), hubId, fromJob or "
                            "initFromConfig"),
        ("!has(self.initFromConfig) || has(self.tokenizerPath)",
         f"spec.{role}.tokenizerPath: required with initFromConfig (a fresh model still needs a tokenizer)"))


def dataset_schema(description: str, where: str = "spec.dataset") -> dict[str, Any]:
    section = section_schema(tc.DatasetConfig, description)
    props = {
        "path": _str(
            "File or directory of the data. Relative to the claim's root when `claim` is set, otherwise an absolute "
            "path inside the trainer container (not used with `configMap`: the key names the file). No '..' segments.",
            pattern=PATH_PATTERN,
        ),
        "claim": _str("PersistentVolumeClaim (same namespace) holding the data; mounted read-only at "
                      "/mnt/claims/<claim>.", maxLength=253, pattern=OBJECT_NAME_PATTERN),
        "configMap": _obj(
            "A ConfigMap holding a small dataset file; mounted read-only at /mnt/configmaps/<name>.",
            {
                "name": _str("Name of the ConfigMap (same namespace).", minLength=1, maxLength=253,
                             pattern=OBJECT_NAME_PATTERN),
                "key": _str("Key of the file in the ConfigMap (letters, digits, '-', '_', '.'; no '/', not starting "
                            "with '..').", minLength=1, maxLength=253, pattern=CONFIGMAP_KEY_PATTERN),
            },
            required=["name", "key"],
        ),
        "hubId": _str("Hugging Face dataset id (needs network access from the pod)."),
    }
    section["properties"] = {**props, **section["properties"]}
    # With a configMap, path is not used (the key names the file).
    path = "((has(self.path) || has(self.claim)) && !has(self.configMap))"
    sources = f"({path} ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.hubId) ? 1 : 0)"
    return _rules(section,
                  ("!has(self.claim) || !has(self.configMap)", f"{where}: claim and configMap cannot be combined"),
                  (f"{sources} >= 1", f"{where}: set one of path (optionally with claim), configMap or hubId"),
                  (f"{sources} <= 1", f"{where}: set only one of path (with or without claim), configMap or hubId"))


def reward_sources_schema() -> dict[str, Any]:
    section = section_schema(
        tc.RewardSourcesConfig,
        "Where the reward comes from besides spec.rewardModel: a remote endpoint and verifiable rules. The reward of a "
        "response is the weighted sum of every source set (the reward model's score weighted by modelWeight).",
    )
    endpoint = section_schema(tc.RewardEndpointConfig, "A remote reward service (HTTP POST of JSON batches).")
    endpoint["properties"]["tokenSecret"] = _obj(
        "A key of a Secret (same namespace) holding a bearer token for the endpoint. The operator mounts that one key "
        "read-only as a file in the trainer pod (never as an environment variable); the trainer sends it only to "
        "`url`, as `Authorization: Bearer <token>`.",
        {
            "name": _str("Name of the Secret.", minLength=1, maxLength=253, pattern=OBJECT_NAME_PATTERN),
            "key": _str("Key of the token in the Secret.", minLength=1, maxLength=253, pattern=CONFIGMAP_KEY_PATTERN),
        },
        required=["name", "key"],
    )
    section["properties"].update({
        "endpoint": endpoint,
        "match": section_schema(tc.MatchRuleConfig, "Verifiable rule: 1 when the response matches a dataset field."),
        "length": section_schema(tc.LengthRuleConfig, "Verifiable rule: 1 when the response's length is in bounds."),
        "format": section_schema(tc.FormatRuleConfig, "Verifiable rule: 1 when the response has the format."),
    })
    return section


def resources_schema() -> dict[str, Any]:
    return _obj(
        "Compute for the trainer pod.",
        {
            "gpus": _int(
                "GPUs per pod (requested as nvidia.com/gpu). More than one runs the trainer under torchrun "
                "with one process per GPU. Allowed: 0, 1, 2, 4 or 8. Default: 1.",
                minimum=0, maximum=64,
            ),
            "nodes": _int(
                "Pods the job runs on, one per node, each with `gpus` GPUs and the cpu and memory below. More than "
                "one runs torchrun on every pod with rank 0 as the rendezvous (a headless Service gives the pods "
                "stable DNS names) and gang semantics: the pods start together, and when one fails or is deleted "
                "all stop and the gang restarts from the latest checkpoint. Needs spec.checkpoint.accessMode "
                "ReadWriteMany (every pod mounts the claim). Default: 1.",
                minimum=1, maximum=MAX_NODES, default=1,
            ),
            "cpu": _quantity("CPU request, e.g. \"4\" or \"500m\"."),
            "memory": _quantity("Memory request and limit, e.g. \"32Gi\"."),
        },
    )


def scheduling_schema() -> dict[str, Any]:
    toleration = _obj(
        "A pod toleration (as in a Pod spec).",
        {
            "key": _str("Taint key to tolerate."),
            "operator": _str("Exists or Equal.", enum=["Exists", "Equal"]),
            "value": _str("Taint value (with Equal)."),
            "effect": _str("Taint effect to tolerate.", enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            "tolerationSeconds": _int("How long a NoExecute taint is tolerated.", minimum=0, maximum=MAX_SECONDS),
        },
    )
    return _obj(
        "Where the trainer pod may run.",
        {
            "nodeSelector": _obj("Node labels the pod requires.", additionalProperties={"type": "string"}),
            "tolerations": {"type": "array", "items": toleration, "description": "Taints the pod tolerates; only keys "
                            "the operator allows (RLHF_ALLOWED_TOLERATION_KEYS, default nvidia.com/gpu)."},
            "affinity": _free("Pod affinity rules (as in a Pod spec)."),
            "priorityClassName": _str("PriorityClass of the pod; only ones the operator allows "
                                      "(RLHF_ALLOWED_PRIORITY_CLASSES)."),
            "gangTimeoutSeconds": _int(
                "Multi-node jobs (resources.nodes > 1): how long the pods may wait, once released, until all of "
                "them run. Past it the job fails (reason GangTimeout, naming the pod that could not start and why) "
                "and its pods are deleted, so a partial gang never holds GPUs for longer. Default: 600.",
                minimum=10, maximum=MAX_GANG_TIMEOUT_SECONDS, default=DEFAULT_GANG_TIMEOUT_SECONDS,
            ),
        },
    )


def deepspeed_schema() -> dict[str, Any]:
    stage = "(has(self.zeroStage) ? self.zeroStage : 0)"
    return _rules(
        section_schema(tc.DeepSpeedConfig, "DeepSpeed settings (ZeRO stage, offload, precision, extra config)."),
        ("!(has(self.bf16) && self.bf16 && has(self.fp16) && self.fp16)",
         "spec.deepspeed: bf16 and fp16 are both true; choose one"),
        (f"!(has(self.offloadParams) && self.offloadParams) || {stage} == 3",
         "spec.deepspeed.offloadParams: parameter offload needs zeroStage 3"),
        (f"!(has(self.offloadOptimizer) && self.offloadOptimizer) || {stage} > 0",
         "spec.deepspeed.offloadOptimizer: optimizer offload needs zeroStage 1, 2 or 3"),
    )


def ppo_schema() -> dict[str, Any]:
    rollout = f"(has(self.rolloutBatchSize) ? self.rolloutBatchSize : {tc.PPOConfig().rollout_batch_size})"
    samples = f"(has(self.samplesPerPrompt) ? self.samplesPerPrompt : {tc.PPOConfig().samples_per_prompt})"
    return _rules(
        section_schema(tc.PPOConfig, "PPO settings: advantage estimator (GAE with a critic, or critic-free GRPO, RLOO, "
                       "REINFORCE++), KL penalty, clipping, rollout and group sizes, generation."),
        # Static messages where a number would go in: string(int) in a messageExpression is estimated as an
        # unbounded string, and the API server refuses the CRD for its cost.
        (f"!has(self.minibatchSize) || self.minibatchSize <= {rollout}",
         f"spec.ppo.minibatchSize: is larger than ppo.rolloutBatchSize (default {tc.PPOConfig().rollout_batch_size}); "
         "make it smaller or equal"),
        (f"!has(self.advantageEstimator) || !(self.advantageEstimator in {list(tc.GROUP_ESTIMATORS)}) || "
         f"{samples} >= 2",
         "'spec.ppo.samplesPerPrompt: advantageEstimator ' + self.advantageEstimator + ' compares the responses to one "
         "prompt with each other and needs at least 2 per prompt; set samplesPerPrompt >= 2 (e.g. 4)'"),
        (f"{rollout} % {samples} == 0",
         f"spec.ppo.rolloutBatchSize: responses are not whole groups of spec.ppo.samplesPerPrompt (default "
         f"{tc.PPOConfig().samples_per_prompt}); use a multiple of it"),
    )


# Row formats of preference pairs (rlhf_trainer.data.formats.PREFERENCE_FORMATS, which needs the trainer's
# data stack to import): what offline DPO can train on.
DPO_PAIR_FORMATS = ("auto", "prompt_chosen_rejected", "hh_rlhf", "ranked", "scored")


def dpo_model_source_schema(role: str, description: str) -> dict[str, Any]:
    """A DPOJob model source whose fromJob.kind the schema checks too (a reward model where a policy belongs is
    refused at apply time, in jobspec's words)."""
    schema = model_source_schema("DPOJob", role, description)
    allowed = FROM_JOB_KINDS[("DPOJob", role)]
    schema["x-kubernetes-validations"].append({
        "rule": f"!has(self.fromJob) || !has(self.fromJob.kind) || self.fromJob.kind in {list(allowed)}",
        "messageExpression": f"'spec.{role}.fromJob.kind: a ' + self.fromJob.kind + ' cannot be used as {role}; "
                             f"use one of {', '.join(allowed)}'",
    })
    return schema


def dpo_schema() -> dict[str, Any]:
    return _rules(
        section_schema(tc.DPOConfig, "DPO settings: beta, the loss, label smoothing, the reference."),
        ("!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || !has(self.loss) || self.loss == 'sigmoid'",
         "'spec.dpo.labelSmoothing: only the sigmoid loss has label smoothing, the loss is ' + self.loss + "
         "'; set labelSmoothing to 0 or loss to sigmoid'"),
    )


def dpo_online_schema() -> dict[str, Any]:
    section = section_schema(
        tc.DPOOnlineConfig,
        "Online iterative DPO: each round the current policy samples samplesPerPrompt responses to promptsPerRound "
        "prompts of spec.dataset, the reward model (or rewardFn) scores them with the length penalty, and the best "
        "and worst response of each prompt form that round's pairs (written to the claim as rounds/NN/pairs.jsonl). "
        "Leave this out for offline DPO on the preference pairs of spec.dataset.",
    )
    section["properties"]["rounds"]["minimum"] = 1  # 0 is offline DPO: leave spec.online out instead
    section["properties"]["rewardModel"] = dpo_model_source_schema(
        "online.rewardModel", "Reward model scoring the sampled responses, usually fromJob a RewardModelJob.")
    section["properties"] = dict(sorted(section["properties"].items()))
    section["required"] = ["rounds"]
    fn = "(has(self.rewardFn) && self.rewardFn != '')"
    return _rules(
        section,
        ("!has(self.rounds) || self.rounds >= 1",
         "spec.online.rounds: 0 rounds is offline DPO; remove spec.online to train offline on the preference pairs "
         "of spec.dataset, or set rounds >= 1"),
        (f"has(self.rewardModel) || {fn}",
         "spec.online.rewardModel: online DPO scores its samples with a reward model; set rewardModel (e.g. fromJob "
         "a RewardModelJob) or rewardFn, or remove spec.online for offline DPO on preference pairs"),
        (f"!(has(self.rewardModel) && {fn})", "spec.online.rewardFn: set either rewardFn or rewardModel, not both"),
    )


def checkpoint_schema() -> dict[str, Any]:
    cp = {f.name: f for f in dataclasses.fields(tc.CheckpointConfig)}
    hints = typing.get_type_hints(tc.CheckpointConfig)
    every = field_schema(tc.CheckpointConfig, cp["every_steps"], hints["every_steps"])
    keep = field_schema(tc.CheckpointConfig, cp["keep_last"], hints["keep_last"])
    return _obj(
        "The job's checkpoint claim: checkpoints, resume state and the final model that later stages read.",
        {
            "storageClass": _str("StorageClass of the claim. Default: the operator's setting, else the cluster "
                                 "default."),
            "size": _quantity("Size of the claim. Default: the operator's setting (10Gi)."),
            "accessMode": _str("Access mode of the claim.", enum=["ReadWriteOnce", "ReadWriteMany"],
                               default="ReadWriteOnce"),
            "everySteps": every,
            "keepLast": keep,
            "retainPolicy": _str(
                "Retain keeps the claim (and the model in it) when the job is deleted; Delete removes it with the job.",
                enum=["Retain", "Delete"],
                default="Retain",
            ),
            "onClaimLoss": _str(
                "What the job does when its claim is deleted before it finished (its checkpoints go with it): "
                "Fail (condition CheckpointClaimLost) or StartOver (a new claim, training again from step 0).",
                enum=["Fail", "StartOver"],
                default="Fail",
            ),
            "saveGraceSeconds": _int(
                "The trainer pods' termination grace period: on suspend, deletion or preemption the trainer gets "
                "SIGTERM and this long to write its checkpoint before it is killed (a 7B ZeRO-3 save takes minutes). "
                "Default: 120.",
                minimum=10, maximum=MAX_SAVE_GRACE_SECONDS, default=DEFAULT_SAVE_GRACE_SECONDS,
            ),
        },
    )


def env_schema() -> dict[str, Any]:
    return {
        "type": "array",
        "description": "Extra environment variables for the trainer container (as in a Pod spec). Names that change "
        "which code runs (PATH, HOME, LD_*, PYTHON* but PYTHONUNBUFFERED and the like, TORCH_EXTENSIONS_DIR, ...) and "
        "the ones the operator sets are refused unless the operator's settings allow them (RLHF_ALLOWED_ENV).",
        "items": _obj(
            "An environment variable.",
            {
                "name": _str("Variable name.", minLength=1),
                "value": _str("Literal value."),
                "valueFrom": _free(
                    "Source of the value: configMapKeyRef, fieldRef, resourceFieldRef, or secretKeyRef when the "
                    "operator allows reading Secrets (RLHF_ALLOW_SECRET_ENV)."
                ),
            },
            required=["name"],
        ),
    }


def common_spec_properties() -> dict[str, Any]:
    return {
        "image": _str("Trainer image. Default: the operator's RLHF_TRAINER_IMAGE; any other must be allowed by the "
                      "operator's RLHF_ALLOWED_TRAINER_IMAGES."),
        "training": section_schema(tc.TrainingConfig, "Optimisation settings."),
        "resources": resources_schema(),
        "scheduling": scheduling_schema(),
        "deepspeed": deepspeed_schema(),
        "checkpoint": checkpoint_schema(),
        "env": env_schema(),
        "backoffLimit": _int(
            "How many times a failed trainer pod is replaced (each resumes from the latest checkpoint). Trainer "
            "exit codes 2, 3 and 4 (bad config, data or model) fail the job at once.",
            minimum=0,
            maximum=1000,
            default=DEFAULT_BACKOFF_LIMIT,
        ),
        "activeDeadlineSeconds": _int(
            "Fail the job when it has been running this long (counted from its latest start or resume).",
            minimum=1, maximum=MAX_SECONDS,
        ),
        "ttlSecondsAfterFinished": _int("Delete the job this many seconds after it Succeeded or Failed.",
                                        minimum=0, maximum=MAX_SECONDS),
        "suspend": _bool(
            "Stop the trainer pod (it writes a checkpoint on SIGTERM) and keep the claim; set back to false to "
            "resume from the latest checkpoint.",
            default=False,
        ),
    }


def spec_schema(kind: str) -> dict[str, Any]:
    props = common_spec_properties()
    if kind == "PPOJob":
        props.update({
            "actor": model_source_schema(kind, "actor", "Policy to train, usually fromJob an SFTJob."),
            "rewardModel": model_source_schema(kind, "rewardModel", "Frozen reward model, usually fromJob a "
                                               "RewardModelJob. Optional when spec.reward sets another source."),
            "reward": reward_sources_schema(),
            "critic": model_source_schema(kind, "critic", "Critic initialisation (advantageEstimator gae only). "
                                          "Default: the reward model."),
            "reference": model_source_schema(kind, "reference", "Frozen reference policy for the KL penalty. "
                                             "Default: the actor."),
            "dataset": dataset_schema("Prompt dataset."),
            "ptxDataset": dataset_schema("Text data for the pretraining (PTX) loss (used when ppo.ptxCoef > 0).",
                                         "spec.ptxDataset"),
            "ppo": ppo_schema(),
        })
        required = ["actor", "dataset"]  # the reward: spec.rewardModel and/or spec.reward (jobspec checks)
    elif kind == "DPOJob":
        props.update({
            "policy": dpo_model_source_schema("policy", "Policy to train, usually fromJob an SFTJob."),
            "reference": dpo_model_source_schema(
                "reference", "Frozen reference policy. Default: the policy's starting weights (see "
                "dpo.referenceMode for each round's starting policy)."),
            "dataset": dataset_schema("Offline: preference pairs (prompt_chosen_rejected, hh_rlhf, ranked, scored). "
                                      "Online (spec.online): the prompts the policy answers each round."),
            "dpo": dpo_schema(),
            "online": dpo_online_schema(),
        })
        required = ["policy", "dataset"]
    else:
        props["model"] = model_source_schema(kind, "model", "Starting model.")
        props["dataset"] = dataset_schema("Training data." if kind == "SFTJob" else "Preference pairs.")
        if kind == "SFTJob":
            props["sft"] = section_schema(tc.SFTConfig, "SFT settings.")
        else:
            props["reward"] = section_schema(tc.RewardConfig, "Reward-model settings.")
        required = ["model", "dataset"]
    schema = _obj(f"Desired state of the {kind}.", dict(sorted(props.items())), required=required)
    if kind == "DPOJob":  # jobspec (dpo_spec) checks the same
        pairs = list(DPO_PAIR_FORMATS)
        _rules(schema,
               ("!has(self.dpo) || !has(self.dpo.referenceMode) || self.dpo.referenceMode != 'each_round' || "
                "has(self.online)",
                "spec.dpo.referenceMode: each_round needs online rounds (spec.online); use initial for offline DPO"),
               (f"has(self.online) || !has(self.dataset) || !has(self.dataset.format) || "
                f"self.dataset.format in {pairs}",
                "'spec.dataset.format: offline DPO trains on preference pairs, not ' + self.dataset.format + ' rows; "
                f"use one of {', '.join(pairs)}, or set spec.online to sample pairs from prompts'"),
               ("!has(self.online) || !has(self.dataset) || !has(self.dataset.format) || self.dataset.format != 'text'",
                "spec.dataset.format: online DPO samples answers to prompts, and text rows have none; use prompt, "
                "prompt_response or a preference-pair format"),
               ("!has(self.online) || !has(self.online.rounds) || self.online.rounds < 1 || !has(self.training) || "
                "!has(self.training.maxSteps) || self.training.maxSteps % self.online.rounds == 0",
                "spec.training.maxSteps: online DPO runs maxSteps / rounds steps per round, and maxSteps is not a "
                "multiple of spec.online.rounds; use a multiple, or 0 to size each round by "
                "spec.online.epochsPerRound"))
    if kind == "PPOJob":  # jobspec also checks that spec.reward sets a source
        _rules(schema, ("has(self.rewardModel) || has(self.reward) || (has(self.ppo) && has(self.ppo.rewardFn))",
                        "spec.rewardModel: set a reward model, or a reward source in spec.reward (endpoint, match, "
                        "length, format)"))
    return schema


def condition_schema() -> dict[str, Any]:
    return _obj(
        "One aspect of the job's state (Kubernetes API conventions).",
        {
            "type": _str("Condition type.", enum=list(CONDITION_TYPES)),
            "status": _str("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _str("One CamelCase word saying why."),
            "message": _str("Human-readable details."),
            "lastTransitionTime": _str("When the status last changed.", format="date-time"),
            "observedGeneration": _int("metadata.generation this condition was computed from."),
        },
        required=["type", "status"],
    )


def status_schema(kind: str) -> dict[str, Any]:
    # The trainer's values come from the progress contract (contract.PROGRESS); the operator adds the
    # percent and summary of the step count (listed right after it) and the time of the last scrape.
    values: dict[str, Any] = {}
    for f in contract.PROGRESS:
        values[f.key] = (_int if f.type is int else _num)(f.help)
        if f.key == "totalSteps":
            values.update(percent=_num("step / totalSteps in percent."), summary=_str("step/totalSteps for printing."))
    values["updateTime"] = _str("When the trainer was last scraped.", format="date-time")
    progress = _obj("Live training progress scraped from the trainer's metrics endpoint (refreshed while running).",
                    values)
    dep = _obj(
        "An upstream job this job reads from.",
        {
            "role": _str("Which model of this job comes from it."),
            "kind": _str("Kind of the upstream job."),
            "name": _str("Name of the upstream job."),
            "uid": _str("UID of the upstream job when it was first seen (a later different UID means it was "
                        "replaced)."),
            "phase": _str("Phase of the upstream job when last checked."),
        },
    )
    return _obj(
        f"Observed state of the {kind}.",
        {
            "phase": _str("Summary for printing; the conditions carry the details.", enum=list(PHASES)),
            "observedGeneration": _int("metadata.generation the status was computed from."),
            "conditions": {
                "type": "array",
                "description": "Conditions: Created, WaitingForDependencies, PodScheduled, Running, Restarting, "
                "Suspended, Succeeded, Failed, SpecChangeRefused, StatusRejected, Queued (Kueue: waiting for "
                "admission, or preempted). Succeeded and Failed are terminal.",
                "items": condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "startTime": _str("When the current run started (reset on resume).", format="date-time"),
            "completionTime": _str("When the job Succeeded or Failed.", format="date-time"),
            "restartCount": _int("How many failed trainer pods were replaced (counted against spec.backoffLimit)."),
            "disruptionCount": _int("How many trainer pods were deleted, evicted, preempted or lost with their node "
                                    "and replaced; not counted against spec.backoffLimit."),
            "nextAttemptTime": _str("When the next trainer pod starts, while a failed one waits out its back-off.",
                                    format="date-time"),
            "runningGeneration": _int("metadata.generation of the spec the trainer pods run (a run keeps its spec; "
                                      "see the SpecChangeRefused condition)."),
            "runningSpec": _free("The spec the current run started with; its pods, replacements included, are built "
                                 "from it."),
            "attempt": _int("Index of the newest trainer pod (<job>-<sft|rm|ppo|dpo>-trainer-<attempt>)."),
            "trainerPod": _str("Name of the current trainer pod (rank 0's for a multi-node job)."),
            "gang": _obj(
                "The pods of a multi-node job's current attempt (spec.resources.nodes > 1).",
                {
                    "size": _int("Pods in the gang (spec.resources.nodes)."),
                    "ready": _int("Pods of the gang that run (or finished)."),
                    "summary": _str("ready/size for printing."),
                    "attempt": _int("The attempt these counts are of."),
                    "waitingSince": _str("When the gang began waiting for all its pods to run (bounded by "
                                         "spec.scheduling.gangTimeoutSeconds).", format="date-time"),
                    "stop": _obj(
                        "Why this attempt stops: the first pod that failed or was disrupted (its peers are stopped "
                        "and the gang restarts as one).",
                        {
                            "pod": _str("The pod."),
                            "disruption": _bool("Deleted, evicted or preempted: not counted against backoffLimit."),
                            "message": _str("What happened."),
                            "exitCode": _int("Its trainer's exit code."),
                            "finishedAt": _str("When it ended.", format="date-time"),
                        },
                    ),
                },
            ),
            "checkpoint": _obj(
                "The job's checkpoint claim.",
                {
                    "claim": _str("Name of the PersistentVolumeClaim."),
                    "latestStep": _int("Step of the newest complete checkpoint seen."),
                    "retainPolicy": _str("Retain policy applied to the claim (Delete: owned by the job)."),
                },
            ),
            "output": _obj(
                "Where the final model is (set when the job Succeeded).",
                {
                    "claim": _str("Claim holding the final model."),
                    "path": _str("Directory of the final model inside the claim."),
                },
            ),
            "progress": progress,
            "dependencies": {"type": "array", "description": "Upstream jobs (fromJob).", "items": dep},
        },
    )


def printer_columns(k: Kind) -> list[dict[str, Any]]:
    name, key, desc = k.metric_column
    kind = "integer" if contract.printer_column(k.stage).type is int else "number"
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the job."},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary",
         "description": "round r/R, step s/S (online DPO)." if k.kind == "DPOJob" else "step/total."},
        {"name": name, "type": kind, "jsonPath": f".status.progress.{key}", "description": desc},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount", "priority": 1,
         "description": "Replaced trainer pods."},
        {"name": "Pods", "type": "string", "jsonPath": ".status.gang.summary", "priority": 1,
         "description": "Running pods of a multi-node job: ready/size."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


KIND_DESCRIPTIONS = {
    "SFTJob": "Supervised fine-tuning of a causal language model.",
    "RewardModelJob": "Training of a pairwise (Bradley-Terry) reward model on preference data.",
    "PPOJob": "RLHF with PPO (GAE and a critic) or a critic-free estimator (GRPO, RLOO, REINFORCE++): an actor trained "
              "against a reward model, a reward endpoint and/or verifiable rules, with a KL penalty to a reference.",
    "DPOJob": "Direct preference optimisation of a policy against a frozen reference: offline on preference pairs, "
              "or online in rounds whose pairs are the best and worst of n sampled responses as a reward model scores "
              "them (iterative DPO).",
}


def crd(kind: str) -> dict[str, Any]:
    k = KINDS[kind]
    schema = _obj(
        KIND_DESCRIPTIONS[kind],
        {
            "apiVersion": _str("API version of the object."),
            "kind": _str("Kind of the object."),
            "metadata": {"type": "object"},
            "spec": spec_schema(kind),
            "status": status_schema(kind),
        },
        required=["spec"],
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{k.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "rlhf-platform"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": k.kind,
                "listKind": f"{k.kind}List",
                "plural": k.plural,
                "singular": k.singular,
                "shortNames": [k.short],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(k),
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    return {f"{GROUP}_{KINDS[kind].plural}.yaml": crd(kind) for kind in KINDS}
