"""Container processes: start through the mount-namespace shim, wait, signal, and clean up leftovers.

Each container is its own session and process group, so signals reach everything it started
(torchrun workers included). Pid files (pid + kernel start time, so a reused pid is never hit)
let a restarted agent, or `cluster down`, stop processes an agent that died left behind.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import cgroups
from .cgroups import Cgroup

log = logging.getLogger(__name__)

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.py")


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def exit_code(returncode: int) -> int:
    """Popen's -N for "killed by signal N" -> the 128+N a container runtime reports."""
    return 128 - returncode if returncode < 0 else returncode


class ContainerProcess:
    """One run of one container.

    security: the shim plan's user/capabilities/no_new_privs/read_only_root (security.container_security);
    cgroup: the run's memory cgroup (joined before exec, removed after the exit); rlimit_as: the memory
    limit as an address-space limit, where there are no cgroups.
    """

    def __init__(self, run_dir: str, name: str, argv: list[str], env: dict[str, str], cwd: str | None,
                 mounts: list[dict], log_path: str, security: dict | None = None, cgroup: Cgroup | None = None,
                 rlimit_as: int | None = None):
        self.name = name
        self.termination_path = os.path.join(run_dir, f"{name}.termination-log")
        self.start_error_path = os.path.join(run_dir, f"{name}.start-error")
        self.pid_path = os.path.join(run_dir, f"{name}.pid")
        self.cgroup, self.cgroup_path = cgroup, os.path.join(run_dir, f"{name}.cgroup")
        self.oom_killed = False
        plan_path = os.path.join(run_dir, f"{name}.json")
        for stale in (self.termination_path, self.start_error_path):
            if os.path.exists(stale):
                os.unlink(stale)
        open(self.termination_path, "w").close()
        os.chmod(self.termination_path, 0o666)  # non-root containers write their message too
        with open(plan_path, "w") as f:
            json.dump({"mounts": mounts, "cwd": cwd, "argv": argv, "start_error": self.start_error_path,
                       **(security or {}), "cgroup": cgroup.path if cgroup else None, "rlimit_as": rlimit_as}, f)
        if cgroup:  # lets a restarted agent (kill_leftovers) remove it
            with open(self.cgroup_path, "w") as f:
                f.write(f"{cgroup.path} {cgroup.version}\n")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "ab") as logf:
            self.log_path, self.log_offset = log_path, logf.tell()
            self.popen = subprocess.Popen([sys.executable, "-I", "-S", SHIM, plan_path], stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                          close_fds=True)
        self.pid = self.popen.pid
        self.started_at = time.time()
        with open(self.pid_path, "w") as f:
            f.write(f"{self.pid} {_start_time(self.pid) or ''}\n")
        self.returncode: int | None = None

    def signal(self, sig: int) -> None:
        """Signal the container's whole process group."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_in_thread(self, on_exit: Callable[[ContainerProcess], None]) -> None:
        threading.Thread(target=self._wait, args=(on_exit,), name=f"wait-{self.pid}", daemon=True).start()

    def _wait(self, on_exit: Callable[[ContainerProcess], None]) -> None:
        # Notice the exit without reaping, so the process group id cannot be reused before the
        # leftovers in it (like a container's other processes) are killed.
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        self.signal(signal.SIGKILL)
        self.returncode = exit_code(self.popen.wait())
        if self.cgroup:
            self.oom_killed = self.cgroup.oom_kills() > 0
            if not self.cgroup.destroy():
                self.cgroup_path = ""  # keep its record for kill_leftovers
        for path in (self.cgroup_path, self.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:  # also: the pod's directory is already gone
                pass
        on_exit(self)

    def termination_message(self, limit: int = 4096) -> str:
        try:
            with open(self.termination_path, "rb") as f:
                return f.read(limit).decode("utf-8", "replace")
        except OSError:
            return ""

    def start_error(self) -> str | None:
        """Why the shim could not start the command; None when the command itself ran."""
        try:
            with open(self.start_error_path) as f:
                return f.read() or None
        except FileNotFoundError:
            return None

    def log_tail(self, lines: int = 80, limit: int = 2048) -> str:
        """The end of what this run wrote (for terminationMessagePolicy FallbackToLogsOnError)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except OSError:
            return ""
        text = b"\n".join(data.rstrip(b"\n").split(b"\n")[-lines:])[-limit:]
        return text.decode("utf-8", "replace")


def kill_leftovers(state_dir: str) -> int:
    """SIGKILL the process groups recorded by pid files under state_dir; returns how many were alive."""
    killed = 0
    for pid_file in glob.glob(os.path.join(state_dir, "pod-data", "*", "run", "*.pid")):
        try:
            with open(pid_file) as f:
                pid_text, _, start = f.read().strip().partition(" ")
            pid = int(pid_text)
            if start and _start_time(pid) == start:
                os.killpg(pid, signal.SIGKILL)
                killed += 1
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            pass
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass
    if killed:
        log.info("killed %d container process group(s) left by a previous agent", killed)
    cgroups.remove_leftovers(state_dir)
    return killed
