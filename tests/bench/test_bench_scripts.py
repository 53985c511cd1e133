"""Smoke tests of the benchmark scripts: each runs in its --quick size and writes valid, sensible JSON.

Not timed tests: the numbers are only checked for shape and sanity (positive times, memory, accuracy
in [0, 1], ratios computed from the sides' own numbers), never against a speed target.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def run_script(script: str, out: Path, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"wrote {out}" in proc.stdout, proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["machine"]["cpus"] >= 1
    return data


def sides_of(data: dict) -> dict[str, dict]:
    """The results of a comparison benchmark by side; both sides ran."""
    sides = {r["side"]: r for r in data["results"]}
    assert set(sides) == {"ours", "trl"}
    return sides


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchlib_percentiles_and_request_classification():
    sys.path.insert(0, str(BENCH))
    try:
        import _benchlib as bl
        from _kubeproxy import classify
    finally:
        sys.path.remove(str(BENCH))
    assert bl.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bl.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert bl.summary([2.0])["p99"] == 2.0
    assert classify("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}) == ("watch", "pods")
    assert classify("GET", "/api/v1/namespaces/a/pods/p", {}) == ("get", "pods")
    assert classify("PATCH", "/apis/rlhf.io/v1alpha1/namespaces/a/sftjobs/j/status", {}) == ("patch", "sftjobs/status")
    assert classify("POST", "/api/v1/namespaces/a/events", {}) == ("create", "events")
    assert classify("GET", "/apis/rlhf.io/v1alpha1", {}) == ("discovery", "apis/rlhf.io/v1alpha1")


@pytest.mark.slow
def test_reward_throughput_quick(tmp_path):
    data = run_script("reward_throughput.py", tmp_path / "rm.json")
    sides = sides_of(data)
    for r in sides.values():
        assert positive(r["pairs_per_s"]) and positive(r["peak_rss_mib"]) and positive(r["timed_seconds"])
        assert r["pairs_per_s"] == pytest.approx(2 / r["step_s_median"])  # quick: batch size 2
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and math.isfinite(r["final_train_loss"])
    (ratio,) = data["ratios"]
    assert ratio["throughput_ratio"] == pytest.approx(sides["ours"]["pairs_per_s"] / sides["trl"]["pairs_per_s"])
    assert ratio["peak_rss_ratio"] == pytest.approx(sides["ours"]["peak_rss_mib"] / sides["trl"]["peak_rss_mib"])


@pytest.mark.slow
def test_ppo_iteration_quick(tmp_path):
    data = run_script("ppo_iteration.py", tmp_path / "ppo.json")
    sides = sides_of(data)
    for r in sides.values():
        assert positive(r["iteration_s"]) and positive(r["peak_rss_mib"])
        assert all(positive(r["phases_s"][ph]) for ph in ("generate", "score", "train"))
        # The phases are parts of an iteration (which also logs): they cannot add up to more. With the
        # quick size's two timed iterations the medians are means, so the sums compare exactly.
        assert sum(r["phases_s"].values()) <= r["iteration_s_window_mean"] * 1.05
        assert math.isfinite(r["heldout_reward"]) and math.isfinite(r["heldout_reward_gain"])
    (ratio,) = data["ratios"]
    assert ratio["speed_ratio"] == pytest.approx(sides["trl"]["iteration_s"] / sides["ours"]["iteration_s"])


def test_grpo_iteration_quick(tmp_path):
    data = run_script("grpo_iteration.py", tmp_path / "grpo.json")
    for side in ("ours", "trl", "ours_gae_with_critic"):
        r = data[side]
        assert positive(r["iteration_s"]) and positive(r["peak_rss_mib"]), side
        assert 0.0 <= r["reward_first"] <= 1.0 and 0.0 <= r["reward_last"] <= 1.0, side
    assert data["speed_ratio"] == pytest.approx(data["trl"]["iteration_s"] / data["ours"]["iteration_s"])
    assert data["memory_ratio"] == pytest.approx(data["trl"]["peak_rss_mib"] / data["ours"]["peak_rss_mib"])


@pytest.mark.slow
def test_operator_latency_quick(cluster, tmp_path):
    if cluster.state_dir is None:
        pytest.skip("RLHF_TEST_KUBECONFIG cluster: the benchmark needs a cluster state directory (its metrics token)")
    data = run_script("operator_latency.py", tmp_path / "op.json", "--cluster-dir", str(cluster.state_dir),
                      "--gpus", "0")
    r = data["results"]
    assert positive(r["floor"]["create_rtt_s"]["p50"])
    for phase in ("single", "burst"):
        lat = r[phase]
        assert 0 < lat["to_pod_created_s"]["p50"] <= lat["to_running_s"]["p50"]
        assert lat["n"] == data["sizes"]["singles" if phase == "single" else "burst"]
    assert positive(r["burst"]["operator_peak_rss_mib"])
    assert r["handoff"]["from_succeeded_status_s"]["n"] == data["sizes"]["handoffs"]
    # Every job's life needs at least its ConfigMap, claim and pod to be created by the operator.
    by_type = r["requests"]["requests_per_job_by_type"]
    assert by_type.get("create pods", 0) >= 1 and by_type.get("create configmaps", 0) >= 1
    assert r["requests"]["requests_per_job"] >= 3
    assert set(data["verdict"]) == {"single_p50_within_3x_floor", "burst_within_60s", "handoff_under_2s"}
