"""The local node agent: plays the kubelet for the embedded cluster's Pods.

Run it with `python -m localcluster.nodeagent --kubeconfig K --state-dir D [--node NAME:cpu=16,gpu=1 ...]`.

What it does: registers Nodes and keeps them Ready (status + Lease), runs each container's command/args
as a local process of the project's Python environment in its own mount namespace with the pod's
volumes bind-mounted, gives each pod its own 127.x.y.z address, hostname (UTS namespace), /etc/hosts and
/etc/resolv.conf (the cluster DNS, dns.py), reports truthful pod status, honours restartPolicy and graceful
deletion (eviction included), and provisions PVCs of the default StorageClass `local-path`.
It enforces the securityContext (user, groups, fsGroup volume ownership, capabilities, no_new_privs,
read-only root; security.py, shim.py) and resources.limits.memory in a memory cgroup per container,
reporting a kernel OOM kill as OOMKilled (cgroups.py).

What it does not do (say so to users): images are recorded, never pulled (a container needs an
explicit `command`); no `kubectl logs/exec` (there is no kubelet API: read
`pod_log_path(...)`, or `python -m localcluster logs`); probes are not run (a running container is
ready); CPU limits, seccomp, AppArmor/SELinux are not enforced; containers share the host's root
filesystem (read-only with readOnlyRootFilesystem), so mountpoints are created on it.
"""

import os

from ..provision import cache_dir
from .processes import kill_leftovers

__all__ = ["pod_log_path", "kill_leftovers", "shared_cache_dir"]


def shared_cache_dir() -> str:
    """The node's default shared cache: one directory every pod can write whatever its uid and read-only root
    (a build cache such as torch extensions, which a real image would ship prebuilt); `--shared-cache`."""
    return str(cache_dir() / "pod-cache")


def pod_log_path(state_dir: str, namespace: str, pod: str, container: str) -> str:
    """Where a container's stdout and stderr go (appended across restarts of the container)."""
    return os.path.join(os.path.abspath(state_dir), "pods", namespace, pod, f"{container}.log")
