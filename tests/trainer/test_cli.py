"""The command line: exit codes and termination messages for bad config, data, model and NaN losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rlhf_trainer import cli
from rlhf_trainer import contract as c
from trainer_support import sentiment_pairs, tiny_gpt2, write_jsonl


@pytest.fixture()
def term_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(path))
    return path


@pytest.fixture()
def base(tmp_path, minilm_path) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(40))
    return {
        "model": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2()},
        "dataset": {"path": str(data)},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 32, "threads": 1},
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path / "run")},
        "metrics": {"port": 0},
    }


def fresh_termination_log() -> None:
    """Each run starts as a new container does, with an empty termination log (a recorded failure stays)."""
    if c.ENV_TERMINATION_LOG in os.environ:
        Path(os.environ[c.ENV_TERMINATION_LOG]).unlink(missing_ok=True)


def run_cli(tmp_path, stage: str, config: dict) -> int:
    fresh_termination_log()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--config", str(path)])
    return e.value.code


def test_bad_config_exits_2_naming_the_field(tmp_path, base, term_log, capsys):
    assert run_cli(tmp_path, "reward", {**base, "training": {"batch_size": 0}}) == c.EXIT_CONFIG_ERROR
    assert "training.batch_size: must be >= 1, got 0" in term_log.read_text()
    assert "training.batch_size" in capsys.readouterr().err
    assert run_cli(tmp_path, "reward", {**base, "stage": "sft"}) == c.EXIT_CONFIG_ERROR
    assert "stage is 'sft' but the command runs the 'reward' stage" in term_log.read_text()
    fresh_termination_log()
    with pytest.raises(SystemExit) as e:
        cli.main(["reward", "--config", str(tmp_path / "missing.yaml")])
    assert e.value.code == c.EXIT_CONFIG_ERROR and "cannot read config file" in term_log.read_text()


def test_bad_data_exits_3_before_any_model_is_loaded(tmp_path, base, term_log):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    cfg = {**base, "dataset": {"path": str(bad)}, "model": {"path": str(tmp_path / "no-such-model")}}
    assert run_cli(tmp_path, "reward", cfg) == c.EXIT_DATA_ERROR
    assert term_log.read_text() == f"data error: {bad}:2: field 'rejected' is missing; " \
                                   "format prompt_chosen_rejected needs prompt, chosen, rejected (strings)\n[exit 3]"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(tmp_path, "sft", {**cfg, "dataset": {"path": str(empty)}}) == c.EXIT_DATA_ERROR
    assert "has no rows" in term_log.read_text()


def test_data_that_is_not_utf8_exits_3_naming_file_and_offset(tmp_path, base, term_log):
    utf16 = tmp_path / "pairs-utf16.jsonl"
    utf16.write_text(open(base["dataset"]["path"]).read(), encoding="utf-16")
    assert run_cli(tmp_path, "reward", {**base, "dataset": {"path": str(utf16)}}) == c.EXIT_DATA_ERROR
    assert term_log.read_text().startswith(f"data error: {utf16}:1: byte offset 0: a UTF-16 byte-order mark")
    latin1 = tmp_path / "pairs-latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n')
    assert run_cli(tmp_path, "reward", {**base, "dataset": {"path": str(latin1)}}) == c.EXIT_DATA_ERROR
    assert term_log.read_text() == (f"data error: {latin1}:1: byte offset 15: byte 0xe9 is not UTF-8 (invalid "
                                    "continuation byte); expected UTF-8 JSON lines\n[exit 3]")


def test_unreadable_model_path_exits_4(tmp_path, base, term_log):
    missing = tmp_path / "no-such-model"
    assert run_cli(tmp_path, "reward", {**base, "model": {"path": str(missing)}}) == c.EXIT_MODEL_ERROR
    assert f"model.path {missing} does not exist" in term_log.read_text()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    assert run_cli(tmp_path, "sft", {**base, "model": {"path": str(tmp_path / "junk")}}) == c.EXIT_MODEL_ERROR
    assert "cannot load a tokenizer from" in term_log.read_text()


def test_nan_loss_exits_5(tmp_path, base, term_log):
    exploding = {**base, "model": {**base["model"], "init_from_config": tiny_gpt2(initializer_range=1e30)}}
    assert run_cli(tmp_path, "reward", exploding) == c.EXIT_NUMERIC_ERROR
    assert term_log.read_text().startswith("numeric error: training loss is nan at step 1")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing poisoned was checkpointed


def test_module_entry_point_reads_rlhf_config_and_sets_the_exit_code(tmp_path):
    log = tmp_path / "termination-log"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: reward\nmodel: {path: /m}\ndataset: {path: /d}\nbogus: 1\n")
    env = {**os.environ, c.ENV_CONFIG: str(cfg), c.ENV_TERMINATION_LOG: str(log)}
    proc = subprocess.run([sys.executable, "-m", "rlhf_trainer", "reward"], env=env, capture_output=True, text=True)
    assert proc.returncode == c.EXIT_CONFIG_ERROR
    assert "unknown field(s) bogus" in log.read_text() and "unknown field(s) bogus" in proc.stderr
    help_out = subprocess.run([sys.executable, "-m", "rlhf_trainer", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "{sft,reward,ppo,dpo}" in help_out.stdout
