"""PPO experience: left-padded sampling, per-token log-probs and values, and the rollout batch.

Layout of one rollout (B prompts):

    query    (B, P)  left padded prompt ids          query_mask    (B, P)
    response (B, T)  right padded generated ids      response_mask (B, T)  1 up to and including EOS

The model sees ``cat(query, response)`` with position ids counted from the first real token, so a
left-padded prompt is read exactly as the same prompt without padding. Per-token tensors are aligned
on the response: entry ``t`` belongs to generated token ``t``; its log-prob and value come from the
hidden state at sequence position ``P - 1 + t`` (the state in which that token was chosen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import ops


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from the first real token (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: excluded logits become -inf. The best token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` per left-padded prompt with a KV cache.

    Returns ``(response, response_mask)``: after a row emits EOS its later positions hold
    ``pad_token_id`` and mask 0 (the EOS itself is a real response token). Sampling draws from
    ``generator`` only, so a seeded generator reproduces the rollout exactly.
    """
    batch = query.shape[0]
    device = query.device
    attn = query_mask.long()
    pos = position_ids(attn)
    out = model(input_ids=query, attention_mask=attn, position_ids=pos, use_cache=True)
    past, next_logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = pos[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, masks = [], []
    for step in range(max_new_tokens):
        logits = filter_logits(next_logits.float() / temperature, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        masks.append(~finished)
        tokens.append(tok)
        if eos_token_id is not None:
            finished = finished | (tok == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(
            input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past, use_cache=True
        )
        past, next_logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(masks, dim=1).long()


def _joined(query, query_mask, response, response_mask):
    """``cat(query, response)`` with each row's left padding moved to its end, and ``chosen_at`` (B, T): the
    position of the state in which each response token was chosen.

    Left padding gives query rows that see no key at all; fused attention kernels return 0 there but NaN
    gradients, which reach every weight (on GPUs in bf16: every PPO step was skipped). Moved to the end, each
    pad row still sees its prompt; real tokens keep their positions and what they attend to."""
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    pad = query.shape[1] - query_mask.long().sum(1)
    width = ids.shape[1]
    src = (torch.arange(width, device=ids.device) + pad[:, None]) % width
    ids, mask = ids.gather(1, src), mask.gather(1, src)
    chosen_at = (query.shape[1] - pad - 1).clamp(min=0)[:, None] + torch.arange(response.shape[1], device=ids.device)
    return ids, mask, position_ids(mask), chosen_at


def response_logprobs(
    model: torch.nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under ``model`` at the sampling temperature, and
    optionally the per-token entropy of the same distributions."""
    ids, mask, pos, at = _joined(query, query_mask, response, response_mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature
    logp = ops.gather_logprobs(logits, response)
    entropy = ops.entropy_from_logits(logits) if with_entropy else None
    return logp, entropy


def response_values(
    critic: torch.nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token values (B, T) of the states in which each response token was chosen."""
    ids, mask, pos, at = _joined(query, query_mask, response, response_mask)
    values = critic(input_ids=ids, attention_mask=mask, position_ids=pos)
    return values.gather(1, at).float()


@dataclass
class Rollout:
    """One batch of experience; every per-token field is (B, T) aligned on response tokens."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) reward-model/rule scores before normalisation and clipping
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return self.query.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def minibatches(self, size: int, generator: torch.Generator) -> Iterator[Rollout]:
        """Shuffled minibatches of ``size`` samples (the last one may be smaller)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size])


def finish_rollout(
    *,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    scores: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
    reward_clip: float,
    score_mean: float | None,
    score_std: float | None,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
    estimator: str = "gae",
    group_size: int = 1,
    grpo_normalize_std: bool = True,
    kl_in_loss: bool = False,
    batch_total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Rollout:
    """Rewards and advantages of one rollout, per ``estimator``:

    * ``gae``: per-token KL penalty + clipped, normalised score at the last real token; GAE with the
      critic's ``values``; optionally whitened advantages;
    * ``reinforce_plus_plus``: the same per-token rewards, summed to go and normalised over the whole
      batch (``batch_total`` sums over processes);
    * ``grpo`` / ``rloo``: the sequence reward (score minus ``kl_coef`` times the summed KL) compared
      within each group of ``group_size`` consecutive samples of one prompt; every token of a response
      gets its sequence's advantage.

    With ``kl_in_loss`` no KL enters the reward (the actor's loss carries it instead). Critic-free
    estimators take ``values=None``; the rollout then holds zeros there.
    """
    mask = response_mask
    kl = ops.kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    shaped = ops.normalize_scores(scores, score_mean, score_std)
    rewards = ops.token_rewards(shaped, kl, mask, 0.0 if kl_in_loss else kl_coef, reward_clip)
    if estimator == "gae":
        if values is None:
            raise ValueError("finish_rollout: the gae estimator needs the critic's values")
        values = values * mask
        advantages, returns = ops.compute_gae(rewards, values, mask, gamma, lam)
        if whiten_advantages and int(mask.sum()) > 1:
            advantages = ops.masked_whiten(advantages, mask)
    else:
        values = torch.zeros_like(logprobs)
        if estimator == "reinforce_plus_plus":
            advantages, returns = ops.reinforce_pp_advantages(rewards, mask, gamma, batch_total)
        elif estimator in ops.GROUP_ESTIMATORS:
            sequence = rewards.sum(1)
            if estimator == "grpo":
                adv = ops.grpo_advantages(sequence, group_size, grpo_normalize_std)
            else:
                adv = ops.rloo_advantages(sequence, group_size)
            m = mask.to(rewards.dtype)
            advantages, returns = adv[:, None] * m, sequence[:, None] * m
        else:
            raise ValueError(f"finish_rollout: unknown advantage estimator {estimator!r}; use one of "
                             f"{', '.join(ops.ADVANTAGE_ESTIMATORS)}")
    return Rollout(
        query=query,
        query_mask=query_mask,
        response=response,
        response_mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
