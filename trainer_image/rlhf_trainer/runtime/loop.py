"""The training loop every stage runs, and the supervised stages' batches.

:func:`run_loop` owns what a resumable run needs whatever its step is: resume from the newest checkpoint,
periodic checkpoints, the checkpoint on SIGTERM (preemption) or after a retryable error, the skipped-step
counters carried across restarts, and the step count and metrics. A stage supplies its step function and
its state (:class:`Resumable`); :func:`fit` is the supervised step (SFT, reward, offline DPO), PPO
supplies one iteration.

Data position is a pure function of the step: the examples of step ``s`` are a fixed slice of a
seeded per-epoch permutation, split across micro batches and processes. Resuming from a checkpoint
of step ``s`` therefore needs only ``s`` (plus the engine and RNG states) to continue exactly where
the run stopped, and ``P`` processes with micro batch ``B`` see the same examples per step as one
process with micro batch ``P * B``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


# --- the resumable loop every stage runs ---------------------------------------------------------


@dataclass
class Resumable:
    """What a stage gives :func:`run_loop` so that the loop can checkpoint it and resume it."""

    save: Callable[[Path], None]  # write the stage's engines and own state into a checkpoint dir (every process)
    load: Callable[[Path], None]  # restore them from one (every process)
    plan: dict[str, Any]  # what a resumed run must share with its checkpoint (data order, batch, processes, seed)
    plan_key: str = "data"  # the plan's key in the checkpoint metadata
    plan_hint: str = "dataset, batch size, processes and seed"  # what to keep the same (error message)
    extra_meta: Callable[[int], dict[str, Any]] | None = None  # more metadata for the checkpoint of a step
    guards: Sequence[StepGuard] = ()  # skipped-step counters: reported, and carried across restarts


# step(index, log) -> the values of step index + 1: the metrics to log (when `log`; a stage may leave them out
# otherwise) and the counts "samples" and "tokens", which the loop takes out and adds to the counters.
Step = Callable[[int, bool], dict[str, float]]


@dataclass
class LoopResult:
    step: int  # steps done
    values: dict[str, float]  # the newest logged values (the checkpoint's when no step ran)
    resumed_from: int  # the checkpoint step restored, -1 when started fresh
    meta: dict[str, Any]  # that checkpoint's metadata ({} when started fresh)


def resume(cfg: TrainerConfig, ckpt: CheckpointManager, stage: Resumable, metrics: TrainerMetrics) -> dict:
    """Load the newest checkpoint (if any, after checking its digests) into ``stage``; returns its metadata."""
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is None:
        metrics.report_resume(None, reason="checkpoint.resume is false" if not cfg.checkpoint.resume else "")
        return {}
    meta = ckpt.verify_for_resume(latest)
    if meta.get("stage") != cfg.stage:
        raise ConfigError(
            f"checkpoint.dir {cfg.checkpoint.dir} holds a {meta.get('stage')} checkpoint ({latest.name}) but this "
            f"run is the {cfg.stage} stage; use an empty checkpoint directory per job"
        )
    saved = meta.get(stage.plan_key)
    if saved is not None and saved != stage.plan:
        raise ConfigError(
            f"checkpoint {latest} was written with the plan {saved} but this run has {stage.plan}; resume with the "
            f"same {stage.plan_hint} (or set checkpoint.resume: false)"
        )
    stage.load(latest)
    for guard in stage.guards:  # consecutive skipped steps add up across restarts
        guard.load_state_dict((meta.get("skip_guards") or {}).get(guard.model))
    print(f"rlhf-trainer: resumed from {latest} (step {meta['step']})", flush=True)
    metrics.report_resume(int(meta["step"]), latest)
    return meta


def run_loop(cfg: TrainerConfig, strategy, stage: Resumable, total_steps: int, step: Step, metrics: TrainerMetrics,
             stop: GracefulStop, after_step: Callable[[int, dict[str, float]], None] | None = None,
             save_on: tuple[type[BaseException], ...] = ()) -> LoopResult:
    """Run ``step`` up to ``total_steps`` steps: resume from the newest checkpoint, count and log each step, write
    a checkpoint every ``checkpoint.every_steps`` and at the end, and at a step boundary on SIGTERM (then raise
    Preempted) or after one of the ``save_on`` errors (then re-raise it), so the next start resumes there.
    ``after_step(steps done, values)`` runs after each step (evaluation)."""
    ckpt = CheckpointManager.from_config(cfg, dist=strategy)
    for guard in stage.guards:
        if guard.metrics is None:
            guard.attach(metrics)
    meta = resume(cfg, ckpt, stage, metrics)
    start = int(meta["step"]) if meta else 0
    metrics.set_total_steps(total_steps)
    last_saved = start if meta else None
    values: dict[str, float] = dict(meta.get("metrics") or {})

    def save(at: int) -> None:
        nonlocal last_saved
        t0 = time.monotonic()
        record = {"stage": cfg.stage, stage.plan_key: stage.plan, **(stage.extra_meta(at) if stage.extra_meta else {}),
                  "metrics": values}
        if stage.guards:
            record["skip_guards"] = {g.model: g.state_dict() for g in stage.guards}
        ckpt.save(at, stage.save, record)
        metrics.observe_checkpoint(time.monotonic() - t0, at)
        last_saved = at

    done = start
    while done < total_steps:
        if stop.should_stop(done, strategy):
            if last_saved != done and done > 0:
                save(done)
            raise Preempted(f"stop requested (SIGTERM) at step {done} of {total_steps}; checkpoint saved, "
                            f"the next start resumes from it")
        log = (done + 1) % cfg.training.log_every == 0 or done + 1 == total_steps
        try:
            out = step(done, log)
        except save_on:  # nothing lost: the retried pod resumes at this step
            if last_saved != done and done > 0:
                save(done)
            raise
        done += 1
        metrics.add_samples(int(out.pop("samples", 0)))
        metrics.add_tokens(int(out.pop("tokens", 0)))
        if out:
            values = out
        if log:
            metrics.log_step(done, values)
        if after_step is not None:
            after_step(done, values)
        if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0:
            save(done)
    if last_saved != done:
        save(done)
    return LoopResult(done, values, start if meta else -1, meta)


# --- the supervised stages (SFT, reward, offline DPO) ---------------------------------------------


def fit(cfg: TrainerConfig, strategy, engine, plan: BatchPlan, total_steps: int, micro_step: MicroStep,
        summarize: Summarize, evaluate: Callable[[], dict[str, float]], metrics: TrainerMetrics,
        stop: GracefulStop) -> FitResult:
    """Train to ``total_steps`` optimizer steps of micro batches (gradient accumulation) through :func:`run_loop`,
    with periodic evaluation."""
    guard = StepGuard(cfg.stage, "reward" if cfg.stage == "reward" else "policy", consecutive_limit(cfg), metrics)
    eval_stats: dict[str, float] = {}

    def train_step(index: int, log: bool) -> dict[str, float]:
        engine.train()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step())
        sums: dict[str, float] = {}
        for micro in range(plan.grad_accum):
            loss, stats = micro_step(engine, plan.indices(index, micro, strategy.rank))
            guard.backward_step(engine, loss, where=f"training step {index + 1}")
            stats = {**stats, "loss_sum": float(loss.detach()), "micro_batches": 1.0}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        reduced = strategy.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        sums = dict(zip(keys, torch.as_tensor(reduced).tolist(), strict=True))
        loss_value = sums["loss_sum"] / sums["micro_batches"]
        check_finite(loss_value, "training loss", index + 1)
        out: dict[str, float] = {}
        if log:
            grad_norm = engine.get_global_grad_norm()
            out = {
                c.M_LOSS: loss_value,
                c.M_LEARNING_RATE: lr,
                c.M_EPOCH: plan.epoch(index + 1),
                **({c.M_GRAD_NORM: float(grad_norm)} if grad_norm is not None else {}),
                c.M_SKIPPED_STEPS: float(guard.skipped),
                **summarize(sums),
            }
        return {**out, "samples": sums["samples"], "tokens": sums["tokens"]}

    def evaluate_between(done: int, _values: dict[str, float]) -> None:
        nonlocal eval_stats
        if cfg.training.eval_every and done % cfg.training.eval_every == 0 and done < total_steps:
            eval_stats = evaluate()
            if eval_stats:
                metrics.log_step(done, eval_stats)

    stage = Resumable(
        save=lambda d: strategy.save(engine, d / ENGINE_SUBDIR),
        load=lambda d: strategy.load(engine, d / ENGINE_SUBDIR),
        plan=plan.state(), extra_meta=lambda step: {"epoch": plan.epoch(step)}, guards=[guard],
    )
    result = run_loop(cfg, strategy, stage, total_steps, train_step, metrics, stop, after_step=evaluate_between)
    eval_stats = evaluate()
    if eval_stats:
        metrics.log_step(result.step, eval_stats)
    return FitResult(result.step, result.values, eval_stats, result.resumed_from)
