"""How many CPU threads torch may use: what the pod asked for, not what the node has.

torch defaults to one thread per core of the node. Two pods that each take every core of a small node
slow each other down far more than they gain (spinning OpenMP threads fight over the same cores), so
with ``training.threads: 0`` the trainer follows the container's CPU budget instead: the pod's CPU request
(``$RLHF_CPU_REQUEST``, which the operator fills from ``spec.resources.cpu`` through the downward API,
rounded up), else the cgroup's CPU quota (a CPU limit), else torch's default. Processes started by
torchrun on one node share the budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .. import contract

CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_cpus(cpu_max: str = CGROUP_V2_CPU_MAX, quota: str = CGROUP_V1_QUOTA, period: str = CGROUP_V1_PERIOD) -> int:
    """CPUs allowed by the cgroup's quota, rounded up; 0 when there is no quota."""
    parts = _read(cpu_max).split()
    if len(parts) == 2 and parts[0] != "max":
        q, p = parts
    else:
        q, p = _read(quota), _read(period)
    try:
        q_us, p_us = int(q), int(p)
    except ValueError:
        return 0
    return math.ceil(q_us / p_us) if q_us > 0 and p_us > 0 else 0


def cpu_budget(env: Mapping[str, str] | None = None, cgroup: int | None = None) -> tuple[int, str]:
    """(CPUs this container may use, where that number came from); (0, ...) when nothing limits it."""
    env = os.environ if env is None else env
    raw = env.get(contract.ENV_CPU_REQUEST, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0  # a malformed value is ignored, the quota or torch's default applies
        if value > 0:
            return value, f"pod CPU request ${contract.ENV_CPU_REQUEST}={value}"
    quota = cgroup_cpus() if cgroup is None else cgroup
    if quota > 0:
        return quota, f"cgroup CPU quota {quota}"
    return 0, "torch default"


def choose_threads(configured: int, env: Mapping[str, str] | None = None, cgroup: int | None = None,
                   available: int | None = None) -> tuple[int, str]:
    """(threads to use, why); 0 threads = leave torch's default."""
    if configured > 0:
        return configured, "training.threads"
    env = os.environ if env is None else env
    budget, source = cpu_budget(env, cgroup)
    if budget <= 0:
        return 0, source
    available = available or len(os.sched_getaffinity(0))
    local_procs = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(budget, available) // local_procs), source


def apply(configured: int) -> str:
    """Set torch's intra-op threads from the config or the CPU budget; says how many and why."""
    import torch

    threads, why = choose_threads(configured)
    if threads > 0:
        torch.set_num_threads(threads)
    return f"{torch.get_num_threads()} CPU threads ({why})"
