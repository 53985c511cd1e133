"""Tensor math of RLHF: masked statistics, log-probs, the pairwise reward loss and the PPO pieces.

Pure torch functions (no models, no I/O) so that each one can be checked against a hand-computed
reference. Conventions shared by every PPO helper:

* Per-token tensors of a rollout are ``(batch, response_len)`` and aligned on the *response* tokens:
  position ``t`` is the ``t``-th generated token. ``mask`` is 1 on real response tokens and 0 on
  padding after the end of a response (generation pads on the right of the response, after EOS).
* Masks may be bool or float; every statistic is computed over the masked-in entries only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# --- masked statistics ---------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1: ``sum(x * m) / sum(m)`` (over ``dim`` or all)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; with ``unbiased`` the Bessel correction n/(n-1) is applied."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs at least 2 masked-in entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries; masked-out entries become 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as used for rewards.
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=bool(m.sum() > 1))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --- indexing and log-probs ----------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask = 1) token in each row, correct for left and right padding.

    ``[0, 0, 1, 1]`` (left padded) -> 3; ``[1, 1, 0, 0]`` (right padded) -> 1. A row without any
    real token is an error: there is no token to read a score from.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"last_token_index: expected a (batch, seq) mask, got shape {tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    if not bool(m.any(dim=1).all()):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"last_token_index: rows {empty} have no real tokens (attention mask all zero)")
    seq_len = m.shape[1]
    # argmax returns the first maximum; on the reversed mask that is the last real token.
    return seq_len - 1 - m.flip(1).int().argmax(dim=1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position: logits ``(..., V)``, tokens ``(...)`` -> ``(...)``.

    Computed as ``logit[token] - logsumexp(logits)`` in float32, which avoids materialising the full
    log-softmax tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: ``H = logsumexp(z) - sum softmax(z) * z``."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# --- reward model --------------------------------------------------------------------------------


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Bradley-Terry pairwise loss with optional margin (Ouyang et al. 2022; Llama 2 margin variant).

    ``loss = mean(-log sigmoid(r_chosen - r_rejected - margin))``.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# --- KL ------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With ``log r = ref_logp - logp``:
    k1 = ``-log r`` (unbiased, can be negative); k2 = ``(log r)^2 / 2`` (biased, low variance);
    k3 = ``(r - 1) - log r`` (unbiased, always >= 0).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences", eq. 2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_samples / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be > 0")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


def make_kl_controller(kl_coef: float, kl_target: float = 0.0, horizon: int = 10000) -> FixedKLController:
    """Adaptive controller when a positive target is given, else a fixed coefficient."""
    if kl_target > 0:
        return AdaptiveKLController(kl_coef, kl_target, horizon)
    return FixedKLController(kl_coef)


# --- PPO rewards, advantages, losses -------------------------------------------------------------


def normalize_scores(scores: torch.Tensor, mean: float | None, std: float | None, eps: float = 1e-8) -> torch.Tensor:
    """``(score - mean) / std`` with statistics saved alongside the reward model (identity if absent)."""
    if mean is None or std is None:
        return scores
    return (scores - mean) / (std + eps)


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float = 0.0,
) -> torch.Tensor:
    """Per-token PPO rewards: ``-kl_coef * KL_t`` on each response token, plus the sequence score
    (clipped to ``[-reward_clip, reward_clip]`` when ``reward_clip > 0``) on the LAST REAL response
    token - not on the first padding position after it (TRL #3750, DeepSpeed-Chat #672).

    scores ``(B,)``, kl and mask ``(B, T)`` aligned on response tokens -> rewards ``(B, T)``, 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens only.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``t+1`` is the next *real* token (masked-out positions are skipped) and the value after the last
    real token is 0 (the episode ends there). Returns ``(advantages, returns = A + V)``, both 0 on padding.
    """
    m = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # On a masked-out position carry the "next" quantities through unchanged.
        next_adv = m[:, t] * adv + (1 - m[:, t]) * next_adv
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        advantages[:, t] = m[:, t] * adv
    returns = (advantages + values) * m
    return advantages.detach(), returns.detach()


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2
) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017): with ``rho = exp(logp - old_logp)``,
    ``L = mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))`` over masked tokens.

    Also returns the fraction of tokens where the clipped term is active and the approximate KL
    between the old and the new policy, ``mean((rho - 1) - log rho)`` (the k3 estimator).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float = 0.2
) -> ValueLoss:
    """Clipped value loss (PPO2 baselines): ``V_clip = V_old + clip(V - V_old, -c, c)``;
    ``L = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` over masked tokens. ``c <= 0`` disables clipping.
    """
    unclipped = (values - returns) ** 2
    if cliprange_value <= 0:
        return ValueLoss(0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype))
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss, clip_fraction)


def is_finite(x: torch.Tensor | float) -> bool:
    """True when a loss/statistic is neither NaN nor infinite."""
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(x)
