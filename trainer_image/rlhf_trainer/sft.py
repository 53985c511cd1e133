"""SFT stage: causal-LM loss on the response tokens (prompt tokens masked unless ``sft.loss_on_prompt``).

``loss = mean over unmasked positions t of -log p(x_t | x_<t)``; a micro batch's loss averages
over its response tokens. With ``sft.packing`` consecutive examples are concatenated into sequences
of up to ``max_length`` tokens (fewer pad tokens; attention is causal across example boundaries).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import contract as c
from . import models
from .config import TrainerConfig
from .data import SFTExample, load_sft_splits, token_cache
from .data.encoding import IGNORE_INDEX, collate_sft, encode_sft_many, pack
from .export import build_metadata, export_final
from .runtime.failure import GracefulStop
from .runtime.loop import BatchPlan, fit
from .runtime.metrics import TrainerMetrics
from .runtime.strategy import Strategy


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions (labels shifted by one), and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


class SFTData:
    """Examples of one split as (ids, labels), tokenised once up front (cached on the claim,
    data.token_cache) and packed when ``sft.packing``; a step only pads and stacks them."""

    def __init__(self, cfg: TrainerConfig, tokenizer, examples: list[SFTExample], split: str = "train"):
        max_length, loss_on_prompt = cfg.training.max_length, cfg.sft.loss_on_prompt
        encoded = token_cache.cached(
            f"sft-{split}", tokenizer, {"max_length": max_length, "loss_on_prompt": loss_on_prompt}, examples,
            lambda items: encode_sft_many(tokenizer, items, max_length, loss_on_prompt),
            token_cache.cache_dir(cfg.checkpoint.dir))
        self.items = pack(encoded, max_length) if cfg.sft.packing else encoded

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.items[i]


class SFTTrainer:
    def __init__(self, cfg: TrainerConfig, strategy: Strategy, tokenizer, train: SFTData, evals: SFTData):
        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.train, self.evals = train, evals
        self.engine: Any = None

    def _loss_sum(self, engine, items) -> tuple[torch.Tensor, int, int]:
        batch = {k: v.to(self.strategy.device) for k, v in collate_sft(self.tokenizer, items).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, n = lm_loss_sum(logits, batch["labels"])
        return loss_sum, n, int(batch["attention_mask"].sum())

    def micro_step(self, engine, idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, n, tokens = self._loss_sum(engine, [self.train[i] for i in idx])
        loss = loss_sum / max(n, 1)
        return loss, {"samples": float(len(idx)), "tokens": float(tokens), "target_tokens": float(n)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-averaged loss (and perplexity) on the eval split, sharded over processes."""
        if not len(self.evals):
            return {}
        s, bs = self.strategy, self.cfg.training.batch_size
        mine = list(range(s.rank, len(self.evals), s.world_size))
        n_batches = math.ceil(math.ceil(len(self.evals) / s.world_size) / bs)
        self.engine.eval()
        total, count = 0.0, 0.0
        for b in range(n_batches):
            chunk = mine[b * bs:(b + 1) * bs]
            loss_sum, n, _ = self._loss_sum(self.engine, [self.evals[i] for i in (chunk or [0])])
            if chunk:
                total, count = total + float(loss_sum), count + n
        total = s.all_reduce_sum(total)
        count = s.all_reduce_sum(count)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def summarize(sums: dict[str, float]) -> dict[str, float]:
    return {"target_tokens": sums["target_tokens"]}


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Fine-tune a causal LM on prompt/response (or text) data and export it."""
    with GracefulStop() as stop:
        splits = load_sft_splits(cfg.dataset)
        strategy = Strategy(cfg)
        tokenizer = models.load_tokenizer(cfg.model)
        train, evals = SFTData(cfg, tokenizer, splits.train), SFTData(cfg, tokenizer, splits.eval, "eval")
        plan = BatchPlan.from_config(cfg, len(train), strategy.world_size)
        total = plan.total_steps(cfg.training.max_steps, cfg.training.epochs)
        strategy.setup()
        model = models.load_causal_lm(cfg.model, tokenizer)
        engine = strategy.prepare(model, cfg.training.learning_rate, total)
        trainer = SFTTrainer(cfg, strategy, tokenizer, train, evals)
        trainer.engine = engine
        metrics = TrainerMetrics(cfg, is_main=strategy.is_main)
        metrics.start_server()
        try:
            result = fit(cfg, strategy, engine, plan, total, trainer.micro_step, summarize, trainer.evaluate,
                         metrics, stop)
            state_dict = strategy.full_state_dict(engine)
            final_metrics = {**result.train, **result.eval}
            meta = build_metadata(cfg, result.step, final_metrics, {
                "dataset_format": splits.format, "train_examples": len(splits.train),
                "eval_examples": len(splits.eval), "packing": cfg.sft.packing,
            })
            final = export_final(
                cfg, lambda d: models.save_causal_lm(strategy.unwrap(engine), tokenizer, d, state_dict),
                meta, strategy.is_main)
            strategy.barrier()
        finally:
            metrics.stop_server()
        return {"step": result.step, "metrics": final_metrics, "final_dir": str(final),
                "resumed_from": result.resumed_from, "loss": final_metrics.get(c.M_LOSS)}
