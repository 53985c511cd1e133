"""The one definition of the trainer's configuration.

The operator renders a job's spec into this structure (as YAML in a ConfigMap); the trainer reads it
back with :func:`load_config`. Both import this module, so the two cannot drift apart. It must stay
importable without torch (the operator image has no torch).

Every field carries a help text; ``from_dict`` rejects unknown keys and wrong types with the dotted
path of the offending field, so a bad config fails with a message that says where and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("sft", "reward", "ppo", "dpo")
# Advantage estimators of the PPO stage; the critic-free ones load and train no value model.
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_plus_plus")
CRITIC_FREE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
GROUP_ESTIMATORS = ("grpo", "rloo")  # compare the samples of one prompt: need samples_per_prompt >= 2
DPO_LOSSES = ("sigmoid", "ipo", "hinge")

# Fixed paths inside a trainer pod. The operator mounts volumes there; the trainer reads them.
CONFIG_MOUNT_DIR = "/etc/rlhf"
CONFIG_FILE_NAME = "config.yaml"
CHECKPOINT_MOUNT = "/ckpt"  # the job's own checkpoint claim, read-write
INPUTS_MOUNT = "/inputs"  # claims of upstream jobs, read-only, at /inputs/<job-name>
CHECKPOINTS_SUBDIR = "checkpoints"  # <claim>/checkpoints/step-00000042/
LATEST_POINTER = "latest"  # <claim>/checkpoints/latest holds the name of the newest complete one
FINAL_SUBDIR = "final"  # <claim>/final/ : Hugging Face export that the next stage reads
METADATA_FILE = "rlhf_metadata.json"  # in final/: stage, steps, final metrics, inputs used
DEFAULT_METRICS_PORT = 9400

# Limits of the numeric options (each field's `bounds`): far above any real run, low enough that derived values
# (status.progress.totalSteps, deadlines as datetimes) stay representable; an int64 there locked a job's status.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_TOKENS = 1_048_576
MAX_SAMPLES = 1_000_000_000
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_COEF = 1_000.0


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field path and how to fix it."""


