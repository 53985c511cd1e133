"""Fixtures of the monitoring tests (helpers in monitoring_helpers.py)."""

from __future__ import annotations

import pytest
from monitoring_helpers import Monitoring, render_monitoring


@pytest.fixture(scope="session")
def monitoring() -> Monitoring:
    return render_monitoring()
