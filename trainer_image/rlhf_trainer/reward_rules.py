"""Verifiable rule rewards (``ppo.rewards.match|length|format``): each rule scores a response 1 or 0.

* match: the response - or the last match of ``extract`` in it (its first group if it has one), e.g.
  the final number - equals the dataset field's value after collapsing whitespace (``mode: exact``), or
  the field's value is a regular expression found in it (``mode: regex``);
* length: the stripped response has between ``min_chars`` and ``max_chars`` characters (0 = no bound);
* format: the whole stripped response matches ``pattern`` (``re.fullmatch``, ``.`` matches newlines).

Pure functions of (record, response); the reference answers come from the prompt rows' other fields
(``Record.fields``), e.g. ``{"prompt": "2+3=", "answer": "5"}`` with ``field: answer``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .data.formats import Record
from .runtime.failure import DataError


def collapse(text: str) -> str:
    return " ".join(text.split())


def extract_answer(response: str, extract: re.Pattern | None) -> str | None:
    """The part of ``response`` to compare: all of it, or the last match of ``extract`` (None: no match)."""
    if extract is None:
        return response
    last = None
    for last in extract.finditer(response):  # noqa: B007 - the last match is the answer
        pass
    if last is None:
        return None
    return last.group(1) if extract.groups else last.group(0)


def record_field(record: Record, name: str) -> str:
    """A prompt row's field by name; ``response`` is the reference response of a prompt/response row."""
    fields = dict(record.fields)
    if name in fields:
        return fields[name]
    if name == "response" and record.responses:
        return record.responses[0]
    known = ", ".join(sorted(fields)) or "none besides the prompt"
    raise DataError(f"{record.source}: field {name!r} is missing (ppo.rewards.match.field names the dataset field "
                    f"holding the reference answer; this row has: {known}); add it to every row or change the field")


class MatchRule:
    def __init__(self, field: str, mode: str = "exact", extract: str = ""):
        self.field, self.mode = field, mode
        self.extract = re.compile(extract) if extract else None
        self._patterns: dict[str, re.Pattern] = {}

    def _pattern(self, record: Record, text: str) -> re.Pattern:
        if text not in self._patterns:
            try:
                self._patterns[text] = re.compile(text)
            except re.error as e:
                raise DataError(f"{record.source}: field {self.field!r} is not a valid regular expression ({e}); "
                                "ppo.rewards.match.mode regex reads it as one") from e
        return self._patterns[text]

    def __call__(self, record: Record, response: str) -> float:
        reference = record_field(record, self.field)
        got = extract_answer(response, self.extract)
        if got is None:
            return 0.0
        if self.mode == "exact":
            return float(collapse(got) == collapse(reference))
        return float(self._pattern(record, reference).search(got) is not None)


class LengthRule:
    def __init__(self, min_chars: int = 0, max_chars: int = 0):
        self.min_chars, self.max_chars = min_chars, max_chars

    def __call__(self, record: Record, response: str) -> float:
        n = len(response.strip())
        return float(n >= self.min_chars and (self.max_chars <= 0 or n <= self.max_chars))


class FormatRule:
    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern, re.DOTALL)

    def __call__(self, record: Record, response: str) -> float:
        return float(self.pattern.fullmatch(response.strip()) is not None)


class RuleScorer:
    """One rule as a scorer: a float32 score per response."""

    stats = None
    source = "rule"

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, records: Sequence[Record], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.rule(r, s) for r, s in zip(records, responses, strict=True)], dtype=torch.float32)
