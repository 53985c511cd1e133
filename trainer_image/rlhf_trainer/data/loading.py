"""Dataset -> records -> fixed seeded train/eval split -> examples of one stage.

The split is made over records (a prompt with all its responses), so the C(K, 2) pairs of one
prompt never straddle train and eval. Everything here runs before any model is loaded, so an empty
or too-small split fails fast.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..runtime.failure import DataError
from .files import read_rows
from .formats import (
    PREFERENCE_FORMATS,
    PreferencePair,
    Record,
    SFTExample,
    detect_format,
    group_scored,
    parse_row,
    preference_pairs,
    sft_example,
)

T = TypeVar("T")

STAGE_FORMATS = {
    "reward": PREFERENCE_FORMATS,
    "sft": ("prompt_response", "text", *PREFERENCE_FORMATS),
    "ppo": ("prompt", "prompt_response", *PREFERENCE_FORMATS),
}


@dataclass
class Splits(Generic[T]):
    train: list[T]
    eval: list[T]
    format: str


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed permutation of ``range(n)`` by ``seed``: (train, eval) with ``max(1, round(n * f))`` eval items."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_records(dataset_cfg, stage: str) -> tuple[list[Record], str]:
    """Parse every row (errors name file, line and field); returns the records and the format used."""
    rows = read_rows(dataset_cfg)
    fmt = dataset_cfg.format
    if fmt == "auto":
        fmt = detect_format(*rows[0])
    allowed = STAGE_FORMATS[stage]
    if fmt not in allowed:
        raise DataError(
            f"dataset {dataset_cfg.path or dataset_cfg.hub_id}: format {fmt} cannot feed the {stage} stage; "
            f"it needs one of {', '.join(allowed)}"
        )
    records = [parse_row(fmt, loc, row) for loc, row in rows]
    if fmt == "scored":
        records = group_scored(records)
    return records, fmt


def _split_records(dataset_cfg, records: list[Record]) -> tuple[list[Record], list[Record]]:
    if dataset_cfg.max_samples and dataset_cfg.max_samples < len(records):
        # A seeded random subset (not the first rows: files are often sorted by source or topic).
        order = list(range(len(records)))
        random.Random(dataset_cfg.split_seed + 1).shuffle(order)
        records = [records[i] for i in sorted(order[: dataset_cfg.max_samples])]
    train_idx, eval_idx = split_indices(len(records), dataset_cfg.eval_fraction, dataset_cfg.split_seed)
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def _check_sizes(dataset_cfg, splits: Splits, unit: str) -> Splits:
    where = dataset_cfg.path or dataset_cfg.hub_id
    if len(splits.train) < max(1, dataset_cfg.min_train_samples):
        raise DataError(
            f"dataset {where}: the train split has {len(splits.train)} {unit}, fewer than "
            f"dataset.min_train_samples={dataset_cfg.min_train_samples}; add data or lower eval_fraction"
        )
    if dataset_cfg.eval_fraction > 0 and not splits.eval:
        raise DataError(
            f"dataset {where}: the eval split is empty (eval_fraction={dataset_cfg.eval_fraction}); "
            f"add data or set dataset.eval_fraction to 0"
        )
    return splits


def load_preference_splits(dataset_cfg) -> Splits[PreferencePair]:
    """Preference pairs of the reward stage (K ranked responses -> C(K, 2) pairs)."""
    records, fmt = load_records(dataset_cfg, "reward")
    train, evals = _split_records(dataset_cfg, records)
    expand = lambda rs: [p for r in rs for p in preference_pairs(r)]  # noqa: E731
    return _check_sizes(dataset_cfg, Splits(expand(train), expand(evals), fmt), "pairs")


def load_sft_splits(dataset_cfg) -> Splits[SFTExample]:
    """SFT examples: prompt/response, plain text, or the best response of preference data."""
    records, fmt = load_records(dataset_cfg, "sft")
    train, evals = _split_records(dataset_cfg, records)
    return _check_sizes(dataset_cfg, Splits([sft_example(r) for r in train], [sft_example(r) for r in evals], fmt),
                        "examples")


def load_prompt_records(dataset_cfg) -> Splits[Record]:
    """PPO prompt records (with chat turns) from a prompt column or cut from preference/SFT data."""
    records, fmt = load_records(dataset_cfg, "ppo")
    empty = [r.source for r in records if not r.prompt.strip()]
    if empty:
        raise DataError(f"{empty[0]}: the prompt is empty; PPO needs a non-empty prompt in every row")
    train, evals = _split_records(dataset_cfg, records)
    return _check_sizes(dataset_cfg, Splits(train, evals, fmt), "prompts")


def load_prompts(dataset_cfg) -> list[str]:
    """PPO prompts (the train split) as strings, e.g. HH transcripts up to the final 'Assistant:'."""
    return [r.prompt for r in load_prompt_records(dataset_cfg).train]
