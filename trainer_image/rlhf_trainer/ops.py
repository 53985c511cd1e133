"""Tensor math of RLHF: masked statistics, log-probs, the pairwise reward loss, the PPO pieces and the
critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++).

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

from .config import ADVANTAGE_ESTIMATORS, CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS  # noqa: F401 (re-exported)

# --- masked statistics ---------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1: ``sum(x * m) / sum(m)`` (over ``dim`` or all)."""
    m = mask.to(x.dtype)
    x = torch.where(m != 0, x, torch.zeros_like(x))  # NaN/Inf on padding must not reach the sum (NaN * 0 = NaN)
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
    # 0 on padding: log-probs of pad tokens drift freely, and exp() of a large difference is inf (NaN gradients).
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
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
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float = 0.2,
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


# --- critic-free advantages: GRPO, RLOO, REINFORCE++ ----------------------------------------------
#
# A rollout of B samples holds B / k groups of k consecutive samples of the same prompt
# (``ppo.samples_per_prompt`` = k). Sequence-level quantities are ``(B,)``; a sample mask ``(B,)``
# leaves samples out of their group's statistics (1 = counts).



def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() != 1 or group_size < 1 or x.shape[0] % group_size:
        raise ValueError(
            f"expected a (batch,) tensor of whole groups of {group_size} samples, got shape {tuple(x.shape)}"
        )
    return x.view(-1, group_size)


