"""Tokenise once: a dataset's ids are computed in batched tokenizer calls before training, equal to the
per-example encoders, kept on disk under a key of (examples, tokenizer, settings), and a training step of
the reward or SFT stage runs no tokenizer at all."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import models, reward, sft  # noqa: E402
from rlhf_trainer.config import ModelConfig  # noqa: E402
from rlhf_trainer.data import token_cache  # noqa: E402
from rlhf_trainer.data.encoding import (  # noqa: E402
    collate_encoded_pairs,
    collate_pairs,
    encode_pairs,
    encode_sft,
    encode_sft_many,
)
from rlhf_trainer.data.formats import PreferencePair, SFTExample  # noqa: E402
from rlhf_trainer.runtime.strategy import Strategy  # noqa: E402
from trainer_support import counting_examples, sentiment_pairs, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def bert_tok(minilm_path):
    return models.load_tokenizer(ModelConfig(path=minilm_path))


def pairs(n: int = 12) -> list[PreferencePair]:
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in sentiment_pairs(n)]


def examples(n: int = 12) -> list[SFTExample]:
    return [SFTExample(r["prompt"], r["response"]) for r in counting_examples(n)]


def test_batched_encoders_equal_the_per_example_ones(bert_tok):
    ps = pairs() + [PreferencePair("", " x", " " + "y " * 300)]  # an empty prompt and a cut one
    expected = collate_pairs(bert_tok, ps, 48)
    torch.testing.assert_close(collate_encoded_pairs(bert_tok, encode_pairs(bert_tok, ps, 48)), expected)
    exs = examples() + [SFTExample("p " * 100, "r " * 100)]
    assert encode_sft_many(bert_tok, exs, 40) == [encode_sft(bert_tok, e, 40) for e in exs]
    assert encode_sft_many(bert_tok, exs, 40, True) == [encode_sft(bert_tok, e, 40, True) for e in exs]


def test_ids_are_cached_by_examples_tokenizer_and_settings(bert_tok, tmp_path):
    calls = []

    def encode(items):
        calls.append(len(items))
        return encode_pairs(bert_tok, items, 32)

    ps = pairs()
    first = token_cache.cached("pairs", bert_tok, {"max_length": 32}, ps, encode, tmp_path)
    again = token_cache.cached("pairs", bert_tok, {"max_length": 32}, ps, encode, tmp_path)
    assert again == first and calls == [12]  # the second read came from the file
    token_cache.cached("pairs", bert_tok, {"max_length": 16}, ps, encode, tmp_path)
    edited = [PreferencePair(ps[0].prompt, ps[0].chosen + " more", ps[0].rejected), *ps[1:]]
    token_cache.cached("pairs", bert_tok, {"max_length": 32}, edited, encode, tmp_path)
    assert calls == [12, 12, 12]  # other settings or an edited example: a new key
    files = sorted(tmp_path.glob("pairs-*.safetensors"))
    assert len(files) == 3
    for f in files:
        f.write_bytes(f.read_bytes()[:40])  # torn files are recomputed, not trusted
    assert token_cache.cached("pairs", bert_tok, {"max_length": 32}, ps, encode, tmp_path) == first
    assert calls == [12, 12, 12, 12]


class NoTokenizing:
    """A tokenizer stand-in for the training steps: padding ids only; any tokenisation is an error."""

    def __init__(self, tok):
        self.pad_token_id = tok.pad_token_id

    def __call__(self, *args, **kwargs):
        raise AssertionError("a training step tokenised text")


def test_reward_and_sft_steps_do_not_tokenise(make_cfg, minilm_path, tmp_path, bert_tok):
    rm_cfg = make_cfg("reward", write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(8)), tmp_path / "rm")
    strategy = Strategy(rm_cfg)
    trainer = reward.RewardTrainer(rm_cfg, strategy, bert_tok, pairs(8), pairs(4))
    assert (tmp_path / "rm" / token_cache.SUBDIR).is_dir()  # cached on the job's claim
    trainer.tokenizer = NoTokenizing(bert_tok)
    model = models.build_reward_model(rm_cfg.model, bert_tok)
    loss, stats = trainer.micro_step(model, [0, 1, 2])
    assert torch.isfinite(loss) and stats["samples"] == 3

    sft_cfg = make_cfg("sft", write_jsonl(tmp_path / "sft.jsonl", counting_examples(8)), tmp_path / "sft")
    data = sft.SFTData(sft_cfg, bert_tok, examples(8))
    step = sft.SFTTrainer(sft_cfg, Strategy(sft_cfg), NoTokenizing(bert_tok), data, data)
    loss, stats = step.micro_step(models.load_causal_lm(sft_cfg.model, bert_tok), [0, 1])
    assert torch.isfinite(loss) and stats["samples"] == 2
