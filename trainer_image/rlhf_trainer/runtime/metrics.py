"""Prometheus endpoint and JSON step logs of a trainer process.

Every gauge carries the labels ``namespace``, ``job``, ``stage`` (low cardinality; the operator and
the dashboards select on them). Only the main process (global rank 0) serves and logs; the others
keep a no-op instance, so callers never branch on rank.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .. import contract as c

GAUGES: dict[str, str] = {
    c.M_STEP: "Optimizer steps done.",
    c.M_TOTAL_STEPS: "Optimizer steps planned for the run.",
    c.M_LOSS: "Training loss of the last logged step.",
    c.M_LEARNING_RATE: "Learning rate of the last logged step.",
    c.M_GRAD_NORM: "Gradient norm before clipping.",
    c.M_EPOCH: "Epochs done (fractional).",
    c.M_LAST_CHECKPOINT_STEP: "Step of the newest checkpoint written.",
    c.M_RESUMED_FROM_STEP: "Checkpoint step this run restored at start; -1 when it started fresh.",
    c.M_TOKENS_PER_SECOND: "Training tokens per second (all processes).",
    c.M_RM_ACCURACY: "Reward model pairwise accuracy on the training batch.",
    c.M_RM_EVAL_ACCURACY: "Reward model pairwise accuracy on the eval split.",
    c.M_RM_CHOSEN_MEAN: "Mean reward of chosen responses.",
    c.M_RM_REJECTED_MEAN: "Mean reward of rejected responses.",
    c.M_RM_MARGIN: "Mean reward margin chosen - rejected.",
    c.M_PPO_REWARD_MEAN: "Mean reward-model score of the rollout.",
    c.M_PPO_REWARD_STD: "Standard deviation of the rollout scores.",
    c.M_PPO_KL: "Mean KL(policy || reference) per response.",
    c.M_PPO_KL_COEF: "Current KL penalty coefficient.",
    c.M_PPO_ENTROPY: "Mean policy entropy per token.",
    c.M_PPO_POLICY_LOSS: "PPO clipped surrogate loss.",
    c.M_PPO_VALUE_LOSS: "PPO clipped value loss.",
    c.M_PPO_CLIP_FRACTION: "Fraction of tokens where the policy ratio was clipped.",
    c.M_PPO_APPROX_KL: "Approximate KL between the old and the new policy.",
    c.M_PPO_RESPONSE_LENGTH: "Mean generated response length in tokens.",
    c.M_PPO_ADVANTAGES_MEAN: "Mean advantage.",
    c.M_PPO_RETURNS_MEAN: "Mean return.",
    c.M_PPO_VALUES_MEAN: "Mean critic value.",
    c.M_PPO_REWARD_GROUP_STD: "Mean standard deviation of the rewards within a prompt's group of samples.",
    c.M_PPO_ZERO_VARIANCE_GROUPS: "Fraction of prompt groups whose samples all got the same reward "
                                  "(no GRPO/RLOO signal).",
    c.M_PPO_CRITIC_ENABLED: "1 when a critic is loaded and trained (gae), 0 with a critic-free advantage estimator.",
    c.M_PPO_KL_LOSS: "KL to the reference as a term of the actor's loss (k3; ppo.kl_in_loss).",
    c.M_DPO_LOSS: "DPO loss of the last logged step.",
    c.M_DPO_REWARDS_CHOSEN: "Mean implicit reward beta * (log pi - log ref) of the chosen responses.",
    c.M_DPO_REWARDS_REJECTED: "Mean implicit reward of the rejected responses.",
    c.M_DPO_REWARD_ACCURACY: "Fraction of training pairs whose chosen response has the higher implicit reward "
                             "(ties count half).",
    c.M_DPO_MARGIN: "Mean implicit-reward margin, chosen minus rejected.",
    c.M_DPO_EVAL_REWARD_ACCURACY: "Implicit-reward accuracy on the held-out pairs.",
    c.M_DPO_EVAL_MARGIN: "Mean implicit-reward margin on the held-out pairs.",
    c.M_DPO_ROUND: "Current online DPO round, 1-based (0 = offline).",
    c.M_DPO_ROUNDS: "Planned online DPO rounds (0 = offline).",
    c.M_DPO_BEST_REWARD_MEAN: "Online DPO: mean reward of each prompt's best sample in the current round.",
    c.M_DPO_WORST_REWARD_MEAN: "Online DPO: mean reward of each prompt's worst sample in the current round.",
    c.M_DPO_RESPONSE_LENGTH: "Online DPO: mean sampled response length (tokens) in the current round.",
    c.M_DPO_SKIPPED_GROUPS: "Online DPO: prompts of the current round without a pair (all scores equal).",
}
PHASES = ("generate", "score", "train")
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


def _bind_host(cfg) -> str:
    return cfg.metrics.host or os.environ.get(c.ENV_POD_IP, "") or "0.0.0.0"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cuda_peak_mib() -> float | None:
    """Peak GPU memory allocated by this process so far (JSON log only); None without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _json_value(v: float) -> float | None:
    return v if math.isfinite(v) else None


