#!/usr/bin/env bash
# Installs everything the platform needs on a fresh Debian bookworm machine (idempotent, cached):
#   1. Debian packages (etcd, Go and the build tools for Kubernetes, Prometheus, g++ for DeepSpeed's JIT ops)
#   2. a Python venv at .venv with the pinned requirements and the project's three packages
#   3. kube-apiserver/controller-manager/scheduler v1.20.2 built from Debian's source (cached by version)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "==> [install] $*"; }
die() { echo "ERROR [install] step '$1' failed running: $2" >&2; echo "  what to do: $3" >&2; exit 1; }

APT_PKGS=(etcd-server golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev prometheus openssl util-linux iproute2 g++ make)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || die apt-update "apt-get update" "check the network access to Debian's mirrors"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die apt-install "apt-get install ${missing[*]}" "run it by hand to see which package fails"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv || die venv "$PY -m venv .venv" "install python3-venv (apt-get install python3-venv)"
fi
stamp=.venv/.rlhf-requirements.sha
want=$(cat requirements/*.txt operator/pyproject.toml trainer_image/pyproject.toml pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "pip install -r requirements/dev.txt (torch==2.13.0 CPU wheel)"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -r requirements/dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, deepspeed, kopf, kubernetes" \
    || die pip "pip install -r requirements/dev.txt" "read the pip output above; torch must be the pinned 2.13.0"
  .venv/bin/pip install -q --no-deps -e trainer_image -e operator -e . 2>&1 | grep -v "^WARNING: Location" || true
  echo "$want" > "$stamp"
fi

step "Kubernetes control-plane binaries"
.venv/bin/python -m localcluster provision || die provision "python -m localcluster provision" "read the step it names above"
step "done"
