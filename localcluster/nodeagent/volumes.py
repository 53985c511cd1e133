"""Pod volumes as local directories, and each container's bind-mount plan.

The directories are made here (in the agent); the mounts happen inside the pod's own mount
namespace (see shim.py), so nothing is mounted on the host.
"""

from __future__ import annotations

import base64
import os
import posixpath
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .env import ContainerConfigError, PodContext, expand, field_value, resource_value

SUPPORTED = ("persistentVolumeClaim", "emptyDir", "configMap", "secret", "downwardAPI", "projected", "hostPath")
# Kinds the kubelet always mounts read-only.
ALWAYS_READ_ONLY = ("configMap", "secret", "downwardAPI", "projected")
DEFAULT_FILE_MODE = 0o644


class VolumeError(Exception):
    """A volume cannot be set up (yet); the kubelet reports these as FailedMount."""


@dataclass(frozen=True)
class Mount:
    src: str
    dst: str
    read_only: bool
    is_file: bool
    root_fs: bool = False  # a host path bound back over a volume: part of the root filesystem, not a volume

    def to_json(self) -> dict:
        return {"src": self.src, "dst": self.dst, "ro": self.read_only, "file": self.is_file, "root": self.root_fs}


@dataclass(frozen=True)
class Volume:
    path: str
    read_only: bool
    scratch: bool = False  # an emptyDir: only private scratch space, never data the pod must see


Lookup = Callable[[str, str], dict | None]
ClaimPath = Callable[[str, str], str]  # (namespace, claim) -> directory; raises VolumeError


def _safe_relpath(path: str, what: str) -> str:
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm == ".." or norm.startswith("../"):
        raise VolumeError(f"{what}: path {path!r} must be relative and stay inside the volume")
    return norm


def _write_files(root: str, files: dict[str, tuple[bytes, int]]) -> None:
    os.makedirs(root, mode=0o755, exist_ok=True)
    for rel, (content, mode) in files.items():
        target = os.path.join(root, rel)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        tmp = target + ".tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, target)


def _key_files(data: dict[str, bytes], items: list[dict] | None, default_mode: int, optional: bool,
               what: str) -> dict[str, tuple[bytes, int]]:
    """configMap/secret keys -> files, following `items` when given (missing keys are errors)."""
    if not items:
        return {_safe_relpath(k, what): (v, default_mode) for k, v in data.items()}
    files = {}
    for item in items:
        key = item.get("key")
        if key not in data:
            if optional:
                continue
            raise VolumeError(f"{what} has no key {key!r}")
        files[_safe_relpath(item.get("path") or key, what)] = (data[key], item.get("mode", default_mode))
    return files


def _configmap_bytes(obj: dict | None) -> dict[str, bytes] | None:
    if obj is None:
        return None
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _secret_bytes(obj: dict | None) -> dict[str, bytes] | None:
    if obj is None:
        return None
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _downward_files(items: list[dict], default_mode: int, ctx: PodContext, what: str) -> dict[str, tuple[bytes, int]]:
    files = {}
    containers = {c["name"]: c for c in ctx.pod["spec"].get("containers") or []}
    for item in items or []:
        try:
            if "fieldRef" in item:
                value = field_value(item["fieldRef"].get("fieldPath", ""), ctx)
            else:
                ref = item.get("resourceFieldRef") or {}
                container = containers.get(ref.get("containerName")) or next(iter(containers.values()))
                value = resource_value(ref, container)
        except ContainerConfigError as e:
            raise VolumeError(f"{what}: {e}") from None
        files[_safe_relpath(item.get("path", ""), what)] = (value.encode(), item.get("mode", default_mode))
    return files


