"""What the operator and the trainer agree on besides the config: env vars, metric names, exit codes.

Importable without torch. The operator reads progress from the trainer's Prometheus endpoint using
these names; the Grafana dashboard and alert rules query them too.
"""

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

# Metric names the operator copies into status.progress (status key -> metric name).
PROGRESS_FIELDS = {
    "step": M_STEP,
    "totalSteps": M_TOTAL_STEPS,
    "loss": M_LOSS,
    "accuracy": M_RM_EVAL_ACCURACY,
    "reward": M_PPO_REWARD_MEAN,
    "kl": M_PPO_KL,
    "checkpointStep": M_LAST_CHECKPOINT_STEP,
    "resumedFromStep": M_RESUMED_FROM_STEP,
}

# Exit codes of the trainer CLI.
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2  # bad config: retrying will not help
EXIT_DATA_ERROR = 3  # bad or missing dataset
EXIT_MODEL_ERROR = 4  # unreadable model path
EXIT_NUMERIC_ERROR = 5  # NaN/Inf loss
EXIT_CHECKPOINT_ERROR = 7  # a checkpoint's files do not match their digests: changed after it was written
EXIT_PREEMPTED = 143  # SIGTERM: checkpoint written, resume later
# Exit codes after which the operator must not retry (the input is wrong, not the machine).
PERMANENT_EXIT_CODES = (EXIT_CONFIG_ERROR, EXIT_DATA_ERROR, EXIT_MODEL_ERROR, EXIT_CHECKPOINT_ERROR)
