"""Datasets of the three stages: reading files, row formats, the fixed train/eval split, tokenisation.

Public entry points::

    load_preference_splits(cfg.dataset) -> Splits[PreferencePair]   # reward stage
    load_sft_splits(cfg.dataset)        -> Splits[SFTExample]        # SFT stage
    load_prompts(cfg.dataset)           -> list[str]                 # PPO prompts (train split)
    load_prompt_records(cfg.dataset)    -> Splits[Record]            # PPO prompts with chat turns

Importing this package does not import torch (``encoding`` does).
"""

from ..runtime.failure import DataError
from .formats import PreferencePair, Record, SFTExample
from .loading import Splits, load_preference_splits, load_prompt_records, load_prompts, load_sft_splits, split_indices

__all__ = [
    "DataError",
    "PreferencePair",
    "Record",
    "SFTExample",
    "Splits",
    "load_preference_splits",
    "load_prompt_records",
    "load_prompts",
    "load_sft_splits",
    "split_indices",
]