class VolumeBuilder:
    """Creates a pod's volume directories under its own pod directory."""

    def __init__(self, pod_dir: str, configmap: Lookup, secret: Lookup, claim_path: ClaimPath):
        self.pod_dir = pod_dir
        self.configmap, self.secret, self.claim_path = configmap, secret, claim_path

    def build(self, ctx: PodContext) -> dict[str, Volume]:
        pod = ctx.pod
        ns = pod["metadata"]["namespace"]
        pod_sc = pod["spec"].get("securityContext") or {}
        group = pod_sc.get("fsGroup")
        on_root_mismatch = pod_sc.get("fsGroupChangePolicy") == "OnRootMismatch"
        volumes = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            kind = next((k for k in vol if k != "name"), None)
            if kind not in SUPPORTED:
                raise VolumeError(f"volume {name!r} is of type {kind!r}, which the local node agent does not "
                                  f"support (supported: {', '.join(SUPPORTED)})")
            source = vol[kind] or {}
            what = f"volume {name!r} ({kind})"
            local = os.path.join(self.pod_dir, "volumes", kind, name)
            if kind == "persistentVolumeClaim":
                path = self.claim_path(ns, source.get("claimName", ""))
            elif kind == "emptyDir":
                path = local
                os.makedirs(path, exist_ok=True)
                os.chmod(path, 0o777)  # like the kubelet's emptyDir: writable by non-root containers
            elif kind == "hostPath":
                path = self._host_path(source, what)
            else:
                path = local
                _write_files(path, self._projection(kind, source, ns, ctx, what))
            read_only = kind in ALWAYS_READ_ONLY or bool(source.get("readOnly"))
            if group is not None and kind != "hostPath" and not (kind == "persistentVolumeClaim" and read_only):
                try:
                    apply_fs_group(path, group, read_only, on_root_mismatch)
                except OSError as e:
                    raise VolumeError(f"{what}: could not give it to fsGroup {group}: {e}") from None
            volumes[name] = Volume(path, read_only, scratch=kind == "emptyDir")
        return volumes

    def _projection(self, kind: str, source: dict, ns: str, ctx: PodContext, what: str) -> dict:
        mode = source.get("defaultMode", DEFAULT_FILE_MODE)
        if kind == "projected":
            files: dict = {}
            for i, part in enumerate(source.get("sources") or []):
                sub_kind = next(iter(part), None)
                if sub_kind not in ("configMap", "secret", "downwardAPI"):
                    raise VolumeError(f"{what}: projected source {i} of type {sub_kind!r} is not supported "
                                      "(supported: configMap, secret, downwardAPI)")
                files.update(self._projection(sub_kind, {**part[sub_kind], "defaultMode": mode}, ns, ctx, what))
            return files
        if kind == "downwardAPI":
            return _downward_files(source.get("items") or [], mode, ctx, what)
        name_key = "name" if kind == "configMap" else "secretName"
        obj_name = source.get(name_key) or source.get("name", "")
        raw = self.configmap(ns, obj_name) if kind == "configMap" else self.secret(ns, obj_name)
        data = _configmap_bytes(raw) if kind == "configMap" else _secret_bytes(raw)
        optional = bool(source.get("optional"))
        if data is None:
            if optional:
                return {}
            raise VolumeError(f"{what}: {kind} {ns}/{obj_name} not found; create it or mark the volume optional")
        return _key_files(data, source.get("items"), mode, optional, f"{what}: {kind} {ns}/{obj_name}")

    @staticmethod
    def _host_path(source: dict, what: str) -> str:
        path, htype = source.get("path", ""), source.get("type") or ""
        if not os.path.isabs(path):
            raise VolumeError(f"{what}: path {path!r} must be absolute")
        if htype == "DirectoryOrCreate":
            os.makedirs(path, exist_ok=True)
        elif htype == "FileOrCreate" and not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        elif htype in ("Directory", "File") and not (os.path.isdir(path) if htype == "Directory" else os.path.isfile(path)):
            raise VolumeError(f"{what}: {path} is not an existing {htype.lower()} (type {htype})")
        return path


