"""The supervised training loop shared by the SFT and reward stages.

Data position is a pure function of the step: the examples of step ``s`` are a fixed slice of a
seeded per-epoch permutation, split across micro batches and processes. Resuming from a checkpoint
of step ``s`` therefore needs only ``s`` (plus the engine and RNG states) to continue exactly where
the run stopped, and ``P`` processes with micro batch ``B`` see the same examples per step as one
process with micro batch ``P * B``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import contract as c
from ..config import ConfigError, TrainerConfig
from .checkpoint import CheckpointManager
from .failure import DataError, GracefulStop, Preempted, check_finite
from .metrics import TrainerMetrics
from .nonfinite import StepGuard, consecutive_limit

ENGINE_SUBDIR = "model"


@dataclass
class BatchPlan:
    """Which train examples each (step, micro batch, rank) uses."""

    n_examples: int
    micro_batch: int
    world_size: int
    grad_accum: int
    seed: int
    _perm_cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: TrainerConfig, n_examples: int, world_size: int) -> BatchPlan:
        t = cfg.training
        plan = cls(n_examples, t.batch_size, world_size, t.gradient_accumulation_steps, t.seed)
        if plan.steps_per_epoch == 0:
            raise DataError(
                f"the train split has {n_examples} examples, fewer than one optimizer step needs "
                f"(batch_size {t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps} "
                f"x {world_size} processes = {plan.global_batch}); add data or lower training.batch_size"
            )
        return plan

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch  # the last partial batch of an epoch is dropped

    def total_steps(self, max_steps: int, epochs: float) -> int:
        return max_steps if max_steps > 0 else max(1, round(epochs * self.steps_per_epoch))

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            order = list(range(self.n_examples))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm_cache = {epoch: order}
        return self._perm_cache[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return self._permutation(epoch)[start:start + self.micro_batch]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def state(self) -> dict[str, int]:
        return {"n_examples": self.n_examples, "global_batch": self.global_batch, "seed": self.seed}


# micro_step(engine, example indices) -> (loss to backpropagate, stats as sums over the micro batch).
# Stats need the keys "samples" and "tokens"; the loop adds "loss_sum" and "micro_batches".
MicroStep = Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, float]]]
Summarize = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class FitResult:
    step: int
    train: dict[str, float]
    eval: dict[str, float]
    resumed_from: int  # the checkpoint step restored, -1 when started fresh


def _resume(cfg: TrainerConfig, strategy, engine, ckpt: CheckpointManager, plan: BatchPlan,
            metrics: TrainerMetrics) -> tuple[int, dict]:
    """Load the newest checkpoint (if any, after checking its digests); returns its step and metadata."""
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is None:
        metrics.report_resume(None, reason="checkpoint.resume is false" if not cfg.checkpoint.resume else "")
        return 0, {}
    meta = ckpt.verify_for_resume(latest)
    if meta.get("stage") != cfg.stage:
        raise ConfigError(
            f"checkpoint.dir {cfg.checkpoint.dir} holds a {meta.get('stage')} checkpoint ({latest.name}) but this "
            f"run is the {cfg.stage} stage; use an empty checkpoint directory per job"
        )
    if meta.get("data") and meta["data"] != plan.state():
        raise ConfigError(
            f"checkpoint {latest} was written with data plan {meta['data']} but this run has {plan.state()}; "
            f"resume with the same dataset, batch size, processes and seed (or set checkpoint.resume: false)"
        )
    strategy.load(engine, latest / ENGINE_SUBDIR)
    print(f"rlhf-trainer: resumed from {latest} (step {meta['step']})", flush=True)
    metrics.report_resume(int(meta["step"]), latest)
    return int(meta["step"]), meta


def fit(cfg: TrainerConfig, strategy, engine, plan: BatchPlan, total_steps: int, micro_step: MicroStep,
        summarize: Summarize, evaluate: Callable[[], dict[str, float]], metrics: TrainerMetrics,
        stop: GracefulStop) -> FitResult:
    """Train to ``total_steps`` with resume, periodic eval and checkpoints, SIGTERM handling."""
    ckpt = CheckpointManager.from_config(cfg, dist=strategy)
    start, meta = _resume(cfg, strategy, engine, ckpt, plan, metrics)
    metrics.set_total_steps(total_steps)
    last_saved = start if start else None
    train_stats: dict[str, float] = meta.get("metrics", {})
    guard = StepGuard(cfg.stage, "reward" if cfg.stage == "reward" else "policy", consecutive_limit(cfg), metrics)
    eval_stats: dict[str, float] = {}

    def save(step: int) -> None:
        nonlocal last_saved
        t0 = time.monotonic()
        meta = {"stage": cfg.stage, "data": plan.state(), "epoch": plan.epoch(step), "metrics": train_stats}
        ckpt.save(step, lambda d: strategy.save(engine, d / ENGINE_SUBDIR), meta)
        metrics.observe_checkpoint(time.monotonic() - t0, step)
        last_saved = step

    step = start
    while step < total_steps:
        if stop.should_stop(step, strategy):
            if last_saved != step and step > 0:
                save(step)
            raise Preempted(f"stop requested (SIGTERM) at step {step} of {total_steps}; checkpoint saved, "
                            f"the next start resumes from it")
        engine.train()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step())
        sums: dict[str, float] = {}
        for micro in range(plan.grad_accum):
            loss, stats = micro_step(engine, plan.indices(step, micro, strategy.rank))
            guard.backward_step(engine, loss, where=f"training step {step + 1}")
            stats = {**stats, "loss_sum": float(loss.detach()), "micro_batches": 1.0}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        step += 1
        keys = sorted(sums)
        reduced = strategy.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        sums = dict(zip(keys, torch.as_tensor(reduced).tolist(), strict=True))
        loss_value = sums["loss_sum"] / sums["micro_batches"]
        check_finite(loss_value, "training loss", step)
        metrics.add_samples(int(sums["samples"]))
        metrics.add_tokens(int(sums["tokens"]))
        if step % cfg.training.log_every == 0 or step == total_steps:
            grad_norm = engine.get_global_grad_norm()
            train_stats = {
                c.M_LOSS: loss_value,
                c.M_LEARNING_RATE: lr,
                c.M_EPOCH: plan.epoch(step),
                **({c.M_GRAD_NORM: float(grad_norm)} if grad_norm is not None else {}),
                c.M_SKIPPED_STEPS: float(guard.skipped),
                **summarize(sums),
            }
            metrics.log_step(step, train_stats)
        if cfg.training.eval_every and step % cfg.training.eval_every == 0 and step < total_steps:
            eval_stats = evaluate()
            if eval_stats:
                metrics.log_step(step, eval_stats)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            save(step)
    if last_saved != step:
        save(step)
    eval_stats = evaluate()
    if eval_stats:
        metrics.log_step(step, eval_stats)
    return FitResult(step, train_stats, eval_stats, start if meta else -1)
