"""PPO experience pieces on a tiny GPT-2: sampling with left padding, log-prob alignment, rewards, schedule."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_trainer import ops  # noqa: E402
from rlhf_trainer.data.formats import Record  # noqa: E402
from rlhf_trainer.ppo import PromptSchedule, left_pad  # noqa: E402
from rlhf_trainer.ppo_rollout import (  # noqa: E402
    filter_logits,
    finish_rollout,
    response_logprobs,
    sample_responses,
)
from rlhf_trainer.ppo_scorers import CountScorer, rule_scorer  # noqa: E402
from trainer_support import token_lm  # noqa: E402

VOCAB, PAD, EOS = 24, 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # trainer/conftest.py: one torch thread


@pytest.fixture(scope="module")
def lm():
    return token_lm(VOCAB, EOS, PAD, positions=64)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    # top-k keeps every token tied with the k-th best
    assert (~torch.isinf(filter_logits(logits, top_k=2))).tolist() == [[True, True, True, False]]
    kept = ~torch.isinf(filter_logits(logits, top_k=1))
    assert kept.tolist() == [[True, False, False, False]]
    # top_p = 0.6: 0.5 alone does not reach 0.6, so the next token (0.2) is kept; the rest dropped
    kept = ~torch.isinf(filter_logits(logits, top_p=0.6))
    assert kept.sum().item() == 2 and kept[0, 0]
    # top_p smaller than the best token keeps only the best token
    assert (~torch.isinf(filter_logits(logits, top_p=0.1))).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits), logits)


def test_left_pad():
    ids, mask = left_pad([[3, 4, 5], [6]], pad_id=PAD)
    assert ids.tolist() == [[3, 4, 5], [PAD, PAD, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_generation_is_independent_of_left_padding(lm):
    query, qmask = left_pad(PROMPTS, PAD)
    resp, rmask = sample_responses(lm, query, qmask, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD, top_k=1)
    for row, prompt in enumerate(PROMPTS):
        q = torch.tensor([prompt])
        alone, _ = sample_responses(lm, q, torch.ones_like(q), max_new_tokens=6, eos_token_id=None,
                                    pad_token_id=PAD, top_k=1)
        assert resp[row].tolist() == alone[0].tolist()
    assert rmask.sum().item() == 3 * 6


def test_sampled_responses_end_at_eos_and_pad_the_rest(lm):
    query, qmask = left_pad(PROMPTS, PAD)
    resp, rmask = sample_responses(lm, query, qmask, max_new_tokens=40, eos_token_id=EOS, pad_token_id=PAD,
                                   temperature=1.5, generator=torch.Generator().manual_seed(0))
    lengths = rmask.sum(1).tolist()
    assert min(lengths) < resp.shape[1], "with 40 tokens over 24 symbols some row must have sampled EOS"
    for row in range(resp.shape[0]):
        toks, m, n = resp[row].tolist(), rmask[row].tolist(), lengths[row]
        assert m == [1] * n + [0] * (len(m) - n), "the mask is a prefix of real tokens"
        assert EOS not in toks[: n - 1], "no EOS before the last real token"
        if n < len(toks):
            assert toks[n - 1] == EOS, "a row that stopped early ends with EOS"
        assert all(t == PAD for t in toks[n:]), "positions after the end hold the pad id"
    # The same generator seed reproduces the rollout exactly.
    again, _ = sample_responses(lm, query, qmask, max_new_tokens=40, eos_token_id=EOS, pad_token_id=PAD,
                                temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resp, again)


def test_eos_handling_with_forced_eos():
    # A model that always emits EOS after the first generated token.
    class Scripted(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
            logits = torch.full((input_ids.shape[0], input_ids.shape[1], VOCAB), -1e9)
            seen = attention_mask.shape[1]
            first = torch.tensor([[4.0 if i == 3 else -1e9 for i in range(VOCAB)]])
            logits[:, -1] = first if past_key_values is None else torch.tensor(
                [[0.0 if i == EOS else -1e9 for i in range(VOCAB)]])
            return type("Out", (), {"logits": logits, "past_key_values": seen})()

    query, qmask = left_pad(PROMPTS, PAD)
    resp, rmask = sample_responses(Scripted(), query, qmask, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    assert resp.tolist() == [[3, EOS]] * 3  # the loop stops when every row is done
    assert rmask.tolist() == [[1, 1]] * 3
    assert ops.last_token_index(rmask).tolist() == [1, 1, 1]


def test_response_logprobs_match_step_by_step_probabilities(lm):
    query, qmask = left_pad(PROMPTS, PAD)
    resp, rmask = sample_responses(lm, query, qmask, max_new_tokens=4, eos_token_id=None, pad_token_id=PAD,
                                   temperature=0.7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp, entropy = response_logprobs(lm, query, qmask, resp, rmask, temperature=0.7, with_entropy=True)
    # Reference: for each row without padding, score every prefix with a plain forward.
    for row, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for t in range(resp.shape[1]):
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([seq])).logits[0, -1] / 0.7
            probs = torch.softmax(logits.double(), -1)
            tok = resp[row, t].item()
            assert logp[row, t].item() == pytest.approx(math.log(probs[tok].item()), abs=1e-4)
            ent = -(probs * probs.log()).sum().item()
            assert entropy[row, t].item() == pytest.approx(ent, abs=1e-4)
            seq.append(tok)


def test_finish_rollout_places_score_on_last_real_token_and_masks_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0, -1.0, -5.0, -5.0], [-1.0] * 5])
    ref = torch.tensor([[-1.5, -2.0, -0.5, -1.0, -1.0], [-1.0] * 5])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.0] * 5])
    scores = torch.tensor([7.0, 1.0])
    ro = finish_rollout(
        query=torch.zeros(2, 1, dtype=torch.long), query_mask=torch.ones(2, 1, dtype=torch.long),
        response=torch.zeros(2, 5, dtype=torch.long), response_mask=mask, logprobs=logp, ref_logprobs=ref,
        values=values, scores=scores, kl_coef=0.1, kl_estimator="k1", reward_clip=4.0, score_mean=1.0,
        score_std=2.0, gamma=1.0, lam=1.0, whiten_advantages=False,
    )
    # normalised (7 - 1) / 2 = 3 (inside the clip) on token 2 of row 0; (1 - 1) / 2 = 0 on token 4 of row 1
    assert ro.kl[0].tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0])
    assert ro.rewards[0].tolist() == pytest.approx([-0.05, 0.0, 0.05 + 3.0, 0.0, 0.0])
    assert ro.rewards[1].tolist() == pytest.approx([0.0] * 5)
    # gamma = lam = 1: returns are rewards-to-go; padding values do not leak in
    assert ro.returns[0].tolist() == pytest.approx([3.0, 3.05, 3.05, 0.0, 0.0])
    assert ro.advantages[0].tolist() == pytest.approx([2.9, 2.85, 2.75, 0.0, 0.0])
    whitened = finish_rollout(
        query=ro.query, query_mask=ro.query_mask, response=ro.response, response_mask=mask, logprobs=logp,
        ref_logprobs=ref, values=values, scores=scores, kl_coef=0.1, kl_estimator="k1", reward_clip=4.0,
        score_mean=1.0, score_std=2.0, gamma=1.0, lam=1.0, whiten_advantages=True,
    )
    assert ops.masked_mean(whitened.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ops.masked_var(whitened.advantages, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert whitened.advantages[0, 3:].tolist() == [0.0, 0.0]


def test_minibatches_cover_the_rollout_once():
    mask = torch.ones(5, 2, dtype=torch.long)
    ro = finish_rollout(
        query=torch.arange(5)[:, None], query_mask=torch.ones(5, 1, dtype=torch.long), response=torch.zeros(5, 2, dtype=torch.long),
        response_mask=mask, logprobs=torch.zeros(5, 2), ref_logprobs=torch.zeros(5, 2), values=torch.zeros(5, 2),
        scores=torch.zeros(5), kl_coef=0.0, kl_estimator="k1", reward_clip=0.0, score_mean=None, score_std=None,
        gamma=1.0, lam=1.0, whiten_advantages=False,
    )
    batches = list(ro.minibatches(2, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(q for b in batches for q in b.query[:, 0].tolist()) == [0, 1, 2, 3, 4]


def test_prompt_schedule_epochs_and_ranks():
    s = PromptSchedule(n_prompts=10, per_rank=2, world_size=2, seed=3)
    first_epoch = [i for it in range(2) for r in range(2) for i in s.indices(it, r)]
    first_epoch += s.indices(2, 0)  # 10 slots = 2.5 iterations
    assert sorted(first_epoch) == list(range(10))
    assert set(s.indices(0, 0)).isdisjoint(s.indices(0, 1))
    assert s.position(3) == 12
    assert s.indices(5, 1) == PromptSchedule(10, 2, 2, 3).indices(5, 1)  # a pure function of the iteration


def test_count_scorer():
    recs = [Record(prompt="p", responses=())] * 3
    out = rule_scorer("count:good")(recs, ["good good", "bad", "goodgood good"])
    assert out.tolist() == [2.0, 0.0, 3.0]
    assert isinstance(rule_scorer("count: x"), CountScorer)
    with pytest.raises(ValueError, match="count:<text>"):
        rule_scorer("length")


def close(x: torch.Tensor, expected) -> None:
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), rtol=1e-5, atol=1e-6)


def _critic_free(estimator, scores, kl_in_loss, group_size=2, **kw):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    logp = torch.tensor([[-1.0, -1.0, -9.0], [-1.0, -2.0, -1.0], [-1.0, -9.0, -9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0], [-2.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    return mask, finish_rollout(
        query=torch.zeros(4, 1, dtype=torch.long), query_mask=torch.ones(4, 1, dtype=torch.long),
        response=torch.zeros(4, 3, dtype=torch.long), response_mask=mask, logprobs=logp, ref_logprobs=ref,
        values=None, scores=torch.tensor(scores), kl_coef=0.1, kl_estimator="k1", reward_clip=0.0, score_mean=None,
        score_std=None, gamma=1.0, lam=0.95, whiten_advantages=True, estimator=estimator, group_size=group_size,
        kl_in_loss=kl_in_loss, **kw,
    )


def test_grpo_rollout_spreads_each_group_advantage_over_its_tokens_and_keeps_kl_out_of_the_reward():
    mask, ro = _critic_free("grpo", [1.0, 0.0, 3.0, 3.0], kl_in_loss=True)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # group (1, 0): mean 0.5, std sqrt(0.5); group (3, 3): no spread
    close(ro.advantages, [[a, a, 0.0], [-a, -a, -a], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert ro.rewards.sum(1).tolist() == pytest.approx([1.0, 0.0, 3.0, 3.0])  # no KL in the reward
    assert ro.kl[0].tolist() == pytest.approx([0.5, 0.0, 0.0])  # still measured (k1 = logp - ref)
    assert ro.values.abs().sum() == 0 and ro.returns[2].tolist() == pytest.approx([3.0, 0.0, 0.0])
    _, dr = _critic_free("grpo", [1.0, 0.0, 3.0, 3.0], kl_in_loss=True, grpo_normalize_std=False)
    close(dr.advantages[:2], [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]])


def test_rloo_rollout_puts_the_summed_kl_into_the_sequence_reward():
    mask, ro = _critic_free("rloo", [1.0, 0.0, 3.0, 3.0], kl_in_loss=False)
    # sequence rewards: score - 0.1 * sum KL; KL sums (k1): row0 0.5, row1 -1, row2 1, row3 0
    seq = [1.0 - 0.05, 0.0 + 0.1, 3.0 - 0.1, 3.0]
    assert ro.rewards.sum(1).tolist() == pytest.approx(seq)
    expected = [seq[0] - seq[1], seq[1] - seq[0], seq[2] - seq[3], seq[3] - seq[2]]  # k = 2: the other sample
    close(ro.advantages, [[e * m for m in row] for e, row in zip(expected, mask.tolist(), strict=True)])


def test_reinforce_pp_rollout_normalises_rewards_to_go_over_the_batch():
    mask, ro = _critic_free("reinforce_plus_plus", [1.0, 0.0, 3.0, 3.0], kl_in_loss=False, group_size=1)
    togo = ops.discounted_returns(ro.rewards, mask, 1.0)
    torch.testing.assert_close(ro.returns, togo)
    assert ro.rewards[0].tolist() == pytest.approx([-0.05, 1.0, 0.0])  # per-token KL, score on the last real token
    assert ops.masked_mean(ro.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ops.masked_var(ro.advantages, mask).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="critic's values"):
        _critic_free("gae", [1.0, 0.0, 3.0, 3.0], kl_in_loss=False)
