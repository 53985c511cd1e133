"""Text -> token ids, the same way at training, scoring and generation time.

Rules that keep the stages consistent:

* With a chat template on the tokenizer, prompts are rendered through it (user/assistant turns);
  otherwise prompt and response are used as raw text (``prompt + response``).
* Sequences start with the tokenizer's start token when it has a distinct one (``[CLS]`` for BERT,
  ``<s>`` for Llama; none for GPT-2) and every scored/trained sequence ends with EOS, so the
  reward is read at the same token at training and at scoring time.
* Too long sequences lose the *start* of the prompt: the response, where chosen and rejected
  differ, is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .formats import PreferencePair, SFTExample

IGNORE_INDEX = -100


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat(prompt: str, messages) -> list[dict[str, str]]:
    turns = messages or (("user", prompt),)
    return [{"role": role, "content": content} for role, content in turns]


def render_prompt(tokenizer, prompt: str, messages=None) -> str:
    """The text a policy is prompted with (chat template with a generation prompt, or the raw prompt)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_chat(prompt, messages), tokenize=False, add_generation_prompt=True)
    return prompt


def render_full(tokenizer, prompt: str, response: str, messages=None) -> str:
    """Prompt and response as one text, as the reward model and SFT see it."""
    if has_chat_template(tokenizer):
        chat = [*_chat(prompt, messages), {"role": "assistant", "content": response.strip()}]
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return prompt + response


def start_ids(tokenizer) -> list[int]:
    """Token(s) put before every sequence when no chat template renders them."""
    if has_chat_template(tokenizer):
        return []
    if tokenizer.cls_token_id is not None:
        return [tokenizer.cls_token_id]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        return [tokenizer.bos_token_id]
    return []


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _ids_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``_ids`` of many texts in one call: a fast tokenizer encodes the batch in Rust, in parallel."""
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if ids and ids[-1] == eos else [*ids, eos]


def encode_for_scoring(tokenizer, text: str, max_length: int) -> list[int]:
    """``start + text + EOS``, cut from the left of ``text`` to fit ``max_length``."""
    return encode_for_scoring_many(tokenizer, [text], max_length)[0]


def encode_for_scoring_many(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """:func:`encode_for_scoring` of many texts with one tokenizer call."""
    start = start_ids(tokenizer)
    keep = max_length - len(start)
    return [start + _with_eos(tokenizer, body)[-keep:] for body in _ids_many(tokenizer, texts)]


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of each pair, as :func:`collate_pairs` encodes them, in one tokenizer call."""
    texts = [render_full(tokenizer, p.prompt, p.chosen, p.messages) for p in pairs]
    texts += [render_full(tokenizer, p.prompt, p.rejected, p.messages) for p in pairs]
    ids = encode_for_scoring_many(tokenizer, texts, max_length)
    return list(zip(ids[:len(pairs)], ids[len(pairs):], strict=True))


def encode_prompt(tokenizer, prompt: str, max_length: int, messages=None) -> list[int]:
    """A generation prompt (no EOS), cut from the left to ``max_length`` tokens."""
    start = start_ids(tokenizer)
    body = _ids(tokenizer, render_prompt(tokenizer, prompt, messages))
    return start + body[-(max_length - len(start)):]


def encode_prompt_many(tokenizer, prompts: Sequence[tuple[str, object]], max_length: int) -> list[list[int]]:
    """:func:`encode_prompt` of many (prompt, messages) pairs with one tokenizer call."""
    start = start_ids(tokenizer)
    keep = max_length - len(start)
    bodies = _ids_many(tokenizer, [render_prompt(tokenizer, prompt, messages) for prompt, messages in prompts])
    return [start + body[-keep:] for body in bodies]


def encode_sft(tokenizer, ex: SFTExample, max_length: int, loss_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) with prompt labels set to IGNORE_INDEX unless ``loss_on_prompt``.

    Prompt and response are tokenised separately so the boundary is exact; the response ends with EOS.
    When too long, the prompt keeps at most half of ``max_length`` (its end) and the response is cut.
    """
    if has_chat_template(tokenizer):
        prompt_ids = _ids(tokenizer, render_prompt(tokenizer, ex.prompt, ex.messages))
        full = _with_eos(tokenizer, _ids(tokenizer, render_full(tokenizer, ex.prompt, ex.response, ex.messages)))
        return _fit_sft(tokenizer, prompt_ids, full[len(prompt_ids):], max_length, loss_on_prompt)
    return _fit_sft(tokenizer, _ids(tokenizer, ex.prompt), _with_eos(tokenizer, _ids(tokenizer, ex.response)),
                    max_length, loss_on_prompt)


def encode_sft_many(tokenizer, examples: Sequence[SFTExample], max_length: int,
                    loss_on_prompt: bool = False) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_sft` of many examples; without a chat template with two tokenizer calls in all."""
    if has_chat_template(tokenizer):
        return [encode_sft(tokenizer, ex, max_length, loss_on_prompt) for ex in examples]
    prompts = _ids_many(tokenizer, [ex.prompt for ex in examples])
    responses = _ids_many(tokenizer, [ex.response for ex in examples])
    return [_fit_sft(tokenizer, p, _with_eos(tokenizer, r), max_length, loss_on_prompt)
            for p, r in zip(prompts, responses, strict=True)]


def _fit_sft(tokenizer, prompt_ids: list[int], response_ids: list[int], max_length: int,
             loss_on_prompt: bool) -> tuple[list[int], list[int]]:
    start = start_ids(tokenizer)
    room = max_length - len(start)
    if len(prompt_ids) + len(response_ids) > room:
        keep_prompt = min(len(prompt_ids), max(room - len(response_ids), room // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
        response_ids = response_ids[: room - keep_prompt]
    prompt_part = start + prompt_ids
    ids = prompt_part + response_ids
    labels = list(ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt_part) + response_ids
    return ids, labels


def pack(sequences: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate consecutive (ids, labels) into sequences of at most ``max_length`` tokens.

    Examples are never split; attention is causal across example boundaries (plain packing), each
    example ends with EOS so the model learns where one ends.
    """
    packed: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for seq_ids, seq_labels in sequences:
        if ids and len(ids) + len(seq_ids) > max_length:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + seq_ids, labels + seq_labels
    if ids:
        packed.append((ids, labels))
    return packed


def pad_batch(seqs: Sequence[list[int]], pad_id: int,
              labels: Sequence[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask (and labels padded with IGNORE_INDEX)."""
    width = max(len(s) for s in seqs)
    out = {
        "input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long),
    }
    if labels is not None:
        out["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels], dtype=torch.long)
    return out


def collate_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B sequences: the B chosen texts first, then the B rejected ones."""
    texts = [render_full(tokenizer, p.prompt, p.chosen, p.messages) for p in pairs]
    texts += [render_full(tokenizer, p.prompt, p.rejected, p.messages) for p in pairs]
    return pad_batch([encode_for_scoring(tokenizer, t, max_length) for t in texts], tokenizer.pad_token_id)


def collate_encoded_pairs(tokenizer, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """One padded batch of 2B sequences from :func:`encode_pairs` ids: the B chosen first, then the B rejected."""
    return pad_batch([c for c, _ in encoded] + [r for _, r in encoded], tokenizer.pad_token_id)


def collate_sft(tokenizer, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    return pad_batch([ids for ids, _ in encoded], tokenizer.pad_token_id, [lab for _, lab in encoded])
