"""The rollout sampler at hardware speed, and still exact: static KV cache, EOS checked every k steps, sampling
on the device, an optional compiled decode step, the ZeRO-3 gather around generation, prompts encoded once."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_trainer.ppo import left_pad  # noqa: E402
from rlhf_trainer.ppo_rollout import (  # noqa: E402
    GenerationOptions,
    filter_logits,
    position_ids,
    response_logprobs,
    sample_responses,
    sample_tokens,
)
from trainer_support import token_lm  # noqa: E402

VOCAB, PAD, EOS = 24, 0, 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]

pytestmark = pytest.mark.usefixtures("one_thread")  # trainer/conftest.py: one torch thread


@pytest.fixture(scope="module")
def lm():
    return token_lm(VOCAB, EOS, PAD, positions=128)


@torch.no_grad()
def per_step_reference(model, query, query_mask, max_new_tokens, temperature, generator, top_k=0, top_p=1.0):
    """The sampler as it was before: a growing (dynamic) cache, torch.multinomial, and a host read of "all
    ended?" after every token."""
    batch = query.shape[0]
    attn = query_mask.long()
    pos = position_ids(attn)
    out = model(input_ids=query, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits, next_pos = out.past_key_values, out.logits[:, -1, :], pos[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens, masks = [], []
    for step in range(max_new_tokens):
        probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, PAD), tok)
        masks.append(~finished)
        tokens.append(tok)
        finished = finished | (tok == EOS)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past,
                    use_cache=True)
        past, logits, next_pos = out.past_key_values, out.logits[:, -1, :], next_pos + 1
    return torch.stack(tokens, 1), torch.stack(masks, 1).long()


def sample(model, seed, options=None, max_new_tokens=40, temperature=1.5, **kw):
    query, qmask = left_pad(PROMPTS, PAD)
    return sample_responses(model, query, qmask, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                            temperature=temperature, generator=torch.Generator().manual_seed(seed),
                            options=options, **kw)


