"""Pure parts of the main job's driver: data chunking, the live table, log parsing, overrides, the summary,
the chart, the demo's CPU sizing and `scripts/main.sh --help`."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline import plots, report, seed, stats, summary
from rlhf_pipeline.cli import apply_overrides, fit_cpu_requests, held_out_pairs, parse_args

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pipeline"
DEMO_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"


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
    assert summary.values(series, "rlhf_ppo_reward_mean") == [0.1, 0.5]
    assert summary.values(series, "missing") == []


def test_overrides_set_nested_fields_and_reject_unknown_jobs():
    docs = [{"kind": "PPOJob", "metadata": {"name": "p"}, "spec": {"training": {"maxSteps": 24}}}]
    apply_overrides(docs, ["PPOJob/p:spec.training.maxSteps=3", "PPOJob/p:spec.ppo.klEstimator=k3"])
    assert docs[0]["spec"]["training"]["maxSteps"] == 3
    assert docs[0]["spec"]["ppo"]["klEstimator"] == "k3"
    with pytest.raises(SystemExit, match="no SFTJob named x"):
        apply_overrides(docs, ["SFTJob/x:spec.a=1"])


def test_extension_cache_is_shared_but_never_overrides_the_job():
    from rlhf_pipeline.cli import share_extension_cache

    docs = [{"kind": "SFTJob", "spec": {}},
            {"kind": "PPOJob", "spec": {"env": [{"name": "TORCH_EXTENSIONS_DIR", "value": "/mine"}]}}]
    share_extension_cache(docs, "/host/cache")
    assert docs[0]["spec"]["env"] == [{"name": "TORCH_EXTENSIONS_DIR", "value": "/host/cache"}]
    assert docs[1]["spec"]["env"] == [{"name": "TORCH_EXTENSIONS_DIR", "value": "/mine"}]


def test_table_fits_100_columns_and_wraps_the_note_between_words():
    why = ("waiting for SFTJob policy-sft (Running, step 12/100) and RewardModelJob harmless-rm (Running, "
           "step 40/193) to succeed before the actor and reward model can be mounted")
    jobs = [
        _job("RewardModelJob", "harmless-rm", "Running", {"step": 40, "totalSteps": 193, "accuracy": 0.6125}),
        _job("PPOJob", "harmless-ppo", "Waiting", conditions=[
            {"type": "WaitingForDependencies", "status": "True", "message": why}]),
    ]
    lines = report.table(jobs, width=100).splitlines()
    assert all(len(line) <= 100 for line in lines), lines
    note_col = lines[0].index("NOTE")
    start = next(i for i, line in enumerate(lines) if "PPOJob/harmless-ppo" in line)
    note = " ".join(line[note_col:].strip() for line in lines[start:])
    assert note == why  # every word whole, none dropped
    assert len(lines) > 3  # it wrapped


def test_quarters_measure_the_rise_against_the_spread():
    flat = [0.5 + (0.2 if i % 2 else -0.2) for i in range(40)]
    q = stats.quarters(flat)
    assert q["first"]["n"] == q["last"]["n"] == 10 and q["points"] == 40
    assert abs(q["rise"]) < 1e-9 and q["first"]["sd"] == pytest.approx(0.2108, abs=1e-3)
    rising = [0.1 * i + (0.2 if i % 2 else -0.2) for i in range(40)]
    q = stats.quarters(rising)
    assert q["rise"] == pytest.approx(3.0) and q["rise_in_se"] > 10
    assert q["rise_se"] == pytest.approx(math.sqrt(2 * q["first"]["sd"] ** 2 / 10))
    assert stats.quarters([1.0, 2.0, 3.0]) is None
    assert stats.binomial_se(0.7, 100) == pytest.approx(math.sqrt(0.21 / 100))
    assert stats.smooth([0, 0, 3, 0, 0], window=3) == [0, 1, 1, 1, 0]


def _finished(kind, name, progress):
    return _job(kind, name, "Succeeded", progress)


def _demo_series(n=40):
    rm = [{"step": s, "rlhf_trainer_loss": 0.7 - s / 1000, "rlhf_reward_accuracy": 0.5 + s / 1000} for s in range(10, 200, 10)]
    rm += [{"step": 96, "rlhf_reward_eval_accuracy": 0.6}, {"step": 193, "rlhf_reward_eval_accuracy": 0.66}]
    ppo = [{"step": i + 1, "rlhf_ppo_reward_mean": 0.02 * i + (0.1 if i % 3 else -0.1), "rlhf_ppo_kl": 0.01 * i}
           for i in range(n)]
    sft = [{"step": s, "rlhf_trainer_loss": 9 - s / 30} for s in range(10, 110, 10)] + [{"step": 100, "eval_loss": 6.1}]
    return {"policy-sft": sft, "harmless-rm": rm, "harmless-ppo": ppo}


def test_summary_gives_accuracy_with_standard_error_and_reward_quarters_with_spread():
    jobs = [_finished("SFTJob", "policy-sft", {"step": 100}), _finished("RewardModelJob", "harmless-rm", {"step": 193}),
            _finished("PPOJob", "harmless-ppo", {"step": 40})]
    timing = {"pipeline_s": 420.0, "total_s": 480.0, "cluster_s": 20.0, "cpus": 2, "load_start": 0.1,
              "stages": {"policy-sft": {"start_s": 5, "end_s": 200}, "harmless-ppo": {"start_s": 260, "end_s": 410}}}
    s = summary.build(jobs, _demo_series(), timing, eval_pairs=171)
    assert s["ok"] and s["reward_model_eval_accuracy"] == 0.66
    assert s["reward_model_eval_accuracy_se"] == pytest.approx(math.sqrt(0.66 * 0.34 / 171))
    q = s["ppo_reward_quarters"]
    assert q["first"]["n"] == 10 and q["rise"] == pytest.approx(0.6, abs=0.05)
    text = "\n".join(summary.lines(s))
    assert "held-out accuracy: 0.660 +- 0.036 (standard error; 171 unseen pairs" in text
    assert f"first quarter {q['first']['mean']:.3f} +- {q['first']['sd']:.3f} -> last quarter" in text
    assert "standard errors" in text and "pipeline (jobs applied -> all finished): 420 s" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "policy-sft 5-200, harmless-ppo 260-410" in text
    json.dumps(s)  # summary.json is plain JSON


def test_plot_draws_every_stage(tmp_path):
    out = tmp_path / "c.png"
    kinds = {"policy-sft": "SFTJob", "harmless-rm": "RewardModelJob", "harmless-ppo": "PPOJob"}
    plots.plot_curves(_demo_series(), kinds, out, eval_se=0.036)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _examples():
    return {d["kind"]: d for p in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d}


def test_demo_stages_fit_two_cores_and_take_their_threads_from_the_cpu_request():
    docs = _examples()
    cpu = {k: float(d["spec"]["resources"]["cpu"]) for k, d in docs.items()}
    assert cpu["SFTJob"] + cpu["RewardModelJob"] <= 2  # they overlap without oversubscribing 2 cores
    assert cpu["PPOJob"] <= 2
    for d in docs.values():
        assert not d["spec"]["training"].get("threads"), "threads follow spec.resources.cpu"


def test_pod_tells_the_trainer_its_cpu_request():
    from rlhf_operator import builders
    from rlhf_operator.settings import from_env
    from rlhf_trainer.runtime import threads

    from localcluster.nodeagent.env import resource_value

    job = dict(_examples()["SFTJob"], metadata={"name": "policy-sft", "namespace": "rlhf-demo", "uid": "u1"})
    pod = builders.build_pod(job, from_env({}), 0, 0, "digest", [])
    container = pod["spec"]["containers"][0]
    ref = next(e for e in container["env"] if e["name"] == "RLHF_CPU_REQUEST")["valueFrom"]["resourceFieldRef"]
    value = resource_value(ref, container)  # what the kubelet (here the node agent) puts in the env
    assert value == "1"
    assert threads.choose_threads(0, {"RLHF_CPU_REQUEST": value}, cgroup=0, available=2)[0] == 1
    no_cpu = dict(job, spec={k: v for k, v in job["spec"].items() if k != "resources"})
    env = builders.build_pod(no_cpu, from_env({}), 0, 0, "digest", [])["spec"]["containers"][0]["env"]
    assert not any(e["name"] == "RLHF_CPU_REQUEST" for e in env)


def test_cpu_requests_over_the_node_are_lowered():
    docs = [{"kind": "PPOJob", "metadata": {"name": "p"}, "spec": {"resources": {"cpu": "2"}}},
            {"kind": "SFTJob", "metadata": {"name": "s"}, "spec": {"resources": {"cpu": "500m"}}}]
    assert fit_cpu_requests(docs, 1) == ["PPOJob/p: spec.resources.cpu 2 -> 1"]
    assert docs[0]["spec"]["resources"]["cpu"] == "1" and docs[1]["spec"]["resources"]["cpu"] == "500m"


@pytest.mark.skipif(not DEMO_DATA.is_file(), reason="demo data not present")
def test_held_out_pairs_follow_the_reward_models_split():
    docs = list(_examples().values())
    rows = sum(1 for line in DEMO_DATA.read_text().splitlines() if line.strip())
    n = held_out_pairs(docs, DEMO_DATA)
    assert n is not None and abs(n - rows * 0.1) <= 1


def test_main_sh_help_lists_every_option_and_installs_nothing(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "main.sh"), "--help"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "[install]" not in proc.stdout + proc.stderr
    for needle in ("How long:", "What it needs:", "minutes", "CPU cores"):
        assert needle in proc.stdout
    run = parse_args(["run"])
    parser_options = [a for a in vars(run) if a != "cmd"]
    for name in parser_options:
        assert "--" + name.replace("_", "-") in proc.stdout, name


def test_a_dead_operator_is_reported_with_its_last_error(tmp_path):
    import sys

    from rlhf_pipeline.cli import operator_failure

    log = tmp_path / "operator.log"
    log.write_text("INFO started\nERROR kopf: [Errno 98] address already in use\nTraceback ...\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    why = operator_failure(proc, log)
    assert "exited with code 3" in why and "address already in use" in why and str(log) in why
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert operator_failure(running, log) is None
    finally:
        running.kill()
        running.wait()
