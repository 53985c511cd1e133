"""Finding a pod's process on this machine (the embedded node agent runs pods as local processes)."""

from __future__ import annotations

from pathlib import Path


def pod_process(namespace: str, pod: str, program: str, exclude: str = "") -> int | None:
    """PID of the process of pod `namespace/pod` whose command line contains `program` (e.g. the trainer's
    module or script name) and not `exclude` (e.g. "torchrun", for the worker it started), found by the
    POD_NAME and RLHF_JOB_NAMESPACE its environment carries."""
    wanted = (f"POD_NAME={pod}".encode(), f"RLHF_JOB_NAMESPACE={namespace}".encode())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if all(w in environ for w in wanted) and program.encode() in cmdline and not (
                exclude and exclude.encode() in cmdline):
            return int(proc.name)
    return None


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
