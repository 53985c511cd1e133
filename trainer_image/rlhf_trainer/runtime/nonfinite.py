"""Optimizer steps skipped for non-finite gradients: counted per model, logged, and fatal when they repeat.

DeepSpeed's mixed-precision optimizers skip a step whose gradients hold NaN/Inf (``engine.skipped_steps``)
and the plain-torch engine does the same (``TorchEngine.step``): the weights stay as they were. A run in
which every step is skipped would still "succeed" without learning anything, so each trained model gets a
:class:`StepGuard` that does the backward pass and the step, counts skipped steps (metric
``rlhf_trainer_skipped_steps_total{model=...}``, one JSON log line each, ``status.progress.skippedSteps``)
and ends the run with exit code 10 (``NonFiniteGradients``) after ``training.max_skipped_steps``
consecutive ones, naming stage, model, step and the last finite loss.

Test hook: ``RLHF_INJECT_NONFINITE_GRADS=MODEL:STEP[:COUNT]`` turns the gradients of optimizer steps
STEP.. STEP+COUNT-1 (1-based; COUNT default: all later steps) of MODEL into NaN while the loss stays
finite - what a faulty attention backward kernel does.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch

from .failure import NonFiniteGradients

ENV_INJECT = "RLHF_INJECT_NONFINITE_GRADS"
MODELS = ("actor", "critic", "policy", "reward")
DEFAULT_LIMIT = 10  # consecutive skipped steps that end an SFT or reward run


def consecutive_limit(cfg) -> int:
    """``training.max_skipped_steps``, or by default: one PPO iteration's optimizer steps for PPO
    (a whole rollout's updates lost), 10 for SFT and reward."""
    if cfg.training.max_skipped_steps > 0:
        return cfg.training.max_skipped_steps
    if cfg.stage == "ppo":
        p = cfg.ppo
        updates = p.ppo_epochs * math.ceil(p.rollout_batch_size / p.minibatch_size)
        return max(1, updates // cfg.training.gradient_accumulation_steps)
    return DEFAULT_LIMIT


def parse_injection(value: str, model: str) -> range | None:
    """The 1-based optimizer steps of ``model`` whose gradients the test hook poisons, if any."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MODELS or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{ENV_INJECT}={value!r}: expected MODEL:STEP[:COUNT] with MODEL one of {', '.join(MODELS)}")
    if parts[0] != model:
        return None
    start = int(parts[1])
    count = int(parts[2]) if len(parts) == 3 else 10**12
    return range(start, start + count)


def _poison(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("nan"))


class StepGuard:
    """Backward pass and optimizer step of one engine, with skipped-step accounting."""

    def __init__(self, stage: str, model: str, limit: int, metrics=None, stream=None):
        if model not in MODELS:
            raise ValueError(f"StepGuard: model must be one of {', '.join(MODELS)}, got {model!r}")
        self.stage, self.model, self.limit = stage, model, max(1, int(limit))
        self.metrics = None
        self.stream = stream or sys.stdout
        self.steps = 0  # optimizer steps attempted (boundaries)
        self.skipped = 0
        self.consecutive = 0
        self.last_finite_loss: float | None = None
        self.inject = parse_injection(os.environ.get(ENV_INJECT, ""), model)
        if metrics is not None:
            self.attach(metrics)

    def state_dict(self) -> dict[str, Any]:
        """The counts a checkpoint carries, so that skips before and after a restart add up (a job that skips
        every step and is preempted in between still fails after ``limit`` consecutive ones)."""
        return {"model": self.model, "steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive,
                "last_finite_loss": self.last_finite_loss}

    def load_state_dict(self, state: dict[str, Any] | None) -> StepGuard:
        """Restore :meth:`state_dict` (None or {}: a checkpoint written before the counts were saved)."""
        if state:
            self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
            self.consecutive = int(state["consecutive"])
            loss = state.get("last_finite_loss")
            self.last_finite_loss = None if loss is None else float(loss)
        return self

    def attach(self, metrics) -> StepGuard:
        """Report to ``metrics`` (a TrainerMetrics); the series exists, at 0, from then on."""
        self.metrics = metrics
        metrics.add_skipped_steps(self.model, 0)
        return self

    def backward_step(self, engine, loss: torch.Tensor, where: str = "") -> bool:
        """``engine.backward(loss)`` then ``engine.step()``; True when an optimizer step was applied.

        Raises NonFiniteGradients when this made ``limit`` consecutive skipped steps, or when the engine
        applied a non-finite gradient (an engine without overflow checks, e.g. DeepSpeed fp32 without ZeRO)."""
        boundary = engine.is_gradient_accumulation_boundary()
        value = float(loss.detach())
        if math.isfinite(value):
            self.last_finite_loss = value
        if boundary and self.inject is not None and (self.steps + 1) in self.inject and loss.requires_grad:
            loss.register_hook(_poison)
        before = engine.skipped_steps
        engine.backward(loss)
        engine.step()
        if not boundary:
            return False
        self.steps += 1
        if engine.skipped_steps == before:
            norm = engine.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                raise NonFiniteGradients(self.failure_message(where, applied=True))
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        self._report(where)
        if self.consecutive >= self.limit:
            raise NonFiniteGradients(self.failure_message(where))
        return False

    def _report(self, where: str) -> None:
        record: dict[str, Any] = {
            "event": "skipped_step", "model": self.model, "optimizer_step": self.steps,
            "consecutive": self.consecutive, "skipped_total": self.skipped,
            "message": f"{self.model} optimizer step {self.steps}{f' ({where})' if where else ''} skipped: "
                       "the gradients are not finite; the weights are unchanged",
        }
        if self.metrics is not None:
            self.metrics.add_skipped_steps(self.model, 1)
            self.metrics.log_event(record)
        else:
            print(json.dumps({"ts": round(time.time(), 3), "stage": self.stage, **record}), file=self.stream,
                  flush=True)

    def failure_message(self, where: str = "", applied: bool = False) -> str:
        loss = "none" if self.last_finite_loss is None else f"{self.last_finite_loss:.6g}"
        at = f"{self.model} optimizer step {self.steps}" + (f" ({where})" if where else "")
        if applied:
            return (f"{self.stage} stage, model {self.model}: the engine applied NaN/Inf gradients at {at} (it has "
                    f"no overflow check); last finite loss {loss}. The weights are no longer finite: use bf16 or a "
                    f"ZeRO stage (they skip such steps), lower training.learning_rate, or check the data")
        return (f"{self.stage} stage, model {self.model}: {self.consecutive} consecutive optimizer steps skipped "
                f"because the gradients were NaN/Inf, up to {at}; last finite loss {loss}; {self.skipped} of "
                f"{self.steps} {self.model} steps skipped in total. The weights stopped changing, so the run was "
                f"stopped: lower training.learning_rate, keep training.max_grad_norm > 0, check the data, or raise "
                f"training.max_skipped_steps (now {self.limit}) to tolerate more")
