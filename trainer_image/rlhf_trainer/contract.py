"""What the operator and the trainer agree on besides the config: env vars, metric names, exit codes.

Importable without torch. The operator reads progress from the trainer's Prometheus endpoint using
these names; the Grafana dashboard and alert rules query them too.
"""

import dataclasses

# Environment of a trainer pod (set by the operator).
ENV_CONFIG = "RLHF_CONFIG"  # path of the rendered TrainerConfig YAML
ENV_JOB_NAME = "RLHF_JOB_NAME"
ENV_JOB_NAMESPACE = "RLHF_JOB_NAMESPACE"
ENV_JOB_KIND = "RLHF_JOB_KIND"
ENV_POD_NAME = "POD_NAME"
ENV_POD_IP = "POD_IP"
ENV_TERMINATION_LOG = "RLHF_TERMINATION_LOG"  # default /dev/termination-log
ENV_CPU_REQUEST = "RLHF_CPU_REQUEST"  # spec.resources.cpu rounded up (downward API); sets torch threads
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# Metric labels: low cardinality only.
LABELS = ("namespace", "job", "stage")

# Gauges every stage exports (name -> help). Values are set each logged step.
M_STEP = "rlhf_trainer_step"
M_TOTAL_STEPS = "rlhf_trainer_total_steps"
M_LOSS = "rlhf_trainer_loss"
M_LEARNING_RATE = "rlhf_trainer_learning_rate"
M_GRAD_NORM = "rlhf_trainer_grad_norm"
M_EPOCH = "rlhf_trainer_epoch"
M_LAST_CHECKPOINT_STEP = "rlhf_trainer_last_checkpoint_step"
M_TOKENS_PER_SECOND = "rlhf_trainer_tokens_per_second"
M_SAMPLES_TOTAL = "rlhf_trainer_samples_total"  # counter
M_TOKENS_TOTAL = "rlhf_trainer_tokens_total"  # counter
M_CHECKPOINT_SECONDS = "rlhf_trainer_checkpoint_duration_seconds"  # histogram
M_RESUMED_FROM_STEP = "rlhf_trainer_resumed_from_step"  # checkpoint step restored at start, -1 when started fresh
# Counter of optimizer steps skipped for NaN/Inf gradients; the one metric with an extra label, model =
# actor|critic (PPO), policy (SFT), reward (reward model). Progress and messages use the sum over models.
M_SKIPPED_STEPS = "rlhf_trainer_skipped_steps_total"
SKIPPED_STEPS_LABELS = (*LABELS, "model")

# Reward-model gauges (split label: train|eval would add cardinality 2; we use separate names).
M_RM_ACCURACY = "rlhf_reward_accuracy"
M_RM_EVAL_ACCURACY = "rlhf_reward_eval_accuracy"
M_RM_CHOSEN_MEAN = "rlhf_reward_chosen_mean"
M_RM_REJECTED_MEAN = "rlhf_reward_rejected_mean"
M_RM_MARGIN = "rlhf_reward_margin"

# PPO gauges.
M_PPO_REWARD_MEAN = "rlhf_ppo_reward_mean"
M_PPO_REWARD_STD = "rlhf_ppo_reward_std"
M_PPO_KL = "rlhf_ppo_kl"
M_PPO_KL_COEF = "rlhf_ppo_kl_coef"
M_PPO_ENTROPY = "rlhf_ppo_entropy"
M_PPO_POLICY_LOSS = "rlhf_ppo_policy_loss"
M_PPO_VALUE_LOSS = "rlhf_ppo_value_loss"
M_PPO_CLIP_FRACTION = "rlhf_ppo_clip_fraction"
M_PPO_APPROX_KL = "rlhf_ppo_approx_kl"
M_PPO_RESPONSE_LENGTH = "rlhf_ppo_response_length"
M_PPO_ADVANTAGES_MEAN = "rlhf_ppo_advantages_mean"
M_PPO_RETURNS_MEAN = "rlhf_ppo_returns_mean"
M_PPO_VALUES_MEAN = "rlhf_ppo_values_mean"
M_PPO_PHASE_SECONDS = "rlhf_ppo_phase_seconds"  # gauge with extra label phase=generate|score|train
M_PPO_REWARD_GROUP_STD = "rlhf_ppo_reward_group_std"  # mean std of the rewards within a prompt's group
M_PPO_ZERO_VARIANCE_GROUPS = "rlhf_ppo_zero_variance_group_fraction"  # groups whose rewards are all equal
M_PPO_REWARD_SOURCE_MEAN = "rlhf_ppo_reward_source_mean"  # gauge with extra label source=model|endpoint|match|...
M_PPO_CRITIC_ENABLED = "rlhf_ppo_critic_enabled"  # 1: a critic is loaded and trained (gae); 0: critic-free
M_PPO_KL_LOSS = "rlhf_ppo_kl_loss"  # the k3 KL term of the actor's loss (ppo.kl_in_loss)

