"""Runtime pieces: DeepSpeed config builder, LR schedule, data plan, checkpoints, metrics, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from rlhf_trainer import contract as c
from rlhf_trainer.config import ConfigError, from_dict
from rlhf_trainer.runtime.checkpoint import CheckpointManager
from rlhf_trainer.runtime.failure import DataError, GracefulStop, NumericError, check_finite
from support.ports import free_port

torch = pytest.importorskip("torch")

from rlhf_trainer.runtime.loop import BatchPlan  # noqa: E402
from rlhf_trainer.runtime.metrics import TrainerMetrics  # noqa: E402
from rlhf_trainer.runtime.strategy import deepspeed_config, lr_multiplier  # noqa: E402


def cfg_of(**sections):
    base = {"stage": "reward", "model": {"path": "/m"}, "dataset": {"path": "/d"}}
    return from_dict({**base, **sections})


# --- DeepSpeed config ----------------------------------------------------------------------------

def test_deepspeed_config_follows_the_trainer_config():
    cfg = cfg_of(training={"batch_size": 4, "gradient_accumulation_steps": 3, "max_grad_norm": 0.5},
                 deepspeed={"zero_stage": 2, "bf16": True})
    ds = deepspeed_config(cfg, world_size=2, lr=1e-4)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds  # torch AdamW is passed in: no JIT-built optimizer op
    off = deepspeed_config(cfg_of(deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                                              "extra": {"zero_optimization": {"stage3_max_live_parameters": 7}}}), 1, 2e-5)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["zero_optimization"]["stage3_max_live_parameters"] == 7 and off["zero_optimization"]["stage"] == 3
    assert off["optimizer"]["type"] == "AdamW" and off["optimizer"]["params"]["lr"] == 2e-5
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage 3"):
        deepspeed_config(cfg_of(deepspeed={"zero_stage": 2, "offload_params": True}), 1, 1e-5)
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        deepspeed_config(cfg_of(deepspeed={"offload_optimizer": True}), 1, 1e-5)


def test_lr_schedule_warms_up_then_decays():
    assert [lr_multiplier(s, 4, 10, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 4, 10, "linear") == 1.0 and lr_multiplier(7, 4, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(10, 4, 10, "linear") == 0.0
    assert lr_multiplier(7, 4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(9, 0, 10, "constant") == 1.0


# --- data plan -----------------------------------------------------------------------------------

def test_batch_plan_gives_processes_the_slices_one_process_would_see():
    one = BatchPlan(100, micro_batch=8, world_size=1, grad_accum=1, seed=3)
    two = BatchPlan(100, micro_batch=4, world_size=2, grad_accum=1, seed=3)
    accum = BatchPlan(100, micro_batch=2, world_size=2, grad_accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == accum.steps_per_epoch == 12
    for step in (0, 5, 11, 12, 30):
        full = one.indices(step, 0, 0)
        assert two.indices(step, 0, 0) + two.indices(step, 0, 1) == full
        assert [i for m in range(2) for r in range(2) for i in accum.indices(step, m, r)] == full
    epoch0 = [i for s in range(12) for i in one.indices(s, 0, 0)]
    assert len(set(epoch0)) == 96  # no repeats within an epoch
    assert epoch0 != [i for s in range(12, 24) for i in one.indices(s, 0, 0)]  # reshuffled per epoch
    with pytest.raises(DataError, match="fewer than one optimizer step needs"):
        BatchPlan.from_config(cfg_of(training={"batch_size": 8}), 10, world_size=2)


# --- checkpoints ---------------------------------------------------------------------------------

def write_blob(text: str):
    def fn(d: Path) -> None:
        (d / "blob.txt").write_text(text)
    return fn


def test_checkpoints_are_pointed_to_read_back_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        path = mgr.save(step, write_blob(f"s{step}"), {"stage": "reward"})
    assert path == tmp_path / "checkpoints" / "step-00000030" == mgr.latest()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    assert mgr.read_meta(path)["step"] == 30 and mgr.read_meta(path)["stage"] == "reward"
    assert [p.name for p in mgr.complete_checkpoints()] == ["step-00000020", "step-00000030"]
    assert CheckpointManager(tmp_path / "checkpoints", 2).latest() == path  # root may also be the checkpoints dir


def test_a_checkpoint_cut_off_mid_write_is_never_picked(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, write_blob("one"), {})

    def crash(d: Path) -> None:
        (d / "blob.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(2, crash, {})
    assert mgr.latest().name == "step-00000001"
    # A process killed hard while writing (no cleanup at all) leaves only a temp dir behind.
    script = textwrap.dedent(f"""
        import os
        from rlhf_trainer.runtime.checkpoint import CheckpointManager
        def die(d):
            (d / "blob.txt").write_text("partial")
            os._exit(9)
        CheckpointManager({str(tmp_path)!r}, 3).save(3, die, {{}})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert (tmp_path / "checkpoints" / ".tmp-step-00000003").is_dir()
    assert mgr.latest().name == "step-00000001"
    # A step dir without meta.json (copied by hand, truncated) and a dangling pointer are ignored too.
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    assert mgr.latest().name == "step-00000001"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert mgr.latest().name == "step-00000001"
    # The next save cleans up the leftovers.
    mgr.save(4, write_blob("four"), {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000001", "step-00000004"]
    assert (mgr.latest() / "blob.txt").read_text() == "four"


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_endpoint_serves_the_contract_names_with_labels(capsys):
    cfg = cfg_of(job={"name": "rm-1", "namespace": "team-a"}, metrics={"port": free_port(), "host": "127.0.0.1"})
    m = TrainerMetrics(cfg, is_main=True)
    port = m.start_server()
    try:
        m.set_total_steps(100)
        m.add_samples(16)
        m.add_tokens(400)
        m.observe_checkpoint(1.5, step=10)
        m.set_phase_seconds("generate", 2.5)
        record = m.log_step(10, {c.M_LOSS: 0.5, c.M_RM_EVAL_ACCURACY: 0.75, "eval_loss": float("nan")})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.stop_server()
    labels = 'job="rm-1",namespace="team-a",stage="reward"'
    assert f"{c.M_STEP}{{{labels}}} 10.0" in body
    assert f"{c.M_TOTAL_STEPS}{{{labels}}} 100.0" in body
    assert f"{c.M_LOSS}{{{labels}}} 0.5" in body
    assert f"{c.M_RM_EVAL_ACCURACY}{{{labels}}} 0.75" in body
    assert f"{c.M_SAMPLES_TOTAL}{{{labels}}} 16.0" in body and f"{c.M_TOKENS_TOTAL}{{{labels}}} 400.0" in body
    assert f"{c.M_LAST_CHECKPOINT_STEP}{{{labels}}} 10.0" in body
    assert f'{c.M_CHECKPOINT_SECONDS}_bucket{{job="rm-1",le="2.0",namespace="team-a",stage="reward"}} 1.0' in body
    assert f'{c.M_PPO_PHASE_SECONDS}{{job="rm-1",namespace="team-a",phase="generate",stage="reward"}} 2.5' in body
    assert c.M_TOKENS_PER_SECOND in record
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["step"] == 10 and line[c.M_LOSS] == 0.5 and line["eval_loss"] is None and line["stage"] == "reward"


def test_only_the_main_process_serves_and_logs(capsys):
    m = TrainerMetrics(cfg_of(metrics={"port": free_port()}), is_main=False)
    assert m.start_server() is None
    m.log_step(1, {c.M_LOSS: 1.0})
    assert capsys.readouterr().out == ""


# --- failures ------------------------------------------------------------------------------------

def test_fail_writes_the_termination_message_and_exits_with_the_code(tmp_path):
    log = tmp_path / "termination-log"
    script = "from rlhf_trainer.runtime.failure import fail; fail(3, 'data error: rows.jsonl:7: field x is missing')"
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, c.ENV_TERMINATION_LOG: str(log)},
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert log.read_text() == "data error: rows.jsonl:7: field x is missing\n[exit 3]"  # the code: runtime.failure
    assert "rows.jsonl:7" in proc.stderr


def test_nan_and_inf_losses_are_numeric_errors():
    check_finite(0.3, "loss", 1)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NumericError, match="training loss is .* at step 7"):
            check_finite(bad, "training loss", 7)


def test_sigterm_becomes_a_stop_flag():
    with GracefulStop(install=True) as stop:
        assert not stop.should_stop(5)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(5)
    assert signal.getsignal(signal.SIGTERM) is not stop._on_signal  # previous handler restored
    assert GracefulStop(stop_at_step=3, install=False).should_stop(3)
    assert not GracefulStop(stop_at_step=3, install=False).should_stop(2)
