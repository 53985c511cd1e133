"""Per-container memory cgroups: enforce resources.limits.memory and tell an OOM kill from other deaths.

Each container run gets a child cgroup of the agent's own memory cgroup (cgroup v1 `memory` hierarchy, or
cgroup v2 with the memory controller delegated), with the limit and no swap; the shim joins it before
exec. The kernel's per-cgroup `oom_kill` counter says whether the OOM killer struck, as the runtime's OOM
event does for the kubelet. Where no cgroup can be made (a read-only /sys/fs/cgroup, v2 without the memory
controller delegated), `detect` returns None and the agent falls back to RLIMIT_AS (see pods.py).
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CGROUP_FS = "/sys/fs/cgroup"
PREFIX = "localcluster-"
UNLIMITED = None


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of each mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 3:
                out.append((fields[4], rfields[0], rfields[2]))
    return out


def _own_path(controller: str) -> str:
    """This process's cgroup path for a v1 controller, or for v2 with controller ''."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if (controller and controller in ctrls.split(",")) or (not controller and ctrls == ""):
                return path
    return "/"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class CgroupParent:
    """Where the agent makes container cgroups: a writable directory of a memory cgroup hierarchy."""

    path: str
    version: int  # 1 or 2

    def create(self, name: str, limit: int | None) -> Cgroup:
        path = os.path.join(self.path, PREFIX + name)
        os.mkdir(path)
        try:
            if self.version == 1:
                if limit is not None:
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
                    swap = os.path.join(path, "memory.memsw.limit_in_bytes")  # memory + swap: no swap
                    if os.path.exists(swap):
                        _write(swap, str(limit))
            else:
                if limit is not None:
                    _write(os.path.join(path, "memory.max"), str(limit))
                for name_, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):  # like the kubelet
                    if os.path.exists(os.path.join(path, name_)):
                        _write(os.path.join(path, name_), value)
        except OSError:
            os.rmdir(path)
            raise
        return Cgroup(path, self.version)


@dataclass(frozen=True)
class Cgroup:
    path: str
    version: int

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in _read(os.path.join(self.path, name)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.procs_file).split()]
        except OSError:
            return []

    def destroy(self, timeout: float = 5.0) -> bool:
        """SIGKILL whatever is left in the cgroup (even processes that left the container's process group)
        and remove it; False when it could not be removed in time."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("could not remove cgroup %s (processes still exiting?)", self.path)
                    return False
                time.sleep(0.05)


def detect() -> tuple[CgroupParent | None, str]:
    """The parent for container cgroups, or None and why not (for the agent's log)."""
    mounts = _mounts()
    v1 = next((mp for mp, fs, opts in mounts if fs == "cgroup" and "memory" in opts.split(",")), None)
    candidates: list[tuple[str, int]] = []
    if v1:
        candidates += [(os.path.join(v1, _own_path("memory").lstrip("/")), 1), (v1, 1)]
    v2 = next((mp for mp, fs, _ in mounts if fs == "cgroup2"), None)
    if v2 and not v1:
        candidates += [(os.path.join(v2, _own_path("").lstrip("/")), 2)]
    why = "no cgroup filesystem with the memory controller is mounted"
    for path, version in candidates:
        if not os.path.isdir(path):
            continue
        if version == 2 and not _v2_delegates_memory(path):
            why = f"cgroup v2 at {path} does not delegate the memory controller to child cgroups"
            continue
        probe = os.path.join(path, f"{PREFIX}probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as e:
            why = f"cannot create a cgroup under {path}: {e.strerror}"
            continue
        return CgroupParent(path, version), f"cgroup v{version} under {path}"
    return None, why


def _v2_delegates_memory(path: str) -> bool:
    control = os.path.join(path, "cgroup.subtree_control")
    try:
        if "memory" in _read(control).split():
            return True
        if "memory" not in _read(os.path.join(path, "cgroup.controllers")).split():
            return False
        _write(control, "+memory")  # refused (EBUSY) when the cgroup itself holds processes
        return True
    except OSError:
        return False


def remove_leftovers(state_dir: str) -> int:
    """Kill and remove the cgroups recorded in pod run directories (left by an agent that died)."""
    removed = 0
    for record in glob.glob(os.path.join(state_dir, "pod-data", "*", "run", "*.cgroup")):
        try:
            path, _, version = _read(record).strip().rpartition(" ")
            if path and os.path.basename(path).startswith(PREFIX) and Cgroup(path, int(version)).destroy(2.0):
                removed += 1
            os.unlink(record)
        except (OSError, ValueError):
            pass
    return removed
