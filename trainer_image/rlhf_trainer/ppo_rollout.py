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
import os
import sys
import weakref
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


EOS_CHECK_EVERY = 16  # decode steps between two host reads of "has every row ended?"
ENV_EOS_CHECK_EVERY = "RLHF_EOS_CHECK_EVERY"
ENV_COMPILE = "RLHF_GENERATION_COMPILE"  # 1: torch.compile + CUDA graphs for the decode step (CUDA only)


def log(message: str) -> None:
    print(f"rlhf-trainer generation: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GenerationOptions:
    """How :func:`sample_responses` runs; none of these change which tokens are drawn.

    ``eos_check_every``: the loop reads "has every row ended?" back to the host only every k steps (1 = every
    step, the old behaviour), so the device is never stalled per token; the up to k - 1 extra steps after the
    last EOS are cut off again. ``static_cache``: one KV cache of fixed size, written in place (no per-step
    reallocation), for models that support it. ``compile``: the decode step through ``torch.compile`` with CUDA
    graphs ("reduce-overhead"); CUDA only, and generation falls back to eager mode if compiling fails.
    ``compile_backend`` is for tests (e.g. "eager": the same graph capture without a compiler, on the CPU)."""

    eos_check_every: int = EOS_CHECK_EVERY
    static_cache: bool = True
    compile: bool = False
    compile_backend: str | Callable | None = None

    @classmethod
    def from_env(cls, env=None) -> GenerationOptions:
        env = os.environ if env is None else env
        every = env.get(ENV_EOS_CHECK_EVERY, "")
        if every and (not every.isdigit() or int(every) < 1):
            raise ValueError(f"{ENV_EOS_CHECK_EVERY}={every!r}: expected a whole number >= 1 (decode steps between "
                             f"EOS checks)")
        return cls(eos_check_every=int(every) if every else EOS_CHECK_EVERY,
                   compile=env.get(ENV_COMPILE, "") in ("1", "true", "yes"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(filtered logits / temperature), all on the logits' device.

    ``argmax(p / E)`` with E ~ Exp(1) i.i.d. draws index i with probability p_i (the exponential race): the
    same draw ``torch.multinomial(p, 1)`` makes from the same generator state, without its input checks that
    read values back to the host."""
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def _supports_static_cache(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_can_compile_fullgraph", False)) and hasattr(model, "config")


class _CompiledStepError(Exception):
    """The compiled decode step failed (its cause is chained)."""


# Per model: the compiled decode step and its static cache, reused across rollouts (CUDA graphs are recorded
# against the cache's fixed addresses; a new cache per rollout would recompile); they live as long as the process
# (one actor per trainer process). Models that failed to compile.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()


def _static_cache(model, batch: int, length: int, reuse: bool):
    from transformers import StaticCache

    if not reuse:
        return StaticCache(config=model.config, max_cache_len=length)
    entry = _COMPILED.setdefault(model, {})
    cache = entry.get(("cache", batch, length))
    if cache is None:
        cache = entry[("cache", batch, length)] = StaticCache(config=model.config, max_cache_len=length)
    else:
        cache.reset()
    return cache


def _decode_fn(model: torch.nn.Module, opts: GenerationOptions, device: torch.device) -> Callable | None:
    """The compiled decode step, or None for eager mode (CPU, compile off, no static cache: shapes would change
    every step, or an earlier compile failure)."""
    wanted = (opts.compile and opts.static_cache and _supports_static_cache(model)
              and (device.type == "cuda" or opts.compile_backend is not None))
    if not wanted or model in _COMPILE_FAILED:
        return None
    entry = _COMPILED.setdefault(model, {})
    if "decode" not in entry:

        def decode(tok, attn, pos, cache):
            out = model(input_ids=tok, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
            return out.logits[:, -1, :]

        kwargs = {"backend": opts.compile_backend} if opts.compile_backend else {"mode": "reduce-overhead"}
        entry["decode"] = torch.compile(decode, dynamic=False, fullgraph=False, **kwargs)
    return entry["decode"]


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
    options: GenerationOptions | None = None,
    cache_length: int | None = None,
    return_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sample up to ``max_new_tokens`` per left-padded prompt with a KV cache.

    Returns ``(response, response_mask)``: after a row emits EOS its later positions hold
    ``pad_token_id`` and mask 0 (the EOS itself is a real response token); the response ends with the
    step in which the last row emitted EOS. Sampling draws from ``generator`` only, so a seeded
    generator reproduces the rollout exactly, whatever ``options`` say. ``cache_length``: the static
    cache's size with a compiled decode step (at least prompt width + ``max_new_tokens``); callers pass
    their maximum so that the compiled step sees the same shapes in every rollout and compiles once.
    ``return_logprobs``: also return each sampled token's log-prob (B, T) under the temperature-scaled,
    unfiltered distribution it was drawn from (0 after the end), as :func:`response_logprobs` computes it.
    """
    opts = options or GenerationOptions.from_env()
    state = generator.get_state() if generator is not None else None
    try:
        return _sample(model, query, query_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k,
                       top_p, generator, opts, cache_length, return_logprobs)
    except _CompiledStepError as e:  # compiling (or running) the compiled step failed: eager, same draws
        _COMPILE_FAILED.add(model)
        _COMPILED.pop(model, None)
        cause = e.__cause__
        log(f"compiled decode step failed ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            "); generating in eager mode from now on")
        if generator is not None:
            generator.set_state(state)
        return _sample(model, query, query_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k,
                       top_p, generator, opts, cache_length, return_logprobs)


def _sample(model, query, query_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
            generator, opts: GenerationOptions, cache_length: int | None,
            return_logprobs: bool) -> tuple[torch.Tensor, ...]:
    batch, width = query.shape
    device = query.device
    decode = _decode_fn(model, opts, device)
    total = width + max_new_tokens if decode is None else max(cache_length or 0, width + max_new_tokens)
    static = opts.static_cache and _supports_static_cache(model)
    # The mask of the whole cache, fixed for the whole loop: prompt padding 0, every generated slot 1 (slots
    # not written yet are hidden by causality). Without a static cache each step reads its prefix (a view).
    attn = torch.zeros(batch, total, dtype=torch.long, device=device)
    attn[:, :width] = query_mask
    attn[:, width:width + max_new_tokens] = 1
    pos = position_ids(query_mask.long())
    cache = _static_cache(model, batch, total, reuse=decode is not None) if static else None
    prefill_attn = attn if static else attn[:, :width]
    kwargs = {"past_key_values": cache} if static else {}
    out = model(input_ids=query, attention_mask=prefill_attn, position_ids=pos, use_cache=True, **kwargs)
    past, next_logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = pos[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    masks = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device) if return_logprobs else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    every = max(1, opts.eos_check_every)
    for step in range(max_new_tokens):
        tok = torch.where(finished, pad, sample_tokens(next_logits, temperature, top_k, top_p, generator))
        tokens[:, step] = tok
        masks[:, step] = ~finished
        if logprobs is not None:
            lp = torch.log_softmax(next_logits.float() / temperature, dim=-1).gather(1, tok[:, None]).squeeze(1)
            logprobs[:, step] = lp.masked_fill(finished, 0.0)
        if eos_token_id is not None:
            finished = finished | (tok == eos_token_id)
            # the only host read of the loop, every k steps (the device runs ahead in between)
            if (step + 1) % every == 0 and bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        if decode is not None:
            try:
                torch.compiler.cudagraph_mark_step_begin()
                next_logits = decode(tok[:, None], attn, next_pos, past).clone()  # CUDA graphs reuse the output
            except Exception as e:  # noqa: BLE001 - any compiler/runtime failure of the compiled step
                raise _CompiledStepError() from e
        else:
            step_attn = attn if static else attn[:, :width + step + 1]
            out = model(input_ids=tok[:, None], attention_mask=step_attn, position_ids=next_pos,
                        past_key_values=past, use_cache=True)
            past, next_logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    if eos_token_id is not None:
        # Up to the step in which the last row ended: every column before holds a real token of some row.
        n = int(masks.any(0).sum())
        tokens, masks = tokens[:, :n], masks[:, :n]
        logprobs = logprobs[:, :n] if logprobs is not None else None
    return (tokens, masks.long()) if logprobs is None else (tokens, masks.long(), logprobs)


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