def _help(text: str, bounds: dict[str, Any] | None = None, pattern_help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help text (kept in metadata, shown by ``describe``).

    ``bounds`` are the field's value rules as JSON-schema keywords (minimum, maximum, exclusiveMinimum,
    exclusiveMaximum, pattern, maxLength): their one home. The CRD generator copies them into the schema and
    :func:`validate` enforces them, so the API server and the trainer refuse the same values.
    ``pattern_help`` says in words what the pattern wants (the error shows it instead of the regex).
    """
    metadata: dict[str, Any] = {"help": text}
    if bounds:
        metadata["bounds"] = bounds
    if pattern_help:
        metadata["pattern_help"] = pattern_help
    return field(metadata=metadata, **kw)


def _range(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> dict[str, Any]:
    """Bounds ``lo <= x <= hi`` (``open_lo``/``open_hi``: that end excluded) as JSON-schema keywords."""
    out: dict[str, Any] = {"minimum": lo}
    if open_lo:
        out["exclusiveMinimum"] = True
    out["maximum"] = hi
    if open_hi:
        out["exclusiveMaximum"] = True
    return out


@dataclass
class JobIdentity:
    name: str = _help("Name of the Kubernetes job object this run belongs to.", default="local")
    namespace: str = _help("Namespace of the job object.", default="default")
    kind: str = _help("Kind of the job object (SFTJob, RewardModelJob, PPOJob).", default="")


@dataclass
class ModelConfig:
    path: str = _help("Local directory of a Hugging Face model (config, weights, tokenizer).", default="")
    tokenizer_path: str = _help("Tokenizer directory when it differs from `path`.", default="")
    hub_id: str = _help("Hugging Face hub id; used only when `path` is empty and the cluster has network.", default="")
    init_from_config: dict[str, Any] = _help(
        "Build a fresh model from this transformers config dict instead of loading weights "
        "(e.g. {'model_type': 'gpt2', 'n_layer': 2, ...}); the tokenizer still comes from `tokenizer_path`.",
        default_factory=dict,
    )


@dataclass
class DatasetConfig:
    path: str = _help("File or directory of the dataset (JSONL, JSON, Parquet, or a `datasets` save_to_disk dir).",
                      default="")
    hub_id: str = _help("Hugging Face dataset id; used only when `path` is empty.", default="")
    file_format: Literal["auto", "jsonl", "json", "parquet", "hf_disk"] = _help(
        "Container format; `auto` picks from the file extension or directory layout.", default="auto"
    )
    format: Literal[
        "auto", "prompt_chosen_rejected", "hh_rlhf", "ranked", "scored", "prompt_response", "text", "prompt"
    ] = _help(
        "Row schema: prompt/chosen/rejected; HH-RLHF chosen/rejected transcripts; K ranked responses "
        "(prompt + responses best-first); scored completions (user_input/completion/score); "
        "SFT prompt/response; plain text; PPO prompts. `auto` detects from the first row's keys.",
        default="auto",
    )
    eval_fraction: float = _help("Fraction held out for evaluation (fixed split by `split_seed`).",
                                 bounds=_range(0, 1, open_hi=True), default=0.1)
    split_seed: int = _help("Seed of the train/eval split.", bounds=_range(0, MAX_SEED), default=0)
    max_samples: int = _help("Use at most this many rows (0 = all).", bounds=_range(0, MAX_SAMPLES), default=0)
    min_train_samples: int = _help("Fail before loading a model when the train split is smaller.",
                                   bounds=_range(0, MAX_SAMPLES), default=1)


@dataclass
class TrainingConfig:
    max_steps: int = _help("Optimizer steps to run (0 = `epochs` over the train split).",
                           bounds=_range(0, MAX_STEPS), default=0)
    epochs: float = _help("Epochs over the train split when `max_steps` is 0.",
                          bounds=_range(0, 10_000, open_lo=True), default=1.0)
    batch_size: int = _help("Per-process micro batch size.", bounds=_range(1, MAX_BATCH), default=8)
    gradient_accumulation_steps: int = _help("Micro batches per optimizer step.",
                                             bounds=_range(1, MAX_BATCH), default=1)
    learning_rate: float = _help("Peak learning rate (AdamW).", bounds=_range(0, 10), default=1e-5)
    weight_decay: float = _help("AdamW weight decay.", bounds=_range(0, 10), default=0.0)
    warmup_steps: int = _help("Linear warm-up steps, then linear decay to 0 (constant if `lr_schedule` is constant).",
                              bounds=_range(0, MAX_STEPS), default=0)
    lr_schedule: Literal["linear", "constant", "cosine"] = _help("Learning-rate schedule after warm-up.",
                                                                 default="linear")
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", bounds=_range(0, 1e6), default=1.0)
    max_length: int = _help("Maximum tokens per sequence (longer ones are truncated).",
                            bounds=_range(8, MAX_TOKENS), default=512)
    seed: int = _help("Random seed for model init, shuffling and sampling.", bounds=_range(0, MAX_SEED), default=42)
    log_every: int = _help("Log metrics every N steps.", bounds=_range(1, MAX_STEPS), default=1)
    eval_every: int = _help("Evaluate every N steps (0 = only at the end).", bounds=_range(0, MAX_STEPS), default=0)
    threads: int = _help("torch CPU threads (0 = as many as the pod requests CPUs, spec.resources.cpu; "
                         "without a request, the CPU limit or torch's default).", bounds=_range(0, 1024), default=0)
    max_skipped_steps: int = _help(
        "Consecutive optimizer steps skipped for NaN/Inf gradients that end the run (exit code 10, "
        "NonFiniteGradients); 0 = automatic: one PPO iteration's optimizer steps for PPO, 10 for SFT and reward.",
        bounds=_range(0, MAX_STEPS), default=0,
    )


@dataclass
class RewardConfig:
    margin: float = _help("Margin m in -logsigmoid(r_chosen - r_rejected - m).",
                          bounds=_range(-MAX_COEF, MAX_COEF), default=0.0)
    head: Literal["sequence_classification", "value_head"] = _help(
        "Score head: a sequence-classification model or backbone + linear value head.", default="value_head"
    )


@dataclass
class SFTConfig:
    packing: bool = _help("Pack several short examples into one sequence of `max_length`.", default=False)
    loss_on_prompt: bool = _help("Also train on prompt tokens (default: response tokens only).", default=False)


@dataclass
class RewardEndpointConfig:
    url: str = _help(
        "HTTP(S) URL of a reward service. Each batch of responses is POSTed as JSON {prompts, responses, fields, job}; "
        "the answer is {rewards: [number, ...]}, one per response (README: Rewards). Empty = no endpoint.",
        bounds={"pattern": r"^https?://[^\s]+$", "maxLength": 2048},
        pattern_help="must start with http:// or https:// and contain no spaces", default="",
    )
    weight: float = _help("Weight of the endpoint's reward in the sum of reward sources.",
                          bounds=_range(-MAX_COEF, MAX_COEF), default=1.0)
    timeout_seconds: float = _help("Seconds to wait for one answer before the request counts as failed.",
                                   bounds=_range(0, 3600, open_lo=True), default=30.0)
    max_retries: int = _help(
        "Retries of a request that timed out, could not connect or got HTTP 408/425/429/5xx; then the trainer stops "
        "with exit code 8 (restarted by the operator, resuming from its checkpoint).", bounds=_range(0, 100), default=5
    )
    backoff_seconds: float = _help("Wait before the first retry; doubled for each further one.",
                                   bounds=_range(0, 3600), default=1.0)
    max_backoff_seconds: float = _help("Longest wait between two retries.", bounds=_range(0, 3600), default=30.0)
    max_in_flight: int = _help("Requests sent at the same time at most (per trainer process).",
                               bounds=_range(1, 256), default=4)
    batch_size: int = _help("Responses per request.", bounds=_range(1, MAX_BATCH), default=64)
    token_file: str = _help(
        "File holding a bearer token sent as `Authorization: Bearer <token>` (the operator mounts "
        "spec.reward.endpoint.tokenSecret here). Empty = no token.", default=""
    )


@dataclass
class MatchRuleConfig:
    field: str = _help(
        "Dataset field holding each prompt's reference answer (e.g. `answer`; `response` of prompt/response rows). "
        "Empty = rule off.", default=""
    )
    mode: Literal["exact", "regex"] = _help(
        "exact: the response (or its `extract` part) equals the field after collapsing whitespace; regex: the field "
        "holds a regular expression that must be found in it. Scores 1 or 0.", default="exact"
    )
    extract: str = _help(
        "Regular expression applied to the response first; its last match (group 1 if it has groups) is compared, "
        r"e.g. `(-?\d+)\s*$` for a final number. Empty = the whole response.", default=""
    )
    weight: float = _help("Weight of this rule in the sum of reward sources.",
                          bounds=_range(-MAX_COEF, MAX_COEF), default=1.0)


@dataclass
class LengthRuleConfig:
    min_chars: int = _help("Fewest characters of the stripped response that score 1 (0 = no lower bound).",
                           bounds=_range(0, MAX_TOKENS), default=0)
    max_chars: int = _help("Most characters of the stripped response that score 1 (0 = no upper bound; both 0 = "
                           "rule off).", bounds=_range(0, MAX_TOKENS), default=0)
    weight: float = _help("Weight of this rule in the sum of reward sources.",
                          bounds=_range(-MAX_COEF, MAX_COEF), default=1.0)


@dataclass
class FormatRuleConfig:
    pattern: str = _help(
        "Regular expression the whole stripped response must match (`.` matches newlines) to score 1, else 0. "
        "Empty = rule off.", default=""
    )
    weight: float = _help("Weight of this rule in the sum of reward sources.",
                          bounds=_range(-MAX_COEF, MAX_COEF), default=1.0)


@dataclass
class RewardSourcesConfig:
    model_weight: float = _help(
        "Weight of the reward model's score (normalised with its saved statistics when ppo.normalize_reward) when "
        "other sources are set too; the reward is the weighted sum of every source set.",
        bounds=_range(-MAX_COEF, MAX_COEF), default=1.0
    )
    endpoint: RewardEndpointConfig = _help("A remote reward service.", default_factory=RewardEndpointConfig)
    match: MatchRuleConfig = _help("Verifiable rule: the response against a dataset field.",
                                   default_factory=MatchRuleConfig)
    length: LengthRuleConfig = _help("Verifiable rule: the response's length.", default_factory=LengthRuleConfig)
    format: FormatRuleConfig = _help("Verifiable rule: the response's format.", default_factory=FormatRuleConfig)

    def sources(self) -> list[str]:
        """Names of the non-model sources that are set."""
        on = {"endpoint": bool(self.endpoint.url), "match": bool(self.match.field),
              "length": bool(self.length.min_chars or self.length.max_chars), "format": bool(self.format.pattern)}
        return [k for k, v in on.items() if v]


@dataclass
class PPOConfig:
    actor: ModelConfig = _help("Policy to train (usually the SFT output).", default_factory=ModelConfig)
    reward_model: ModelConfig = _help("Frozen reward model (usually a RewardModelJob output).",
                                      default_factory=ModelConfig)
    reward_fn: str = _help(
        "Built-in rule scorer used instead of `reward_model` (tests, demos): `count:<text>` scores a "
        "response by how many times <text> occurs in its decoded text. Empty = use the reward model.",
        default="",
    )
    critic: ModelConfig = _help("Critic init; empty = the reward model's backbone.", default_factory=ModelConfig)
    reference: ModelConfig = _help("Frozen reference policy; empty = a copy of the actor at start.",
                                   default_factory=ModelConfig)
    kl_coef: float = _help("Initial KL penalty coefficient beta.", bounds=_range(0, MAX_COEF), default=0.05)
    kl_target: float = _help("Adaptive KL target (0 = fixed coefficient).", bounds=_range(0, MAX_COEF), default=0.0)
    kl_horizon: int = _help("Horizon of the adaptive KL controller (in samples).",
                            bounds=_range(1, MAX_SAMPLES), default=10000)
    kl_estimator: Literal["k1", "k3"] = _help("Per-token KL estimator: k1 = log p - log q, k3 = (r - 1) - log r.",
                                              default="k1")
    cliprange: float = _help("Policy ratio clip epsilon.", bounds=_range(0, MAX_COEF), default=0.2)
    cliprange_value: float = _help("Value clip range around old values.", bounds=_range(0, 1e6), default=0.2)
    vf_coef: float = _help("Value loss coefficient.", bounds=_range(0, MAX_COEF), default=0.5)
    entropy_coef: float = _help("Entropy bonus coefficient.", bounds=_range(0, MAX_COEF), default=0.0)
    gamma: float = _help("Discount factor.", bounds=_range(0, 1), default=1.0)
    lam: float = _help("GAE lambda.", bounds=_range(0, 1), default=0.95)
    whiten_advantages: bool = _help("Whiten advantages over each rollout (gae; the other estimators normalise their "
                                    "own way).", default=True)
    reward_clip: float = _help("Clip the reward-model score to [-c, c] (0 = off).", bounds=_range(0, 1e6), default=5.0)
    normalize_reward: bool = _help("Normalise RM scores with the mean/std saved with the reward model.", default=True)
    rollout_batch_size: int = _help(
        "Responses per rollout (per PPO iteration and process): prompts x samples_per_prompt.",
        bounds=_range(1, MAX_BATCH), default=16
    )
    minibatch_size: int = _help("Samples per PPO minibatch.", bounds=_range(1, MAX_BATCH), default=8)
    ppo_epochs: int = _help("Passes over each rollout.", bounds=_range(1, 1000), default=1)
    max_prompt_length: int = _help("Prompt tokens kept (left-truncated).", bounds=_range(1, MAX_TOKENS), default=128)
    max_new_tokens: int = _help("Tokens generated per response.", bounds=_range(1, MAX_TOKENS), default=32)
    temperature: float = _help("Sampling temperature.", bounds=_range(0, 100, open_lo=True), default=1.0)
    top_k: int = _help("Top-k sampling (0 = off).", bounds=_range(0, 10_000_000), default=0)
    top_p: float = _help("Nucleus sampling p (1.0 = off).", bounds=_range(0, 1, open_lo=True), default=1.0)
    ptx_coef: float = _help("Pretraining (PTX) loss coefficient (0 = off).", bounds=_range(0, MAX_COEF), default=0.0)
    ptx_dataset: DatasetConfig = _help("Text data for the PTX loss.", default_factory=DatasetConfig)
    critic_learning_rate: float = _help("Critic learning rate (0 = the training learning rate).",
                                        bounds=_range(0, 10), default=0.0)
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_plus_plus"] = _help(
        "How advantages are computed. gae: a critic (value model) and GAE. grpo: each response's reward minus its "
        "prompt group's mean, divided by the group's std (see grpo_normalize_std). rloo: the reward minus the mean "
        "reward of the other responses to the same prompt. reinforce_plus_plus: per-token KL in the reward, "
        "rewards-to-go normalised over the whole batch. grpo, rloo and reinforce_plus_plus load and train no critic.",
        default="gae",
    )
    samples_per_prompt: int = _help(
        "Responses sampled per prompt (one group); at least 2 for grpo and rloo. rollout_batch_size counts responses "
        "and must be a multiple of it.", bounds=_range(1, 1024), default=1
    )
    grpo_normalize_std: bool = _help(
        "grpo: divide by the group's reward std; false = Dr. GRPO (only subtract the group mean, so groups of nearly "
        "equal rewards are not blown up).", default=True
    )
    kl_in_loss: bool = _help(
        "Add kl_coef times the k3 KL to the reference to the actor's loss instead of subtracting the KL from the "
        "reward (as GRPO does). The KL metric still uses kl_estimator.", default=False
    )
    rewards: RewardSourcesConfig = _help(
        "Reward sources besides the reward model: a remote endpoint and verifiable rules, summed with weights.",
        default_factory=RewardSourcesConfig,
    )


@dataclass
class DPOOnlineConfig:
    rounds: int = _help(
        "Online iterative DPO rounds: in each, the current policy samples responses to fresh prompts, the reward "
        "model scores them and the best and worst response of each prompt form that round's preference pairs. "
        "0 = offline DPO on the preference pairs of `dataset`.", bounds={"minimum": 0, "maximum": 1000}, default=0
    )
    prompts_per_round: int = _help("Prompts sampled from `dataset` per round.",
                                   bounds={"minimum": 1, "maximum": 1_000_000}, default=64)
    samples_per_prompt: int = _help("Responses sampled per prompt (n of best-of-n / worst-of-n); at least 2.",
                                    bounds={"minimum": 2, "maximum": 1024}, default=8)
    reward_model: ModelConfig = _help("Reward model that scores the sampled responses (a RewardModelJob output).",
                                      default_factory=ModelConfig)
    reward_fn: str = _help(
        "Built-in rule scorer used instead of `reward_model` (tests, demos): `count:<text>` scores a response by how "
        "many times <text> occurs in it. Empty = use the reward model.", default=""
    )
    length_penalty: float = _help(
        "lambda in score = reward - lambda * response tokens, used to pick the best and worst response.",
        bounds={"minimum": 0, "maximum": 1000.0}, default=0.0
    )
    temperature: float = _help("Sampling temperature.", bounds={"minimum": 0, "exclusiveMinimum": True,
                                                                "maximum": 100}, default=1.0)
    top_k: int = _help("Top-k sampling (0 = off).", bounds={"minimum": 0, "maximum": 10_000_000}, default=0)
    top_p: float = _help("Nucleus sampling p (1.0 = off).",
                         bounds={"minimum": 0, "exclusiveMinimum": True, "maximum": 1}, default=1.0)
    max_prompt_length: int = _help("Prompt tokens kept (left-truncated).", bounds={"minimum": 1, "maximum": 1_048_576},
                                   default=128)
    max_new_tokens: int = _help("Tokens generated per response.", bounds={"minimum": 1, "maximum": 1_048_576},
                                default=64)
    epochs_per_round: float = _help("Passes over each round's pairs.",
                                    bounds={"minimum": 0, "exclusiveMinimum": True, "maximum": 1000}, default=1.0)


@dataclass
class DPOConfig:
    policy: ModelConfig = _help("Policy to train (usually an SFT output).", default_factory=ModelConfig)
    reference: ModelConfig = _help("Frozen reference policy; empty = the policy's starting weights.",
                                   default_factory=ModelConfig)
    reference_mode: Literal["initial", "each_round"] = _help(
        "initial: the reference stays `reference` (or the starting policy) for the whole run; each_round: online, "
        "each round's starting policy becomes the reference of that round.", default="initial"
    )
    beta: float = _help("beta: strength of the implicit KL to the reference (about 0.1).",
                        bounds={"minimum": 0, "exclusiveMinimum": True, "maximum": 1000.0}, default=0.1)
    loss: Literal["sigmoid", "ipo", "hinge"] = _help(
        "sigmoid: -log sigmoid(beta * margin) (Rafailov et al. 2023); ipo: (margin - 1 / (2 beta))^2 (Azar et al. "
        "2023); hinge: max(0, 1 - beta * margin) (SLiC). margin = the policy's log-ratio of chosen minus rejected "
        "against the reference.", default="sigmoid"
    )
    label_smoothing: float = _help(
        "Probability that a pair's label is flipped (conservative DPO); sigmoid loss only.",
        bounds={"minimum": 0, "exclusiveMaximum": True, "maximum": 0.5}, default=0.0
    )
    reference_free: bool = _help("Ignore the reference: the margin is the policy's own log-prob difference.",
                                 default=False)
    online: DPOOnlineConfig = _help("Online iterative DPO (rounds > 0); offline when rounds is 0.",
                                    default_factory=DPOOnlineConfig)


@dataclass
class DeepSpeedConfig:
    enabled: bool | None = _help(
        "Wrap trained models with DeepSpeed (false = plain torch). Unset = automatic: plain torch for one "
        "process with zeroStage 0/1 and no offload (faster there), DeepSpeed otherwise.",
        default=None,
    )
    zero_stage: int = _help("ZeRO stage 0-3.", bounds=_range(0, 3), default=0)
    offload_optimizer: bool = _help("Offload optimizer states to CPU memory.", default=False)
    offload_params: bool = _help("Offload parameters to CPU memory (ZeRO-3 only).", default=False)
    bf16: bool = _help("Train in bfloat16.", default=False)
    fp16: bool = _help("Train in float16 with loss scaling.", default=False)
    extra: dict[str, Any] = _help("Extra DeepSpeed config merged over the generated one.", default_factory=dict)


@dataclass
class CheckpointConfig:
    dir: str = _help("Root of this job's checkpoint volume.", default=CHECKPOINT_MOUNT)
    every_steps: int = _help("Checkpoint every N optimizer steps (0 = only at the end and on SIGTERM).",
                             bounds=_range(0, MAX_STEPS), default=50)
    keep_last: int = _help("Keep the newest K checkpoints.", bounds=_range(1, 1000), default=2)
    resume: bool = _help("Resume from the latest checkpoint when one exists.", default=True)


@dataclass
class MetricsConfig:
    port: int = _help("Port of the Prometheus endpoint on the pod IP (0 = disabled).", bounds=_range(0, 65535),
                      default=DEFAULT_METRICS_PORT)
    host: str = _help("Address to bind; empty = $POD_IP or 0.0.0.0.", default="")


@dataclass
class TrainerConfig:
    stage: Literal["sft", "reward", "ppo", "dpo"] = _help("Which training stage to run.", default="sft")
    job: JobIdentity = _help("Identity of the owning job (metric labels, metadata).", default_factory=JobIdentity)
    model: ModelConfig = _help("Starting model (SFT and reward stages).", default_factory=ModelConfig)
    dataset: DatasetConfig = _help("Training data (prompts for PPO and online DPO; preference pairs for offline DPO).",
                                   default_factory=DatasetConfig)
    training: TrainingConfig = _help("Optimisation settings.", default_factory=TrainingConfig)
    reward: RewardConfig = _help("Reward-model settings.", default_factory=RewardConfig)
    sft: SFTConfig = _help("SFT settings.", default_factory=SFTConfig)
    ppo: PPOConfig = _help("PPO settings.", default_factory=PPOConfig)
    dpo: DPOConfig = _help("DPO settings (offline, or online iterative rounds).", default_factory=DPOConfig)
    deepspeed: DeepSpeedConfig = _help("DeepSpeed settings.", default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = _help("Checkpointing and resume.", default_factory=CheckpointConfig)
    metrics: MetricsConfig = _help("Prometheus endpoint.", default_factory=MetricsConfig)
    output_dir: str = _help("Where the final Hugging Face export is written; empty = <checkpoint.dir>/final.",
                            default="")
    inputs: dict[str, str] = _help("Upstream jobs used, name -> path (recorded in the output metadata).",
                                   default_factory=dict)

    @property
    def final_dir(self) -> str:
        return self.output_dir or str(Path(self.checkpoint.dir) / FINAL_SUBDIR)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- parsing -------------------------------------------------------------------------------------

def _check_scalar(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is types.UnionType and type(None) in typing.get_args(tp):  # `X | None`: unset is allowed
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return None if value is None else _check_scalar(value, inner, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover - programming error


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, path)
        else:
            kwargs[name] = _check_scalar(value, tp, path)
    return cls(**kwargs)


def _regex_error(path: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{path}: {pattern!r} is not a valid regular expression ({e}); fix it") from None


# Cross-field rules shared with the operator, which checks a job's spec with them before rendering it: `name`
# turns a trainer field path into the name a message shows (the operator's gives spec.ppo.samplesPerPrompt).
Names = typing.Callable[[str], str]


def _own(path: str) -> str:
    return path


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def deepspeed_errors(ds: DeepSpeedConfig, name: Names = _own) -> list[str]:
    """Precision and offload against the ZeRO stage."""
    out = []
    stage = name("deepspeed.zero_stage")
    if ds.bf16 and ds.fp16:
        out.append(f"{name('deepspeed')}: bf16 and fp16 are both true; choose one")
    if ds.offload_params and ds.zero_stage != 3:
        what = name("deepspeed.offload_params")
        out.append(f"{what}: {_leaf(what)} needs {stage} 3, got {ds.zero_stage}; set {_leaf(stage)} to 3 or turn "
                   f"{_leaf(what)} off")
    if ds.offload_optimizer and ds.zero_stage == 0:
        what = name("deepspeed.offload_optimizer")
        out.append(f"{what}: {_leaf(what)} needs {stage} 1, 2 or 3; set {_leaf(stage)} or turn {_leaf(what)} off")
    return out


def ppo_errors(p: PPOConfig, name: Names = _own) -> list[str]:
    """PPO rules across fields that the operator checks too: batch sizes, groups, critic, the reward's source."""
    out = []
    est, k, rollout = p.advantage_estimator, p.samples_per_prompt, p.rollout_batch_size
    estimator = _leaf(name("ppo.advantage_estimator"))
    if p.minibatch_size > rollout:
        out.append(f"{name('ppo.minibatch_size')}: {p.minibatch_size} is larger than {name('ppo.rollout_batch_size')} "
                   f"({rollout}); make it smaller or equal")
    if k >= 1 and rollout % k:
        out.append(f"{name('ppo.rollout_batch_size')}: {rollout} responses are not whole groups of "
                   f"{name('ppo.samples_per_prompt')} ({k}); use a multiple of {k}")
    if est in CRITIC_FREE_ESTIMATORS:
        if _has_source(p.critic):
            out.append(f"{name('ppo.critic')}: {estimator} {est} uses no critic (no value model is loaded or "
                       f"trained); remove {name('ppo.critic')}, or use {estimator} gae")
        if p.critic_learning_rate > 0:
            out.append(f"{name('ppo.critic_learning_rate')}: {estimator} {est} trains no critic; remove it, or use "
                       f"{estimator} gae")
    if not (p.reward_fn or p.rewards.sources() or _has_source(p.reward_model)):
        out.append(f"{name('ppo.reward_model')}: set a reward model, or a reward source in {name('ppo.rewards')} "
                   "(endpoint, match, length, format)")
    return out


