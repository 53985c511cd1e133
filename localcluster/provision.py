"""Provisioning: Kubernetes v1.20.2 control-plane binaries built from Debian's source package, cached by version.

Steps (each idempotent; the whole run is skipped when the cached binaries exist and report the right version):
  1. apt packages      etcd, Go, build tools, Debian's reflect2 1.0.2 sources
  2. deb-src entry     so apt can fetch bookworm's `kubernetes` source package
  3. download source   `apt-get source --download-only kubernetes` (kept in the cache)
  4. unpack            `dpkg-source -x` (applies Debian's patches)
  5. fix reflect2      vendored reflect2 1.0.1 crashes the API server under Go >= 1.18 on the first custom
                       resource; swap in Debian's 1.0.2 sources
  6. build             `make WHAT=...` in the GOPATH layout Debian's packaging uses
  7. install           copy the three binaries to <cache>/k8s-v1.20.2/bin/
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

K8S_VERSION = "v1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
APT_PACKAGES = (
    "etcd-server",
    "golang-go",
    "rsync",
    "jq",
    "dpkg-dev",
    "golang-github-modern-go-reflect2-dev",
    "openssl",
    "util-linux",
)
SOURCE_PACKAGE = "kubernetes"
SOURCE_VERSION_MARK = "really1.20.2"  # Debian's version is 1.20.5+really1.20.2-...: the tree is v1.20.2
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/rlhf-deb-src.sources")
DEB_SRC_ENTRY = """\
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
REFLECT2_VENDOR = Path("vendor/github.com/modern-go/reflect2")

Log = Callable[[str], None]


