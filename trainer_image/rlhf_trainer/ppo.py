"""PPO stage: actor, reference, critic and scorer; rollouts, advantages and clipped PPO updates; resumable.

One *iteration* (the step of the metrics and checkpoints) is:

1. generate: sample ``ppo.rollout_batch_size`` responses per process, ``ppo.samples_per_prompt`` of them
   (one group) per left-padded prompt;
2. score: the reward model (own tokenizer; response text re-encoded), a rule, or the weighted sum of
   the reward sources (endpoint, rules) scores each response; actor, reference and (with gae) critic
   give per-token log-probs and values;
3. advantages (``ppo_rollout.finish_rollout``): gae - rewards ``-beta * KL_t`` per token plus the
   normalised, clipped score at the last real token, GAE, whitened; grpo / rloo - each sequence reward
   against its prompt's group; reinforce_plus_plus - rewards-to-go normalised over the batch. With
   ``ppo.kl_in_loss`` the KL leaves the reward and enters the actor's loss (k3);
4. train: ``ppo.ppo_epochs`` passes over shuffled minibatches - clipped surrogate minus entropy bonus
   (plus PTX, plus KL) for the actor, clipped value loss for the critic (gae only), each through its engine;
5. the KL controller is updated, metrics logged, a checkpoint written every ``checkpoint.every_steps``.

The critic-free estimators (grpo, rloo, reinforce_plus_plus) never load, train or checkpoint a critic.
A reward endpoint that keeps failing stops the run after writing a checkpoint at the iteration boundary.

Every random draw of an iteration (prompt order, sampling, minibatch order) comes from generators
seeded by (seed, iteration, rank), so a resumed run repeats the iterations of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import contract as c
from . import data, models, ops
from .config import ConfigError, TrainerConfig
from .data import token_cache
from .data.encoding import collate_sft, encode_prompt, encode_prompt_many, encode_sft
from .data.formats import Record
from .export import build_metadata, export_final
from .ppo_rollout import Rollout, finish_rollout, response_logprobs, response_values, sample_responses
from .ppo_scorers import RewardModelScorer, Scorer, build_scorer
from .reward_endpoint import EndpointScorer, RewardEndpointError
from .runtime import failure, nonfinite
from .runtime.loop import Resumable, run_loop
from .runtime.metrics import TrainerMetrics
from .runtime.strategy import Strategy

STATE_FILE = "ppo_state.json"


def log(message: str) -> None:
    print(f"rlhf-trainer ppo: {message}", file=sys.stderr, flush=True)


def disable_dropout(model: nn.Module) -> nn.Module:
    """PPO ratios compare two forward passes of the same weights; dropout would make them differ."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def iteration_seed(seed: int, iteration: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, iteration, process, purpose)."""
    return (seed * 1_000_003 + iteration * 10_007 + rank * 101 + stream) % (2**63)


# --- models --------------------------------------------------------------------------------------


