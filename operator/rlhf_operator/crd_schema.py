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
KINDS: dict[str, Kind] = {k.kind: k for k in (SFT, REWARD, PPO)}

# Which kinds a `fromJob` may name, per role; the first is the default when `kind` is omitted.
FROM_JOB_KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("SFTJob", "model"): ("SFTJob", "PPOJob"),
    ("RewardModelJob", "model"): ("SFTJob", "RewardModelJob"),
    ("PPOJob", "actor"): ("SFTJob", "PPOJob"),
    ("PPOJob", "reference"): ("SFTJob", "PPOJob"),
    ("PPOJob", "rewardModel"): ("RewardModelJob",),
    ("PPOJob", "critic"): ("RewardModelJob",),
}
MODEL_ROLES: dict[str, tuple[str, ...]] = {
    "SFTJob": ("model",),
    "RewardModelJob": ("model",),
    "PPOJob": ("actor", "rewardModel", "critic", "reference"),
}
# Roles a job cannot run without (critic and reference have defaults in the trainer).
REQUIRED_ROLES: dict[str, tuple[str, ...]] = {
    "SFTJob": ("model",),
    "RewardModelJob": ("model",),
    "PPOJob": ("actor",),  # the reward may come from spec.reward instead of a reward model
}

PHASES = ("Pending", "Waiting", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
CONDITION_TYPES = (
    "Created", "WaitingForDependencies", "PodScheduled", "Running", "Restarting", "Suspended", "Succeeded", "Failed",
    "SpecChangeRefused", "StatusRejected",
)
DEFAULT_BACKOFF_LIMIT = 3
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

# Upper bounds: far above any real run, low enough that derived values (status.progress.totalSteps,
# deadlines as datetimes) stay representable; an int64 there locked a job's status for good.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_TOKENS = 1_048_576
MAX_SAMPLES = 1_000_000_000
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_SECONDS = 10 * 365 * 24 * 3600
MAX_COEF = 1_000.0

# Bounds of the trainer options in the schema, so a bad value is refused at apply time with the field
# named. The minimums are the ones the trainer enforces (rlhf_trainer.config.validate); the maximums live
# only here (the trainer accepts any size when run by hand). Keys are (dataclass, field) in the trainer's
# snake_case; a test checks they all exist and that every number in a spec is bounded.
BOUNDS: dict[tuple[type, str], dict[str, Any]] = {
    (tc.TrainingConfig, "max_steps"): {"minimum": 0, "maximum": MAX_STEPS},
    (tc.TrainingConfig, "epochs"): {"minimum": 0, "exclusiveMinimum": True, "maximum": 10_000},
    (tc.TrainingConfig, "batch_size"): {"minimum": 1, "maximum": MAX_BATCH},
    (tc.TrainingConfig, "gradient_accumulation_steps"): {"minimum": 1, "maximum": MAX_BATCH},
    (tc.TrainingConfig, "learning_rate"): {"minimum": 0, "maximum": 10},
    (tc.TrainingConfig, "weight_decay"): {"minimum": 0, "maximum": 10},
    (tc.TrainingConfig, "warmup_steps"): {"minimum": 0, "maximum": MAX_STEPS},
    (tc.TrainingConfig, "max_grad_norm"): {"minimum": 0, "maximum": 1e6},
    (tc.TrainingConfig, "max_length"): {"minimum": 8, "maximum": MAX_TOKENS},
    (tc.TrainingConfig, "seed"): {"minimum": 0, "maximum": MAX_SEED},
    (tc.TrainingConfig, "log_every"): {"minimum": 1, "maximum": MAX_STEPS},
    (tc.TrainingConfig, "eval_every"): {"minimum": 0, "maximum": MAX_STEPS},
    (tc.TrainingConfig, "threads"): {"minimum": 0, "maximum": 1024},
    (tc.TrainingConfig, "max_skipped_steps"): {"minimum": 0, "maximum": MAX_STEPS},
    (tc.DatasetConfig, "eval_fraction"): {"minimum": 0, "maximum": 1, "exclusiveMaximum": True},
    (tc.DatasetConfig, "split_seed"): {"minimum": 0, "maximum": MAX_SEED},
    (tc.DatasetConfig, "max_samples"): {"minimum": 0, "maximum": MAX_SAMPLES},
    (tc.DatasetConfig, "min_train_samples"): {"minimum": 0, "maximum": MAX_SAMPLES},
    (tc.DeepSpeedConfig, "zero_stage"): {"minimum": 0, "maximum": 3},
    (tc.CheckpointConfig, "every_steps"): {"minimum": 0, "maximum": MAX_STEPS},
    (tc.CheckpointConfig, "keep_last"): {"minimum": 1, "maximum": 1000},
    (tc.RewardConfig, "margin"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
    (tc.PPOConfig, "kl_coef"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "kl_target"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "kl_horizon"): {"minimum": 1, "maximum": MAX_SAMPLES},
    (tc.PPOConfig, "cliprange"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "cliprange_value"): {"minimum": 0, "maximum": 1e6},
    (tc.PPOConfig, "vf_coef"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "entropy_coef"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "gamma"): {"minimum": 0, "maximum": 1},
    (tc.PPOConfig, "lam"): {"minimum": 0, "maximum": 1},
    (tc.PPOConfig, "reward_clip"): {"minimum": 0, "maximum": 1e6},
    (tc.PPOConfig, "rollout_batch_size"): {"minimum": 1, "maximum": MAX_BATCH},
    (tc.PPOConfig, "minibatch_size"): {"minimum": 1, "maximum": MAX_BATCH},
    (tc.PPOConfig, "ppo_epochs"): {"minimum": 1, "maximum": 1000},
    (tc.PPOConfig, "max_prompt_length"): {"minimum": 1, "maximum": MAX_TOKENS},
    (tc.PPOConfig, "max_new_tokens"): {"minimum": 1, "maximum": MAX_TOKENS},
    (tc.PPOConfig, "temperature"): {"minimum": 0, "exclusiveMinimum": True, "maximum": 100},
    (tc.PPOConfig, "top_k"): {"minimum": 0, "maximum": 10_000_000},
    (tc.PPOConfig, "top_p"): {"minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    (tc.PPOConfig, "ptx_coef"): {"minimum": 0, "maximum": MAX_COEF},
    (tc.PPOConfig, "critic_learning_rate"): {"minimum": 0, "maximum": 10},
    (tc.PPOConfig, "samples_per_prompt"): {"minimum": 1, "maximum": 1024},
    (tc.RewardSourcesConfig, "model_weight"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
    (tc.RewardEndpointConfig, "url"): {"pattern": r"^https?://[^\s]+$", "maxLength": 2048},
    (tc.RewardEndpointConfig, "weight"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
    (tc.RewardEndpointConfig, "timeout_seconds"): {"minimum": 0, "exclusiveMinimum": True, "maximum": 3600},
    (tc.RewardEndpointConfig, "max_retries"): {"minimum": 0, "maximum": 100},
    (tc.RewardEndpointConfig, "backoff_seconds"): {"minimum": 0, "maximum": 3600},
    (tc.RewardEndpointConfig, "max_backoff_seconds"): {"minimum": 0, "maximum": 3600},
    (tc.RewardEndpointConfig, "max_in_flight"): {"minimum": 1, "maximum": 256},
    (tc.RewardEndpointConfig, "batch_size"): {"minimum": 1, "maximum": MAX_BATCH},
    (tc.MatchRuleConfig, "weight"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
    (tc.LengthRuleConfig, "min_chars"): {"minimum": 0, "maximum": MAX_TOKENS},
    (tc.LengthRuleConfig, "max_chars"): {"minimum": 0, "maximum": MAX_TOKENS},
    (tc.LengthRuleConfig, "weight"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
    (tc.FormatRuleConfig, "weight"): {"minimum": -MAX_COEF, "maximum": MAX_COEF},
}

# Trainer fields that the CRD sets some other way (model sources, dataset location, fixed paths).
SKIPPED_FIELDS: dict[type, tuple[str, ...]] = {
    tc.DatasetConfig: ("path", "hub_id"),
    tc.PPOConfig: ("actor", "reward_model", "critic", "reference", "ptx_dataset", "rewards"),
    tc.RewardEndpointConfig: ("token_file",),  # set by the operator from tokenSecret
}


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
    schema.update(BOUNDS.get((cls, f.name), {}))
    return schema


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
    else:
        props["model"] = model_source_schema(kind, "model", "Starting model.")
        props["dataset"] = dataset_schema("Training data." if kind == "SFTJob" else "Preference pairs.")
        if kind == "SFTJob":
            props["sft"] = section_schema(tc.SFTConfig, "SFT settings.")
        else:
            props["reward"] = section_schema(tc.RewardConfig, "Reward-model settings.")
        required = ["model", "dataset"]
    schema = _obj(f"Desired state of the {kind}.", dict(sorted(props.items())), required=required)
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
                "Suspended, Succeeded, Failed, SpecChangeRefused, StatusRejected. Succeeded and Failed are terminal.",
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
            "attempt": _int("Index of the newest trainer pod (<job>-<sft|rm|ppo>-trainer-<attempt>)."),
            "trainerPod": _str("Name of the current trainer pod."),
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
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "step/total."},
        {"name": name, "type": kind, "jsonPath": f".status.progress.{key}", "description": desc},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount", "priority": 1,
         "description": "Replaced trainer pods."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


KIND_DESCRIPTIONS = {
    "SFTJob": "Supervised fine-tuning of a causal language model.",
    "RewardModelJob": "Training of a pairwise (Bradley-Terry) reward model on preference data.",
    "PPOJob": "RLHF with PPO (GAE and a critic) or a critic-free estimator (GRPO, RLOO, REINFORCE++): an actor trained "
              "against a reward model, a reward endpoint and/or verifiable rules, with a KL penalty to a reference.",
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
