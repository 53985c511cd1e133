"""DPO stage: direct preference optimisation, offline on preference pairs or online in iterative rounds.

Per pair, with sequence log-probs summed over the *response* tokens (``ops.sequence_logprobs``) of the
policy pi and the frozen reference, ``h = (pi_w - pi_l) - (ref_w - ref_l)`` and the loss is sigmoid
(``-log sigmoid(beta h)``, optionally label-smoothed), ipo or hinge (``ops.dpo_loss``). The implicit
rewards ``beta (pi - ref)`` of chosen and rejected give the metrics: reward accuracy (chosen above
rejected; a tie counts half, so an untrained policy sits at 0.5) and margin.

Reference log-probs are computed without gradients once per pair set: offline once at the start (with
the policy's starting weights, or ``dpo.reference``), online once per round (``reference_mode``: the
starting policy for the whole run, or each round's starting policy) and saved with the round's pairs.
Training is the resumable loop of ``runtime.loop`` (checkpoints, SIGTERM, skipped-step guard).

Online (``dpo.online.rounds`` > 0), each round: the current policy samples ``samples_per_prompt``
responses to each of ``prompts_per_round`` prompts (the PPO sampler), the reward model (normalised with
its saved statistics) or ``reward_fn`` scores them, each prompt's best and worst response by
``reward - length_penalty * tokens`` form a pair (ties skipped), the pairs are written to
``<checkpoint.dir>/rounds/NN/pairs.jsonl`` and the policy trains on them for a fixed number of steps
(``dpo_rounds``). A pod resumed inside a round reads that round's pairs back instead of sampling again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import contract as c
from . import data, models, ops
from .config import ConfigError, TrainerConfig
from .data import PreferencePair, token_cache
from .data.encoding import IGNORE_INDEX, encode_prompt, encode_sft_many, pad_batch
from .data.formats import Record, SFTExample
from .dpo_rounds import (
    RoundPlan,
    checkpoint_every,
    read_round,
    remove_rounds_after,
    round_dir,
    slot_pair,
    steps_per_round,
    write_round,
)
from .export import build_metadata, export_final
from .ppo import PromptSchedule, disable_dropout, iteration_seed, left_pad
from .ppo_rollout import sample_responses
from .ppo_scorers import RewardModelScorer, Scorer, rule_scorer
from .runtime.failure import DataError, GracefulStop, ModelError
from .runtime.loop import BatchPlan, fit
from .runtime.metrics import TrainerMetrics
from .runtime.strategy import Strategy, resolve_use_deepspeed

# (chosen ids, chosen labels, rejected ids, rejected labels): labels are IGNORE_INDEX on the prompt
Item = tuple[list[int], list[int], list[int], list[int]]
# Model types whose LM head is the output embedding applied to the base model's last hidden state (no logit
# scaling or soft-capping): for them only the labelled positions go through the head.
HEAD_ONLY_ON_LABELS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
LOGIT_CHUNK_ELEMENTS = 1 << 24  # logits the LM head builds at once: 64 MiB in fp32


def log(message: str) -> None:
    print(f"rlhf-trainer dpo: {message}", file=sys.stderr, flush=True)


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ops.gather_logprobs(head(hidden), targets)


def head_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                  recompute: bool = True) -> torch.Tensor:
    """``log softmax(head(hidden))[target]`` for (N, H) hidden states, ``chunk_tokens`` rows at a time. With
    gradients and ``recompute``, each chunk's logits are rebuilt in the backward pass instead of being kept, so
    at most one chunk's (chunk, V) logits exist at any time."""
    parts = []
    for i in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[i:i + chunk_tokens], targets[i:i + chunk_tokens]
        if recompute and torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, h, y, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, y))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class SequenceLogProbs(nn.Module):
    """A causal LM whose forward returns each sequence's summed log-prob of its labelled tokens (B,).

    Wrapping the LM keeps the engines (DeepSpeed, DDP) in charge of the forward. For the model types of
    HEAD_ONLY_ON_LABELS only the response positions go through the LM head, in chunks whose logits are
    recomputed in the backward pass: the (B, L, V) logits are never built, which is most of a step's memory
    with a large vocabulary (``recompute_head`` off: chunks are kept for the backward, e.g. under ZeRO-3).
    """

    def __init__(self, lm: nn.Module, recompute_head: bool = True, chunk_elements: int = LOGIT_CHUNK_ELEMENTS):
        super().__init__()
        self.lm = lm
        self.head_on_labels = getattr(lm.config, "model_type", "") in HEAD_ONLY_ON_LABELS
        self.recompute_head = recompute_head
        vocab = getattr(lm.config, "vocab_size", None) or 1
        self.chunk_tokens = max(16, chunk_elements // vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.head_on_labels:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return ops.sequence_logprobs(logits, labels)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logp = head_logprobs(self.lm.get_output_embeddings(), hidden[:, :-1][keep], target[keep], self.chunk_tokens,
                             self.recompute_head)
        rows = keep.nonzero()[:, 0]
        return torch.zeros(input_ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def collate_items(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: the B chosen first, then the B rejected."""
    ids = [it[0] for it in items] + [it[2] for it in items]
    labels = [it[1] for it in items] + [it[3] for it in items]
    return pad_batch(ids, pad_id, labels)


def encode_preference_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> list[Item]:
    """Prompt and each response tokenised as SFT does (chat template if any, response ends with EOS,
    prompt labels masked), so the log-probs cover exactly the response tokens."""
    chosen = encode_sft_many(tokenizer, [SFTExample(p.prompt, p.chosen, p.messages) for p in pairs], max_length)
    rejected = encode_sft_many(tokenizer, [SFTExample(p.prompt, p.rejected, p.messages) for p in pairs], max_length)
    return [(ci, cl, ri, rl) for (ci, cl), (ri, rl) in zip(chosen, rejected, strict=True)]


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Sums over a batch of implicit rewards; a tie counts half a correct pair (chance = 0.5)."""
    return {"samples": float(chosen.numel()),
            "correct": float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum()),
            "chosen_sum": float(chosen.sum()), "rejected_sum": float(rejected.sum())}


def item_from_pair(p: dict[str, Any]) -> tuple[Item, tuple[float, float]]:
    """A saved online pair -> the training item (the sampled token ids) and its reference log-probs."""
    prompt = list(p["prompt_ids"])
    masked = [IGNORE_INDEX] * len(prompt)
    item = (prompt + p["chosen_ids"], masked + p["chosen_ids"], prompt + p["rejected_ids"], masked + p["rejected_ids"])
    return item, (float(p["reference_chosen_logp"]), float(p["reference_rejected_logp"]))


class DPOTrainer:
    """The pieces of one DPO run the generic loop calls back into, and the online rounds."""

    def __init__(self, cfg: TrainerConfig, strategy: Strategy, tokenizer, engine, metrics: TrainerMetrics):
        self.cfg, self.d, self.strategy, self.tokenizer = cfg, cfg.dpo, strategy, tokenizer
        self.engine, self.metrics = engine, metrics
        self.online = cfg.dpo.online.rounds > 0
        self.train: list[Item] = []
        self.train_ref = torch.zeros(0, 2)
        self.evals: list[Item] = []
        self.eval_ref = torch.zeros(0, 2)
        # online
        self.plan: RoundPlan | None = None
        self.records: list[Record] = []
        self.schedule: PromptSchedule | None = None
        self.scorer: Scorer | None = None
        self.reference: nn.Module | None = None  # frozen initial policy (online, reference_mode initial)
        self.round_index = -1
        self.round_values: dict[str, float] = {}
        self.generated_rounds: list[int] = []
        self.loaded_rounds: list[int] = []
        self.round_summaries: dict[int, dict[str, Any]] = {}

    # -- log-probs --

    def _forward_module(self, engine):
        """The engine for training; its bare module for no-grad passes (no DDP bookkeeping), except under
        ZeRO-3 where the engine gathers the partitioned parameters."""
        s = self.strategy
        if s.use_deepspeed and self.cfg.deepspeed.zero_stage == 3:
            return engine
        return s.unwrap(engine) if hasattr(engine, "module") else engine

    def _logps(self, model, items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch = {k: v.to(self.strategy.device) for k, v in collate_items(items, self.tokenizer.pad_token_id).items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = len(items)
        return out[:n].float(), out[n:].float(), int(batch["attention_mask"].sum())

    @torch.no_grad()
    def reference_logps(self, model, items: Sequence[Item]) -> torch.Tensor:
        """(N, 2) float32 reference log-probs (chosen, rejected) of ``items`` (CPU), without gradients."""
        if self.d.reference_free or not items:
            return torch.zeros(len(items), 2)
        was_training = model.training
        model.eval()
        bs = self.cfg.training.batch_size
        out = []
        for start in range(0, len(items), bs):
            ch, rj, _ = self._logps(model, items[start:start + bs])
            out.append(torch.stack([ch, rj], 1).cpu())
        model.train(was_training)
        return torch.cat(out).float()

    def _loss(self, pc, pr, ref: torch.Tensor) -> ops.DPOLoss:
        ref = ref.to(pc.device)
        return ops.dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.d.beta, self.d.loss, self.d.label_smoothing,
                            self.d.reference_free)

    # -- the loop's callbacks --

    def _batch(self, idx: list) -> tuple[list[Item], torch.Tensor]:
        if not self.online:
            return [self.train[i] for i in idx], self.train_ref[idx]
        r, first = idx[0]
        self.ensure_round(r, r * self.plan.steps_per_round + first // self.plan.global_batch)
        n = len(self.train)
        picks = [slot_pair(s, n, self.cfg.training.seed, r) for _, s in idx]
        return [self.train[i] for i in picks], self.train_ref[picks]

    def micro_step(self, engine, idx: list) -> tuple[torch.Tensor, dict[str, float]]:
        items, ref = self._batch(idx)
        pc, pr, tokens = self._logps(engine, items)
        out = self._loss(pc, pr, ref)
        return out.loss, {**pair_stats(out.chosen_rewards, out.rejected_rewards), "tokens": float(tokens)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["samples"], 1.0)
        chosen, rejected = sums["chosen_sum"] / n, sums["rejected_sum"] / n
        return {
            c.M_DPO_LOSS: sums["loss_sum"] / max(sums["micro_batches"], 1.0),
            c.M_DPO_REWARDS_CHOSEN: chosen, c.M_DPO_REWARDS_REJECTED: rejected,
            c.M_DPO_REWARD_ACCURACY: sums["correct"] / n, c.M_DPO_MARGIN: chosen - rejected,
            c.M_DPO_ROUND: float(self.round_index + 1 if self.online else 0),
            c.M_DPO_ROUNDS: float(self.d.online.rounds),
            **self.round_values,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pairs (offline): reward accuracy, margin, loss; sharded over processes."""
        if self.online or not self.evals:
            return {}
        s, bs = self.strategy, self.cfg.training.batch_size
        mine = list(range(s.rank, len(self.evals), s.world_size))
        n_batches = math.ceil(math.ceil(len(self.evals) / s.world_size) / bs)
        model = self._forward_module(self.engine)
        model.eval()
        sums: dict[str, float] = {}
        for b in range(n_batches):
            chunk = mine[b * bs:(b + 1) * bs]
            use = chunk or [0]  # every process runs the same number of forwards (ZeRO-3 gathers collectively)
            pc, pr, _ = self._logps(model, [self.evals[i] for i in use])
            out = self._loss(pc, pr, self.eval_ref[use])
            part = {**pair_stats(out.chosen_rewards, out.rejected_rewards), "loss_sum": float(out.loss) * len(use)}
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + (v if chunk else 0.0)
        keys = sorted(sums)
        reduced = s.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        sums = dict(zip(keys, torch.as_tensor(reduced).tolist(), strict=True))
        n = max(sums["samples"], 1.0)
        chosen, rejected = sums["chosen_sum"] / n, sums["rejected_sum"] / n
        return {c.M_DPO_EVAL_REWARD_ACCURACY: sums["correct"] / n, c.M_DPO_EVAL_MARGIN: chosen - rejected,
                "eval_rewards_chosen": chosen, "eval_rewards_rejected": rejected, "eval_loss": sums["loss_sum"] / n}

    # -- online rounds --

    def ensure_round(self, r: int, step: int) -> None:
        """Make round ``r``'s pairs the training set: read them back when this plan already wrote them
        (a resumed pod), else sample, score, select and write them."""
        if r == self.round_index:
            return
        o, cfg = self.d.online, self.cfg
        if self.round_index < 0 and self.strategy.is_main:  # first round of this process: drop stale later ones
            for stale in remove_rounds_after(cfg.checkpoint.dir, r):
                log(f"removed {stale}: written after the checkpoint this run resumed from")
        directory = round_dir(cfg.checkpoint.dir, r)
        loaded = read_round(directory, self.plan.state()) if cfg.checkpoint.resume else None
        if loaded is not None:
            pairs, summary = loaded
            self.loaded_rounds.append(r + 1)
            log(f"round {r + 1}/{o.rounds}: {len(pairs)} pairs read back from {directory} (not sampled again)")
        else:
            pairs, summary = self.generate_round(r)
            if self.strategy.is_main:
                write_round(directory, pairs, summary)
            self.strategy.barrier()
            self.generated_rounds.append(r + 1)
            log(f"round {r + 1}/{o.rounds}: {len(pairs)} pairs from {summary['prompts']} prompts "
                f"({summary['skipped_groups']} skipped: all scores equal) written to {directory}")
        if not pairs:
            raise DataError(
                f"online DPO round {r + 1}: every one of the {summary['prompts']} prompts got {o.samples_per_prompt} "
                f"responses with equal scores, so there is no preference pair to learn from (the policy would not "
                f"change); raise dpo.online.temperature or samples_per_prompt, or check the reward model / reward_fn"
            )
        decoded = [item_from_pair(p) for p in pairs]
        self.train = [it for it, _ in decoded]
        self.train_ref = torch.tensor([ref for _, ref in decoded], dtype=torch.float32)
        self.round_index = r
        self.round_values = {k: float(summary[k]) for k in (c.M_DPO_BEST_REWARD_MEAN, c.M_DPO_WORST_REWARD_MEAN,
                                                            c.M_DPO_RESPONSE_LENGTH, c.M_DPO_SKIPPED_GROUPS)}
        self.round_summaries[r + 1] = summary
        self.metrics.log_step(step, {c.M_DPO_ROUND: float(r + 1), c.M_DPO_ROUNDS: float(o.rounds),
                                     **self.round_values, "round_pairs": float(len(pairs))})
        self.engine.train()

    @torch.no_grad()
    def generate_round(self, r: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Sample, score and pair this process's prompts of round ``r``; all processes' pairs, gathered."""
        o, s, tok = self.d.online, self.strategy, self.tokenizer
        n = o.samples_per_prompt
        records = [self.records[i] for i in self.schedule.indices(r, s.rank)]
        policy = self._forward_module(self.engine)
        lm = s.unwrap(self.engine).lm
        lm.eval()
        gen = torch.Generator(device=s.device).manual_seed(iteration_seed(self.cfg.training.seed, r, s.rank, 1))
        pairs: list[dict[str, Any]] = []
        sums = {"best": 0.0, "worst": 0.0, "length": 0.0, "skipped": 0.0, "prompts": 0.0, "samples": 0.0}
        chunk = max(1, self.cfg.training.batch_size)
        for start in range(0, len(records), chunk):
            recs = records[start:start + chunk]
            prompt_ids = [encode_prompt(tok, rec.prompt, o.max_prompt_length, rec.messages) for rec in recs]
            query, query_mask = (x.to(s.device) for x in left_pad([p for p in prompt_ids for _ in range(n)],
                                                                   tok.pad_token_id))
            response, response_mask = sample_responses(
                lm, query, query_mask, max_new_tokens=o.max_new_tokens, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, generator=gen)
            lengths = response_mask.sum(1).cpu()
            ids = [row[: int(k)].tolist() for row, k in zip(response.cpu(), lengths, strict=True)]
            texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
            raw = self.scorer([rec for rec in recs for _ in range(n)], texts).float().cpu()
            stats = self.scorer.stats
            rewards = ops.normalize_scores(raw, float(stats["mean"]), float(stats["std"])) if stats else raw
            rw, ln = rewards.view(-1, n), lengths.view(-1, n).float()
            selected, skipped = ops.best_worst_pairs(rw, ln, o.length_penalty)
            score = rw.double() - o.length_penalty * ln.double()
            best, worst = score.argmax(1), score.argmin(1)
            rows = torch.arange(len(recs))
            sums["best"] += float(rw[rows, best].sum())
            sums["worst"] += float(rw[rows, worst].sum())
            sums["length"] += float(ln.sum())
            sums["skipped"] += skipped
            sums["prompts"] += len(recs)
            sums["samples"] += len(recs) * n
            for i, b, w in selected:
                rec = recs[i]
                pairs.append({
                    "prompt": rec.prompt, "chosen": texts[i * n + b], "rejected": texts[i * n + w],
                    "chosen_reward": float(rw[i, b]), "rejected_reward": float(rw[i, w]),
                    "chosen_score": float(score[i, b]), "rejected_score": float(score[i, w]),
                    "chosen_tokens": int(ln[i, b]), "rejected_tokens": int(ln[i, w]),
                    "prompt_ids": prompt_ids[i], "chosen_ids": ids[i * n + b], "rejected_ids": ids[i * n + w],
                })
        reference = policy if self.d.reference_mode == "each_round" else self.reference
        items = [item_from_pair({**p, "reference_chosen_logp": 0.0, "reference_rejected_logp": 0.0})[0]
                 for p in pairs]
        ref = self.reference_logps(reference, items) if reference is not None else torch.zeros(len(items), 2)
        for p, (rc, rr) in zip(pairs, ref.tolist(), strict=True):
            p["reference_chosen_logp"], p["reference_rejected_logp"] = rc, rr
        if s.world_size > 1 and s.distributed:
            gathered: list[Any] = [None] * s.world_size
            torch.distributed.all_gather_object(gathered, (pairs, sums))
            pairs = [p for part, _ in gathered for p in part]
            sums = {k: sum(part[k] for _, part in gathered) for k in sums}
        prompts = max(sums["prompts"], 1.0)
        summary = {
            "round": r + 1, "rounds": o.rounds, "pairs": len(pairs), "prompts": int(sums["prompts"]),
            "skipped_groups": int(sums["skipped"]), "samples_per_prompt": n, "length_penalty": o.length_penalty,
            "reference_mode": self.d.reference_mode, "plan": self.plan.state(),
            c.M_DPO_BEST_REWARD_MEAN: sums["best"] / prompts, c.M_DPO_WORST_REWARD_MEAN: sums["worst"] / prompts,
            c.M_DPO_RESPONSE_LENGTH: sums["length"] / max(sums["samples"], 1.0),
            c.M_DPO_SKIPPED_GROUPS: sums["skipped"],
        }
        return pairs, summary


# --- setup ---------------------------------------------------------------------------------------


def _has_source(m) -> bool:
    return bool(m.path or m.hub_id or m.init_from_config)


def build_scorer(cfg: TrainerConfig, strategy: Strategy) -> Scorer:
    """``reward_fn`` or the reward model with its tokenizer and saved statistics (as PPO loads it)."""
    o = cfg.dpo.online
    if o.reward_fn:
        return rule_scorer(o.reward_fn)
    if not o.reward_model.path:
        raise ModelError("dpo.online.reward_model.path: online DPO needs a saved reward model directory (a "
                         "RewardModelJob output), or dpo.online.reward_fn")
    rm, rm_tokenizer, stats = models.load_reward_model(o.reward_model.path)
    strategy.prepare_frozen(rm)
    return RewardModelScorer(rm, rm_tokenizer, stats, batch_size=cfg.training.batch_size)


def online_plan(cfg: TrainerConfig, world_size: int, n_prompts: int) -> RoundPlan:
    o, t = cfg.dpo.online, cfg.training
    if t.max_steps and t.max_steps % o.rounds:
        raise ConfigError(f"training.max_steps: online DPO runs max_steps / rounds steps per round, and "
                          f"{t.max_steps} is not a multiple of dpo.online.rounds ({o.rounds}); use a multiple, or "
                          "0 to size each round by dpo.online.epochs_per_round")
    if o.prompts_per_round % world_size:
        raise ConfigError(f"dpo.online.prompts_per_round: {o.prompts_per_round} prompts cannot be split evenly over "
                          f"{world_size} processes; use a multiple of {world_size}")
    if cfg.deepspeed.zero_stage == 3 and resolve_use_deepspeed(cfg, world_size):
        raise ConfigError("deepspeed.zero_stage: online DPO samples with the policy and does not gather ZeRO-3 "
                          "partitions for it yet; use zero_stage 0, 1 or 2")
    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    per_round = steps_per_round(o.prompts_per_round, o.epochs_per_round, global_batch, t.max_steps, o.rounds)
    d = cfg.dpo
    # What a round's pairs depend on: a saved round is reused only by a run that shares all of it.
    identity = {"prompts": n_prompts, "prompts_per_round": o.prompts_per_round,
                "samples_per_prompt": o.samples_per_prompt, "world_size": world_size,
                "policy": d.policy.path or d.policy.hub_id or "init_from_config",
                "reference": d.reference.path or d.reference.hub_id, "reference_mode": d.reference_mode,
                "reference_free": d.reference_free, "scorer": o.reward_fn or o.reward_model.path,
                "length_penalty": o.length_penalty, "temperature": o.temperature, "top_k": o.top_k,
                "top_p": o.top_p, "max_prompt_length": o.max_prompt_length, "max_new_tokens": o.max_new_tokens}
    return RoundPlan(o.rounds, per_round, t.batch_size, world_size, t.gradient_accumulation_steps, t.seed, identity)


def _check_positions(lm, cfg: TrainerConfig) -> None:
    o = cfg.dpo.online
    limit = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    if limit and o.max_prompt_length + o.max_new_tokens > limit:
        raise ConfigError(f"dpo.online.max_prompt_length ({o.max_prompt_length}) + max_new_tokens "
                          f"({o.max_new_tokens}) exceeds the policy's {limit} positions; lower one of them")


def _encode_split(cfg: TrainerConfig, tokenizer, pairs: list[PreferencePair], split: str) -> list[Item]:
    max_length = cfg.training.max_length
    return [tuple(x) for x in token_cache.cached(
        f"dpo-{split}", tokenizer, {"max_length": max_length}, pairs,
        lambda items: encode_preference_pairs(tokenizer, items, max_length),
        token_cache.cache_dir(cfg.checkpoint.dir))]


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Train (or resume) a DPO policy, offline or in online rounds, and export it."""
    with GracefulStop() as stop:
        d = cfg.dpo
        online = d.online.rounds > 0
        if online:  # data errors surface before any model loads
            records, splits = data.load_prompt_records(cfg.dataset).train, None
        else:
            records, splits = [], data.load_preference_splits(cfg.dataset)
        strategy = Strategy(cfg)
        tokenizer = models.load_tokenizer(d.policy)
        if online:
            plan: Any = online_plan(cfg, strategy.world_size, len(records))
            total = plan.total_steps
        else:
            train_items = _encode_split(cfg, tokenizer, splits.train, "train")
            eval_items = _encode_split(cfg, tokenizer, splits.eval, "eval")
            plan = BatchPlan.from_config(cfg, len(train_items), strategy.world_size)
            total = plan.total_steps(cfg.training.max_steps, cfg.training.epochs)
        strategy.setup()
        scorer = build_scorer(cfg, strategy) if online else None  # a wrong reward model fails before the policy loads
        lm = disable_dropout(models.load_causal_lm(d.policy, tokenizer))  # two passes of one pair must agree
        if online:
            _check_positions(lm, cfg)
        frozen_reference = None
        if not d.reference_free and _has_source(d.reference):
            frozen_reference = SequenceLogProbs(disable_dropout(models.load_causal_lm(d.reference, tokenizer)))
        elif online and not d.reference_free and d.reference_mode == "initial":
            frozen_reference = SequenceLogProbs(copy.deepcopy(lm))  # the starting weights, before any resume
        if frozen_reference is not None:
            strategy.prepare_frozen(frozen_reference)
        zero3 = strategy.use_deepspeed and cfg.deepspeed.zero_stage == 3  # partitioned head: no recompute
        engine = strategy.prepare(SequenceLogProbs(lm, recompute_head=not zero3), cfg.training.learning_rate, total)
        metrics = TrainerMetrics(cfg, is_main=strategy.is_main)
        metrics.start_server()
        try:
            trainer = DPOTrainer(cfg, strategy, tokenizer, engine, metrics)
            fit_cfg = cfg
            if online:
                trainer.plan, trainer.records = plan, records
                trainer.schedule = PromptSchedule(len(records), d.online.prompts_per_round // strategy.world_size,
                                                  strategy.world_size, cfg.training.seed)
                trainer.scorer = scorer
                trainer.reference = frozen_reference
                every = checkpoint_every(cfg.checkpoint.every_steps, plan.steps_per_round)
                fit_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=every))
            else:
                # Reference log-probs once, before training (and before a resume loads later weights): from
                # dpo.reference, else the policy's starting weights.
                ref_model = frozen_reference or trainer._forward_module(engine)
                trainer.train, trainer.evals = train_items, eval_items
                t0 = time.perf_counter()
                trainer.train_ref = trainer.reference_logps(ref_model, train_items)
                trainer.eval_ref = trainer.reference_logps(ref_model, eval_items)
                metrics.log_event({"event": "reference_logps", "pairs": len(train_items) + len(eval_items),
                                   "seconds": round(time.perf_counter() - t0, 3)})
                ref_model = frozen_reference = None  # offline: not needed any more, free its memory
            result = fit(fit_cfg, strategy, engine, plan, total, trainer.micro_step, trainer.summarize,
                         trainer.evaluate, metrics, stop)
            state_dict = strategy.full_state_dict(engine)
            if state_dict is not None:
                state_dict = {k.removeprefix("lm."): v for k, v in state_dict.items()}
            final_metrics = {**result.train, **result.eval}
            extra: dict[str, Any] = {"loss": d.loss, "beta": d.beta, "reference_mode": d.reference_mode,
                                     "reference_free": d.reference_free}
            if online:
                extra.update(rounds=d.online.rounds, steps_per_round=plan.steps_per_round,
                             round_summaries={k: {m: v for m, v in s.items() if m != "plan"}
                                              for k, s in sorted(trainer.round_summaries.items())})
            else:
                extra.update(dataset_format=splits.format, train_pairs=len(splits.train),
                             eval_pairs=len(splits.eval))
            meta = build_metadata(cfg, result.step, final_metrics, extra)
            final = export_final(cfg, lambda out: models.save_causal_lm(strategy.unwrap(engine).lm, tokenizer, out,
                                                                        state_dict), meta, strategy.is_main)
            strategy.barrier()
        finally:
            metrics.stop_server()
        if strategy.is_main:
            acc = final_metrics.get(c.M_DPO_EVAL_REWARD_ACCURACY, final_metrics.get(c.M_DPO_REWARD_ACCURACY))
            log(f"done: {result.step} steps, reward accuracy {acc}, margin {final_metrics.get(c.M_DPO_MARGIN)}; "
                f"model exported to {final}")
        return {"step": result.step, "metrics": final_metrics, "final_dir": str(final),
                "resumed_from": result.resumed_from, "rounds_generated": trainer.generated_rounds,
                "rounds_loaded": trainer.loaded_rounds, "round_summaries": trainer.round_summaries}