# DPO gauges (training batches; the eval_ ones on the held-out split). rewards_* are the implicit rewards
# beta * (log pi - log pi_ref) of the chosen and rejected responses, margin their difference.
M_DPO_LOSS = "rlhf_dpo_loss"
M_DPO_REWARDS_CHOSEN = "rlhf_dpo_rewards_chosen"
M_DPO_REWARDS_REJECTED = "rlhf_dpo_rewards_rejected"
M_DPO_REWARD_ACCURACY = "rlhf_dpo_reward_accuracy"
M_DPO_MARGIN = "rlhf_dpo_margin"
M_DPO_EVAL_REWARD_ACCURACY = "rlhf_dpo_eval_reward_accuracy"
M_DPO_EVAL_MARGIN = "rlhf_dpo_eval_margin"
M_DPO_ROUND = "rlhf_dpo_round"  # online: the current round, 1-based (0 = offline)
M_DPO_ROUNDS = "rlhf_dpo_rounds"  # online: planned rounds (0 = offline)
M_DPO_BEST_REWARD_MEAN = "rlhf_dpo_best_reward_mean"  # online: mean reward of each prompt's chosen (best) sample
M_DPO_WORST_REWARD_MEAN = "rlhf_dpo_worst_reward_mean"  # online: mean reward of the rejected (worst) samples
M_DPO_RESPONSE_LENGTH = "rlhf_dpo_response_length"  # online: mean sampled response length (tokens)
M_DPO_SKIPPED_GROUPS = "rlhf_dpo_skipped_groups"  # online: prompts of the round with no pair (all scores equal)

# The progress contract, in one table: each row is one status.progress key, the metric it is read from
# (on the metrics endpoint while the trainer runs, and in its success termination message), int or float,
# the stages that report it (empty: every stage), its description in the CRDs, and the `kubectl get`
# column that shows it, if any. A new progress value is one row here; then regenerate the CRDs
# (python -m rlhf_operator.crdgen). The operator's parser is rlhf_operator.progress.from_metrics.
@dataclasses.dataclass(frozen=True)
class ProgressField:
    key: str  # status.progress key
    metric: str  # metric name
    type: type  # int or float
    help: str  # description of status.progress.<key>
    stages: tuple[str, ...] = ()  # stages that report it; () = all
    column: str = ""  # printer column name, shown for column_stages
    column_help: str = ""
    column_stages: tuple[str, ...] = ()  # () = the stages that report it
    summed: bool = False  # one series per value of an extra label (e.g. model): the progress value is their sum

    def reported_by(self, stage: str) -> bool:
        return not self.stages or stage in self.stages

    def column_for(self, stage: str) -> bool:
        return bool(self.column) and self.reported_by(stage) and (not self.column_stages or stage in self.column_stages)


