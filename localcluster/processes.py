"""Detached processes of a cluster: start them, recognise them later, stop them and everything they started.

A process is identified by its pid *and* its start time (field 22 of /proc/<pid>/stat), so a recycled pid is
never mistaken for one of ours. Every process a cluster starts also carries a marker in its environment
(``LOCALCLUSTER_MARKER=<uuid>``), which its children inherit; `stop` uses both the process tree and the
marker so that pod processes re-parented to init are still found.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER_ENV = "LOCALCLUSTER_MARKER"

# Popen objects of children started by this Python process: kept so they are reaped (no zombies, no
# "still running" ResourceWarning) when the process that called `spawn` outlives them.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ProcRecord:
    role: str
    pid: int
    start_ticks: int
    log: str
    argv: tuple[str, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "argv": list(self.argv)}

    @classmethod
    def from_json(cls, data: dict) -> ProcRecord:
        return cls(data["role"], int(data["pid"]), int(data["start_ticks"]), data["log"], tuple(data["argv"]))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None when the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def alive(pid: int, ticks: int) -> bool:
    """True while the process with this pid and start time runs (a zombie counts as gone)."""
    _reap(pid)
    fields = _stat_fields(pid)
    return bool(fields) and int(fields[19]) == ticks and fields[0] not in ("Z", "X")


def record_alive(rec: ProcRecord) -> bool:
    return alive(rec.pid, rec.start_ticks)


def spawn(role: str, argv: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> ProcRecord:
    """Start argv detached (own session, stdin closed, output appended to log_path)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    ticks = start_ticks(proc.pid)
    if ticks is None:  # exited (and was reaped) already; record something that can never match
        ticks = -1
    return ProcRecord(role, proc.pid, ticks, str(log_path), tuple(argv))


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start_ticks) for every live process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] not in ("Z", "X"):
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pids: Iterable[int], table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """pid -> start_ticks of every live descendant of pids."""
    table = _process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def marked(marker: str, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """pid -> start_ticks of every live process whose environment carries this cluster's marker."""
    table = _process_table() if table is None else table
    needle = f"{MARKER_ENV}={marker}".encode()
    found = {}
    for pid, (_, ticks) in table.items():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found[pid] = ticks
    return found


def _signal(pid: int, ticks: int, sig: int) -> None:
    if pid != os.getpid() and alive(pid, ticks):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(stages: Sequence[Sequence[ProcRecord]], marker: str | None, grace: Sequence[float]) -> dict[int, int]:
    """Stop the recorded processes stage by stage, then everything they started.

    Each stage gets SIGTERM and grace[i] seconds, then SIGKILL. Descendants and marked processes seen at any
    point (a node agent's pods, say) are remembered and killed at the end if they outlived their parents.
    Returns pid -> start_ticks of processes still alive afterwards (empty on success).
    """
    known: dict[int, int] = {}

    def collect(live: Iterable[ProcRecord]) -> None:
        table = _process_table()
        known.update(descendants([r.pid for r in live], table))
        if marker:
            known.update(marked(marker, table))
        known.pop(os.getpid(), None)

    for stage, seconds in zip(stages, grace, strict=True):
        live = [r for r in stage if r.pid != os.getpid() and record_alive(r)]  # a watchdog stopping its cluster
        collect(live)
        for rec in live:
            known[rec.pid] = rec.start_ticks
            _signal(rec.pid, rec.start_ticks, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            collect(live)
            live = [r for r in live if record_alive(r)]
        for rec in live:
            _signal(rec.pid, rec.start_ticks, signal.SIGKILL)

    collect([])
    for pid, ticks in known.items():
        _signal(pid, ticks, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    left = {p: t for p, t in known.items() if alive(p, t)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p: t for p, t in left.items() if alive(p, t)}
    return left
