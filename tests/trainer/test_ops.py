"""RLHF math helpers against hand-computed references (plain Python loops and worked numbers)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import ops  # noqa: E402


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_and_var_use_only_masked_entries():
    x = t([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    m = t([[1, 1, 0], [1, 0, 1]])
    vals = [1.0, 2.0, 3.0, 4.0]
    mean = sum(vals) / 4
    var_pop = sum((v - mean) ** 2 for v in vals) / 4
    assert ops.masked_mean(x, m).item() == pytest.approx(mean)
    assert ops.masked_var(x, m, unbiased=False).item() == pytest.approx(var_pop)
    assert ops.masked_var(x, m).item() == pytest.approx(var_pop * 4 / 3)
    # per-row mean
    assert ops.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.5])


def test_masked_whiten_zero_mean_unit_var_and_shift_option():
    x = t([[1.0, 2.0, 9.0], [3.0, 7.0, 4.0]])
    m = t([[1, 1, 0], [1, 0, 1]])
    w = ops.masked_whiten(x, m)
    vals = [1.0, 2.0, 3.0, 4.0]
    mean = 2.5
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3)
    expected = [[(1 - mean) / std, (2 - mean) / std, 0.0], [(3 - mean) / std, 0.0, (4 - mean) / std]]
    assert w.tolist()[0] == pytest.approx(expected[0])
    assert w.tolist()[1] == pytest.approx(expected[1])
    kept = ops.masked_whiten(x, m, shift_mean=False)
    assert ops.masked_mean(kept, m).item() == pytest.approx(mean)


def test_masked_var_unbiased_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        ops.masked_var(t([[1.0, 2.0]]), t([[1, 0]]))


# --- indexing ------------------------------------------------------------------------------------


def test_last_token_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    both = torch.tensor([[0, 1, 1, 0, 0]])  # left-padded prompt, right-padded response
    assert ops.last_token_index(left).tolist() == [3, 3, 3]
    assert ops.last_token_index(right).tolist() == [1, 2, 0]
    assert ops.last_token_index(both).tolist() == [2]
    assert ops.last_token_index(right.bool()).tolist() == [1, 2, 0]


def test_last_token_index_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        ops.last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_gather_logprobs_and_entropy_match_direct_formulas():
    logits = t([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]])
    tokens = torch.tensor([[1, 2]])
    lp = ops.gather_logprobs(logits, tokens)
    for pos, (row, tok) in enumerate(zip(logits[0].tolist(), tokens[0].tolist(), strict=True)):
        z = sum(math.exp(v) for v in row)
        assert lp[0, pos].item() == pytest.approx(row[tok] - math.log(z), rel=1e-6)
        probs = [math.exp(v) / z for v in row]
        ent = -sum(p * math.log(p) for p in probs)
        assert ops.entropy_from_logits(logits)[0, pos].item() == pytest.approx(ent, rel=1e-6)


# --- reward model --------------------------------------------------------------------------------


def test_pairwise_loss_hand_computed_with_margin():
    rc, rr = t([2.0, 0.0, -1.0]), t([1.0, 0.5, -3.0])
    expected = sum(-math.log(sigmoid(c - r)) for c, r in zip([2.0, 0.0, -1.0], [1.0, 0.5, -3.0], strict=True)) / 3
    assert ops.pairwise_loss(rc, rr).item() == pytest.approx(expected)
    expected_m = sum(-math.log(sigmoid(c - r - 0.5)) for c, r in zip([2.0, 0.0, -1.0], [1.0, 0.5, -3.0], strict=True)) / 3
    assert ops.pairwise_loss(rc, rr, margin=0.5).item() == pytest.approx(expected_m)
    # per-pair margins
    margins = t([0.0, 1.0, 2.0])
    expected_v = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.5)) - math.log(sigmoid(0.0))) / 3
    assert ops.pairwise_loss(rc, rr, margins).item() == pytest.approx(expected_v)


def test_pairwise_loss_gradient_pushes_chosen_up():
    rc = t([0.3], dtype=torch.float32).requires_grad_()
    rr = t([0.1], dtype=torch.float32).requires_grad_()
    ops.pairwise_loss(rc, rr).backward()
    assert rc.grad.item() == pytest.approx(-(1 - sigmoid(0.2)), rel=1e-5)
    assert rr.grad.item() == pytest.approx(1 - sigmoid(0.2), rel=1e-5)


# --- KL ------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    k1 = [-1.0 + 1.5, -2.0 + 1.0]
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert ops.kl_penalty(logp, ref, "k1").tolist() == pytest.approx(k1)
    assert ops.kl_penalty(logp, ref, "k3").tolist() == pytest.approx(k3)
    assert ops.kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert (ops.kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        ops.kl_penalty(logp, ref, "k9")


def test_kl_estimators_are_unbiased_for_true_kl():
    # pi = Categorical(p), ref = Categorical(q): E_pi[k1] = E_pi[k3] = KL(p || q).
    p, q = t([0.7, 0.2, 0.1]), t([0.3, 0.3, 0.4])
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    logp, ref = p.log(), q.log()
    for est in ("k1", "k3"):
        expectation = (p * ops.kl_penalty(logp, ref, est)).sum().item()
        assert expectation == pytest.approx(true_kl)


def test_adaptive_kl_controller_update_rule():
    c = ops.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    # KL 9 -> error 0.5 clipped to 0.2 -> beta * (1 + 0.2 * 100 / 1000)
    assert c.update(9.0, 100) == pytest.approx(0.1 * 1.02)
    # KL 5.4 -> error -0.1 -> * (1 - 0.1 * 50 / 1000)
    assert c.update(5.4, 50) == pytest.approx(0.1 * 1.02 * 0.995)
    state = c.state_dict()
    d = ops.AdaptiveKLController(0.5, target=6.0, horizon=1000)
    d.load_state_dict(state)
    assert d.value == pytest.approx(c.value)
    fixed = ops.make_kl_controller(0.05)
    assert isinstance(fixed, ops.FixedKLController) and not isinstance(fixed, ops.AdaptiveKLController)
    assert fixed.update(100.0, 1000) == 0.05
    assert isinstance(ops.make_kl_controller(0.05, 1.0, 10), ops.AdaptiveKLController)


# --- PPO -----------------------------------------------------------------------------------------


def test_token_rewards_score_on_last_real_token_not_first_pad():
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 0.7, 0.8]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1]])
    scores = t([2.0, -10.0])
    r = ops.token_rewards(scores, kl, mask, kl_coef=0.5, reward_clip=3.0)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1 + 2.0, 0.0, 0.0])
    assert r[1].tolist() == pytest.approx([-0.25, 0.05, -0.35, -0.4 - 3.0])
    unclipped = ops.token_rewards(scores, kl, mask, kl_coef=0.0)
    assert unclipped[1, 3].item() == pytest.approx(-10.0)


def test_normalize_scores():
    assert ops.normalize_scores(t([3.0, 1.0]), 1.0, 2.0).tolist() == pytest.approx([1.0, 0.0])
    assert ops.normalize_scores(t([3.0]), None, None).tolist() == [3.0]


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain Python GAE over the real tokens of each row, terminal value 0."""
    out_adv, out_ret = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask, strict=True):
        idx = [i for i, m in enumerate(m_row) if m]
        adv = [0.0] * len(r_row)
        last = 0.0
        for k in reversed(range(len(idx))):
            i = idx[k]
            next_v = v_row[idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r_row[i] + gamma * next_v - v_row[i]
            last = delta + gamma * lam * last
            adv[i] = last
        out_adv.append(adv)
        out_ret.append([a + v if m else 0.0 for a, v, m in zip(adv, v_row, m_row, strict=True)])
    return out_adv, out_ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_compute_gae_matches_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=g, dtype=torch.float64)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = t([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 0, 0]])
    rewards = rewards * mask
    adv, ret = ops.compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    for row in range(4):
        assert adv[row].tolist() == pytest.approx(ref_adv[row])
        assert ret[row].tolist() == pytest.approx(ref_ret[row])


