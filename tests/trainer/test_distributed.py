"""Real processes: torchrun data parallelism (gloo) and SIGTERM preemption of the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

torch = pytest.importorskip("torch")

from rlhf_trainer import contract as c  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer_support import sentiment_pairs, tiny_gpt2, write_jsonl  # noqa: E402

pytestmark = pytest.mark.slow

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RLHF_STOP_AT_STEP")


def clean_env(**extra) -> dict[str, str]:
    """The test process may hold a process group of its own (in-process DeepSpeed tests): don't leak it."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def write_config(path, minilm_path, data, run_dir, **training) -> str:
    cfg = {
        "stage": "reward",
        "model": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
        "dataset": {"path": str(data), "eval_fraction": 0.2},
        "training": {"batch_size": 8, "learning_rate": 5e-4, "max_length": 32, "threads": 1, "log_every": 1,
                     "warmup_steps": 2, **training},
        "deepspeed": {"enabled": True},
        "checkpoint": {"dir": str(run_dir), "every_steps": 0},
        "metrics": {"port": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def steps_of(stdout: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["step"]: r for r in rows if c.M_LOSS in r}


def test_two_processes_train_like_one_process_on_twice_the_batch(tmp_path, minilm_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(200))
    one = write_config(tmp_path / "one.yaml", minilm_path, data, tmp_path / "one", max_steps=10, batch_size=16)
    two = write_config(tmp_path / "two.yaml", minilm_path, data, tmp_path / "two", max_steps=10, batch_size=8)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    procs = [
        subprocess.Popen([sys.executable, "-m", "rlhf_trainer", "reward", "--config", one],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()),
        subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "-m", "rlhf_trainer", "reward",
                          "--config", two], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()),
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single, double = steps_of(outs[0][0]), steps_of(outs[1][0])
    assert sorted(single) == sorted(double) == list(range(1, 11))  # one JSON line per step, from rank 0 only
    for step in single:
        assert double[step][c.M_LOSS] == pytest.approx(single[step][c.M_LOSS], rel=1e-4, abs=1e-6)
        assert double[step][c.M_RM_ACCURACY] == single[step][c.M_RM_ACCURACY]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3, msg=k)
    meta = json.loads((tmp_path / "two" / "final" / "rlhf_metadata.json").read_text())
    assert meta["steps"] == 10


def test_sigterm_checkpoints_exits_143_and_the_next_start_resumes(tmp_path, minilm_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(200))
    run_dir = tmp_path / "run"
    long_cfg = write_config(tmp_path / "c.yaml", minilm_path, data, run_dir, max_steps=100000, lr_schedule="constant")
    log = tmp_path / "termination-log"
    env = clean_env(**{c.ENV_TERMINATION_LOG: str(log)})
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_trainer", "reward", "--config", long_cfg],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("{") and json.loads(line).get("step", 0) >= 3:  # step lines, not the resume line
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == c.EXIT_PREEMPTED, err[-3000:]
    assert time.monotonic() - t0 < 30  # well inside a default 30 s grace period
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert 3 <= stopped_at < 100000
    assert log.read_text().startswith(f"preempted: stop requested (SIGTERM) at step {stopped_at}")
    assert not (run_dir / "final").exists()
    # The next start (same data plan, a reachable end) resumes from that checkpoint and finishes.
    short_cfg = write_config(tmp_path / "c2.yaml", minilm_path, data, run_dir, max_steps=stopped_at + 2,
                             lr_schedule="constant")
    done = subprocess.run([sys.executable, "-m", "rlhf_trainer", "reward", "--config", short_cfg],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / latest} (step {stopped_at})" in done.stdout
    assert sorted(steps_of(done.stdout)) == [stopped_at + 1, stopped_at + 2]
    assert json.loads((run_dir / "final" / "rlhf_metadata.json").read_text())["steps"] == stopped_at + 2