def validate_ppo(p: PPOConfig) -> None:
    """PPO rules across fields: estimator, groups, critic, reward sources."""
    est, k = p.advantage_estimator, p.samples_per_prompt
    if est in GROUP_ESTIMATORS and k < 2:  # (the operator words it for the spec: ppo_spec.errors)
        raise ConfigError(
            f"ppo.samples_per_prompt: {est} compares the responses to one prompt with each other, so it needs at "
            f"least 2 per prompt, got {k}; set ppo.samples_per_prompt >= 2 (e.g. 4)"
        )
    r, sources = p.rewards, p.rewards.sources()
    if p.reward_fn and sources:  # (the operator words it for the spec: ppo_spec.errors)
        raise ConfigError(
            f"ppo.reward_fn: {p.reward_fn!r} cannot be combined with ppo.rewards ({', '.join(sources)}); use the "
            "rules of ppo.rewards (match, length, format) instead"
        )
    for error in ppo_errors(p):
        raise ConfigError(error)
    if p.reward_fn and not (p.reward_fn.startswith("count:") and len(p.reward_fn) > 6):
        raise ConfigError(
            f"ppo.reward_fn: {p.reward_fn!r} is not a known rule; use `count:<text>` or leave it empty "
            "to score with ppo.reward_model or ppo.rewards"
        )
    if r.match.extract:
        _regex_error("ppo.rewards.match.extract", r.match.extract)
    if r.format.pattern:
        _regex_error("ppo.rewards.format.pattern", r.format.pattern)
    if r.length.max_chars and r.length.min_chars > r.length.max_chars:
        raise ConfigError(
            f"ppo.rewards.length: min_chars ({r.length.min_chars}) is larger than max_chars ({r.length.max_chars}); "
            "no response could score"
        )
    if not _has_source(p.actor):
        raise ConfigError("ppo.actor: set path (or hub_id) to the model to use")