def masked_group_mean_std(
    scores: torch.Tensor, group_size: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (Bessel-corrected) standard deviation of each group over its masked-in samples,
    repeated for every sample of the group: ``(B,) -> (B,), (B,)``. A group with fewer than two
    masked-in samples has standard deviation 0 (and mean 0 when it has none)."""
    g = _grouped(scores, group_size)
    m = torch.ones_like(g) if mask is None else _grouped(mask.to(scores.dtype), group_size)
    n = m.sum(1)
    mean = (g * m).sum(1) / n.clamp(min=1.0)
    var = (((g - mean[:, None]) ** 2) * m).sum(1) / (n - 1).clamp(min=1.0)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    return mean.repeat_interleave(group_size), std.repeat_interleave(group_size)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, mask: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g) / (std_g + eps)`` within each
    prompt's group; with ``normalize_std=False`` only the mean is removed (Dr. GRPO, Liu et al. 2025,
    which drops the std division that over-weights groups of nearly equal rewards). Masked-out samples get 0."""
    mean, std = masked_group_mean_std(scores, group_size, mask)
    adv = scores - mean
    if normalize_std:
        adv = adv / (std + eps)
    return adv if mask is None else adv * mask.to(adv.dtype)


def rloo_advantages(scores: torch.Tensor, group_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline is the
    mean reward of the *other* masked-in samples of its group, ``A_i = r_i - (sum_g - r_i) / (n_g - 1)``.
    A sample alone in its group (n_g < 2) has no baseline and gets 0, as do masked-out samples."""
    g = _grouped(scores, group_size)
    m = torch.ones_like(g) if mask is None else _grouped(mask.to(scores.dtype), group_size)
    n = m.sum(1, keepdim=True)
    baseline = ((g * m).sum(1, keepdim=True) - g) / (n - 1).clamp(min=1.0)
    adv = torch.where(n > 1, g - baseline, torch.zeros_like(g)) * m
    return adv.reshape(-1)


def zero_variance_group_fraction(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> float:
    """Fraction of groups whose samples all got the same reward: they carry no GRPO/RLOO signal."""
    g = _grouped(scores, group_size)
    return float(((g.max(1).values - g.min(1).values) <= tol).float().mean())


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Rewards-to-go over real response tokens: ``G_t = r_t + gamma * G_{next real token}``; 0 on padding."""
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = m[:, t] * (rewards[:, t] + gamma * running) + (1 - m[:, t]) * running
        out[:, t] = m[:, t] * running
    return out


def whiten_over_batch(x: torch.Tensor, mask: torch.Tensor, total=None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (Bessel-corrected) variance over the masked entries of
    the *whole* batch: ``total`` sums a tensor over all processes (identity on one process). Masked-out -> 0."""
    total = total or (lambda v: v)
    m = mask.to(x.dtype)
    n = total(m.sum())
    mean = total((x * m).sum()) / n.clamp(min=1.0)
    sq = total((((x - mean) * m) ** 2).sum())
    var = sq / (n - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, total=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): per-token rewards (the per-token KL penalty plus the score at the last real
    token) summed to go, then normalised over the whole batch - no critic, no per-prompt group.
    Returns ``(advantages, returns)``, both 0 on padding."""
    returns = discounted_returns(rewards, mask, gamma)
    return whiten_over_batch(returns, mask, total).detach(), returns.detach()


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO): the k3 estimate ``exp(ref - logp) - (ref - logp) - 1`` of the
    *current* policy's log-probs, averaged over masked tokens. Unbiased, >= 0, and its gradient pulls the
    policy towards the reference (k1's gradient would be zero in expectation)."""
    return masked_mean(kl_penalty(logp, ref_logp, "k3"), mask)


def is_finite(x: torch.Tensor | float) -> bool:
    """True when a loss/statistic is neither NaN nor infinite."""
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(x)


# --- DPO -----------------------------------------------------------------------------------------
#
# Sequence log-probs are sums over the *response* tokens of a sequence (prompt and padding excluded).
# For a pair, the DPO logit is ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))``:
# how much more the policy prefers the chosen response y_w than the reference does.


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed log-prob of each sequence's labelled tokens: logits ``(B, L, V)``, labels ``(B, L)`` -> ``(B,)``.

    ``labels`` holds the token ids on response positions and ``ignore_index`` on prompt and padding
    positions; token ``t`` is predicted by the logits at ``t - 1`` (so ``labels[:, 0]`` never counts).
    """
    target = labels[:, 1:]
    keep = target != ignore_index
    logp = gather_logprobs(logits[:, :-1], target.masked_fill(~keep, 0))
    return torch.where(keep, logp, torch.zeros_like(logp)).sum(-1)


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, reference_free: bool = False) -> torch.Tensor:
    """``h = (pi_w - pi_l) - (ref_w - ref_l)`` per pair; reference-free: ``h = pi_w - pi_l``."""
    h = policy_chosen - policy_rejected
    return h if reference_free else h - (ref_chosen - ref_rejected)


def dpo_sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)`` per pair. With label smoothing ``eps``
    (conservative DPO: each label is wrong with probability eps) ``-(1 - eps) log sigmoid(beta h)
    - eps log sigmoid(-beta h)``."""
    z = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` per pair - regresses the log-ratio gap to a finite
    target instead of pushing it to infinity."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): ``max(0, 1 - beta * h)`` per pair."""
    return torch.relu(1.0 - beta * h)


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # mean over the pairs
    chosen_rewards: torch.Tensor  # (B,) implicit rewards beta * (pi_w - ref_w), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (pi_l - ref_l), detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             reference_free: bool = False) -> DPOLoss:
    """The DPO family on sequence log-probs ``(B,)`` of the policy and the reference: sigmoid (with optional
    label smoothing), ipo or hinge of :func:`dpo_logits`. The implicit rewards are ``beta`` times the policy's
    log-ratio to the reference (to 0 when ``reference_free``); their accuracy and margin are the DPO metrics."""
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, reference_free)
    if loss_type == "sigmoid":
        losses = dpo_sigmoid_loss(h, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(h, beta)
    elif loss_type == "hinge":
        losses = hinge_loss(h, beta)
    else:
        raise ValueError(f"dpo_loss: unknown loss {loss_type!r}; use sigmoid, ipo or hinge")
    with torch.no_grad():
        zero = torch.zeros_like(policy_chosen)
        chosen = beta * (policy_chosen - (zero if reference_free else ref_chosen))
        rejected = beta * (policy_rejected - (zero if reference_free else ref_rejected))
    return DPOLoss(losses.mean(), chosen.detach(), rejected.detach())


def best_worst_pairs(rewards: torch.Tensor, lengths: torch.Tensor, length_penalty: float = 0.0,
                     tol: float = 1e-6) -> tuple[list[tuple[int, int, int]], int]:
    """Online DPO pair selection (best-of-n vs worst-of-n): rewards and response lengths ``(P, n)`` of the
    ``n`` samples of ``P`` prompts; a sample's score is ``reward - length_penalty * length``.

    Returns ``[(prompt, best sample, worst sample), ...]`` and the number of prompts skipped because the
    best and the worst score tie (every score of the group equal within ``tol``): they carry no preference.
    Ties for first or last place go to the lower sample index, so the choice is reproducible."""
    if rewards.dim() != 2 or rewards.shape != lengths.shape:
        raise ValueError(f"best_worst_pairs: rewards {tuple(rewards.shape)} and lengths {tuple(lengths.shape)} "
                         "must both be (prompts, samples)")
    scores = rewards.double() - length_penalty * lengths.double()
    pairs, skipped = [], 0
    for i, row in enumerate(scores.tolist()):
        hi, lo = max(row), min(row)
        if hi - lo <= tol:
            skipped += 1
            continue
        pairs.append((i, row.index(hi), row.index(lo)))
    return pairs, skipped
