"""Provisioning: the embedded cluster's binaries, built from pinned Go modules and cached by version.

Components (each a small build module under localcluster/gobuild/<name>/ whose go.mod pins it):
  k8s      kube-apiserver, kube-controller-manager, kube-scheduler of k8s.io/kubernetes (go.mod replaces every
           k8s.io staging module by its published v0.x twin: k8s.io/kubernetes's own replaces point into its
           tree and do not apply to a module that depends on it)
  etcd     go.etcd.io/etcd/server/v3
  coredns  CoreDNS with only the plugins the cluster DNS uses (main.go)
  kueue    sigs.k8s.io/kueue's manager, only with `provision --with kueue`

Steps per component (skipped when its cached binaries report the pinned version):
  1. go        a Go toolchain new enough for the pinned modules (/usr/local/go/bin/go, $RLHF_GO or go on PATH)
  2. download  `go mod download` in a copy of the build module (the module cache is shared with other builds)
  3. patch     k8s only: a copy of k8s.io/kubernetes (hard links into the module cache) whose Endpoints and
               EndpointSlice validation accepts loopback addresses, which every pod here has (127.x.y.z)
  4. manifests kueue only: its CRDs and webhook manifests, copied to <cache>/kueue-<version>/manifests/
  5. build     `go build -trimpath -ldflags=-s -w` with CGO_ENABLED=0
  6. install   binaries to <cache>/<name>-<version>/bin/, checked with --version (kueue: a stamp file)
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
from dataclasses import dataclass
from pathlib import Path

GOBUILD_DIR = Path(__file__).resolve().parent / "gobuild"
MIN_GO = (1, 24)


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    packages: tuple[tuple[str, str], ...]  # (binary name, Go main package)
    expect: str  # what `<binary> <version_flag>` prints ("" version_flag: a stamp file next to it says)
    version_flag: str = "--version"
    ldflags: tuple[str, ...] = ()
    min_go: tuple[int, int] = MIN_GO
    optional: bool = False  # built only when asked for (`provision --with NAME`)
    manifests: tuple[tuple[str, str], ...] = ()  # (module, directory in it) copied to <cache>/<key>/manifests/

    @property
    def binaries(self) -> tuple[str, ...]:
        return tuple(b for b, _ in self.packages)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


# v1.34.4: the newest v1.34 patch release the module proxy listed when pinned; the whole suite (kopf 1.45, the
# kubernetes client 37, the chart) runs against it.
K8S_VERSION = "v1.34.4"
_V = "k8s.io/component-base/version"
K8S = Component(
    "k8s", K8S_VERSION,
    (("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
     ("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager"),
     ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler")),
    expect=f"Kubernetes {K8S_VERSION}",
    # What `make` would stamp: without it the binaries report v0.0.0-master and clients see no version.
    ldflags=(f"-X {_V}.gitVersion={K8S_VERSION}", f"-X {_V}.gitMajor=1",
             f"-X {_V}.gitMinor={K8S_VERSION.split('.')[1]}", f"-X {_V}.gitTreeState=clean",
             f"-X {_V}.buildDate=1970-01-01T00:00:00Z"),
)
ETCD = Component("etcd", "v3.6.8", (("etcd", "go.etcd.io/etcd/server/v3"),), expect="etcd Version: 3.6.8")
COREDNS = Component("coredns", "v1.13.1", (("coredns", "."),), expect="CoreDNS-1.13.1", version_flag="-version")
# Kueue's binary has no version flag: a stamp file records what was built.
KUEUE = Component("kueue", "v0.17.0", (("kueue", "sigs.k8s.io/kueue/cmd/kueue"),), expect="kueue-v0.17.0",
                  version_flag="", ldflags=("-X sigs.k8s.io/kueue/pkg/version.GitVersion=v0.17.0",), min_go=(1, 25),
                  optional=True, manifests=(("sigs.k8s.io/kueue", "config/components/crd/bases"),
                                            ("sigs.k8s.io/kueue", "config/components/webhook")))
COMPONENTS = {c.name: c for c in (K8S, ETCD, COREDNS, KUEUE)}
DEFAULT_COMPONENTS = tuple(c.name for c in COMPONENTS.values() if not c.optional)

# The one source change: Endpoints/EndpointSlice addresses may be loopback (pods have 127.x.y.z addresses here,
# so without it no Service would get endpoints and the cluster DNS could not resolve headless names).
LOOPBACK_PATCH_FILE = "pkg/apis/core/validation/validation.go"
LOOPBACK_PATCH_OLD = (
    "\tif ip.IsLoopback() {\n"
    "\t\tallErrs = append(allErrs, field.Invalid(fldPath, ipAddress, "
    "\"may not be in the loopback range (127.0.0.0/8, ::1/128)\"))\n"
    "\t}\n"
)
LOOPBACK_PATCH_NEW = "\t// localcluster: loopback allowed, every pod of the embedded cluster has a 127.x.y.z address.\n"

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


def version_dir(cache: Path | None = None, component: Component = K8S) -> Path:
    return (cache or cache_dir()) / component.key


def bin_dir(cache: Path | None = None, component: Component = K8S) -> Path:
    return version_dir(cache, component) / "bin"


def manifest_dir(cache: Path | None = None, component: Component = K8S) -> Path:
    return version_dir(cache, component) / "manifests"


def binary_paths(cache: Path | None = None, names: Sequence[str] = DEFAULT_COMPONENTS) -> dict[str, Path]:
    """binary name -> its cached path, for the named components."""
    return {b: bin_dir(cache, COMPONENTS[n]) / b for n in names for b in COMPONENTS[n].binaries}


def check_binaries(bdir: Path, component: Component = K8S) -> str | None:
    """None when every binary of the component in bdir runs and reports its version; else why not."""
    for name in component.binaries:
        path = bdir / name
        if not os.access(path, os.X_OK):
            return f"{path} is missing or not executable"
        if not component.version_flag:
            stamp = path.with_name(f"{name}.version")
            found = stamp.read_text().strip() if stamp.exists() else "no stamp"
            if found != component.expect:
                return f"{stamp} says {found!r}, expected {component.expect!r}"
            continue
        try:
            out = subprocess.run([str(path), component.version_flag], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{path} {component.version_flag}` did not run: {exc}"
        printed = out.stdout + out.stderr
        if out.returncode != 0 or component.expect not in printed:
            return (f"`{path} {component.version_flag}` printed {printed.strip()[:200]!r} (exit {out.returncode}), "
                    f"expected {component.expect!r}")
    return None


def check_all(cache: Path | None = None, names: Sequence[str] = DEFAULT_COMPONENTS) -> str | None:
    """None when every binary `up` needs is cached; else why not."""
    for name in names:
        reason = check_binaries(bin_dir(cache, COMPONENTS[name]), COMPONENTS[name])
        if reason:
            return reason
    return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def run_step(step: str, argv: Sequence[str], hint: str, *, cwd: Path | None = None, env: dict | None = None,
             log: Log = print, log_file: Path | None = None) -> str:
    """Run one command of a step; on failure raise ProvisionError with its output's tail."""
    command = shlex.join(argv)
    log(f"    $ {command}" + (f"   (output in {log_file})" if log_file else ""))
    try:
        out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True)
    except OSError as exc:
        raise ProvisionError(step, command, f"could not start: {exc}", hint) from exc
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise ProvisionError(step, command, f"exit code {out.returncode}, output:\n{_tail(out.stdout + out.stderr)}",
                             hint)
    return out.stdout


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


