"""Fixtures of the Helm chart tests (helpers in chart_helpers.py)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from chart_helpers import CHART_DIR, VALUE_SETS, Rendered, render


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(str(CHART_DIR)) as loaded:
        yield loaded


@pytest.fixture(scope="session", params=sorted(VALUE_SETS))
def value_set(request) -> tuple[str, dict[str, Any]]:
    return request.param, VALUE_SETS[request.param]


@pytest.fixture(scope="session")
def rendered(chart, value_set) -> Rendered:
    return render(chart, value_set[1])