PROGRESS = (
    ProgressField("step", M_STEP, int, "Latest optimizer step."),
    ProgressField("totalSteps", M_TOTAL_STEPS, int, "Planned optimizer steps."),
    ProgressField("loss", M_LOSS, float, "Latest training loss.",
                  column="Loss", column_help="Latest training loss.", column_stages=("sft",)),
    ProgressField("accuracy", M_RM_EVAL_ACCURACY, float, "Latest held-out pairwise accuracy (reward model).",
                  stages=("reward",), column="Accuracy", column_help="Latest held-out pairwise accuracy."),
    ProgressField("reward", M_PPO_REWARD_MEAN, float, "Latest mean reward (PPO).",
                  stages=("ppo",), column="Reward", column_help="Latest mean reward of the rollouts."),
    ProgressField("kl", M_PPO_KL, float, "Latest KL to the reference policy (PPO).", stages=("ppo",)),
    ProgressField("rewardAccuracy", M_DPO_REWARD_ACCURACY, float,
                  "Latest fraction of preference pairs whose implicit reward ranks chosen above rejected (DPO).",
                  stages=("dpo",), column="Accuracy",
                  column_help="Latest fraction of pairs the policy ranks right (implicit reward, DPO)."),
    ProgressField("margin", M_DPO_MARGIN, float,
                  "Latest mean implicit-reward margin, chosen minus rejected (DPO).", stages=("dpo",)),
    ProgressField("round", M_DPO_ROUND, int, "Current online DPO round, 1-based (0 = offline DPO).",
                  stages=("dpo",)),
    ProgressField("rounds", M_DPO_ROUNDS, int, "Planned online DPO rounds (0 = offline DPO).", stages=("dpo",)),
    ProgressField("bestReward", M_DPO_BEST_REWARD_MEAN, float,
                  "Mean reward of the chosen (best-of-n) responses of the latest online DPO round.", stages=("dpo",)),
    ProgressField("worstReward", M_DPO_WORST_REWARD_MEAN, float,
                  "Mean reward of the rejected (worst-of-n) responses of the latest online DPO round.",
                  stages=("dpo",)),
    ProgressField("checkpointStep", M_LAST_CHECKPOINT_STEP, int, "Step of the newest complete checkpoint."),
    ProgressField("resumedFromStep", M_RESUMED_FROM_STEP, int,
                  "Checkpoint step the current trainer pod restored at its start, as the trainer reports it; -1 "
                  "when it started fresh (no checkpoint). Absent until reported."),
    ProgressField("skippedSteps", M_SKIPPED_STEPS, int,
                  "Optimizer steps the current trainer pod skipped because their gradients were NaN/Inf (all trained "
                  "models together); training.maxSkippedSteps consecutive ones fail the job (NonFiniteGradients).",
                  summed=True),
)
# Metric names the operator copies into status.progress (status key -> metric name).
PROGRESS_FIELDS = {f.key: f.metric for f in PROGRESS}


def stage_progress_keys(stage: str) -> frozenset[str]:
    """status.progress keys that mean something for a stage."""
    return frozenset(f.key for f in PROGRESS if f.reported_by(stage))


def printer_column(stage: str) -> ProgressField:
    """The progress value `kubectl get` shows for a stage's jobs (exactly one per stage)."""
    (field,) = (f for f in PROGRESS if f.column_for(stage))
    return field

# Exit codes of the trainer CLI.
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2  # bad config: retrying will not help
EXIT_DATA_ERROR = 3  # bad or missing dataset
EXIT_MODEL_ERROR = 4  # unreadable model path
EXIT_NUMERIC_ERROR = 5  # NaN/Inf loss
EXIT_CHECKPOINT_ERROR = 7  # a checkpoint's files do not match their digests: changed after it was written
EXIT_REWARD_ENDPOINT_ERROR = 8  # the reward endpoint kept failing (timeouts, 5xx) after its retries: retried
EXIT_REWARD_ENDPOINT_REFUSED = 9  # the reward endpoint refused the request (4xx) or answered garbage: permanent
EXIT_NONFINITE = 10  # training.max_skipped_steps consecutive optimizer steps had NaN/Inf gradients: permanent
EXIT_PREEMPTED = 143  # SIGTERM: checkpoint written, resume later
# Exit codes after which the operator must not retry (the input is wrong, not the machine).
PERMANENT_EXIT_CODES = (EXIT_CONFIG_ERROR, EXIT_DATA_ERROR, EXIT_MODEL_ERROR, EXIT_CHECKPOINT_ERROR,
                        EXIT_REWARD_ENDPOINT_REFUSED, EXIT_NONFINITE)
