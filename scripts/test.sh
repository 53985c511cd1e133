#!/usr/bin/env bash
# The whole test suite: installs what is missing, lints, then runs pytest (which brings up the embedded
# cluster itself). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Kueue too (cached after the first build): the queueing tests then run instead of skipping.
.venv/bin/python -m localcluster provision --with kueue >/tmp/rlhf-provision-kueue.log 2>&1 || {
  cat /tmp/rlhf-provision-kueue.log; echo "test.sh: building Kueue failed (log above)"; exit 1; }
export RLHF_REQUIRE_KUEUE=1
export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