def _has_source(m: ModelConfig) -> bool:
    return bool(m.path or m.hub_id or m.init_from_config)


def validate_dpo(d: DPOConfig) -> None:
    """DPO rules across fields: the policy, the online scorer, the loss options."""
    if not _has_source(d.policy):
        raise ConfigError("dpo.policy: set path (or hub_id) to the model to train")
    if d.label_smoothing and d.loss != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing: only the sigmoid loss has label smoothing, the loss is {d.loss!r}; "
                          "set label_smoothing to 0 or loss to sigmoid")
    o = d.online
    if o.rounds == 0:
        if d.reference_mode == "each_round":
            raise ConfigError("dpo.reference_mode: each_round needs online rounds (dpo.online.rounds >= 1); "
                              "use initial for offline DPO")
        return
    if o.reward_fn and _has_source(o.reward_model):
        raise ConfigError("dpo.online.reward_fn: set either reward_fn or reward_model, not both")
    if o.reward_fn and not (o.reward_fn.startswith("count:") and len(o.reward_fn) > 6):
        raise ConfigError(f"dpo.online.reward_fn: {o.reward_fn!r} is not a known rule; use `count:<text>` or "
                          "leave it empty to score with dpo.online.reward_model")
    if not (o.reward_fn or _has_source(o.reward_model)):
        raise ConfigError("dpo.online.reward_model: online DPO scores its samples with a reward model; set "
                          "dpo.online.reward_model.path (a RewardModelJob output), or set dpo.online.rounds to 0 "
                          "for offline DPO on preference pairs")
    if o.samples_per_prompt < 2:
        raise ConfigError(f"dpo.online.samples_per_prompt: a pair needs a best and a worst response, so at least 2 "
                          f"per prompt, got {o.samples_per_prompt}")


