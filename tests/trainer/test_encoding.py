"""Tokenisation rules shared by training, scoring and generation: EOS, padding, truncation, masks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import models  # noqa: E402
from rlhf_trainer.config import ModelConfig  # noqa: E402
from rlhf_trainer.data.encoding import (  # noqa: E402
    IGNORE_INDEX,
    collate_pairs,
    encode_for_scoring,
    encode_prompt,
    encode_sft,
    pack,
    render_full,
    render_prompt,
)
from rlhf_trainer.data.formats import PreferencePair, SFTExample  # noqa: E402
from rlhf_trainer.ops import last_token_index  # noqa: E402
from trainer_support import tiny_gpt2, word_tokenizer  # noqa: E402

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def bert_tok(minilm_path):
    return models.load_tokenizer(ModelConfig(path=minilm_path))


def test_pad_token_is_set_and_differs_from_eos(bert_tok):
    assert bert_tok.eos_token == "[SEP]" and bert_tok.pad_token == "[PAD]"
    gpt_like = models.prepare_tokenizer(word_tokenizer())
    assert gpt_like.pad_token == models.PAD_TOKEN and gpt_like.pad_token_id != gpt_like.eos_token_id
    # A model built for that tokenizer gets the grown vocabulary and the special ids in its config.
    model = models.load_causal_lm(ModelConfig(init_from_config=tiny_gpt2()), gpt_like)
    assert model.get_input_embeddings().weight.shape[0] == len(gpt_like)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (gpt_like.pad_token_id, gpt_like.eos_token_id)


def test_scoring_sequences_end_in_one_eos_and_keep_the_end_when_cut(bert_tok):
    ids = encode_for_scoring(bert_tok, "hello there", 32)
    assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.eos_token_id
    assert ids.count(bert_tok.eos_token_id) == 1
    long = " ".join(f"w{i}" for i in range(200)) + " the final answer"
    cut = encode_for_scoring(bert_tok, long, 16)
    assert len(cut) == 16 and cut[0] == bert_tok.cls_token_id and cut[-1] == bert_tok.eos_token_id
    assert bert_tok.decode(cut[-4:-1]) == "the final answer"
    gpt_like = models.prepare_tokenizer(word_tokenizer())
    ids = encode_for_scoring(gpt_like, "how was it", 16)
    assert ids == [*gpt_like("how was it")["input_ids"], gpt_like.eos_token_id]  # no start token for GPT-2 style


def test_pair_batches_put_chosen_first_and_read_the_score_at_eos(bert_tok):
    pairs = [PreferencePair("Q:", " good answer", " bad"), PreferencePair("Q2:", " ok", " a much longer bad answer")]
    batch = collate_pairs(bert_tok, pairs, 64)
    assert batch["input_ids"].shape[0] == 4
    assert bert_tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "q : good answer"
    assert bert_tok.decode(batch["input_ids"][2], skip_special_tokens=True) == "q : bad"
    last = last_token_index(batch["attention_mask"])
    assert (batch["input_ids"].gather(1, last[:, None]).squeeze(1) == bert_tok.eos_token_id).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bert_tok.pad_token_id).all()


def test_sft_labels_cover_only_the_response_and_its_eos():
    tok = models.prepare_tokenizer(word_tokenizer())
    ex = SFTExample("Question 1: how was it?", " great and kind")
    ids, labels = encode_sft(tok, ex, 64)
    n_prompt = len(tok(ex.prompt)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "great and kind"
    ids2, labels2 = encode_sft(tok, ex, 64, loss_on_prompt=True)
    assert ids2 == ids and labels2 == ids
    # Too long: the prompt keeps its end (at most half the room), the response is cut at the end.
    long = SFTExample(" ".join(["the"] * 50) + " how was it?", " " + " ".join(["great"] * 50))
    ids, labels = encode_sft(tok, long, 20)
    assert len(ids) == 20 and labels.count(IGNORE_INDEX) == 10
    assert tok.decode(ids[:10]).endswith("how was it?")
    assert encode_prompt(tok, "the the how was it?", 3) == tok("was it?")["input_ids"]


def test_chat_template_renders_prompts_and_masks_exactly_the_assistant_turn():
    tok = models.prepare_tokenizer(word_tokenizer(chat_template=CHAT))
    msgs = (("user", "how was it?"),)
    assert render_prompt(tok, "how was it?", msgs) == "<|user|> how was it? <|assistant|>"
    assert render_full(tok, "ignored", " great", msgs) == "<|user|> how was it? <|assistant|> great "
    ids, labels = encode_sft(tok, SFTExample("how was it?", " great", msgs), 64)
    answer = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(answer) == ["great", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[: labels.count(IGNORE_INDEX)]) == ["<|user|>", "how", "was", "it", "?", "<|assistant|>"]


def test_packing_fills_sequences_without_splitting_examples():
    seqs = [([1] * n, [2] * n) for n in (5, 7, 3, 9, 2, 4)]
    packed = pack(seqs, 12)
    assert [len(ids) for ids, _ in packed] == [12, 12, 6]
    assert sum(len(ids) for ids, _ in packed) == 30
    assert all(len(ids) == len(lab) for ids, lab in packed)
