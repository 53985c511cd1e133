"""Rendering charts/rlhf-operator with the real Helm engine (helm-python-sdk: Helm v4's Go code behind a
C ABI), no cluster needed. Shared by the chart tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "rlhf-operator"
RELEASE = "rlhf"
NAMESPACE = "rlhf-system"

# The value sets a user picks from: defaults, namespaced mode, prometheus-operator monitoring, images
# from a private registry, and everything optional switched off.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "podMonitor": {"enabled": True, "interval": "10s"},
        },
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafana": {"dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "RLHF"}}},
    },
    "custom-images": {
        "image": {"repository": "registry.example.com/ml/rlhf-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "trainer": {"image": {"repository": "registry.example.com/ml/rlhf-trainer", "digest": "sha256:" + "ab" * 32}},
    },
    "minimal": {"webhook": {"enabled": False}, "grafana": {"dashboard": {"enabled": False}}},
    "open-grants": {"trainer": {"allowedImages": ["registry.example.com/ml/", "ghcr.io/team/trainer:"], "allowSecretEnv": True,
                                "allowedEnv": ["TORCH_EXTENSIONS_DIR", "NCCL_*"], "allowedPriorityClasses": ["training-high"],
                                "allowedTolerationKeys": []}},
}


@dataclass
class Rendered:
    """The objects one `helm template` produced, plus NOTES.txt."""

    docs: list[dict[str, Any]]
    notes: str
    texts: dict[str, str]  # template path -> rendered text (comments included)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}


def render(chart: helm.Chart, values: dict[str, Any], namespace: str = NAMESPACE) -> Rendered:
    manifests = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(docs=docs, notes=notes, texts=manifests)
