"""What scores a PPO response: the frozen reward model, or a built-in rule (``ppo.reward_fn``).

A scorer takes the prompt records and the decoded response texts and returns one raw score per
response (float32, CPU). The reward model re-encodes ``prompt + response`` with its *own* tokenizer
(it may differ from the policy's), exactly as it was encoded in reward training, so the score is read
at the same trailing EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from . import models
from .data.encoding import render_full
from .data.formats import Record


class Scorer(Protocol):
    stats: dict[str, float] | None  # normalisation statistics {mean, std} of the raw scores, if known

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor: ...


class CountScorer:
    """``count:<text>``: the number of (non-overlapping) occurrences of <text> in the response."""

    stats = None

    def __init__(self, needle: str):
        if not needle:
            raise ValueError("CountScorer: the text to count is empty")
        self.needle = needle

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(r.count(self.needle)) for r in responses], dtype=torch.float32)


def rule_scorer(spec: str) -> Scorer:
    """The scorer named by ``ppo.reward_fn`` (validated by the config)."""
    kind, _, arg = spec.partition(":")
    if kind == "count" and arg:
        return CountScorer(arg)
    raise ValueError(f"ppo.reward_fn: unknown rule {spec!r}; use count:<text>")


class RewardModelScorer:
    """A frozen reward model with its tokenizer and the score statistics saved with it."""

    def __init__(self, model: torch.nn.Module, tokenizer, stats: dict[str, float] | None, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.stats = stats
        self.batch_size = batch_size

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        texts = [render_full(self.tokenizer, rec.prompt, resp, rec.messages) for rec, resp in zip(records, responses, strict=True)]
        return models.score(self.model, self.tokenizer, texts, batch_size=self.batch_size)
