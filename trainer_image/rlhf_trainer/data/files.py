"""Reading rows from JSONL, JSON, Parquet, `datasets` save_to_disk directories (or a hub id).

Every row comes with a human location (``file:line`` for JSONL, ``file: item N`` for JSON,
``file: row N`` otherwise) so that a malformed row can be named exactly in the error. Text files must
be UTF-8 (a UTF-8 byte-order mark is skipped); any other encoding or binary content is a DataError
naming the file, the byte offset and the line.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..runtime.failure import DataError

HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}

Row = tuple[str, Any]  # (location, row)

# UTF-32 first: its little-endian mark starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
JSONL_TEXT = "UTF-8 JSON lines"


def _strip_bom(path: Path, head: bytes, expected: str) -> bytes:
    """``head`` without a UTF-8 byte-order mark; a UTF-16/32 mark is a DataError saying how to convert."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            raise DataError(f"{path}:1: byte offset 0: a {encoding} byte-order mark, so the file is {encoding}; "
                            f"expected {expected}; convert it, e.g. iconv -f {encoding} -t UTF-8 {path.name} > "
                            f"{path.stem}.utf8{path.suffix}")
    return head[len(codecs.BOM_UTF8):] if head.startswith(codecs.BOM_UTF8) else head


def _decode(path: Path, data: bytes, offset: int, lineno: int, expected: str) -> str:
    """``data`` (starting at byte ``offset`` of the file, on line ``lineno``) as UTF-8; a byte that is
    not UTF-8, or a NUL (UTF-16 without a byte-order mark, binary data), is a DataError naming where."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad, why = e.start, f"byte 0x{data[e.start]:02x} is not UTF-8 ({e.reason})"
    else:
        if "\0" not in text:
            return text
        bad, why = data.index(b"\0"), "a NUL byte (UTF-16/UTF-32 text or binary data?)"
    line = lineno + data.count(b"\n", 0, bad)
    raise DataError(f"{path}:{line}: byte offset {offset + bad}: {why}; expected {expected}")


def detect_file_format(path: Path) -> str:
    """jsonl/json/parquet from the suffix, hf_disk for a save_to_disk directory, dir for a folder of files."""
    if path.is_dir():
        return "hf_disk" if any((path / m).exists() for m in HF_DISK_MARKERS) else "dir"
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"dataset.path {path}: cannot tell the file format from the suffix {path.suffix!r}; "
            f"use .jsonl, .json or .parquet, or set dataset.file_format"
        )
    if fmt == "json":  # many '.json' files are really JSON lines
        with open(path, "rb") as f:
            head = _strip_bom(path, f.read(4096), "UTF-8 JSON").lstrip()
        if not head.startswith(b"["):
            fmt = "jsonl"
    return fmt


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1:
                raw = _strip_bom(path, raw, JSONL_TEXT)
                start = offset - len(raw)
            line = _decode(path, raw, start, lineno, JSONL_TEXT)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            yield f"{path}:{lineno}", row


def _read_json(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    body = _strip_bom(path, raw, "UTF-8 JSON")
    try:
        data = json.loads(_decode(path, body, len(raw) - len(body), 1, "UTF-8 JSON"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got a {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def _read_hf_dataset(ds: Any, where: str) -> Iterator[Row]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{where}: has splits {', '.join(ds)} but no 'train' split; keep one split or name it "
                            "train")
    for i, row in enumerate(ds):
        yield f"{where}: row {i}", row


def _read_hf_disk(path: Path) -> Iterator[Row]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable `datasets` save_to_disk directory ({e})") from e
    yield from _read_hf_dataset(ds, str(path))


def _read_dir(path: Path) -> Iterator[Row]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataError(f"dataset.path {path}: directory holds no .jsonl, .json or .parquet files")
    for f in files:
        yield from _read_file(f, "auto")


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "hf_disk": _read_hf_disk,
            "dir": _read_dir}


def _read_file(path: Path, file_format: str) -> Iterator[Row]:
    fmt = detect_file_format(path) if file_format == "auto" else file_format
    yield from _READERS[fmt](path)


def read_rows(dataset_cfg) -> list[Row]:
    """All rows of the configured dataset, with their locations."""
    if dataset_cfg.path:
        path = Path(dataset_cfg.path)
        if not path.exists():
            raise DataError(f"dataset.path {path} does not exist; check the path and the volume mount")
        rows = list(_read_file(path, dataset_cfg.file_format))
        where = str(path)
    else:
        from datasets import load_dataset

        try:
            ds = load_dataset(dataset_cfg.hub_id, split="train")
        except Exception as e:
            raise DataError(f"dataset.hub_id {dataset_cfg.hub_id}: cannot load it ({e}); "
                            "use a local dataset.path") from e
        where = f"hub:{dataset_cfg.hub_id}"
        rows = list(_read_hf_dataset(ds, where))
    if not rows:
        raise DataError(f"dataset {where} has no rows; point dataset.path at a non-empty dataset")
    return rows