class TrainerMetrics:
    """Gauges, counters and a histogram for one run, plus one JSON log line per logged step.

    ``log_step`` takes values keyed by the metric names of ``contract``; other keys (e.g.
    ``eval_loss``) only go to the JSON line. Phase durations of PPO go through
    ``set_phase_seconds`` or the keys ``rlhf_ppo_phase_seconds/<phase>``.
    """

    def __init__(self, cfg, is_main: bool | None = None, stream=None):
        self.cfg = cfg
        self.enabled = _is_main_process() if is_main is None else is_main
        self.stream = stream or sys.stdout
        self.labels = {
            "namespace": os.environ.get(c.ENV_JOB_NAMESPACE) or cfg.job.namespace,
            "job": os.environ.get(c.ENV_JOB_NAME) or cfg.job.name,
            "stage": cfg.stage,
        }
        self.registry = CollectorRegistry()
        names = list(c.LABELS)
        self._gauges = {n: Gauge(n, h, names, registry=self.registry) for n, h in GAUGES.items()}
        self._phase = Gauge(c.M_PPO_PHASE_SECONDS, "Seconds spent per PPO phase in the last step.",
                            [*names, "phase"], registry=self.registry)
        self._source = Gauge(c.M_PPO_REWARD_SOURCE_MEAN,
                             "Mean reward of the rollout per reward source (before weights).",
                             [*names, "source"], registry=self.registry)
        self._samples = Counter(c.M_SAMPLES_TOTAL, "Training samples processed.", names, registry=self.registry)
        self._tokens = Counter(c.M_TOKENS_TOTAL, "Training tokens processed.", names, registry=self.registry)
        self._skipped = Counter(c.M_SKIPPED_STEPS, "Optimizer steps skipped because the gradients were NaN/Inf.",
                                list(c.SKIPPED_STEPS_LABELS), registry=self.registry)
        self.skipped_steps: dict[str, int] = {}  # model -> steps skipped in this process's run
        self._ckpt = Histogram(c.M_CHECKPOINT_SECONDS, "Seconds to write a checkpoint.", names,
                               buckets=CHECKPOINT_BUCKETS, registry=self.registry)
        self.server = None
        self._tokens_since_log = 0.0
        self._last_log_time = time.monotonic()
        self.last_values: dict[str, float] = {}

    def _gauge(self, name: str):
        return self._gauges[name].labels(**self.labels)

    def start_server(self) -> int | None:
        """Serve /metrics on the configured host and port; returns the port (None when disabled)."""
        port = self.cfg.metrics.port
        if not self.enabled or port == 0:
            return None
        self.server, _thread = start_http_server(port, addr=_bind_host(self.cfg), registry=self.registry)
        return self.server.server_port

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def set_total_steps(self, n: int) -> None:
        self._gauge(c.M_TOTAL_STEPS).set(n)

    def set_phase_seconds(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown PPO phase {phase!r}; use one of {', '.join(PHASES)}")
        self._phase.labels(**self.labels, phase=phase).set(seconds)

    def add_samples(self, n: int) -> None:
        self._samples.labels(**self.labels).inc(n)

    def add_tokens(self, n: int) -> None:
        self._tokens.labels(**self.labels).inc(n)
        self._tokens_since_log += n

    def add_skipped_steps(self, model: str, n: int = 1) -> None:
        """Count ``n`` skipped optimizer steps of ``model`` (``n`` = 0 creates the series at 0)."""
        self._skipped.labels(**self.labels, model=model).inc(n)
        self.skipped_steps[model] = self.skipped_steps.get(model, 0) + n

    def log_event(self, record: dict[str, Any]) -> None:
        """One JSON line that is not a step record (e.g. a skipped optimizer step)."""
        if self.enabled:
            print(json.dumps({"ts": round(time.time(), 3), "stage": self.cfg.stage, **record}), file=self.stream,
                  flush=True)

    def observe_checkpoint(self, seconds: float, step: int | None = None) -> None:
        self._ckpt.labels(**self.labels).observe(seconds)
        if step is not None:
            self._gauge(c.M_LAST_CHECKPOINT_STEP).set(step)

    def report_resume(self, step: int | None, checkpoint=None, reason: str = "") -> dict[str, Any]:
        """Record where the run starts: the checkpoint step restored (gauge and one JSON line), or -1 when
        ``step`` is None (fresh start; ``reason`` says why when a checkpoint was not even looked for)."""
        value = -1 if step is None else step
        self._gauge(c.M_RESUMED_FROM_STEP).set(value)
        if step is None:
            message = f"{reason or 'no checkpoint found'}, starting at step 0"
        else:
            message = f"resumed from checkpoint step {step}"
        record = {"ts": round(time.time(), 3), "stage": self.cfg.stage, "event": "resume",
                  "resumedFromStep": value, "message": message,
                  **({"checkpoint": str(checkpoint)} if checkpoint is not None else {})}
        if self.enabled:
            print(json.dumps(record), file=self.stream, flush=True)
        return record

    def log_step(self, step: int, values: dict[str, float]) -> dict[str, Any]:
        """Set the gauges named in ``values`` (and the step), print one JSON line; returns the record."""
        now = time.monotonic()
        values = {k: float(v) for k, v in values.items()}
        if c.M_TOKENS_PER_SECOND not in values and self._tokens_since_log:
            values[c.M_TOKENS_PER_SECOND] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
        self._tokens_since_log, self._last_log_time = 0.0, now
        self._gauge(c.M_STEP).set(step)
        for name, v in values.items():
            if name in self._gauges:
                self._gauge(name).set(v)
            elif name.startswith(c.M_PPO_PHASE_SECONDS + "/"):
                self.set_phase_seconds(name.split("/", 1)[1], v)
            elif name.startswith(c.M_PPO_REWARD_SOURCE_MEAN + "/"):
                self._source.labels(**self.labels, source=name.split("/", 1)[1]).set(v)
        self.last_values.update(values)
        record = {"ts": round(time.time(), 3), "stage": self.cfg.stage, "step": step,
                  **{k: _json_value(v) for k, v in values.items()}}
        if (peak := _cuda_peak_mib()) is not None:
            record["cuda_peak_memory_mib"] = peak
        if self.enabled:
            print(json.dumps(record), file=self.stream, flush=True)
        return record