@dataclass
class Models:
    tokenizer: Any
    actor: nn.Module
    reference: nn.Module
    critic: nn.Module | None  # None with a critic-free advantage estimator
    scorer: Scorer


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def load_models(cfg: TrainerConfig) -> Models:
    """Actor and tokenizer, reference (frozen start copy unless configured), scorer, critic init."""
    p = cfg.ppo
    tokenizer = models.load_tokenizer(p.actor)
    actor = disable_dropout(models.load_causal_lm(p.actor, tokenizer))
    limit = getattr(actor.config, "n_positions", None) or getattr(actor.config, "max_position_embeddings", None)
    if limit and p.max_prompt_length + p.max_new_tokens > limit:
        raise ConfigError(
            f"ppo.max_prompt_length ({p.max_prompt_length}) + ppo.max_new_tokens ({p.max_new_tokens}) exceeds the "
            f"actor's {limit} positions; lower one of them"
        )
    if p.reference.path or p.reference.hub_id or p.reference.init_from_config:
        reference = models.load_causal_lm(p.reference, tokenizer)
    else:
        reference = copy.deepcopy(actor)
    rm, rm_scorer = None, None
    rm_set = bool(p.reward_model.path or p.reward_model.hub_id or p.reward_model.init_from_config)
    if not p.reward_fn and (rm_set or not p.rewards.sources()):
        if not p.reward_model.path:
            raise failure.ModelError("ppo.reward_model.path: PPO needs a saved reward model directory (or a reward "
                                     "source in ppo.rewards, or ppo.reward_fn)")
        rm, rm_tokenizer, stats = models.load_reward_model(p.reward_model.path)
        rm_scorer = RewardModelScorer(rm, rm_tokenizer, stats, batch_size=max(p.minibatch_size, 1))
    job = {"namespace": cfg.job.namespace, "name": cfg.job.name}
    scorer = build_scorer(p, job, rm_scorer)
    if p.advantage_estimator in ops.CRITIC_FREE_ESTIMATORS:
        log(f"critic: none - advantage estimator {p.advantage_estimator} needs no value model "
            "(not loaded, not trained)")
        critic = None
    else:
        critic = disable_dropout(_load_critic(cfg, tokenizer, rm, rm_scorer))
    return Models(tokenizer, actor, disable_dropout(reference), critic, scorer)


def _load_critic(cfg: TrainerConfig, tokenizer, rm: nn.Module | None, scorer: RewardModelScorer | None) -> nn.Module:
    """The critic reads the actor's tokens, so it needs the actor's vocabulary.

    Order: ``ppo.critic`` if set; else the reward model's backbone and value head when the reward
    model shares the actor's tokenizer; else the actor's backbone with a fresh value head.
    """
    p = cfg.ppo
    if p.critic.path:
        critic, critic_tok = models.load_critic(p.critic.path)
        if not _same_vocab(critic_tok, tokenizer):
            raise failure.ModelError(
                f"ppo.critic.path {p.critic.path}: its tokenizer differs from the actor's; the critic reads the "
                "actor's tokens, so use a critic with the actor's vocabulary or leave ppo.critic empty"
            )
        return critic
    if p.critic.init_from_config or p.critic.hub_id:
        return models.CriticModel(models.load_backbone(p.critic, tokenizer))
    if isinstance(rm, models.RewardModel) and _same_vocab(scorer.tokenizer, tokenizer):
        return models.critic_from_reward_model(rm)
    if rm is not None and _same_vocab(scorer.tokenizer, tokenizer):
        return models.load_critic(p.reward_model.path, init_value_head="fresh")[0]
    reason = "no reward model is used" if rm is None else "the reward model's tokenizer differs from the actor's"
    log(f"critic: {reason}; initialising it from the actor's backbone with a fresh value head")
    return models.CriticModel(models.load_backbone(p.actor, tokenizer))


# --- prompts -------------------------------------------------------------------------------------