def test_compute_gae_worked_example():
    # gamma = 1, lam = 1: A_t = sum of future rewards - V_t; returns = reward-to-go.
    rewards, values, mask = t([[0.0, 0.0, 1.0, 0.0]]), t([[0.5, 0.2, 0.1, 9.0]]), t([[1, 1, 1, 0]])
    adv, ret = ops.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.8, 0.9, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_policy_loss_clipped_surrogate_hand_computed():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5)]])
    adv = t([[1.0, -1.0, 2.0, -1.0]])
    mask = t([[1, 1, 1, 0]])
    out = ops.policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: ratio 1.5, A=1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 0.5, A=-1 -> max(0.5, 0.8) = 0.8 (clipped)
    # token 2: ratio 1.1, A=2 -> max(-2.2, -2.2) = -2.2 (not clipped)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 3)


def test_policy_loss_gradient_is_zero_where_clipped():
    old = t([[0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(1.1)]]).requires_grad_()
    out = ops.policy_loss(logp, old, t([[1.0, 1.0]]), t([[1, 1]]), cliprange=0.2)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)


def test_value_loss_clipped_hand_computed():
    old = t([[1.0, 1.0, 1.0]])
    new = t([[2.0, 1.1, 0.0]])
    ret = t([[3.0, 0.0, 0.5]])
    mask = t([[1, 1, 1]])
    out = ops.value_loss(new, old, ret, mask, cliprange_value=0.2)
    # token 0: unclipped (2-3)^2=1, clipped (1.2-3)^2=3.24 -> 3.24
    # token 1: unclipped 1.21, clipped 1.21 -> 1.21
    # token 2: unclipped 0.25, clipped (0.8-0.5)^2=0.09 -> 0.25
    assert out.loss.item() == pytest.approx(0.5 * (3.24 + 1.21 + 0.25) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    plain = ops.value_loss(new, old, ret, mask, cliprange_value=0.0)
    assert plain.loss.item() == pytest.approx(0.5 * (1 + 1.21 + 0.25) / 3)


# --- critic-free advantages ----------------------------------------------------------------------


def test_group_mean_std_per_prompt_group_with_a_sample_mask():
    scores = t([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 100.0, 2.0])
    mask = t([1, 1, 1, 1, 1, 1, 0, 1])
    mean, std = ops.masked_group_mean_std(scores, 4, mask)
    # group 1: mean 0.5, unbiased var ((0.5^2) * 4) / 3; group 2 without the masked 100: 3, 1, 2 -> mean 2, var 1
    assert mean.tolist() == pytest.approx([0.5] * 4 + [2.0] * 4)
    assert std.tolist() == pytest.approx([math.sqrt(1 / 3)] * 4 + [1.0] * 4)
    lone_mean, lone_std = ops.masked_group_mean_std(t([5.0, 7.0]), 2, t([1, 0]))
    assert lone_mean.tolist() == [5.0, 5.0] and lone_std.tolist() == [0.0, 0.0]  # one sample: no spread
    with pytest.raises(ValueError, match="whole groups of 4"):
        ops.masked_group_mean_std(t([1.0, 2.0, 3.0]), 4)


def test_grpo_advantages_and_the_dr_grpo_variant():
    scores = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)
    adv = ops.grpo_advantages(scores, 4, normalize_std=True, eps=1e-4)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected)
    dr = ops.grpo_advantages(scores, 4, normalize_std=False)
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    # Dr. GRPO keeps the scale of the rewards: a group twice as spread out gets twice the advantage,
    # GRPO gives both the same unit-std advantages.
    wide = t([2.0, 0.0, 0.0, 2.0])
    assert ops.grpo_advantages(wide, 4, normalize_std=False).tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    assert ops.grpo_advantages(wide, 4).tolist() == pytest.approx(adv[:4].tolist(), rel=1e-3)
    masked = ops.grpo_advantages(t([3.0, 1.0, 100.0, 2.0]), 4, mask=t([1, 1, 0, 1]), eps=0.0)
    assert masked.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    scores = t([1.0, 0.0, 0.0, 1.0])
    # sample 0: 1 - (0 + 0 + 1) / 3; sample 1: 0 - (1 + 0 + 1) / 3
    assert ops.rloo_advantages(scores, 4).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    masked = ops.rloo_advantages(t([3.0, 1.0, 100.0, 2.0]), 4, t([1, 1, 0, 1]))
    assert masked.tolist() == pytest.approx([3.0 - 1.5, 1.0 - 2.5, 0.0, 2.0 - 2.0])
    # k / (k - 1) times the mean-centred reward: the same direction as Dr. GRPO, a larger scale
    assert ops.rloo_advantages(scores, 4).tolist() == pytest.approx(
        (ops.grpo_advantages(scores, 4, normalize_std=False) * 4 / 3).tolist())
    assert ops.rloo_advantages(t([4.0, 9.0]), 2, t([1, 0])).tolist() == [0.0, 0.0]  # no other sample, no baseline


