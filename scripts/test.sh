#!/usr/bin/env bash
# The whole test suite: installs what is missing, lints, then runs pytest (which brings up the embedded
# cluster itself). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
