"""Fixtures of the end-to-end tests: the operator tests' fixtures (`crds`, `operator_factory`,
`operator`, `jobs`, loaded by path from tests/operator/conftest.py) plus an operator running the real
trainer."""

from __future__ import annotations

import pytest
from e2e_helpers import REAL_TRAINER, op

crds = op.crds
operator_factory = op.operator_factory
operator = op.operator
jobs = op.jobs
pytest_runtest_makereport = op.pytest_runtest_makereport  # lets operator_factory print the log of a failed test


@pytest.fixture
def real_operator(operator_factory):
    """An operator whose trainer pods run the real `python -m rlhf_trainer`."""
    return operator_factory(**REAL_TRAINER)
