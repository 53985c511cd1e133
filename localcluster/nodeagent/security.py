"""A container's securityContext turned into what the shim enforces (pure functions, container-runtime rules).

The container's securityContext wins over the pod's for the fields both have. Capabilities start from the
runtime's default set (containerd/Docker), `drop` then `add` apply (either may say ALL); a privileged
container keeps every capability. A process that is not uid 0 ends with no effective capabilities (the
kernel clears them on setuid; only the bounding set is limited), as in a real container.
"""

from __future__ import annotations

import pwd

from .env import ContainerConfigError

# Linux capability numbers (linux/capability.h).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
CAP_NUMBER = {name: i for i, name in enumerate(CAPABILITIES)}
# What containerd and Docker grant a container that asks for nothing.
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")


def _merged(pod_spec: dict, container: dict, field: str):
    sc, pod_sc = container.get("securityContext") or {}, pod_spec.get("securityContext") or {}
    return sc[field] if sc.get(field) is not None else pod_sc.get(field)


def _cap_names(names: list, where: str) -> set[str]:
    out = set()
    for raw in names or []:
        name = str(raw).upper()
        name = name[4:] if name.startswith("CAP_") else name
        if name == "ALL":
            out.update(CAPABILITIES)
        elif name in CAP_NUMBER:
            out.add(name)
        else:
            raise ContainerConfigError(f"{where}: unknown capability {raw!r} (use names like NET_ADMIN or "
                                       "CAP_NET_ADMIN, or ALL)")
    return out


def capability_set(container: dict) -> list[int]:
    """The capability numbers the container keeps, sorted."""
    sc = container.get("securityContext") or {}
    if sc.get("privileged"):
        return list(range(len(CAPABILITIES)))
    where = f"container {container.get('name')!r} securityContext.capabilities"
    caps = sc.get("capabilities") or {}
    keep = set(DEFAULT_CAPABILITIES) - _cap_names(caps.get("drop"), where + ".drop")
    keep |= _cap_names(caps.get("add"), where + ".add")
    return sorted(CAP_NUMBER[c] for c in keep)


def process_user(pod_spec: dict, container: dict, pod_name: str = "") -> dict | None:
    """uid/gid/groups from the securityContexts, or None to stay root (an image's default user).

    Images are not pulled, so an image's USER is unknown and taken to be root: runAsNonRoot therefore needs
    an explicit non-zero runAsUser, or the container is refused like the kubelet refuses a root image.
    """
    uid = _merged(pod_spec, container, "runAsUser")
    gid = _merged(pod_spec, container, "runAsGroup")
    if _merged(pod_spec, container, "runAsNonRoot") and not uid:
        why = ("runAsUser is 0" if uid == 0 else "no runAsUser is set and the local node agent does not pull "
               "images, so the image's user is unknown and taken to be root")
        who = f"pod: {pod_name!r}, container: {container.get('name')!r}"
        raise ContainerConfigError(f"container has runAsNonRoot and image will run as root ({who}): {why}; "
                                   "set securityContext.runAsUser to a non-zero uid")
    if uid is None:
        return None
    pod_sc = pod_spec.get("securityContext") or {}
    groups = list(pod_sc.get("supplementalGroups") or [])
    if pod_sc.get("fsGroup") is not None:
        groups.append(pod_sc["fsGroup"])
    if gid is None:  # like a runtime: the user's primary group in the image's (here the host's) passwd, else 0
        gid = _passwd_gid(int(uid))
    return {"uid": int(uid), "gid": int(gid), "groups": sorted({int(g) for g in groups})}


def _passwd_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return 0


def container_security(pod: dict, container: dict) -> dict:
    """The shim plan's security part: user, capabilities, no_new_privs, read_only_root.

    Raises ContainerConfigError (the kubelet's CreateContainerConfigError) for what cannot be honoured.
    """
    spec = pod.get("spec") or {}
    sc = container.get("securityContext") or {}
    name = f"{(pod.get('metadata') or {}).get('namespace', '')}/{(pod.get('metadata') or {}).get('name', '')}"
    if sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False:
        raise ContainerConfigError(f"container {container.get('name')!r}: cannot set allowPrivilegeEscalation "
                                   "to false and privileged to true")
    return {
        "user": process_user(spec, container, name),
        "capabilities": capability_set(container),
        "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
        "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
    }

