#!/usr/bin/env bash
# Installs everything the platform needs on a fresh Debian bookworm machine (idempotent, cached):
#   1. Debian packages (Prometheus, openssl, util-linux, g++ for DeepSpeed's JIT ops)
#   2. a Python venv at .venv with the pinned requirements and the project's three packages
#   3. kube-apiserver/controller-manager/scheduler v1.34, etcd 3.6 and CoreDNS built from pinned Go modules with
#      the Go toolchain at /usr/local/go (>= 1.24) and the machine's GOPROXY (cached by version)
# Prints one line per step; the tools' own output goes to a log that is shown only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "==> [install] $*"; }
LOG=$(mktemp "${TMPDIR:-/tmp}/rlhf-install.XXXXXX.log")
trap 'rm -f "$LOG"' EXIT
die() {
  echo "ERROR [install] step '$1' failed running: $2" >&2
  if [ -s "$LOG" ]; then echo "  its last output:" >&2; tail -n 30 "$LOG" | sed 's/^/    /' >&2; fi
  echo "  what to do: $3" >&2
  exit 1
}
quiet() { "$@" >>"$LOG" 2>&1; }  # the tool's output goes to the log, shown by die() if it fails

APT_PKGS=(prometheus openssl util-linux iproute2 g++ make)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  quiet $SUDO apt-get update -qq || die apt-update "apt-get update" "check the network access to Debian's mirrors"
  DEBIAN_FRONTEND=noninteractive quiet $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die apt-install "apt-get install ${missing[*]}" "run it by hand to see which package fails"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  quiet "$PY" -m venv .venv || die venv "$PY -m venv .venv" "install python3-venv (apt-get install python3-venv)"
fi
stamp=.venv/.rlhf-requirements.sha
want=$(cat requirements/*.txt operator/pyproject.toml trainer_image/pyproject.toml pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "pip install -r requirements/dev.txt (torch==2.13.0 CPU wheel; a few minutes the first time)"
  quiet .venv/bin/pip install -q --upgrade pip || true
  quiet .venv/bin/pip install -q -r requirements/dev.txt \
    || die pip "pip install -r requirements/dev.txt" "read the pip output above; torch must be the pinned 2.13.0"
  DS_ACCELERATOR=cpu quiet .venv/bin/python -c "import torch, transformers, deepspeed, kopf, kubernetes" \
    || die pip "python -c 'import torch, transformers, deepspeed, kopf, kubernetes'" "read the error above; torch must be the pinned 2.13.0"
  step "pip install -e trainer_image -e operator -e . (the project's packages, editable)"
  quiet .venv/bin/pip install -q --no-deps -e trainer_image -e operator -e . \
    || die pip-editable "pip install --no-deps -e trainer_image -e operator -e ." "read the pip output above"
  echo "$want" > "$stamp"
else
  step ".venv is up to date (requirements unchanged): reused"
fi

step "Kubernetes control plane, etcd and CoreDNS (Go modules; cached, the first build takes a while)"
.venv/bin/python -m localcluster provision || die provision "python -m localcluster provision" "read the step it names above"
step "done"