def _bounded_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted path, value, field) of every field that declares bounds in its metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _bounded_fields(value, f"{prefix}{f.name}.")
        elif "bounds" in f.metadata:
            yield f"{prefix}{f.name}", value, f


def check_bounds(path: str, value: Any, bounds: dict[str, Any], pattern_help: str = "") -> None:
    """Raise ConfigError when ``value`` breaks one of ``bounds`` (JSON-schema keywords)."""
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = bounds.get("minimum"), bounds.get("maximum")
        if lo is not None and (value <= lo if bounds.get("exclusiveMinimum") else value < lo):
            raise ConfigError(f"{path}: must be {'>' if bounds.get('exclusiveMinimum') else '>='} {lo}, got {value}")
        if hi is not None and (value >= hi if bounds.get("exclusiveMaximum") else value > hi):
            raise ConfigError(f"{path}: must be {'<' if bounds.get('exclusiveMaximum') else '<='} {hi}, got {value}")
    if isinstance(value, str) and value:
        if "maxLength" in bounds and len(value) > bounds["maxLength"]:
            raise ConfigError(f"{path}: at most {bounds['maxLength']} characters, got {len(value)}")
        if "pattern" in bounds and not re.search(bounds["pattern"], value):
            raise ConfigError(f"{path}: {value!r} {pattern_help or 'does not match ' + bounds['pattern']}")