def test_exponential_race_draws_what_multinomial_draws():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits / 0.7, -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    got = sample_tokens(logits, 0.7, 0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    kept = ~torch.isinf(filter_logits(logits / 0.7, 3, 0.9))
    for seed in range(20):  # filtered tokens are never drawn
        tok = sample_tokens(logits, 0.7, 3, 0.9, torch.Generator().manual_seed(seed))
        assert kept.gather(1, tok[:, None]).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_new_sampler_gives_the_tokens_and_masks_of_the_per_step_sampler(lm, seed):
    query, qmask = left_pad(PROMPTS, PAD)
    want = per_step_reference(lm, query, qmask, 40, 1.5, torch.Generator().manual_seed(seed))
    lengths = want[1].sum(1).tolist()
    assert min(lengths) < 40, "some row must end early for the test to mean something"
    for every in (1, 3, 8, 16, 64):
        got = sample(lm, seed, GenerationOptions(eos_check_every=every))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"eos_check_every={every}"
    dynamic = sample(lm, seed, GenerationOptions(eos_check_every=8, static_cache=False))
    assert torch.equal(dynamic[0], want[0]) and torch.equal(dynamic[1], want[1])


def test_response_ends_with_the_step_of_the_last_eos_whatever_k():
    # A model that emits EOS at step 2 for every row, then keeps emitting token 3.
    class Scripted(torch.nn.Module):
        calls = 0

        def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
            Scripted.calls += 1
            step = 0 if past_key_values is None else past_key_values
            logits = torch.full((input_ids.shape[0], input_ids.shape[1], VOCAB), -1e9)
            logits[:, -1, EOS if step == 2 else 3] = 0.0
            return type("Out", (), {"logits": logits, "past_key_values": step + 1})()

    query, qmask = left_pad(PROMPTS, PAD)
    for every, forwards in ((1, 3), (4, 4), (16, 16)):
        Scripted.calls = 0
        resp, mask = sample_responses(Scripted(), query, qmask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD,
                                      options=GenerationOptions(eos_check_every=every))
        assert resp.tolist() == [[3, 3, EOS]] * 4 and mask.tolist() == [[1, 1, 1]] * 4
        assert Scripted.calls == forwards  # at most k - 1 decode steps after the last EOS


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor -> Python value conversions (each one a device -> host synchronisation on a GPU)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_decode_loop_reads_nothing_back_between_eos_checks(lm):
    counts, lengths = {}, {}
    for every in (1, 8, 64):
        with HostReads() as reads:
            resp, _ = sample(lm, 0, GenerationOptions(eos_check_every=every), max_new_tokens=32, temperature=0.3,
                             top_k=5, top_p=0.9)
        counts[every], lengths[every] = reads.count, resp.shape[1]
    assert lengths == {1: 32, 8: 32, 64: 32}, "no early end: every decode step runs"
    fixed = counts[64]  # k > steps: no check inside the loop, only the reads before and after it
    assert fixed <= 2, counts
    assert counts[1] - fixed == 32, counts  # one "all ended?" read per token
    assert counts[8] - fixed == 32 // 8, counts  # one per 8 tokens, nothing else per token


def test_seeded_rollout_reproduces_and_sampler_logprobs_match_a_full_forward(lm):
    a = sample(lm, 7, GenerationOptions(), temperature=0.8, return_logprobs=True)
    b = sample(lm, 7, GenerationOptions(eos_check_every=5), temperature=0.8, return_logprobs=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    query, qmask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        full, _ = response_logprobs(lm, query, qmask, a[0], a[1], temperature=0.8)
    torch.testing.assert_close(a[2], full * a[1], atol=1e-5, rtol=1e-5)
    assert (a[2][a[1] == 0] == 0).all()


def test_compiled_decode_step_gives_the_same_tokens_and_a_failing_compile_falls_back(lm, capsys):
    eager = sample(lm, 3, GenerationOptions(eos_check_every=4))
    compiled_model = transformers.GPT2LMHeadModel(lm.config).eval()
    compiled_model.load_state_dict(lm.state_dict())
    graph = sample(compiled_model, 3, GenerationOptions(eos_check_every=4, compile=True, compile_backend="eager"),
                   cache_length=64)
    assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    failing = transformers.GPT2LMHeadModel(lm.config).eval()
    failing.load_state_dict(lm.state_dict())
    opts = GenerationOptions(eos_check_every=4, compile=True, compile_backend=broken_backend)
    fallback = sample(failing, 3, opts)
    assert torch.equal(fallback[0], eager[0]) and torch.equal(fallback[1], eager[1])  # same draws after the retry
    assert "compiled decode step failed" in capsys.readouterr().err
    again = sample(failing, 3, opts)  # no second attempt to compile
    assert torch.equal(again[0], eager[0]) and "compiled decode step failed" not in capsys.readouterr().err


def test_compile_is_off_on_the_cpu_unless_forced_and_options_come_from_the_environment(lm):
    from rlhf_trainer import ppo_rollout

    model = transformers.GPT2LMHeadModel(lm.config).eval()
    model.load_state_dict(lm.state_dict())
    got = sample(model, 2, GenerationOptions(compile=True))  # no backend forced: eager on the CPU
    want = sample(lm, 2, GenerationOptions())
    assert torch.equal(got[0], want[0]) and "decode" not in ppo_rollout._COMPILED.get(model, {})
    assert GenerationOptions.from_env({}) == GenerationOptions(eos_check_every=16, compile=False)
    opts = GenerationOptions.from_env({"RLHF_GENERATION_COMPILE": "1", "RLHF_EOS_CHECK_EVERY": "4"})
    assert opts.compile and opts.eos_check_every == 4
    with pytest.raises(ValueError, match="RLHF_EOS_CHECK_EVERY='0'"):
        GenerationOptions.from_env({"RLHF_EOS_CHECK_EVERY": "0"})
