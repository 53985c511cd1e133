"""Container launcher: a private mount namespace, the pod's bind mounts, then exec the command.

Run by the agent as `python -I -S shim.py PLAN.json` in a new session, so it must stay
standard-library only. The plan is JSON: {"mounts": [{"src", "dst", "ro", "file"}], "cwd",
"argv", "start_error", "user": null or {"uid", "gid", "groups"}}; the environment is already the container's. On a setup failure it
writes the reason to the plan's `start_error` file (empty otherwise) (the agent reports it as StartError) and
exits 128.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000

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


def setup(plan: dict) -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (the agent must run as root)")
    # Keep every mount below private to this container's namespace.
    _mount("none", "/", MS_REC | MS_PRIVATE, "making / private")
    # Open every source first: a volume mounted at, say, /tmp must not hide the sources of later mounts.
    sources = [os.open(m["src"], os.O_PATH) for m in plan["mounts"]]
    for m, fd in zip(plan["mounts"], sources, strict=True):
        _mountpoint(m["dst"], m["file"])
        _mount(f"/proc/self/fd/{fd}", m["dst"], MS_BIND | MS_REC, f"bind-mounting {m['src']} at {m['dst']}")
        if m["ro"]:
            _mount(None, m["dst"], MS_BIND | MS_REMOUNT | MS_RDONLY, f"making {m['dst']} read-only")
    cwd = plan.get("cwd")
    if cwd:
        os.makedirs(cwd, exist_ok=True)
    user = plan.get("user")
    if user:  # drop root last: the mounts above need it
        os.setgroups(user["groups"])
        os.setgid(user["gid"])
        os.setuid(user["uid"])
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
