"""Row schemas: each row becomes a :class:`Record` (a prompt and its responses, best first).

One record shape serves every stage: the reward stage expands a record with K ranked responses into
C(K, 2) preference pairs, SFT takes the best response, PPO takes the prompt. Scored rows
(``user_input``/``completion``/``score``) are grouped by prompt into one record ordered by score.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ..runtime.failure import DataError

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}

# format -> (required fields, description for error messages)
SCHEMAS: dict[str, tuple[tuple[str, ...], str]] = {
    "prompt_chosen_rejected": (("prompt", "chosen", "rejected"), "prompt, chosen, rejected (strings)"),
    "hh_rlhf": (("chosen", "rejected"), "chosen, rejected (full '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts)"),
    "ranked": (("prompt", "responses"), "prompt (string), responses (list of >= 2 strings, best first)"),
    "scored": (("user_input", "completion", "score"), "user_input, completion (strings), score (number)"),
    "prompt_response": (("prompt", "response"), "prompt, response (strings)"),
    "text": (("text",), "text (string)"),
    "prompt": (("prompt",), "prompt (string)"),
}
DETECTION_ORDER = ("prompt_chosen_rejected", "hh_rlhf", "ranked", "scored", "prompt_response", "text", "prompt")
PREFERENCE_FORMATS = ("prompt_chosen_rejected", "hh_rlhf", "ranked", "scored")


@dataclass(frozen=True)
class Record:
    """A prompt with its responses ordered best first (``scores`` descending when known)."""

    prompt: str
    responses: tuple[str, ...]
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) turns of the prompt, for chat templates
    scores: tuple[float, ...] | None = None
    source: str = ""
    # Other scalar fields of a prompt row as (name, text), e.g. a reference answer for a rule reward.
    fields: tuple[tuple[str, str], ...] = ()


def _other_fields(row: dict, used: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v if isinstance(v, str) else json.dumps(v)) for k, v in row.items()
                 if k not in used and (v is None or isinstance(v, (str, int, float, bool))))


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""


def detect_format(location: str, row: Any) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{location}: expected a JSON object (mapping) per row, got {type(row).__name__}")
    keys = set(row)
    for fmt in DETECTION_ORDER:
        if set(SCHEMAS[fmt][0]) <= keys:
            return fmt
    known = "; ".join(f"{f}: {SCHEMAS[f][1]}" for f in DETECTION_ORDER)
    raise DataError(f"{location}: cannot detect the row format from fields {sorted(keys)}; known formats are {known}")


def _field(location: str, row: dict, name: str, fmt: str) -> Any:
    if name not in row:
        raise DataError(f"{location}: field {name!r} is missing; format {fmt} needs {SCHEMAS[fmt][1]}")
    return row[name]


def _text(location: str, row: dict, name: str, fmt: str, *, nonempty: bool = True) -> str:
    value = _field(location, row, name, fmt)
    if not isinstance(value, str):
        raise DataError(f"{location}: field {name!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{location}: field {name!r} is empty; remove the row or fill the field")
    return value


def _messages(location: str, value: list, name: str) -> tuple[tuple[str, str], ...]:
    turns = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{location}: field {name!r} item {i} must be an object with string 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    return tuple(turns)


def render_transcript(messages: tuple[tuple[str, str], ...]) -> str:
    """Chat turns as an HH-style transcript ending in an open Assistant turn (used without a chat template)."""
    body = "".join(f"\n\n{_ROLE_LABELS.get(role, role.capitalize())}: {content}" for role, content in messages)
    return body + HH_ASSISTANT


def _prompt(location: str, row: dict, fmt: str, name: str = "prompt", nonempty: bool = False):
    """A prompt given as a string, or as a list of chat messages (rendered as a transcript)."""
    value = _field(location, row, name, fmt)
    if isinstance(value, list):
        turns = _messages(location, value, name)
        if not turns:
            raise DataError(f"{location}: field {name!r} is an empty message list")
        return render_transcript(turns), turns
    return _text(location, row, name, fmt, nonempty=nonempty), None


def hh_turns(prompt: str) -> tuple[tuple[str, str], ...]:
    """Chat turns of an HH transcript prompt (the trailing open 'Assistant:' is dropped)."""
    parts = _HH_TURN.split(prompt)
    turns = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        if content.strip():
            turns.append((_HH_ROLES[role], content.strip()))
    return tuple(turns)


def split_hh(location: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into (shared prompt up to the last common 'Assistant:', chosen, rejected)."""
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, common)  # the last marker lying fully inside the shared part
    if cut < 0:
        raise DataError(
            f"{location}: fields 'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:'; "
            f"format hh_rlhf needs two transcripts that differ only in the last Assistant turn"
        )
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def parse_row(fmt: str, location: str, row: Any) -> Record:
    """One row of format ``fmt`` as a Record (scored rows give a one-response record with its score)."""
    if not isinstance(row, dict):
        raise DataError(f"{location}: expected a JSON object (mapping) per row, got {type(row).__name__}")
    if fmt == "prompt_chosen_rejected":
        prompt, turns = _prompt(location, row, fmt)
        chosen, rejected = _text(location, row, "chosen", fmt), _text(location, row, "rejected", fmt)
        return Record(prompt, (chosen, rejected), turns, source=location)
    if fmt == "hh_rlhf":
        chosen_text, rejected_text = _text(location, row, "chosen", fmt), _text(location, row, "rejected", fmt)
        prompt, chosen, rejected = split_hh(location, chosen_text, rejected_text)
        return Record(prompt, (chosen, rejected), hh_turns(prompt), source=location)
    if fmt == "ranked":
        prompt, turns = _prompt(location, row, fmt)
        responses = _field(location, row, "responses", fmt)
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{location}: field 'responses' must be a list of at least 2 strings (best first)")
        for i, r in enumerate(responses):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f"{location}: field 'responses' item {i} must be a non-empty string")
        return Record(prompt, tuple(responses), turns, source=location)
    if fmt == "scored":
        prompt, turns = _prompt(location, row, fmt, "user_input")
        completion = _text(location, row, "completion", fmt)
        score = _field(location, row, "score", fmt)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{location}: field 'score' must be a finite number, got {score!r}")
        return Record(prompt, (completion,), turns, (float(score),), source=location)
    if fmt == "prompt_response":
        prompt, turns = _prompt(location, row, fmt)
        return Record(prompt, (_text(location, row, "response", fmt),), turns, source=location,
                      fields=_other_fields(row, ("prompt", "response")))
    if fmt == "text":
        return Record("", (_text(location, row, "text", fmt),), source=location)
    if fmt == "prompt":
        prompt, turns = _prompt(location, row, fmt, nonempty=True)
        return Record(prompt, (), turns, source=location, fields=_other_fields(row, ("prompt",)))
    raise DataError(f"unknown dataset.format {fmt!r}")  # pragma: no cover - the config restricts it


def group_scored(records: list[Record]) -> list[Record]:
    """Merge one-completion scored records by prompt into records ordered by descending score."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.prompt, []).append(r)
    out = []
    for prompt, rs in groups.items():
        ranked = sorted(rs, key=lambda r: -r.scores[0])  # stable: ties keep file order
        out.append(Record(prompt, tuple(r.responses[0] for r in ranked), rs[0].messages,
                          tuple(r.scores[0] for r in ranked), source=rs[0].source))
    return out


def preference_pairs(record: Record) -> list[PreferencePair]:
    """C(K, 2) pairs from K responses ordered best first; equal scores give no pair."""
    pairs = []
    for i, j in itertools.combinations(range(len(record.responses)), 2):
        if record.scores is not None and record.scores[i] == record.scores[j]:
            continue
        pairs.append(PreferencePair(record.prompt, record.responses[i], record.responses[j], record.messages,
                                    record.source))
    return pairs


def sft_example(record: Record) -> SFTExample:
    return SFTExample(record.prompt, record.responses[0], record.messages, record.source)