def apply_fs_group(root: str, gid: int, read_only: bool, on_root_mismatch: bool = False) -> None:
    """The kubelet's volume ownership for fsGroup: group gid on everything, group read (and write unless
    read_only) added, directories searchable and setgid so new files inherit the group. Symlinks are left
    alone. With fsGroupChangePolicy OnRootMismatch an already matching volume root skips the walk."""
    add = 0o440 if read_only else 0o660

    def fix(path: str, is_dir: bool) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return
        want = stat.S_IMODE(st.st_mode) | add | ((0o110 | stat.S_ISGID) if is_dir else 0)
        if st.st_gid != gid:
            os.lchown(path, -1, gid)  # may clear the setgid bit: set the mode afterwards
        elif stat.S_IMODE(st.st_mode) == want:
            return
        os.chmod(path, want)

    st = os.stat(root)
    if on_root_mismatch and st.st_gid == gid and stat.S_IMODE(st.st_mode) & (add | 0o110 | stat.S_ISGID) \
            == add | 0o110 | stat.S_ISGID:
        return
    if not stat.S_ISDIR(st.st_mode):
        fix(root, False)
        return
    for top, _dirs, files in os.walk(root):  # symlinked directories are listed, never followed
        fix(top, True)
        for f in files:
            fix(os.path.join(top, f), False)


def protected_paths() -> list[str]:
    """Host paths a container's process needs (containers share the host's root filesystem here)."""
    return sorted({sys.prefix, sys.base_prefix, "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/dev",
                   "/proc", "/sys"})


def runtime_paths() -> list[str]:
    """What a container's process runs from: this checkout and its venv, and the venv's base interpreter."""
    return sorted({sys.prefix, sys.base_prefix, project_dir()})


def project_dir() -> str:
    """The checkout whose venv runs the containers (its code, e.g. test helpers, must stay visible)."""
    return os.path.dirname(sys.prefix) if sys.prefix != sys.base_prefix else sys.prefix


def hidden_path(mount_path: str, protected: list[str]) -> str | None:
    """The protected path a mount at mount_path would cover, if any."""
    for path in protected:
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return path
    return None


def container_mounts(container: dict, volumes: dict[str, Volume], env: dict[str, str]) -> list[Mount]:
    """The bind mounts for one container, parents before children."""
    mounts = []
    keep: set[str] = set()
    protected = protected_paths()
    for vm in container.get("volumeMounts") or []:
        name, dst = vm.get("name"), vm.get("mountPath", "")
        where = f"container {container.get('name')!r} volumeMount {name!r}"
        if name not in volumes:
            raise VolumeError(f"{where}: the pod has no volume named {name!r}")
        if not dst.startswith("/"):
            raise VolumeError(f"{where}: mountPath {dst!r} must be absolute")
        vol = volumes[name]
        covered = hidden_path(posixpath.normpath(dst), protected + ([project_dir()] if vol.scratch else []))
        if covered and vol.scratch:
            # e.g. an emptyDir at /tmp while this checkout lives under /tmp: mount it, then bind the covered
            # paths back on top (the shim opens every source before mounting anything, so they are still
            # reachable), keeping the code the container runs visible.
            keep.update(p for p in protected + [project_dir()] if hidden_path(posixpath.normpath(dst), [p]))
        elif covered:
            raise VolumeError(f"{where}: mountPath {dst} would hide {covered}, which containers on the local node "
                              "share with the host (the project's Python environment runs them); mount it elsewhere")
        src = vol.path
        sub = vm.get("subPath") or expand(vm.get("subPathExpr") or "", env)
        if sub:
            src = os.path.join(src, _safe_relpath(sub, where))
            if not os.path.exists(src):
                os.makedirs(src, exist_ok=True)
        mounts.append(Mount(src, posixpath.normpath(dst), vol.read_only or bool(vm.get("readOnly")),
                            os.path.isfile(src)))
    ordered = sorted(mounts, key=lambda m: m.dst.count("/"))
    outermost = sorted(p for p in keep if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in keep))
    return ordered + [Mount(p, p, False, False, root_fs=True) for p in outermost]
