"""Whether the Kueue tests can run: skipped where Kueue was not built, failed where the suite requires it."""

from __future__ import annotations

import os

import pytest

from localcluster import provision


def require_kueue() -> None:
    """Skip (or, with RLHF_REQUIRE_KUEUE=1 as scripts/test.sh sets it, fail) when Kueue's binary is missing."""
    reason = provision.check_binaries(provision.bin_dir(None, provision.KUEUE), provision.KUEUE)
    if not reason:
        return
    message = f"Kueue is not provisioned ({reason}): run `python -m localcluster provision --with kueue`"
    if os.environ.get("RLHF_REQUIRE_KUEUE") == "1":
        pytest.fail(message)
    pytest.skip(message)
