"""Atomic checkpoints: written aside, fsynced, renamed into place, pointed to, pruned.

Layout under the job's claim (see ``config``)::

    <claim>/checkpoints/step-00000042/    complete checkpoint (meta.json + whatever write_fn wrote)
    <claim>/checkpoints/latest            name of the newest complete checkpoint
    <claim>/checkpoints/.tmp-step-...     being written; never picked, removed on the next save

A checkpoint directory only ever appears under its final name through ``rename`` of a fully written
and fsynced temp directory, so a process killed mid-write leaves at most a ``.tmp-*`` directory. If
the pointer is missing or names something absent, ``latest()`` falls back to the highest complete
``step-*`` directory.

With several processes (torchrun), every process calls ``save``: all write into the same temp
directory (DeepSpeed writes one shard per rank), the main process renames and updates the pointer.

``meta.json`` lists the sha256 of every file the checkpoint holds. ``verify`` checks them before a
resume reads anything, so a file planted, removed or changed after the save is refused
(:class:`CheckpointError`, exit 7) instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import CHECKPOINTS_SUBDIR, LATEST_POINTER
from .failure import CheckpointError

META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (and ``root`` itself)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries(root: Path) -> dict[str, Path]:
    """Every entry below ``root`` that is not a directory, by relative path (symlinks are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = path
    return out


def _hash_files(files: dict[str, Path]) -> dict[str, str]:
    """sha256 of each file, in parallel (hashlib releases the GIL): a large model's shards take minutes
    one after another."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(_sha256, files.values()), strict=True))


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (``meta.json`` excluded), by relative path."""
    return _hash_files({rel: path for rel, path in sorted(_entries(root).items()) if rel != META_FILE})


def write_file_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


class _Coordinator:
    """Rank and barrier: from ``dist`` (a Strategy), else torch.distributed when initialised, else single."""

    def __init__(self, dist: Any | None):
        self.dist = dist

    def _torch_dist(self):
        if self.dist is not None:
            return None
        try:
            import torch.distributed as td
        except ImportError:  # the checkpoint layout is also read by torch-free tools
            return None
        return td if td.is_available() and td.is_initialized() else None

    @property
    def is_main(self) -> bool:
        if self.dist is not None:
            return bool(self.dist.is_main)
        td = self._torch_dist()
        return td is None or td.get_rank() == 0

    def any_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (needs ``dist``; without it, this process's flag)."""
        return bool(self.dist.any_true(flag)) if self.dist is not None else flag

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()
            return
        td = self._torch_dist()
        if td is not None and td.get_world_size() > 1:
            td.barrier()


class CheckpointManager:
    """Saves and finds checkpoints of one job.

    ``root`` is the job's checkpoint claim (``cfg.checkpoint.dir``); checkpoints live in
    ``root/checkpoints`` (a ``root`` that already ends in ``checkpoints`` is used as is).
    ``dist`` is the run's Strategy (rank and barrier); without it torch.distributed is used when
    initialised.
    """

    def __init__(self, root: str | Path, keep_last: int = 2, dist: Any | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        root = Path(root)
        self.dir = root if root.name == CHECKPOINTS_SUBDIR else root / CHECKPOINTS_SUBDIR
        self.keep_last = keep_last
        self._coord = _Coordinator(dist)

    @classmethod
    def from_config(cls, cfg, dist: Any | None = None) -> CheckpointManager:
        return cls(cfg.checkpoint.dir, cfg.checkpoint.keep_last, dist=dist)

    # --- reading ---------------------------------------------------------------------------------

    def _is_complete(self, path: Path) -> bool:
        try:
            json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            return False
        return True

    def complete_checkpoints(self) -> list[Path]:
        """Complete ``step-*`` directories, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and self._is_complete(p):
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        pointer = self.dir / LATEST_POINTER
        try:
            name = pointer.read_text().strip()
        except OSError:
            name = ""
        if name and _STEP_DIR.match(name) and self._is_complete(self.dir / name):
            return self.dir / name
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any]:
        return json.loads((Path(path) / META_FILE).read_text())

    @staticmethod
    def verify(path: str | Path) -> dict[str, Any]:
        """Check that ``path`` holds exactly the files of its manifest, byte for byte; returns the meta.

        Raises CheckpointError naming the checkpoint and the first file that is missing, unexpected,
        not a regular file or changed. Nothing of the checkpoint is deserialised before this passes.
        """
        path = Path(path)
        meta = CheckpointManager.read_meta(path)
        expected = meta.get("files") if isinstance(meta, dict) else None
        fix = "delete it or restore it"
        if not isinstance(expected, dict):
            raise CheckpointError(f"checkpoint {path}: {META_FILE} lists no file digests (written by an older trainer "
                                  f"or edited), so its files cannot be trusted; {fix}")
        found = {rel: p for rel, p in _entries(path).items() if rel != META_FILE}
        extra = sorted(found.keys() - expected.keys())
        if extra:
            raise CheckpointError(f"checkpoint {path}: file {extra[0]} is not in the manifest ({META_FILE}); it was "
                                  f"added after the checkpoint was written: {fix}")
        for rel in sorted(expected):
            if rel not in found:
                raise CheckpointError(f"checkpoint {path}: file {rel} listed in the manifest ({META_FILE}) is missing; "
                                      f"the checkpoint was changed after it was written: {fix}")
            if not stat.S_ISREG(os.lstat(found[rel]).st_mode):
                raise CheckpointError(f"checkpoint {path}: {rel} is not a regular file (a symlink or device); "
                                      f"the checkpoint was changed after it was written: {fix}")
        digests = _hash_files({rel: found[rel] for rel in sorted(expected)})
        for rel, digest in digests.items():
            if digest != expected[rel]:
                raise CheckpointError(f"checkpoint {path}: file {rel} does not match its digest in the manifest "
                                      f"(sha256 {digest}, manifest {expected[rel]}); the checkpoint was changed after "
                                      f"it was written: {fix}")
        return meta

    def verify_for_resume(self, path: str | Path) -> dict[str, Any]:
        """:meth:`verify` on the main process (each file hashed once, not once per process), the outcome
        shared with all; on a failure every process verifies too, so all report the same file."""
        if self._coord.dist is None:
            return self.verify(path)
        error = None
        if self._coord.is_main:
            try:
                self.verify(path)
            except CheckpointError as e:
                error = e
        if self._coord.any_true(error is not None):
            if error is None:
                try:
                    self.verify(path)
                except CheckpointError as e:
                    error = e
            raise error or CheckpointError(f"checkpoint {path}: the main process found files that do not match the "
                                           f"manifest ({META_FILE}); see its log: delete it or restore it")
        return self.read_meta(path)

    # --- writing ---------------------------------------------------------------------------------

    def save(self, step: int, write_fn: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step``: ``write_fn(tmp_dir)`` fills a temp dir (on every process), then
        the main process adds ``meta.json`` (with ``step``), fsyncs, renames, updates ``latest`` and
        prunes to the newest ``keep_last``. Returns the final directory."""
        coord = self._coord
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if coord.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        coord.barrier()
        write_fn(tmp)
        coord.barrier()
        if coord.is_main:
            record = {"step": step, "saved_at": time.time(), **(meta or {}), "files": file_digests(tmp)}
            (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
            fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. stopped right after a resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_path(self.dir)
            write_file_atomic(self.dir / LATEST_POINTER, final.name + "\n")
            self._prune(keep=final)
        coord.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = self.complete_checkpoints()
        old = [p for p in complete if p != keep][: max(0, len(complete) - self.keep_last)]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        # Incomplete step dirs (no meta) cannot be produced by save(); remove any found so they never linger.
        for p in self.dir.iterdir():
            if _STEP_DIR.match(p.name) and p.is_dir() and not self._is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
