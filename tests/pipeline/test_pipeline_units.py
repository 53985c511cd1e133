"""Pure parts of the main job's driver: data chunking, the live table, log parsing, overrides."""

import json

import pytest

from rlhf_pipeline import report, seed
from rlhf_pipeline.cli import apply_overrides


def test_chunk_lines_respects_limit_and_keeps_every_line():
    lines = [json.dumps({"i": i, "pad": "x" * (i % 50)}) for i in range(300)]
    chunks = seed.chunk_lines(lines, limit=2000)
    assert len(chunks) > 1
    assert all(len(c.encode()) <= 2000 for c in chunks)
    assert [ln for c in chunks for ln in c.splitlines()] == lines


def test_chunk_lines_rejects_a_line_over_the_limit():
    with pytest.raises(ValueError, match="over the 10-byte chunk limit"):
        seed.chunk_lines(["x" * 20], limit=10)


def test_seed_objects_mount_every_part_read_only(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"chosen": "a" * 1000, "rejected": "b"}) for _ in range(1500)))
    cms = seed.data_configmaps("demo", "ns", data)
    assert len(cms) >= 2 and all(len(cm["data"]["part.jsonl"]) < 1_000_000 for cm in cms)
    pod = seed.seed_pod("demo", "ns", "img:1", len(cms), "claim")
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert sum(1 for m in mounts if m.get("readOnly")) == len(cms)
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def _job(kind, name, phase=None, progress=None, conditions=()):
    return {"kind": kind, "metadata": {"name": name},
            "status": {"phase": phase, "progress": progress or {}, "conditions": list(conditions)}}


def test_table_shows_step_key_metric_and_why_waiting():
    jobs = [
        _job("RewardModelJob", "rm", "Running", {"step": 10, "totalSteps": 50, "accuracy": 0.625}),
        _job("PPOJob", "ppo", "Waiting", conditions=[
            {"type": "WaitingForDependencies", "status": "True", "message": "waiting for RewardModelJob rm"}]),
    ]
    text = report.table(jobs)
    rm_line = next(line for line in text.splitlines() if "RewardModelJob/rm" in line)
    assert "10/50" in rm_line and "acc=0.625" in rm_line
    assert "waiting for RewardModelJob rm" in text


def test_parse_log_metrics_keeps_only_step_records():
    text = "starting\n" + json.dumps({"step": 1, "rlhf_ppo_reward_mean": 0.1}) + "\n{not json}\n" + \
        json.dumps({"step": 2, "rlhf_ppo_reward_mean": 0.5}) + "\n" + json.dumps({"event": "x"})
    series = report.parse_log_metrics(text)
    assert [r["step"] for r in series] == [1, 2]
    assert report.first_last(series, "rlhf_ppo_reward_mean") == (0.1, 0.5)
    assert report.first_last(series, "missing") == (None, None)


def test_overrides_set_nested_fields_and_reject_unknown_jobs():
    docs = [{"kind": "PPOJob", "metadata": {"name": "p"}, "spec": {"training": {"maxSteps": 24}}}]
    apply_overrides(docs, ["PPOJob/p:spec.training.maxSteps=3", "PPOJob/p:spec.ppo.klEstimator=k3"])
    assert docs[0]["spec"]["training"]["maxSteps"] == 3
    assert docs[0]["spec"]["ppo"]["klEstimator"] == "k3"
    with pytest.raises(SystemExit, match="no SFTJob named x"):
        apply_overrides(docs, ["SFTJob/x:spec.a=1"])


def test_plot_curves_writes_png(tmp_path):
    series = {"ppo": [{"step": i, "rlhf_ppo_reward_mean": i * 0.1, "rlhf_ppo_kl": 0.01 * i} for i in range(5)]}
    out = tmp_path / "c.png"
    report.plot_curves(series, {"ppo": "PPOJob"}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_extension_cache_is_shared_but_never_overrides_the_job():
    from rlhf_pipeline.cli import share_extension_cache

    docs = [{"kind": "SFTJob", "spec": {}},
            {"kind": "PPOJob", "spec": {"env": [{"name": "TORCH_EXTENSIONS_DIR", "value": "/mine"}]}}]
    share_extension_cache(docs, "/host/cache")
    assert docs[0]["spec"]["env"] == [{"name": "TORCH_EXTENSIONS_DIR", "value": "/host/cache"}]
    assert docs[1]["spec"]["env"] == [{"name": "TORCH_EXTENSIONS_DIR", "value": "/mine"}]