class PromptSchedule:
    """Which prompts iteration ``i`` of process ``rank`` uses: epochs over a seeded permutation.

    Iteration ``i`` covers global prompt slots ``[i * G, (i + 1) * G)`` with ``G = per_rank * world``;
    slot ``s`` is prompt ``perm_{s // N}[s % N]``. The position is a pure function of the iteration,
    so a resumed run continues where the interrupted one stopped.
    """

    def __init__(self, n_prompts: int, per_rank: int, world_size: int, seed: int):
        self.n = n_prompts
        self.per_rank = per_rank
        self.world_size = world_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(iteration_seed(self.seed, epoch, 0, 7))
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def position(self, iteration: int) -> int:
        return iteration * self.per_rank * self.world_size

    def indices(self, iteration: int, rank: int) -> list[int]:
        start = self.position(iteration) + rank * self.per_rank
        return [self._perm(s // self.n)[s % self.n] for s in range(start, start + self.per_rank)]


def encode_prompts(cfg: TrainerConfig, tokenizer, records: Sequence[Record]) -> dict[Record, list[int]]:
    """Every prompt's ids, tokenised once per run in one batched call and kept on the claim like the reward and
    SFT ids (data.token_cache: keyed by the prompts, the tokenizer and ``ppo.max_prompt_length``)."""
    length = cfg.ppo.max_prompt_length

    def encode(items: Sequence[Record]) -> list[tuple[list[int]]]:
        return [(ids,) for ids in encode_prompt_many(tokenizer, [(r.prompt, r.messages) for r in items], length)]

    encoded = token_cache.cached("prompts", tokenizer, {"max_prompt_length": length}, records, encode,
                                 token_cache.cache_dir(cfg.checkpoint.dir))
    return {r: ids for r, (ids,) in zip(records, encoded, strict=True)}


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


# --- one iteration -------------------------------------------------------------------------------


class PPOTrainer:
    """Owns the engines, the KL controller and the iteration logic of one run."""

    def __init__(self, cfg: TrainerConfig, strategy: Strategy, m: Models, actor_engine, critic_engine,
                 ptx: list[tuple[list[int], list[int]]] | None = None):
        self.cfg, self.p, self.strategy = cfg, cfg.ppo, strategy
        self.tokenizer = m.tokenizer
        self.actor, self.critic = actor_engine, critic_engine
        self.reference, self.scorer = m.reference, m.scorer
        self.kl_ctl = ops.make_kl_controller(self.p.kl_coef, self.p.kl_target, self.p.kl_horizon)
        self.ptx = ptx or []
        self.device = strategy.device
        # backward + optimizer step of each trained model, counting steps skipped for NaN/Inf gradients
        limit = nonfinite.consecutive_limit(cfg)
        self.actor_guard = nonfinite.StepGuard(cfg.stage, "actor", limit)
        self.critic_guard = nonfinite.StepGuard(cfg.stage, "critic", limit)
        self.prompt_ids: dict[Record, list[int]] = {}
        self.stats_mean, self.stats_std = None, None
        if self.p.normalize_reward and m.scorer.stats:
            self.stats_mean, self.stats_std = float(m.scorer.stats["mean"]), float(m.scorer.stats["std"])

    # -- experience --

    @torch.no_grad()
    def rollout(self, records: Sequence[Record], iteration: int,
                timings: dict[str, float]) -> tuple[Rollout, torch.Tensor]:
        p, tok, dev = self.p, self.tokenizer, self.device
        t0 = time.perf_counter()
        prompts = [self.prompt_ids.get(r) or encode_prompt(tok, r.prompt, p.max_prompt_length, r.messages)
                   for r in records]  # prompt_ids: the whole prompt set, encoded once per run (encode_prompts)
        query, query_mask = (x.to(dev) for x in left_pad(prompts, tok.pad_token_id))
        seed = iteration_seed(self.cfg.training.seed, iteration, self.strategy.rank, 1)
        gen = torch.Generator(device=dev).manual_seed(seed)
        with self.strategy.gathered_for_generation(self.actor) as actor:  # ZeRO-3: gathered once per rollout
            actor.eval()
            response, response_mask = sample_responses(
                actor, query, query_mask, max_new_tokens=p.max_new_tokens, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                generator=gen, cache_length=p.max_prompt_length + p.max_new_tokens,
            )
        timings["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts = [tok.decode(row[: int(n)].tolist(), skip_special_tokens=True)
                 for row, n in zip(response.cpu(), response_mask.sum(1).cpu(), strict=True)]
        scores = self.scorer(records, texts).to(dev).float()
        logprobs, entropy = response_logprobs(actor, query, query_mask, response, response_mask, p.temperature,
                                              with_entropy=True)
        ref_logprobs, _ = response_logprobs(self.reference, query, query_mask, response, response_mask, p.temperature)
        values = None
        if self.critic is not None:
            critic = self.strategy.unwrap(self.critic)
            critic.eval()
            values = response_values(critic, query, query_mask, response, response_mask)
        ro = finish_rollout(
            query=query, query_mask=query_mask, response=response, response_mask=response_mask,
            logprobs=logprobs, ref_logprobs=ref_logprobs.float(), values=values, scores=scores,
            kl_coef=self.kl_ctl.value, kl_estimator=p.kl_estimator, reward_clip=p.reward_clip,
            score_mean=self.stats_mean, score_std=self.stats_std, gamma=p.gamma, lam=p.lam,
            whiten_advantages=p.whiten_advantages, estimator=p.advantage_estimator,
            group_size=p.samples_per_prompt, grpo_normalize_std=p.grpo_normalize_std, kl_in_loss=p.kl_in_loss,
            batch_total=self.strategy.all_reduce_sum,
        )
        timings["score"] = time.perf_counter() - t0
        return ro, ops.masked_mean(entropy, response_mask)

    # -- optimisation --

    def _ptx_loss(self, k: int) -> torch.Tensor:
        n = self.p.minibatch_size
        batch = [self.ptx[(k * n + j) % len(self.ptx)] for j in range(n)]
        enc = {key: v.to(self.device) for key, v in collate_sft(self.tokenizer, batch).items()}
        return self.actor(**enc).loss

    def train(self, ro: Rollout, iteration: int, updates_before: int) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates over one rollout; returns mean statistics."""
        p = self.p
        gen = torch.Generator().manual_seed(iteration_seed(self.cfg.training.seed, iteration, self.strategy.rank, 2))
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        sums: dict[str, float] = {}
        n = 0
        for _ in range(p.ppo_epochs):
            for mb in ro.minibatches(p.minibatch_size, gen):
                mask = mb.response_mask
                logp, entropy = response_logprobs(self.actor, mb.query, mb.query_mask, mb.response, mask,
                                                  p.temperature, with_entropy=p.entropy_coef > 0)
                pl = ops.policy_loss(logp, mb.logprobs, mb.advantages, mask, p.cliprange)
                actor_loss = pl.loss
                if entropy is not None:
                    actor_loss = actor_loss - p.entropy_coef * ops.masked_mean(entropy, mask)
                kl_term = None
                if p.kl_in_loss:  # GRPO: the KL to the reference is a loss term, not a reward penalty
                    kl_term = ops.kl_loss(logp, mb.ref_logprobs, mask)
                    actor_loss = actor_loss + self.kl_ctl.value * kl_term
                ptx = None
                if p.ptx_coef > 0 and self.ptx:
                    ptx = self._ptx_loss(updates_before + n)
                    actor_loss = actor_loss + p.ptx_coef * ptx
                failure.check_finite(float(actor_loss.detach()), "PPO policy loss", iteration)
                self.actor_guard.backward_step(self.actor, actor_loss, f"PPO iteration {iteration + 1}")

                step_stats = {
                    c.M_PPO_POLICY_LOSS: float(pl.loss.detach()),
                    c.M_PPO_CLIP_FRACTION: float(pl.clip_fraction), c.M_PPO_APPROX_KL: float(pl.approx_kl),
                }
                if kl_term is not None:
                    step_stats[c.M_PPO_KL_LOSS] = float(kl_term.detach())
                if self.critic is not None:
                    values = response_values(self.critic, mb.query, mb.query_mask, mb.response, mask)
                    vl = ops.value_loss(values, mb.values, mb.returns, mask, p.cliprange_value)
                    failure.check_finite(float(vl.loss.detach()), "PPO value loss", iteration)
                    self.critic_guard.backward_step(self.critic, p.vf_coef * vl.loss, f"PPO iteration {iteration + 1}")
                    step_stats[c.M_PPO_VALUE_LOSS] = float(vl.loss.detach())
                    step_stats["value_clip_fraction"] = float(vl.clip_fraction)
                if ptx is not None:
                    step_stats["ptx_loss"] = float(ptx.detach())
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        return {k: self.strategy.all_reduce_mean(v / n) for k, v in sums.items()}

    # -- statistics --

    def rollout_stats(self, ro: Rollout, entropy: torch.Tensor) -> dict[str, float]:
        """Statistics of one rollout, averaged over all processes."""
        s, mask = self.strategy, ro.response_mask
        n = s.all_reduce_sum(float(len(ro)))
        score_sum = s.all_reduce_sum(float(ro.scores.sum()))
        score_sq = s.all_reduce_sum(float((ro.scores.double() ** 2).sum()))
        mean = score_sum / n
        std = math.sqrt(max(score_sq / n - mean**2, 0.0) * n / max(n - 1, 1))
        beta = 0.0 if self.p.kl_in_loss else self.kl_ctl.value
        out = {
            c.M_PPO_REWARD_MEAN: mean,
            c.M_PPO_REWARD_STD: std,
            c.M_PPO_KL: s.all_reduce_mean(float((ro.kl * mask).sum(1).mean())),
            c.M_PPO_ENTROPY: s.all_reduce_mean(float(entropy)),
            c.M_PPO_RESPONSE_LENGTH: s.all_reduce_mean(float(mask.sum(1).float().mean())),
            c.M_PPO_ADVANTAGES_MEAN: s.all_reduce_mean(float(ops.masked_mean(ro.advantages, mask))),
            c.M_PPO_RETURNS_MEAN: s.all_reduce_mean(float(ops.masked_mean(ro.returns, mask))),
            c.M_PPO_CRITIC_ENABLED: float(self.critic is not None),
            "non_score_reward": s.all_reduce_mean(float((-beta * ro.kl * mask).sum(1).mean())),
        }
        if self.critic is not None:
            out[c.M_PPO_VALUES_MEAN] = s.all_reduce_mean(float(ops.masked_mean(ro.values, mask)))
        k = self.p.samples_per_prompt
        if k > 1:  # how much signal the groups carry: a group of equal rewards has none for grpo/rloo
            _, group_std = ops.masked_group_mean_std(ro.scores.double(), k)
            out[c.M_PPO_REWARD_GROUP_STD] = s.all_reduce_mean(float(group_std[::k].mean()))
            out[c.M_PPO_ZERO_VARIANCE_GROUPS] = s.all_reduce_mean(ops.zero_variance_group_fraction(ro.scores, k))
        parts = getattr(self.scorer, "last", None) or {getattr(self.scorer, "source", "model"): ro.scores}
        for name, x in parts.items():
            out[f"{c.M_PPO_REWARD_SOURCE_MEAN}/{name}"] = s.all_reduce_mean(float(x.double().mean()))
        for _, _, source in getattr(self.scorer, "sources", []):
            if isinstance(source, EndpointScorer):  # retried requests so far: a flaky endpoint shows here
                out["reward_endpoint_retries"] = s.all_reduce_sum(float(source.retries))
        return out


# --- checkpoints ---------------------------------------------------------------------------------


def resumable(strategy: Strategy, trainer: PPOTrainer, state: dict[str, Any], plan: dict[str, Any]) -> Resumable:
    """What a PPO checkpoint holds besides the loop's metadata: the actor and critic engines (with optimizers,
    schedulers, RNG) and ``state`` with the KL controller in ``ppo_state.json``; a resume fills ``state`` back in."""

    def save(tmp: Path) -> None:
        strategy.save(trainer.actor, tmp / "actor")
        if trainer.critic is not None:
            strategy.save(trainer.critic, tmp / "critic")
        if strategy.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "kl_controller": trainer.kl_ctl.state_dict()}, indent=2))

    def load(latest: Path) -> None:
        strategy.load(trainer.actor, latest / "actor")
        if trainer.critic is not None:
            strategy.load(trainer.critic, latest / "critic")
        saved = json.loads((latest / STATE_FILE).read_text())
        trainer.kl_ctl.load_state_dict(saved.pop("kl_controller"))
        state.update(saved)

    guards = [trainer.actor_guard] + ([trainer.critic_guard] if trainer.critic is not None else [])
    return Resumable(save, load, plan, plan_key="plan", plan_hint="prompts, rollout size, processes and seed",
                     guards=guards)


# --- the stage -----------------------------------------------------------------------------------


def planned_iterations(cfg: TrainerConfig, n_prompts: int, world_size: int) -> int:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    per_iteration = cfg.ppo.rollout_batch_size // cfg.ppo.samples_per_prompt * world_size  # prompts
    return max(1, math.ceil(cfg.training.epochs * n_prompts / per_iteration))


def load_ptx(cfg: TrainerConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    if cfg.ppo.ptx_coef <= 0:
        return []
    if not (cfg.ppo.ptx_dataset.path or cfg.ppo.ptx_dataset.hub_id):
        raise failure.DataError("ppo.ptx_dataset: set path to text data, or set ppo.ptx_coef to 0")
    examples = data.load_sft_splits(cfg.ppo.ptx_dataset).train
    return [encode_sft(tokenizer, ex, cfg.training.max_length, loss_on_prompt=True) for ex in examples]


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Run (or resume) the PPO stage; returns the final metrics, the metadata and the export path."""
    with failure.GracefulStop() as stop:
        records = data.load_prompt_records(cfg.dataset).train  # data errors surface before any model loads
        strategy = Strategy(cfg).setup()
        metrics = TrainerMetrics(cfg, is_main=strategy.is_main)
        metrics.start_server()
        try:
            return _run(cfg, strategy, metrics, stop, records)
        finally:
            metrics.stop_server()


def _run(cfg: TrainerConfig, strategy: Strategy, metrics: TrainerMetrics, stop: failure.GracefulStop,
         records: list[Record]) -> dict[str, Any]:
    p = cfg.ppo
    m = load_models(cfg)
    ptx = load_ptx(cfg, m.tokenizer)
    total = planned_iterations(cfg, len(records), strategy.world_size)
    updates_per_iteration = p.ppo_epochs * math.ceil(p.rollout_batch_size / p.minibatch_size)
    optimizer_steps = max(1, total * updates_per_iteration // cfg.training.gradient_accumulation_steps)
    actor_engine = strategy.prepare(m.actor, cfg.training.learning_rate, optimizer_steps)
    critic_engine = None
    if m.critic is not None:
        critic_lr = p.critic_learning_rate or cfg.training.learning_rate
        critic_engine = strategy.prepare(m.critic, critic_lr, optimizer_steps)
    strategy.prepare_frozen(m.reference)
    for scorer in (m.scorer, *(source for _, _, source in getattr(m.scorer, "sources", []))):
        if isinstance(scorer, RewardModelScorer):  # alone, or one of the weighted reward sources
            strategy.prepare_frozen(scorer.model)
    trainer = PPOTrainer(cfg, strategy, m, actor_engine, critic_engine, ptx)
    trainer.prompt_ids = encode_prompts(cfg, m.tokenizer, records)
    schedule = PromptSchedule(len(records), p.rollout_batch_size // p.samples_per_prompt, strategy.world_size,
                              cfg.training.seed)
    plan = {"prompts": len(records), "rollout_batch_size": p.rollout_batch_size,
            "world_size": strategy.world_size, "seed": cfg.training.seed}
    if p.samples_per_prompt > 1 or p.advantage_estimator != "gae":  # (older checkpoints have neither key)
        plan.update(samples_per_prompt=p.samples_per_prompt, advantage_estimator=p.advantage_estimator)
    state: dict[str, Any] = {"iteration": 0, "prompt_position": 0, "initial_reward_mean": None, "last_metrics": {}}

    def iteration_step(index: int, _log: bool) -> dict[str, float]:
        values = run_iteration(trainer, records, schedule, index)
        values[c.M_EPOCH] = schedule.position(index + 1) / len(records)
        logged = {k: v for k, v in values.items() if k not in ("samples", "tokens")}
        if state["initial_reward_mean"] is None:
            state["initial_reward_mean"] = logged[c.M_PPO_REWARD_MEAN]
        state.update(iteration=index + 1, prompt_position=schedule.position(index + 1), last_metrics=logged)
        return values

    # the loop resumes, checkpoints (also on SIGTERM and before a reward endpoint's error ends the run) and logs
    result = run_loop(cfg, strategy, resumable(strategy, trainer, state, plan), total, iteration_step, metrics, stop,
                      save_on=(RewardEndpointError,))
    iteration = result.step

    last = state["last_metrics"]
    summary = {
        "initial_reward_mean": state["initial_reward_mean"],
        "final_reward_mean": last.get(c.M_PPO_REWARD_MEAN),
        "final_kl": last.get(c.M_PPO_KL),
        "final_kl_coef": trainer.kl_ctl.value,
        "scorer": p.reward_fn or ", ".join(filter(None, [p.reward_model.path, *p.rewards.sources()])),
        "advantage_estimator": p.advantage_estimator,
        "critic": m.critic is not None,
        "prompts": len(records),
    }
    meta = build_metadata(cfg, iteration, last, summary)
    state_dict = strategy.full_state_dict(actor_engine)  # collective under ZeRO-3
    final = export_final(
        cfg, lambda d: models.save_causal_lm(strategy.unwrap(actor_engine), m.tokenizer, d, state_dict),
        meta, strategy.is_main)
    strategy.barrier()
    if strategy.is_main:
        log(f"done: {iteration} iterations; mean reward {summary['initial_reward_mean']} -> "
            f"{summary['final_reward_mean']}, KL {summary['final_kl']}; final model at {final}")
    return {"step": iteration, "metrics": last, **summary, "final_dir": str(final),
            "resumed_from": result.resumed_from}  # -1: started fresh


def run_iteration(trainer: PPOTrainer, records: list[Record], schedule: PromptSchedule,
                  iteration: int) -> dict[str, float]:
    """Generate, score and train on one rollout; returns the iteration's metrics (all processes)."""
    strategy, p = trainer.strategy, trainer.p
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    batch = [records[i] for i in schedule.indices(iteration, strategy.rank) for _ in range(p.samples_per_prompt)]
    ro, entropy = trainer.rollout(batch, iteration, timings)
    values = trainer.rollout_stats(ro, entropy)
    t0 = time.perf_counter()
    optimizer_steps = iteration * p.ppo_epochs * math.ceil(p.rollout_batch_size / p.minibatch_size)
    values.update(trainer.train(ro, iteration, optimizer_steps))
    timings["train"] = time.perf_counter() - t0
    trainer.kl_ctl.update(values[c.M_PPO_KL], len(ro) * strategy.world_size)
    generated = strategy.all_reduce_sum(float(ro.response_mask.sum()))
    grad_norm = trainer.actor.get_global_grad_norm()
    values.update({
        c.M_PPO_KL_COEF: trainer.kl_ctl.value,
        c.M_LOSS: values[c.M_PPO_POLICY_LOSS] + p.vf_coef * values.get(c.M_PPO_VALUE_LOSS, 0.0)
        + (trainer.kl_ctl.value * values[c.M_PPO_KL_LOSS] if c.M_PPO_KL_LOSS in values else 0.0),
        c.M_LEARNING_RATE: trainer.actor.get_lr()[0],
        c.M_TOKENS_PER_SECOND: generated / max(time.perf_counter() - t_start, 1e-9),
        **({c.M_GRAD_NORM: float(grad_norm)} if grad_norm is not None else {}),
        **{f"{c.M_PPO_PHASE_SECONDS}/{k}": v for k, v in timings.items()},
        c.M_SKIPPED_STEPS: float(trainer.actor_guard.skipped + trainer.critic_guard.skipped),
        "samples": float(len(ro) * strategy.world_size),
        "tokens": strategy.all_reduce_sum(float(ro.response_mask.sum() + ro.query_mask.sum())),
    })
    return values
