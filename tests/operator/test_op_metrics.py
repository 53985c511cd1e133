"""The operator's metrics exist from the start, at zero, for every kind (and phase)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from op_helpers import metric_value
from rlhf_operator.crd_schema import KINDS, PHASES

# A fresh process: the default registry holds only what the operator's start-up creates.
SCRAPE_AT_START = """
from prometheus_client import generate_latest
from rlhf_operator import metrics
metrics.serve(0)
print(generate_latest().decode())
"""


@pytest.fixture(scope="module")
def at_start() -> str:
    proc = subprocess.run([sys.executable, "-c", SCRAPE_AT_START], capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_series_starts_at_zero(at_start, kind):
    for name in ("rlhf_operator_reconcile_total", "rlhf_operator_reconcile_errors_total", "rlhf_operator_pod_restarts_total",
                 "rlhf_operator_reconcile_duration_seconds_count", "rlhf_operator_stage_handoff_seconds_count"):
        assert metric_value(at_start, name, kind=kind) == 0, (name, kind)
    for phase in PHASES:
        assert metric_value(at_start, "rlhf_operator_jobs", kind=kind, phase=phase) == 0, phase
    assert metric_value(at_start, "rlhf_operator_up") == 1
