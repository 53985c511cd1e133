"""Smoke tests of the generation benchmarks at their --quick size on the CPU: the JSON has the numbers the GPU
run reports (tokens/s per path; ZeRO-2 vs ZeRO-3 generation) and the new sampler draws the old one's tokens."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def run(script: str, out: Path, *args: str, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_generation_speed_quick_times_old_and_new_paths_with_the_same_tokens(tmp_path):
    data = run("generation_speed.py", tmp_path / "gen.json", "--compile")
    assert data["same_tokens"] is True and data["device"] == "cpu"
    paths = {r["path"]: r for r in data["results"]}
    assert set(paths) == {"old", "new", "new+compile"}  # compile forced: the eager backend on the CPU
    for r in paths.values():
        assert positive(r["tokens_per_s"]) and r["tokens"] == paths["old"]["tokens"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
    assert paths["old"]["speedup_vs_old"] == 1.0


@pytest.mark.slow
def test_gpu_rlhf_generation_only_compares_zero2_and_zero3(tmp_path):
    data = run("gpu_rlhf.py", tmp_path / "zero.json", "--generation-only", "--threads", "1")
    z = data["zero_compare"]
    for stage in ("zero2", "zero3"):
        assert positive(z[stage]["generation_tokens_per_s"]) and z[stage]["skipped_steps"] == 0
    assert z["zero2_over_zero3"] == pytest.approx(z["zero2"]["generation_tokens_per_s"]
                                                  / z["zero3"]["generation_tokens_per_s"])
    assert "ZeRO-2 / ZeRO-3 generation speed" in data["markdown"] and "reward" not in data