class ProvisionError(RuntimeError):
    """A provisioning step failed: says which step, which command, what happened and what to do."""

    def __init__(self, step: str, command: str, detail: str, hint: str):
        self.step, self.command, self.detail, self.hint = step, command, detail, hint
        super().__init__(
            f"provision step '{step}' failed\n  command: {command}\n  {detail.strip()}\n  what to do: {hint}"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-platform")


def version_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"k8s-{K8S_VERSION}"


def bin_dir(cache: Path | None = None) -> Path:
    return version_dir(cache) / "bin"


def check_binaries(bdir: Path) -> str | None:
    """None when all three binaries in bdir run and report K8S_VERSION; else why not."""
    for name in BINARIES:
        path = bdir / name
        if not os.access(path, os.X_OK):
            return f"{path} is missing or not executable"
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{path} --version` did not run: {exc}"
        if out.returncode != 0 or K8S_VERSION not in out.stdout:
            return f"`{path} --version` printed {out.stdout.strip()!r} (exit {out.returncode}), expected {K8S_VERSION}"
    return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def run_step(step: str, argv: Sequence[str], hint: str, *, cwd: Path | None = None, env: dict | None = None,
             log: Log = print) -> str:
    """Run one command of a step; on failure raise ProvisionError with its output's tail."""
    command = shlex.join(argv)
    log(f"    $ {command}")
    try:
        out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True)
    except OSError as exc:
        raise ProvisionError(step, command, f"could not start: {exc}", hint) from exc
    if out.returncode != 0:
        raise ProvisionError(step, command, f"exit code {out.returncode}, output:\n{_tail(out.stdout + out.stderr)}",
                             hint)
    return out.stdout


def _as_root(argv: Sequence[str], step: str, hint: str) -> list[str]:
    if os.geteuid() == 0:
        return list(argv)
    if shutil.which("sudo"):
        return ["sudo", "-n", *argv]
    raise ProvisionError(step, shlex.join(argv), "needs root and sudo is not installed",
                         f"run `python -m localcluster provision` as root, or {hint}")


@contextmanager
def _locked(path: Path):
    """One provisioning at a time per cache (parallel CI jobs or test sessions on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- steps ---------------------------------------------------------------------------------------------------


def _missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for pkg in packages:
        out = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], capture_output=True, text=True)
        if out.stdout.strip() != "installed":
            missing.append(pkg)
    return missing


def step_apt_packages(log: Log) -> None:
    step = "apt packages"
    if not shutil.which("dpkg-query"):
        raise ProvisionError(step, "dpkg-query", "not a Debian-based system",
                             "provision on Debian bookworm (the recipe uses Debian's packages)")
    missing = _missing_packages(APT_PACKAGES)
    if not missing:
        log("    all installed")
        return
    hint = f"check network access to deb.debian.org, then run `apt-get install {' '.join(missing)}` by hand"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_step(step, _as_root(["apt-get", "update"], step, hint), hint, env=env, log=log)
    run_step(step, _as_root(["apt-get", "install", "-y", "--no-install-recommends", *missing], step, hint), hint,
             env=env, log=log)


def _source_known() -> bool:
    out = subprocess.run(["apt-cache", "showsrc", SOURCE_PACKAGE], capture_output=True, text=True)
    return out.returncode == 0 and SOURCE_VERSION_MARK in out.stdout


def step_deb_src(log: Log) -> None:
    step = "deb-src entry"
    if _source_known():
        log("    apt already knows the kubernetes source package")
        return
    hint = (f"create {DEB_SRC_FILE} with a deb-src entry for bookworm main (see localcluster/provision.py), "
            "then run `apt-get update`")
    if not DEB_SRC_FILE.exists():
        log(f"    writing {DEB_SRC_FILE}")
        if os.geteuid() == 0:
            DEB_SRC_FILE.write_text(DEB_SRC_ENTRY)
        else:
            cmd = _as_root(["tee", str(DEB_SRC_FILE)], step, hint)
            out = subprocess.run(cmd, input=DEB_SRC_ENTRY, capture_output=True, text=True)
            if out.returncode != 0:
                raise ProvisionError(step, shlex.join(cmd), out.stderr, hint)
    run_step(step, _as_root(["apt-get", "update"], step, hint), hint, log=log)
    if not _source_known():
        raise ProvisionError(step, f"apt-cache showsrc {SOURCE_PACKAGE}",
                             f"no source version containing {SOURCE_VERSION_MARK} after apt-get update", hint)


def _find_dsc(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{SOURCE_PACKAGE}_*{SOURCE_VERSION_MARK}*.dsc"))
    if not found:
        return None
    dsc = found[-1]
    files = re.findall(r"^ [0-9a-f]{32,} \d+ (\S+)$", dsc.read_text(), re.M)
    return dsc if files and all((directory / f).exists() for f in files) else None


def step_download_source(src_dir: Path, log: Log) -> Path:
    step = "download source"
    dsc = _find_dsc(src_dir) if src_dir.exists() else None
    if dsc:
        log(f"    cached: {dsc}")
        return dsc
    src_dir.mkdir(parents=True, exist_ok=True)
    hint = "check the deb-src entry and network access to deb.debian.org; retry `python -m localcluster provision`"
    run_step(step, ["apt-get", "source", "--download-only", SOURCE_PACKAGE], hint, cwd=src_dir, log=log)
    dsc = _find_dsc(src_dir)
    if not dsc:
        raise ProvisionError(step, "apt-get source --download-only kubernetes",
                             f"no complete {SOURCE_PACKAGE}_*{SOURCE_VERSION_MARK}*.dsc in {src_dir}",
                             f"delete {src_dir} and retry; the bookworm source must be version 1.20.5+really1.20.2")
    return dsc


def step_unpack(dsc: Path, tree: Path, log: Log) -> None:
    step = "unpack"
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    run_step(step, ["dpkg-source", "-x", str(dsc), str(tree)],
             f"check free disk space under {tree.parent} (about 2 GiB needed) and that dpkg-dev is installed",
             log=log)


def step_fix_reflect2(tree: Path, log: Log) -> None:
    step = "fix reflect2"
    if not (REFLECT2_SRC / "reflect2.go").exists():
        raise ProvisionError(step, f"copy {REFLECT2_SRC}", "Debian's reflect2 sources are not there",
                             "apt-get install golang-github-modern-go-reflect2-dev (version 1.0.2)")
    vendored = tree / REFLECT2_VENDOR
    shutil.rmtree(vendored, ignore_errors=True)
    shutil.copytree(REFLECT2_SRC, vendored, ignore=shutil.ignore_patterns("*_test.go"))
    log(f"    {vendored} <- {REFLECT2_SRC} (without *_test.go)")


def step_build(tree: Path, log: Log) -> None:
    step = "build"
    gopath = tree / ".go"
    link = gopath / "src" / "k8s.io" / "kubernetes"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(tree)
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "CGO_ENABLED": "0",
        "GOFLAGS": "-mod=vendor",
        "GO111MODULE": "on",
        "PATH": f"/usr/lib/go/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    argv = ["make", f"WHAT={' '.join('cmd/' + b for b in BINARIES)}"]
    log_file = tree.parent / "make.log"
    log(f"    $ {shlex.join(argv)}   (in {link}; full output in {log_file}; ~5 min on 2 cores)")
    with open(log_file, "w") as out:
        proc = subprocess.Popen(argv, cwd=link, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        showing = False
        for line in proc.stdout:
            out.write(line)
            # The build's own progress lines ("+++ ... Building go targets:") and the target names under them.
            showing = line.startswith("+++") or (showing and line.startswith("    "))
            if showing:
                log("    " + line.rstrip())
        code = proc.wait()
    if code != 0:
        raise ProvisionError(step, shlex.join(argv), f"exit code {code}, output:\n{_tail(log_file.read_text())}",
                             f"read {log_file}; check `go version` (Debian's golang-go 1.19), rsync, jq and free "
                             "disk space, then retry")


def step_install(tree: Path, bdir: Path, log: Log) -> None:
    step = "install"
    bdir.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        built = tree / "_output" / "bin" / name
        if not built.exists():
            raise ProvisionError(step, f"cp {built} {bdir}", "the build produced no such file",
                                 f"read {tree.parent / 'make.log'}")
        tmp = bdir / f".{name}.tmp"
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, bdir / name)  # atomic: a concurrent `up` never sees half a binary
    reason = check_binaries(bdir)
    if reason:
        raise ProvisionError(step, f"{bdir}/kube-apiserver --version", reason,
                             f"delete {bdir} and rerun `python -m localcluster provision`")
    log(f"    {', '.join(BINARIES)} -> {bdir}")


# ---- driver --------------------------------------------------------------------------------------------------


def provision(cache: Path | None = None, *, keep_build: bool = False, log: Log = print) -> Path:
    """Make sure the control-plane binaries are cached; returns their directory."""
    vdir = version_dir(cache)
    bdir = bin_dir(cache)
    if check_binaries(bdir) is None:
        log(f"[provision] cached Kubernetes {K8S_VERSION} binaries in {bdir}: nothing to do")
        return bdir
    with _locked(vdir / ".provision.lock"):
        if check_binaries(bdir) is None:  # another process built them while we waited
            log(f"[provision] cached Kubernetes {K8S_VERSION} binaries in {bdir}: nothing to do")
            return bdir
        tree = vdir / "build" / "kubernetes"
        state: dict = {}
        steps: list[tuple[str, Callable[[], object]]] = [
            ("apt packages", lambda: step_apt_packages(log)),
            ("deb-src entry", lambda: step_deb_src(log)),
            ("download source", lambda: state.update(dsc=step_download_source(vdir / "source", log))),
            ("unpack", lambda: step_unpack(state["dsc"], tree, log)),
            ("fix reflect2", lambda: step_fix_reflect2(tree, log)),
            ("build", lambda: step_build(tree, log)),
            ("install", lambda: step_install(tree, bdir, log)),
        ]
        for i, (name, fn) in enumerate(steps, 1):
            log(f"[provision] step {i}/{len(steps)}: {name}")
            t0 = time.monotonic()
            fn()
            log(f"    done in {time.monotonic() - t0:.0f} s")
        if not keep_build:
            shutil.rmtree(vdir / "build", ignore_errors=True)
    return bdir