def validate(cfg: TrainerConfig) -> TrainerConfig:
    """Cross-field rules; raises ConfigError naming the field and the fix."""
    for path, value, f in _bounded_fields(cfg):
        check_bounds(path, value, f.metadata["bounds"], f.metadata.get("pattern_help", ""))
    for error in deepspeed_errors(cfg.deepspeed):
        raise ConfigError(error)
    if cfg.stage == "ppo":
        validate_ppo(cfg.ppo)
    elif cfg.stage == "dpo":
        validate_dpo(cfg.dpo)
    else:
        m = cfg.model
        if not (m.path or m.hub_id or m.init_from_config):
            raise ConfigError("model: set path, hub_id or init_from_config to the starting model")
    if not (cfg.dataset.path or cfg.dataset.hub_id):
        raise ConfigError("dataset: set path (or hub_id) to the training data")
    return cfg


def parse_section(cls: type, data: Any, where: str) -> Any:
    """One section (a dataclass) from a plain dict, types checked, no cross-field rules (see ``validate``)."""
    return _from_dict(cls, data, where)


def from_dict(data: Any) -> TrainerConfig:
    """Parse and validate a plain dict (as read from YAML/JSON)."""
    return validate(_from_dict(TrainerConfig, data, ""))


def load_config(path: str | Path, stage: str | None = None) -> TrainerConfig:
    """Read a YAML or JSON config file; errors name the file and the field.

    ``stage`` (from the command line) fills in a config without ``stage`` and must match one that has it.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML/JSON: {e}") from e
    if stage is not None and isinstance(data, dict):
        if data.get("stage", stage) != stage:
            raise ConfigError(f"config file {p}: stage is {data['stage']!r} but the command runs the {stage!r} stage")
        data = {**data, "stage": stage}
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from e


def describe(cls: type = TrainerConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, help) for every field - documentation and drift tests."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append((path, f.metadata.get("help", "")))
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(describe(hints[f.name], path + "."))
    return out