def find_go() -> str | None:
    for candidate in (os.environ.get("RLHF_GO"), "/usr/local/go/bin/go", shutil.which("go")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_go_version(text: str) -> tuple[int, int] | None:
    """`go version go1.26.8 linux/amd64` -> (1, 26)."""
    m = re.search(r"\bgo(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def step_go(component: Component, log: Log) -> str:
    go = find_go()
    want = ".".join(map(str, component.min_go))
    if not go:
        raise ProvisionError("go", "go version", "no Go toolchain: not /usr/local/go/bin/go, $RLHF_GO or go on PATH",
                             f"install Go >= {want} (https://go.dev/dl) at /usr/local/go or set RLHF_GO")
    out = run_step("go", [go, "version"], f"check the Go installation at {go}", log=log)
    have = parse_go_version(out)
    if have is None or have < component.min_go:
        raise ProvisionError("go", f"{go} version", f"printed {out.strip()!r}; {component.key} needs Go >= {want}",
                             f"install Go >= {want} at /usr/local/go, set RLHF_GO to it, or export "
                             f"GOTOOLCHAIN=go{want}.0 to let the go command fetch that toolchain")
    return go


def go_env(build: Path) -> dict[str, str]:
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOWORK": "off"}
    env.setdefault("GOTOOLCHAIN", "local")
    env["GOPATH"] = os.environ.get("GOPATH") or str(Path.home() / "go")  # the shared module cache
    return env


def step_download(component: Component, go: str, build: Path, log: Log) -> None:
    step = "download"
    src = GOBUILD_DIR / component.name
    if not (src / "go.mod").exists():
        raise ProvisionError(step, f"cp -r {src} {build}", f"{src / 'go.mod'} is missing",
                             "restore localcluster/gobuild/ from the repository (git checkout localcluster/gobuild)")
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(src, build)
    hint = ("check access to the Go module proxy (`go env GOPROXY`; GOPROXY, GONOSUMDB and GOFLAGS from the "
            "environment are used) and free disk space, then rerun `python -m localcluster provision`")
    run_step(step, [go, "mod", "download"], hint, cwd=build, env=go_env(build), log=log,
             log_file=build.parent / "download.log")


def module_dir(go: str, build: Path, module: str) -> Path:
    out = run_step("patch", [go, "list", "-m", "-f", "{{.Dir}}", module],
                   f"run `go mod download {module}` in {build} by hand and read its error",
                   cwd=build, env=go_env(build), log=lambda _m: None)
    return Path(out.strip())


def patched_source(text: str) -> str:
    """validation.go with loopback endpoint addresses allowed; refuses a file the patch was not written for."""
    if text.count(LOOPBACK_PATCH_OLD) != 1:
        raise ValueError("the loopback check of ValidateEndpointIP was not found exactly once")
    return text.replace(LOOPBACK_PATCH_OLD, LOOPBACK_PATCH_NEW)


def step_patch(go: str, build: Path, log: Log) -> None:
    """A copy of k8s.io/kubernetes (hard links where possible) with the one patched file; go.mod points at it."""
    step = "patch"
    original = module_dir(go, build, "k8s.io/kubernetes")
    tree = build.parent / "kubernetes"
    shutil.rmtree(tree, ignore_errors=True)
    try:
        shutil.copytree(original, tree, copy_function=os.link)
    except OSError:  # another filesystem: a plain copy (about 110 MB)
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(original, tree)
    target = tree / LOOPBACK_PATCH_FILE
    try:
        text = patched_source(target.read_text())
    except ValueError as exc:
        raise ProvisionError(step, f"patch {target}", str(exc),
                             f"the patch fits k8s.io/kubernetes {K8S_VERSION}; keep that version in "
                             "localcluster/gobuild/k8s/go.mod or update LOOPBACK_PATCH_OLD") from exc
    target.parent.chmod(0o755)  # module cache directories are read-only
    target.unlink()
    target.write_text(text)
    run_step(step, [go, "mod", "edit", f"-replace=k8s.io/kubernetes={tree}"], f"check {build / 'go.mod'}",
             cwd=build, env=go_env(build), log=log)
    log(f"    {LOOPBACK_PATCH_FILE}: Endpoints/EndpointSlices may hold loopback addresses (pods are 127.x.y.z)")


def step_manifests(component: Component, go: str, build: Path, dest: Path, log: Log) -> None:
    """CRDs and webhook manifests from the module, so that `up` does not need the module cache."""
    shutil.rmtree(dest, ignore_errors=True)
    for module, sub in component.manifests:
        src = module_dir(go, build, module) / sub
        if not src.is_dir():
            raise ProvisionError("manifests", f"cp -r {src} {dest}", f"{module} has no {sub}",
                                 f"pin a {module} version that ships {sub} in localcluster/gobuild/{component.name}")
        shutil.copytree(src, dest / Path(sub).name, ignore=shutil.ignore_patterns("kustomiz*"))
        for path in (dest / Path(sub).name).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # module cache files are read-only
    log(f"    {', '.join(sub for _, sub in component.manifests)} -> {dest}")


def step_build(component: Component, go: str, build: Path, out: Path, log: Log) -> None:
    step = "build"
    out.mkdir(parents=True, exist_ok=True)
    ldflags = " ".join(("-s", "-w", *component.ldflags))
    hint = (f"read {build.parent / 'build.log'}; check `go version` (>= {'.'.join(map(str, component.min_go))}) and "
            "free disk space under ~/.cache/go-build, then rerun `python -m localcluster provision`")
    packages = [p for _, p in component.packages]
    if len(packages) == 1:
        target = ["-o", str(out / component.binaries[0])]
    else:  # one invocation: packages shared by the binaries compile once; -o DIR names them after the packages
        target = ["-o", str(out) + "/"]
    argv = [go, "build", "-trimpath", f"-ldflags={ldflags}", *target, *packages]
    run_step(step, argv, hint, cwd=build, env=go_env(build), log=log, log_file=build.parent / "build.log")


def step_install(component: Component, out: Path, bdir: Path, log: Log) -> None:
    step = "install"
    bdir.mkdir(parents=True, exist_ok=True)
    for name in component.binaries:
        built = out / name
        if not built.exists():
            raise ProvisionError(step, f"cp {built} {bdir}", "the build produced no such file",
                                 f"read {out.parent / 'build.log'}")
        tmp = bdir / f".{name}.tmp"
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, bdir / name)  # atomic: a concurrent `up` never sees half a binary
        if not component.version_flag:
            (bdir / f"{name}.version").write_text(component.expect + "\n")
    reason = check_binaries(bdir, component)
    if reason:
        raise ProvisionError(step, f"{bdir / component.binaries[0]} {component.version_flag}", reason,
                             f"delete {bdir} and rerun `python -m localcluster provision`")
    log(f"    {', '.join(component.binaries)} -> {bdir}")


# ---- driver --------------------------------------------------------------------------------------------------


def provision_component(component: Component, cache: Path | None = None, *, keep_build: bool = False,
                        log: Log = print) -> Path:
    vdir, bdir = version_dir(cache, component), bin_dir(cache, component)
    if check_binaries(bdir, component) is None:
        log(f"[provision] {component.key}: cached in {bdir}, nothing to do")
        return bdir
    with _locked(vdir / ".provision.lock"):
        if check_binaries(bdir, component) is None:  # another process built them while we waited
            log(f"[provision] {component.key}: cached in {bdir}, nothing to do")
            return bdir
        build = vdir / "build" / "module"
        state: dict = {}
        steps: list[tuple[str, Callable[[], object]]] = [
            ("go", lambda: state.update(go=step_go(component, log))),
            ("download", lambda: step_download(component, state["go"], build, log)),
        ]
        if component is K8S:
            steps.append(("patch", lambda: step_patch(state["go"], build, log)))
        if component.manifests:
            steps.append(("manifests", lambda: step_manifests(component, state["go"], build, vdir / "manifests",
                                                              log)))
        steps += [
            ("build", lambda: step_build(component, state["go"], build, vdir / "build" / "out", log)),
            ("install", lambda: step_install(component, vdir / "build" / "out", bdir, log)),
        ]
        t_all = time.monotonic()
        for i, (name, fn) in enumerate(steps, 1):
            log(f"[provision] {component.key} step {i}/{len(steps)}: {name}")
            t0 = time.monotonic()
            fn()
            log(f"    done in {time.monotonic() - t0:.0f} s")
        log(f"[provision] {component.key}: built in {time.monotonic() - t_all:.0f} s")
        if not keep_build:
            shutil.rmtree(vdir / "build", ignore_errors=True)
    return bdir


def provision(cache: Path | None = None, *, keep_build: bool = False, with_: Sequence[str] = (),
              log: Log = print) -> Path:
    """Make sure the cluster's binaries (plus the optional components named in with_) are cached.

    Returns the control plane's bin directory; `binary_paths` gives every binary's path.
    """
    t0 = time.monotonic()
    built = False
    for name in (*DEFAULT_COMPONENTS, *with_):
        if name not in COMPONENTS:
            raise ProvisionError("components", f"--with {name}", f"unknown component {name!r}",
                                 f"choose from {', '.join(c for c in COMPONENTS if COMPONENTS[c].optional)}")
        component = COMPONENTS[name]
        built |= check_binaries(bin_dir(cache, component), component) is not None
        provision_component(component, cache, keep_build=keep_build, log=log)
    if built:
        log(f"[provision] all built in {time.monotonic() - t0:.0f} s")
    return bin_dir(cache, K8S)
