"""Helpers of the trainer-core tests: tiny GPT-2 configs and synthetic data sets (no hub downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POSITIVE = ["great", "excellent", "wonderful", "helpful", "kind", "superb", "lovely", "brilliant"]
NEGATIVE = ["awful", "terrible", "rude", "useless", "horrible", "nasty", "dreadful", "poor"]
FILLER = ["the", "answer", "is", "very", "quite", "a", "reply", "that", "seems", "really", "this", "one", "and", "so"]


def tiny_gpt2(dropout: float = 0.1, **over) -> dict[str, Any]:
    """init_from_config of a GPT-2 with 2 layers, 64 wide."""
    return {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128,
            "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout, **over}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_pairs(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference task: the chosen reply carries a positive word, the rejected one a
    negative word, both hidden at a random place among random filler words."""
    r = random.Random(seed)

    def reply(word: str) -> str:
        words = [r.choice(FILLER) for _ in range(r.randint(3, 8))]
        words.insert(r.randint(0, len(words)), word)
        return " " + " ".join(words)

    return [{"prompt": f"Question {r.randint(0, 99)}: how was it?", "chosen": reply(r.choice(POSITIVE)),
             "rejected": reply(r.choice(NEGATIVE))} for _ in range(n)]


def counting_examples(n: int, seed: int = 0) -> list[dict]:
    """SFT task with a deterministic answer: count up from a start number."""
    r = random.Random(seed)
    names = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    out = []
    for _ in range(n):
        s = r.randint(0, 6)
        out.append({"prompt": f"count from {names[s]}:", "response": " " + " ".join(names[s:s + 5])})
    return out


def word_tokenizer(extra_words: list[str] = (), chat_template: str | None = None):
    """A GPT-2-like word-level tokenizer built with `tokenizers`: EOS <|endoftext|>, no pad token."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>", "<|user|>", "<|assistant|>", ":", "?", "Question", "how", "was", "it",
             *POSITIVE, *NEGATIVE, *FILLER, *[str(i) for i in range(100)], *extra_words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template:
        tok.chat_template = chat_template
    return tok


def run_cli(config_path: Path | str, stage: str = "sft") -> int:
    """Exit code of the trainer's command line (`python -m rlhf_trainer STAGE --config PATH`), run in this process."""
    from rlhf_trainer import cli

    try:
        return cli.main([stage, "--config", str(config_path)])
    except SystemExit as e:
        return e.code


def token_lm(vocab: int, eos: int, pad: int, positions: int = 128):
    """A GPT-2 causal LM over plain token ids (2 layers, 32 wide, seed 0) in eval mode: generation tests."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_positions=positions,
                                  bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    return transformers.GPT2LMHeadModel(cfg).eval()
