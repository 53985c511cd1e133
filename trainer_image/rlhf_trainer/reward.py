"""Reward stage: a pairwise (Bradley-Terry) reward model on preference pairs.

Loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)`` (Ouyang et al. 2022; the margin
variant of Llama 2). Chosen and rejected texts of a micro batch go through the model as one batch
of 2B sequences; each score is read at the sequence's last real token (EOS). Metrics on train and
eval: accuracy (r_chosen > r_rejected), mean chosen and rejected reward, mean margin.

At the end the train-set score statistics (mean, std) are saved with the model, so PPO can
normalise rewards.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import contract as c
from . import models
from .config import TrainerConfig
from .data import PreferencePair, load_preference_splits, token_cache
from .data.encoding import collate_encoded_pairs, encode_pairs
from .export import build_metadata, export_final
from .ops import pairwise_loss
from .runtime.failure import GracefulStop
from .runtime.loop import BatchPlan, fit
from .runtime.metrics import TrainerMetrics
from .runtime.strategy import Strategy

STATS_MAX_PAIRS = 512  # train pairs scored for the normalisation statistics (1024 responses)


def pair_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Sums over a batch of pairs (summed again over micro batches and processes)."""
    return {
        "samples": float(r_chosen.numel()),
        "correct": float((r_chosen > r_rejected).sum()),
        "chosen_sum": float(r_chosen.sum()),
        "rejected_sum": float(r_rejected.sum()),
    }


def summarize(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Accuracy, mean chosen/rejected reward and margin from summed ``pair_stats``."""
    n = max(sums["samples"], 1.0)
    chosen, rejected = sums["chosen_sum"] / n, sums["rejected_sum"] / n
    if prefix:  # eval: only accuracy has a metric name of its own; the rest goes to the JSON log
        out = {c.M_RM_EVAL_ACCURACY: sums["correct"] / n, "eval_chosen_mean": chosen,
               "eval_rejected_mean": rejected, "eval_margin": chosen - rejected}
        if "loss_sum" in sums:
            out["eval_loss"] = sums["loss_sum"] / n
        return out
    return {c.M_RM_ACCURACY: sums["correct"] / n, c.M_RM_CHOSEN_MEAN: chosen,
            c.M_RM_REJECTED_MEAN: rejected, c.M_RM_MARGIN: chosen - rejected}


def encode_split(cfg: TrainerConfig, tokenizer, pairs: list[PreferencePair],
                 split: str) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of every pair, tokenised once (and cached on the claim, data.token_cache)."""
    max_length = cfg.training.max_length
    return token_cache.cached(f"pairs-{split}", tokenizer, {"max_length": max_length}, pairs,
                              lambda items: encode_pairs(tokenizer, items, max_length),
                              token_cache.cache_dir(cfg.checkpoint.dir))


class RewardTrainer:
    """The pieces of one reward run that the generic loop calls back into. The pairs are tokenised once, up
    front; a step only pads and stacks their ids."""

    def __init__(self, cfg: TrainerConfig, strategy: Strategy, tokenizer, train: list[PreferencePair],
                 evals: list[PreferencePair]):
        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.train = encode_split(cfg, tokenizer, train, "train")
        self.evals = encode_split(cfg, tokenizer, evals, "eval")
        self.engine: Any = None

    def _scores(self, engine, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch = collate_encoded_pairs(self.tokenizer, pairs)
        batch = {k: v.to(self.strategy.device) for k, v in batch.items()}
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        n = len(pairs)
        return scores[:n], scores[n:], int(batch["attention_mask"].sum())

    def micro_step(self, engine, idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, tokens = self._scores(engine, [self.train[i] for i in idx])
        loss = pairwise_loss(chosen, rejected, self.cfg.reward.margin)
        return loss, {**pair_stats(chosen.detach(), rejected.detach()), "tokens": float(tokens)}

    @torch.no_grad()
    def _sharded_sums(self, pairs: list[tuple[list[int], list[int]]], fn) -> dict[str, float]:
        """Sum ``fn(chosen, rejected)`` over ``pairs``, each process taking every world_size-th pair."""
        s = self.strategy
        mine = pairs[s.rank::s.world_size]
        bs = self.cfg.training.batch_size
        # Every process runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        n_batches = math.ceil(math.ceil(len(pairs) / s.world_size) / bs)
        self.engine.eval()
        sums: dict[str, float] = {}
        for b in range(n_batches):
            chunk = mine[b * bs:(b + 1) * bs]
            chosen, rejected, _ = self._scores(self.engine, chunk or pairs[:1])  # a dummy forward if none left
            part = fn(chosen, rejected)
            for k, v in part.items():
                v = v if chunk else 0.0
                sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        reduced = s.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, torch.as_tensor(reduced).tolist(), strict=True))

    def evaluate(self) -> dict[str, float]:
        if not self.evals:
            return {}
        margin = self.cfg.reward.margin

        def fn(ch, rj):
            loss_sum = float(pairwise_loss(ch, rj, margin)) * ch.numel()
            return {**pair_stats(ch, rj), "loss_sum": loss_sum}

        return summarize(self._sharded_sums(self.evals, fn), prefix="eval")

    def score_stats(self) -> dict[str, float]:
        """Mean and std of the scores of the (first STATS_MAX_PAIRS) train pairs' responses."""
        sums = self._sharded_sums(self.train[:STATS_MAX_PAIRS], lambda ch, rj: {
            "n": float(ch.numel() + rj.numel()),
            "s": float(ch.sum() + rj.sum()),
            "s2": float((ch.double() ** 2).sum() + (rj.double() ** 2).sum()),
        })
        n = sums["n"]
        mean = sums["s"] / n
        var = max(sums["s2"] / n - mean**2, 0.0) * n / max(n - 1, 1)
        return {"mean": mean, "std": math.sqrt(var), "n": int(n)}


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Train, evaluate and export a reward model; returns the final metrics and the export path."""
    with GracefulStop() as stop:
        splits = load_preference_splits(cfg.dataset)  # data errors surface before any model loads
        strategy = Strategy(cfg)
        plan = BatchPlan.from_config(cfg, len(splits.train), strategy.world_size)
        total = plan.total_steps(cfg.training.max_steps, cfg.training.epochs)
        strategy.setup()
        tokenizer = models.load_tokenizer(cfg.model)
        model = models.build_reward_model(cfg.model, tokenizer, cfg.reward.head)
        engine = strategy.prepare(model, cfg.training.learning_rate, total)
        trainer = RewardTrainer(cfg, strategy, tokenizer, splits.train, splits.eval)
        trainer.engine = engine
        metrics = TrainerMetrics(cfg, is_main=strategy.is_main)
        metrics.start_server()
        try:
            result = fit(cfg, strategy, engine, plan, total, trainer.micro_step, summarize,
                         trainer.evaluate, metrics, stop)
            stats = trainer.score_stats()
            state_dict = strategy.full_state_dict(engine)
            final_metrics = {**result.train, **result.eval}
            meta = build_metadata(cfg, result.step, final_metrics, {
                "reward_stats": stats, "head": cfg.reward.head, "dataset_format": splits.format,
                "train_pairs": len(splits.train), "eval_pairs": len(splits.eval),
            })
            final = export_final(cfg, lambda d: models.save_reward_model(
                strategy.unwrap(engine), tokenizer, d, stats, cfg.training.max_length, state_dict),
                meta, strategy.is_main)
            strategy.barrier()
        finally:
            metrics.stop_server()
        return {"step": result.step, "metrics": final_metrics, "reward_stats": stats, "final_dir": str(final),
                "resumed_from": result.resumed_from}
