"""The GPU benchmark's --quick size on the CPU: all three stages run through the real trainer and the
result has throughput, generation speed, memory, skipped steps (none) and the PPO trends."""

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


@pytest.mark.slow
def test_gpu_rlhf_quick_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_rlhf.py"), "--quick", "--threads", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"wrote {out}" in proc.stdout and "| PPO iteration |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["bf16"] is False and data["peak_flops"] is None  # no GPU here
    for stage in ("reward", "sft"):
        r = data[stage]
        assert positive(r["samples_per_s"]) and positive(r["tokens_per_s"]) and positive(r["peak_memory_mib"])
        assert r["skipped_steps"] == 0 and r["params"] > 0 and r["mfu"] is None
    ppo = data["ppo"]
    assert positive(ppo["generation_tokens_per_s"]) and positive(ppo["iteration_s"]) and ppo["skipped_steps"] == 0
    assert len(ppo["reward"]) == len(ppo["kl"]) == data["sizes"]["ppo"]["iterations"] + data["sizes"]["ppo"]["warmup"]
    assert set(ppo["phase_s"]) == {"generate", "score", "train"}
