"""Container launcher: a memory cgroup, a private mount namespace, the pod's bind mounts, a read-only root,
the securityContext's user and capabilities, then exec the command.

Run by the agent as `python -I -S shim.py PLAN.json` in a new session, so it must stay standard-library
only. The plan is JSON:
  mounts          [{"src", "dst", "ro", "file", "root"}]; "root": a host path re-exposed over a volume (part of
                  the root filesystem: read-only with read_only_root), otherwise a volume (as its "ro" says)
  cwd, argv, start_error (a file: the setup failure's reason, empty otherwise)
  cgroup          null or the cgroup directory to join first (its memory limit is set by the agent)
  rlimit_as       null or bytes (the memory limit where cgroups are unavailable)
  user            null (stay uid 0) or {"uid", "gid", "groups"}
  capabilities    null (keep all) or the capability numbers to keep (bounding set; effective too for uid 0)
  no_new_privs    allowPrivilegeEscalation: false
  read_only_root  readOnlyRootFilesystem: every mount but the volumes, /proc, /sys and /dev read-only
  expose          host paths a non-root user must reach (this checkout's Python), see _expose
  hostname        null (the host's UTS namespace) or the pod's hostname, set in a new UTS namespace
The environment is already the container's. On a setup failure the shim writes the reason to start_error
(the agent reports it as StartError) and exits 128.
"""

import ctypes
import json
import os
import re
import resource
import sys
import warnings  # noqa: F401 - os.execvp imports it lazily, maybe after the uid lost access to this Python

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x400, 0x800, 0x1000, 0x4000, 0x40000
MS_RELATIME, MS_STRICTATIME = 0x200000, 0x1000000
# Per-mount flags a bind remount must repeat, or it clears them.
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
# Left writable under readOnlyRootFilesystem: a runtime gives a container its own /proc, /sys and /dev.
KERNEL_FS = ("/proc", "/sys", "/dev")
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, flags: int, what: str) -> None:
    _check(_libc.mount(src and src.encode(), dst.encode(), None, flags, None), what)


def _mountpoint(dst: str, is_file: bool) -> None:
    # Mountpoints are created on the host filesystem (a namespace separates mounts, not files).
    if is_file:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "a").close()
    else:
        os.makedirs(dst, exist_ok=True)


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top.rstrip("/") + "/")


def _mountinfo() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount in this namespace, parents first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = 0
            for opt in fields[5].split(","):
                flags |= MOUNT_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _searchable(path: str, user: dict) -> bool:
    st = os.stat(path)
    if st.st_uid == user["uid"]:
        bits = st.st_mode >> 6
    elif st.st_gid == user["gid"] or st.st_gid in user["groups"]:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bool(bits & 1)


def _expose(paths: list, user: dict) -> None:
    """Make paths the process must reach (the Python it runs) reachable behind a directory its uid cannot
    search, e.g. a 0700 /root holding pyenv's interpreter: that directory is covered with an empty tmpfs
    and only those paths are bound back. The uid could not look into the directory anyway."""
    blocked: dict[str, list] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            top = "/" + "/".join(parts[:i])
            if not _searchable(top, user):
                blocked.setdefault(top, []).append(path)
                break
    fds = {p: os.open(p, os.O_PATH) for keep in blocked.values() for p in keep}
    for top in sorted(blocked, key=len):
        _check(_libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
               f"covering {top}, which uid {user['uid']} cannot search")
        for path in blocked[top]:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fds[path]}", path, MS_BIND | MS_REC, f"binding {path} back over {top}")
    for fd in fds.values():
        os.close(fd)


