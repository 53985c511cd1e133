"""The alert rules and the Grafana dashboard exactly as the Helm chart renders them (real Helm engine).
Shared by the monitoring tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "rlhf-operator"
RELEASE = "rlhf"
NAMESPACE = "rlhf-system"
MONITORING_ON = {
    "prometheusRule": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
}


@dataclass
class Monitoring:
    """The monitoring objects of one chart rendering."""

    values: dict[str, Any]  # merged values
    groups: list[dict[str, Any]]  # PrometheusRule spec.groups
    dashboard: dict[str, Any]  # the Grafana dashboard JSON from the ConfigMap
    operator_service: dict[str, Any]  # the metrics Service (its name is the ServiceMonitor's job label)
    pod_monitor: dict[str, Any]

    @property
    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.groups for rule in group["rules"]]

    def rule(self, alert: str) -> dict[str, Any]:
        (found,) = [r for r in self.rules if r.get("alert") == alert]
        return found

    def write_rules(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({"groups": self.groups}, sort_keys=False))
        return path


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_monitoring(extra_values: dict[str, Any] | None = None) -> Monitoring:
    values = _merge(MONITORING_ON, extra_values or {})
    with helm.Chart.load(str(CHART_DIR)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        merged = chart.merge_values(values)
    docs = [d for path, text in manifests.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (rule,) = by_kind["PrometheusRule"]
    (cm,) = by_kind["ConfigMap"]
    (svc,) = [s for s in by_kind["Service"] if s["metadata"]["name"].endswith("-metrics")]
    (pm,) = by_kind["PodMonitor"]
    return Monitoring(values=merged, groups=rule["spec"]["groups"], dashboard=json.loads(cm["data"]["rlhf-training.json"]),
                      operator_service=svc, pod_monitor=pm)


def duration_minutes(text: str) -> int:
    """Whole minutes of a Prometheus duration such as 30m, 1h or 1h30m (what the tests use)."""
    units = {"m": 1, "h": 60, "d": 1440}
    parts = re.findall(r"(\d+)([mhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unsupported duration {text!r} in a test"
    return sum(int(n) * units[u] for n, u in parts)
