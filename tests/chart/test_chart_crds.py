"""The chart ships the CRDs of crds/ unchanged (charts/sync-crds.sh copies them)."""

from __future__ import annotations

import shutil
import subprocess

import yaml
from chart_helpers import CHART_DIR, ROOT

SYNC = ROOT / "charts" / "sync-crds.sh"
KINDS = {"SFTJob": "sftjobs", "RewardModelJob": "rewardmodeljobs", "PPOJob": "ppojobs", "DPOJob": "dpojobs"}


def test_chart_crds_equal_the_source_crds():
    source = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    shipped = {p.name: p.read_bytes() for p in sorted((CHART_DIR / "crds").glob("*.yaml"))}
    assert source, "crds/ holds no CRD"
    assert shipped == source, "charts/rlhf-operator/crds/ differs from crds/: run charts/sync-crds.sh"


def test_chart_ships_every_kind(chart):
    found = {}
    for crd in chart.crds:
        for doc in yaml.safe_load_all(crd["data"]):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                names = doc["spec"]["names"]
                found[names["kind"]] = names["plural"]
                assert doc["spec"]["group"] == "rlhf.io"
                assert "rlhf" in names.get("categories", [])
                versions = {v["name"]: v for v in doc["spec"]["versions"]}
                assert versions["v1alpha1"]["served"] and versions["v1alpha1"]["storage"]
                assert "status" in versions["v1alpha1"].get("subresources", {})
    assert found == KINDS


def _fake_repo(tmp_path, crd_names):
    (tmp_path / "charts" / "rlhf-operator" / "crds").mkdir(parents=True)
    (tmp_path / "crds").mkdir()
    shutil.copy(SYNC, tmp_path / "charts" / "sync-crds.sh")
    for name in crd_names:
        (tmp_path / "crds" / name).write_text(f"# {name}\nkind: CustomResourceDefinition\n")
    (tmp_path / "charts" / "rlhf-operator" / "crds" / "stale.yaml").write_text("old\n")
    return tmp_path


def test_sync_script_replaces_the_chart_copies(tmp_path):
    repo = _fake_repo(tmp_path, ["a.yaml", "b.yaml"])
    subprocess.run(["bash", str(repo / "charts" / "sync-crds.sh")], check=True, capture_output=True)
    copied = sorted(p.name for p in (repo / "charts" / "rlhf-operator" / "crds").iterdir())
    assert copied == ["a.yaml", "b.yaml"]  # the stale copy is gone
    assert (repo / "charts" / "rlhf-operator" / "crds" / "a.yaml").read_text() == (repo / "crds" / "a.yaml").read_text()


def test_sync_script_refuses_an_empty_source(tmp_path):
    repo = _fake_repo(tmp_path, [])
    proc = subprocess.run(["bash", str(repo / "charts" / "sync-crds.sh")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no CRD files" in proc.stderr
    assert (repo / "charts" / "rlhf-operator" / "crds" / "stale.yaml").exists()  # nothing deleted
