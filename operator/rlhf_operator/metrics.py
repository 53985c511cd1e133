"""The operator's own Prometheus metrics (names are part of the contract with the dashboards)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rlhf_operator.crd_schema import KINDS, PHASES

JOBS = Gauge("rlhf_operator_jobs", "Jobs known to the operator by kind and phase.", ["kind", "phase"])
RECONCILES = Counter("rlhf_operator_reconcile", "Reconciliations run.", ["kind"])  # exported as *_total
RECONCILE_ERRORS = Counter("rlhf_operator_reconcile_errors", "Reconciliations that raised (retried).", ["kind"])
RECONCILE_SECONDS = Histogram(
    "rlhf_operator_reconcile_duration_seconds", "Time of one reconciliation.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
POD_RESTARTS = Counter("rlhf_operator_pod_restarts", "Failed trainer pods replaced.", ["kind"])
HANDOFF_SECONDS = Histogram(
    "rlhf_operator_stage_handoff_seconds",
    "From the last upstream job's success to the creation of the dependent job's first trainer pod.",
    ["kind"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
UP = Gauge("rlhf_operator_up", "1 while the operator runs.")


def initialise() -> None:
    """Export every labelled series at zero from the start: a series born at its first event has no
    earlier sample, so rate()/increase() over that event would miss it."""
    for kind in KINDS:
        for counter in (RECONCILES, RECONCILE_ERRORS, POD_RESTARTS):
            counter.labels(kind)
        for histogram in (RECONCILE_SECONDS, HANDOFF_SECONDS):
            histogram.labels(kind)
        for phase in PHASES:
            JOBS.labels(kind, phase).set(0)


class PhaseTracker:
    """Keeps rlhf_operator_jobs in line with the phase of every job the operator has seen."""

    def __init__(self) -> None:
        self._phases: dict[str, tuple[str, str]] = {}  # uid -> (kind, phase)

    def _refresh(self) -> None:
        counts = {(k, p): 0 for k in KINDS for p in PHASES}
        for key in self._phases.values():
            counts[key] = counts.get(key, 0) + 1
        for (kind, phase), n in counts.items():
            JOBS.labels(kind, phase).set(n)

    def update(self, uid: str, kind: str, phase: str) -> None:
        phase = phase or "Pending"
        if self._phases.get(uid) != (kind, phase):
            self._phases[uid] = (kind, phase)
            self._refresh()

    def remove(self, uid: str) -> None:
        if self._phases.pop(uid, None) is not None:
            self._refresh()


def serve(port: int) -> None:
    initialise()
    if port:
        start_http_server(port)
    UP.set(1)
