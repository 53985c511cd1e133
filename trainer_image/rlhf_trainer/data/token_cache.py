"""Token ids of a dataset, computed once per (examples, tokenizer, encoding settings) and kept on disk.

Training steps then only pad and stack ids: no Python tokenisation per step, and a restarted pod reads
the ids back instead of tokenising again. The key hashes the examples themselves (an edited file is a
new key), the tokenizer's whole definition and the encoding settings. Files are safetensors: reading
one never runs code, and a file that does not read back whole is recomputed. The directory is
``<checkpoint.dir>/cache/tokens`` (the job's claim), ``$RLHF_TOKEN_CACHE_DIR`` when set; ``off``
keeps the ids in memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CACHE_VERSION = 1
ENV_DIR = "RLHF_TOKEN_CACHE_DIR"
SUBDIR = Path("cache") / "tokens"

Encoded = list[tuple[list[int], ...]]  # per example: a tuple of id lists (e.g. chosen, rejected)


def cache_dir(checkpoint_dir: str | Path) -> Path | None:
    env = os.environ.get(ENV_DIR, "")
    if env == "off":
        return None
    return Path(env) if env else Path(checkpoint_dir) / SUBDIR


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides a tokenizer's ids: its definition, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    extra = [type(tokenizer).__name__, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None),
             len(tokenizer)]
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def items_digest(items: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(json.dumps(dataclasses.astuple(x) if dataclasses.is_dataclass(x) else x, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(kind: str, tokenizer, settings: dict[str, Any], items: Sequence[Any]) -> str:
    data = {"v": CACHE_VERSION, "kind": kind, "settings": settings, "tokenizer": tokenizer_fingerprint(tokenizer),
            "items": items_digest(items), "n": len(items)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def _write(path: Path, encoded: Encoded) -> None:
    fields = len(encoded[0]) if encoded else 0
    tensors: dict[str, torch.Tensor] = {"n": torch.tensor([len(encoded), fields], dtype=torch.int64)}
    for j in range(fields):
        seqs = [x[j] for x in encoded]
        tensors[f"ids{j}"] = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
        tensors[f"len{j}"] = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _read(path: Path) -> Encoded:
    t = load_file(str(path))
    n, fields = (int(v) for v in t["n"].tolist())
    columns = []
    for j in range(fields):
        lengths = t[f"len{j}"].tolist()
        if len(lengths) != n or sum(lengths) != t[f"ids{j}"].numel():
            raise ValueError(f"{path}: lengths do not match the ids")
        columns.append([s.tolist() for s in torch.split(t[f"ids{j}"], lengths)])
    return list(zip(*columns, strict=True)) if fields else [() for _ in range(n)]


def cached(kind: str, tokenizer, settings: dict[str, Any], items: Sequence[Any],
           encode: Callable[[Sequence[Any]], Encoded], directory: Path | None) -> Encoded:
    """``encode(items)``, read from ``directory`` when an earlier run (or process) stored the same key."""
    if directory is None or not items:
        return encode(items)
    path = directory / f"{kind}-{cache_key(kind, tokenizer, settings, items)}.safetensors"
    if path.exists():
        try:
            return _read(path)
        except Exception:  # noqa: BLE001 - a torn or foreign file: recompute and replace it
            pass
    encoded = encode(items)
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            _write(path, encoded)
        except OSError:  # a read-only or full volume only costs the next start a tokenisation
            pass
    return encoded