def test_zero_variance_group_fraction():
    assert ops.zero_variance_group_fraction(t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2) == pytest.approx(2 / 3)


def test_discounted_returns_skip_padding():
    rewards = t([[1.0, 2.0, 3.0, 9.0], [0.5, 0.0, 0.0, 0.0], [1.0, 9.0, 2.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0]])
    g = ops.discounted_returns(rewards, mask, gamma=0.5)
    assert g[0].tolist() == pytest.approx([1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0, 0.0])
    assert g[1].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert g[2].tolist() == pytest.approx([1 + 0.5 * 2, 0.0, 2.0, 0.0])


def test_reinforce_pp_normalises_returns_over_the_whole_batch():
    rewards = t([[-0.1, -0.2, 3.0], [0.5, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    adv, ret = ops.reinforce_pp_advantages(rewards, mask, gamma=1.0)
    vals = [2.7, 2.8, 3.0, 0.5]
    assert [ret[0, 0].item(), ret[0, 1].item(), ret[0, 2].item(), ret[1, 0].item()] == pytest.approx(vals)
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3 + 1e-8)
    assert adv[0].tolist() == pytest.approx([(v - mean) / std for v in vals[:3]])
    assert adv[1].tolist() == pytest.approx([(0.5 - mean) / std, 0.0, 0.0])
    # Two processes with the same batch: the sums double, the mean stays, the variance uses 2n - 1.
    both = ops.whiten_over_batch(ret, mask, total=lambda v: 2 * v)
    var2 = 2 * sum((v - mean) ** 2 for v in vals) / (2 * 4 - 1)
    assert both[0, 0].item() == pytest.approx((2.7 - mean) / math.sqrt(var2 + 1e-8))
    torch.testing.assert_close(ops.whiten_over_batch(ret, mask), ops.masked_whiten(ret, mask))


def test_kl_loss_is_k3_of_the_current_policy_and_pulls_towards_the_reference():
    logp = t([[-1.0, -2.0, -7.0]]).requires_grad_()
    ref = t([[-1.5, -1.0, -3.0]])
    mask = t([[1, 1, 0]])
    loss = ops.kl_loss(logp, ref, mask)
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert loss.item() == pytest.approx(sum(k3) / 2)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp): descending moves logp towards ref
    assert logp.grad[0].tolist() == pytest.approx([(1 - math.exp(-0.5)) / 2, (1 - math.exp(1.0)) / 2, 0.0])
