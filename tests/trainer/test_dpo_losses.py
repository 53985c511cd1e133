"""DPO math against hand-computed references: the losses (sigmoid, label smoothing, IPO, hinge, reference-free),
the implicit rewards, sequence log-probs over response tokens only, best/worst pair selection, the round plan."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import ops  # noqa: E402
from rlhf_trainer.dpo_rounds import RoundPlan, checkpoint_every, slot_pair, steps_per_round  # noqa: E402

# One pair: policy log-probs of chosen/rejected -1.0/-3.0, reference -2.0/-2.5.
# h = (pi_w - pi_l) - (ref_w - ref_l) = (-1 + 3) - (-2 + 2.5) = 2 - 0.5 = 1.5
PC, PR, RC, RR = -1.0, -3.0, -2.0, -2.5


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def loss(**kw):
    return ops.dpo_loss(t(PC), t(PR), t(RC), t(RR), **kw)


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log(1.0 + math.exp(x))


def test_sigmoid_loss_and_implicit_rewards():
    out = loss(beta=0.1)
    # -log sigmoid(0.1 * 1.5) = log(1 + e^-0.15) = log(1.860708) = 0.620957
    assert float(out.loss) == pytest.approx(softplus(-0.15), abs=1e-12)
    assert float(out.loss) == pytest.approx(0.620957, abs=1e-6)
    # rewards: beta * (pi - ref): chosen 0.1 * (-1 + 2) = 0.1, rejected 0.1 * (-3 + 2.5) = -0.05
    assert float(out.chosen_rewards) == pytest.approx(0.1)
    assert float(out.rejected_rewards) == pytest.approx(-0.05)


def test_label_smoothing_is_conservative_dpo():
    out = loss(beta=0.1, label_smoothing=0.2)
    # 0.8 * log(1 + e^-0.15) + 0.2 * log(1 + e^0.15) = 0.8 * 0.620957 + 0.2 * 0.770957 = 0.650957
    assert float(out.loss) == pytest.approx(0.8 * softplus(-0.15) + 0.2 * softplus(0.15), abs=1e-12)
    assert float(out.loss) == pytest.approx(0.650957, abs=1e-6)
    # At h = 0 smoothing changes nothing: log 2 either way.
    assert float(ops.dpo_sigmoid_loss(t(0.0), 0.1, 0.3)) == pytest.approx(math.log(2.0))


def test_ipo_loss():
    # (h - 1 / (2 beta))^2 = (1.5 - 5)^2 = 12.25
    assert float(loss(beta=0.1, loss_type="ipo").loss) == pytest.approx(12.25)
    # at the target gap 1 / (2 * 0.5) = 1 the loss is 0
    assert float(ops.ipo_loss(t(1.0), 0.5)) == pytest.approx(0.0)


def test_hinge_loss():
    # max(0, 1 - 0.1 * 1.5) = 0.85; with beta 1: max(0, 1 - 1.5) = 0
    assert float(loss(beta=0.1, loss_type="hinge").loss) == pytest.approx(0.85)
    assert float(loss(beta=1.0, loss_type="hinge").loss) == 0.0


def test_reference_free_ignores_the_reference():
    out = loss(beta=0.1, reference_free=True)
    # h = pi_w - pi_l = 2: log(1 + e^-0.2) = 0.598139
    assert float(out.loss) == pytest.approx(0.598139, abs=1e-6)
    assert float(out.chosen_rewards) == pytest.approx(-0.1) and float(out.rejected_rewards) == pytest.approx(-0.3)


def test_loss_is_the_mean_over_pairs_and_unknown_loss_is_refused():
    out = ops.dpo_loss(t(PC, 0.0), t(PR, 0.0), t(RC, 0.0), t(RR, 0.0), beta=0.1)
    assert float(out.loss) == pytest.approx((0.620957 + math.log(2.0)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        loss(beta=0.1, loss_type="kto")


def test_gradient_raises_the_chosen_and_lowers_the_rejected():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    ops.dpo_loss(pc, pr, t(RC), t(RR), beta=0.1).loss.backward()
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.15) = -0.046257
    assert float(pc.grad) == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-12)
    assert float(pr.grad) == pytest.approx(0.1 / (1 + math.exp(0.15)), abs=1e-12)


def test_sequence_logprobs_count_response_tokens_only():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.zeros(2, 4, 3, dtype=torch.float64)
    # Row 0: prompt token, two response tokens (ids 1, 0), one pad. Token t is predicted by logits[t - 1].
    logits[0, 0] = t(0.0, ln2, 0.0)  # softmax 1/4, 2/4, 1/4: log p(1) = log 0.5
    logits[0, 1] = t(ln3, 0.0, 0.0)  # softmax 3/5, 1/5, 1/5: log p(0) = log 0.6
    logits[0, 2] = t(1000.0, -1000.0, 0.0)  # predicts the pad: must not count
    # Row 1: uniform logits, prompt of two tokens, two response tokens: 2 * log(1/3)
    labels = torch.tensor([[-100, 1, 0, -100], [-100, -100, 2, 1]])
    out = ops.sequence_logprobs(logits, labels)
    assert out.tolist() == pytest.approx([math.log(0.3), -2 * ln3], abs=1e-6)  # computed in float32


def test_best_worst_pairs_with_length_penalty_and_ties():
    rewards = t(1, 3, 2, 2, 2, 2, 0, 5, 5, 3, 1, 3, 1.0, 1.5, 2.0).view(5, 3)
    lengths = t(2, 2, 2, 4, 4, 4, 1, 12, 2, 2, 2, 2, 0, 1, 2).view(5, 3)
    pairs, skipped = ops.best_worst_pairs(rewards, lengths, length_penalty=0.5)
    # scores r - 0.5 * len: [0, 2, 1] -> (1, 0); [0, 0, 0] skipped; [-0.5, -1, 4] -> (2, 1) (the long sample of
    # reward 5 is the worst); [2, 0, 2] tie for best -> first, (0, 1); [1, 1, 1] skipped (penalty evens them).
    assert pairs == [(0, 1, 0), (2, 2, 1), (3, 0, 1)] and skipped == 2
    # without the penalty the third group's first 5 wins and the last group pairs (2, 0)
    pairs, skipped = ops.best_worst_pairs(rewards, lengths, length_penalty=0.0)
    assert pairs == [(0, 1, 0), (2, 1, 0), (3, 0, 1), (4, 2, 0)] and skipped == 1
    with pytest.raises(ValueError, match="prompts, samples"):
        ops.best_worst_pairs(rewards.flatten(), lengths.flatten())


def test_round_plan_arithmetic():
    # 16 prompts per round, 2 epochs, global batch 8 -> 4 steps; max_steps 12 over 3 rounds -> 4
    assert steps_per_round(16, 2.0, 8, 0, 3) == 4 and steps_per_round(16, 2.0, 8, 12, 3) == 4
    assert steps_per_round(4, 1.0, 8, 0, 3) == 1  # at least one step
    # a checkpoint at every round's end: the largest divisor of the round's steps <= every_steps
    assert [checkpoint_every(e, 8) for e in (0, 1, 3, 4, 5, 8, 50)] == [8, 1, 2, 4, 4, 8, 8]
    plan = RoundPlan(rounds=3, steps_per_round=4, micro_batch=2, world_size=2, grad_accum=2, seed=0)
    assert plan.total_steps == 12 and plan.global_batch == 8
    # step 5 = round 1, its second step: slots 8.. ; micro 1, rank 1 -> (1 * 2 + 1) * 2 = 6 further
    assert plan.indices(5, 1, 1) == [(1, 14), (1, 15)]
    assert [plan.round_of(s) for s in (0, 3, 4, 11)] == [0, 0, 1, 2]
    # slots cycle through a round's pairs in seeded epochs: each of 3 pairs once per epoch
    picks = [slot_pair(s, 3, 7, 1) for s in range(9)]
    assert sorted(picks[:3]) == sorted(picks[3:6]) == sorted(picks[6:]) == [0, 1, 2]
