"""What scores a PPO response: the frozen reward model, a built-in rule (``ppo.reward_fn``), or the
weighted sum of the reward model and the sources of ``ppo.rewards`` (endpoint, match, length, format).

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
from .reward_endpoint import EndpointScorer
from .reward_rules import FormatRule, LengthRule, MatchRule, RuleScorer


class Scorer(Protocol):
    stats: dict[str, float] | None  # normalisation statistics {mean, std} of the raw scores, if known

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor: ...


class CountScorer:
    """``count:<text>``: the number of (non-overlapping) occurrences of <text> in the response."""

    stats = None
    source = "rule"

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

    source = "model"

    def __init__(self, model: torch.nn.Module, tokenizer, stats: dict[str, float] | None, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.stats = stats
        self.batch_size = batch_size

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        texts = [render_full(self.tokenizer, rec.prompt, resp, rec.messages)
                 for rec, resp in zip(records, responses, strict=True)]
        return models.score(self.model, self.tokenizer, texts, batch_size=self.batch_size)


class WeightedScorer:
    """The reward as a weighted sum of sources (reward model, endpoint, rules). ``last`` keeps each
    source's scores of the latest call (before weighting) for the per-source metrics."""

    stats = None

    def __init__(self, sources: list[tuple[str, float, Scorer]], normalize: bool = True):
        self.sources = sources
        self.normalize = normalize
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(len(responses), dtype=torch.float32)
        self.last = {}
        for name, weight, scorer in self.sources:
            x = scorer(records, responses).float()
            if self.normalize and scorer.stats:  # the reward model's score on its saved scale
                x = (x - float(scorer.stats["mean"])) / (float(scorer.stats["std"]) + 1e-8)
            self.last[name] = x
            total += weight * x
        return total


def build_scorer(p, job: dict[str, str], model: Scorer | None) -> Scorer:
    """The scorer of a PPO run: ``ppo.reward_fn``; or the reward model alone (as before sources existed);
    or the weighted sum of the reward model (when set) and every source set in ``ppo.rewards``."""
    if p.reward_fn:
        return rule_scorer(p.reward_fn)
    r = p.rewards
    names = r.sources()
    if model is not None and not names:
        return model
    sources: list[tuple[str, float, Scorer]] = []
    if model is not None:
        sources.append(("model", r.model_weight, model))
    if "endpoint" in names:
        sources.append(("endpoint", r.endpoint.weight, EndpointScorer(r.endpoint, job)))
    if "match" in names:
        sources.append(("match", r.match.weight, RuleScorer(MatchRule(r.match.field, r.match.mode, r.match.extract))))
    if "length" in names:
        sources.append(("length", r.length.weight, RuleScorer(LengthRule(r.length.min_chars, r.length.max_chars))))
    if "format" in names:
        sources.append(("format", r.format.weight, RuleScorer(FormatRule(r.format.pattern))))
    return WeightedScorer(sources, normalize=p.normalize_reward)