def _read_only_root(mounts: list) -> None:
    """Remount read-only every mount that belongs to the root filesystem: not a volume, not /proc, /sys or /dev.

    A mount belongs to the deepest plan mount above it; host paths re-exposed over a volume ("root") count
    as root filesystem again.
    """
    owners = sorted(((m["dst"], bool(m.get("root"))) for m in mounts), key=lambda o: len(o[0]), reverse=True)
    table = _mountinfo()
    for i, (point, flags) in enumerate(table):
        if any(_under(point, top) for top in KERNEL_FS):
            continue
        if any(_under(point, later) for later, _ in table[i + 1:]):
            continue  # covered by a later mount at or above it (e.g. the checkout bound back over a /tmp volume):
            # unreachable, and its path now leads into the covering mount, which has its own entry
        if not next((is_root for dst, is_root in owners if _under(point, dst)), True):
            continue
        try:
            _mount(None, point, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, f"making {point} read-only")
        except FileNotFoundError:
            pass  # a mount hidden under a covered directory (see _expose) cannot be reached at all


def _set_capabilities(keep: list) -> None:
    """Effective and permitted become `keep`, inheritable empty, as runtimes do (for a process staying uid 0)."""
    mask = sum(1 << c for c in keep)
    header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(*(v for half in (mask & 0xFFFFFFFF, mask >> 32) for v in (half, half, 0)))
    _check(_libc.capset(header, data), "capset")


def _drop_privileges(plan: dict) -> None:
    keep = plan.get("capabilities")
    if keep is not None:
        keep_set = set(keep)
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            if cap not in keep_set:
                _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    user = plan.get("user")
    if user:  # setuid to a non-zero uid clears the effective and permitted capabilities
        os.setgroups(user["groups"])
        os.setgid(user["gid"])
        os.setuid(user["uid"])
    if keep is not None and (not user or user["uid"] == 0):
        _set_capabilities([c for c in keep if c <= last])
    if plan.get("no_new_privs"):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def setup(plan: dict) -> None:
    if plan.get("cgroup"):  # first, so everything the container allocates is charged to its cgroup
        with open(os.path.join(plan["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if plan.get("rlimit_as"):
        resource.setrlimit(resource.RLIMIT_AS, (plan["rlimit_as"], plan["rlimit_as"]))
    hostname = plan.get("hostname")
    _check(_libc.unshare(CLONE_NEWNS | (CLONE_NEWUTS if hostname else 0)),
           "unshare(CLONE_NEWNS) (the agent must run as root)")
    if hostname:
        name = hostname.encode()
        _check(_libc.sethostname(name, len(name)), f"sethostname({hostname!r})")
    # Keep every mount below private to this container's namespace.
    _mount("none", "/", MS_REC | MS_PRIVATE, "making / private")
    # Open every source first: a volume mounted at, say, /tmp must not hide the sources of later mounts.
    sources = [os.open(m["src"], os.O_PATH) for m in plan["mounts"]]
    cwd = plan.get("cwd")
    if cwd:
        os.makedirs(cwd, exist_ok=True)
    user = plan.get("user")
    if user and user["uid"] != 0 and plan.get("expose"):  # before the mounts: they may go below a covered path
        _expose(plan["expose"], user)
    for m, fd in zip(plan["mounts"], sources, strict=True):
        _mountpoint(m["dst"], m["file"])
        _mount(f"/proc/self/fd/{fd}", m["dst"], MS_BIND | MS_REC, f"bind-mounting {m['src']} at {m['dst']}")
        if m["ro"]:
            _mount(None, m["dst"], MS_BIND | MS_REMOUNT | MS_RDONLY, f"making {m['dst']} read-only")
        os.close(fd)
    if plan.get("read_only_root"):
        _read_only_root(plan["mounts"])
    _drop_privileges(plan)  # last: the steps above need root
    if cwd:
        os.chdir(cwd)


def _fail(error_fd: int, message: str) -> None:
    os.write(error_fd, message.encode())
    print(f"local node agent: container failed to start: {message}", file=sys.stderr, flush=True)
    os._exit(128)


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    argv = plan["argv"]
    # Opened while still root: the process may not be able to create it after dropping privileges.
    error_fd = os.open(plan["start_error"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        setup(plan)
    except OSError as e:
        _fail(error_fd, e.strerror if e.filename is None else str(e))
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        _fail(error_fd, f'exec: "{argv[0]}": executable file not found in $PATH')
    except OSError as e:
        _fail(error_fd, f'exec: "{argv[0]}": {e.strerror}')


if __name__ == "__main__":
    main()
