"""The trainer's exit code in its termination message: under torchrun the container ends with torchrun's own code
(1 for any failed worker), so the operator reads the trainer's code from the message. Several local ranks share
the file: the first failure recorded stays."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from rlhf_trainer import cli
from rlhf_trainer import contract as c
from rlhf_trainer.runtime.failure import parse_failure, record_failure, write_termination_message

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture()
def term_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(path))
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    return path


def test_the_first_failure_stays_and_a_success_never_hides_it(term_log, monkeypatch):
    assert write_termination_message('{"rlhf_step": 2}')  # a success's metrics: no failure, replaced below
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert record_failure(c.EXIT_DATA_ERROR, "data error: rows.jsonl:7: field x is missing")
    first = "data error: rows.jsonl:7: field x is missing\n[exit 3, rank 1]"
    assert term_log.read_text() == first
    monkeypatch.setenv("RANK", "0")  # its peers then fail too, or are stopped by torchrun: consequences
    assert not record_failure(1, "unexpected error: RuntimeError: Connection closed by peer")
    assert not record_failure(c.EXIT_PREEMPTED, "preempted: stop requested (SIGTERM) at step 3")
    assert not write_termination_message('{"rlhf_step": 4}')
    assert term_log.read_text() == first
    assert parse_failure(first) == (3, 1, "data error: rows.jsonl:7: field x is missing")
    assert parse_failure('{"rlhf_step": 4}') == (None, None, '{"rlhf_step": 4}')
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process (DeepSpeed sets RANK=0 for it): no rank in the record
    term_log.write_text("")
    assert record_failure(c.EXIT_DATA_ERROR, "data error: x") and term_log.read_text() == "data error: x\n[exit 3]"
    assert parse_failure("Traceback (most recent call last):\n  ...\nValueError: x") == \
        (None, None, "Traceback (most recent call last):\n  ...\nValueError: x")


def test_a_long_reason_is_cut_but_its_code_kept(term_log):
    assert record_failure(c.EXIT_MODEL_ERROR, "model error: " + "é" * 5000)
    data = term_log.read_bytes()
    assert len(data) <= 4000  # Kubernetes keeps at most 4096 bytes
    code, rank, reason = parse_failure(data.decode("utf-8"))  # not cut inside a character either
    assert code == c.EXIT_MODEL_ERROR and rank is None and reason.startswith("model error: éé")


def test_an_unexpected_error_is_recorded_as_exit_1(term_log, monkeypatch):
    monkeypatch.setattr(cli, "load_config", lambda path, stage: object())

    def boom(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run_stage", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["sft", "--config", "unused.yaml"])
    assert term_log.read_text() == "unexpected error: RuntimeError: boom\n[exit 1]"


WRITER = """
import os, sys, time
from rlhf_trainer.runtime.failure import fail
start = float(sys.argv[1])
while time.time() < start:
    pass
fail(int(sys.argv[2]), f"rank {os.environ['RANK']} failed: " + "x" * 3000)
"""


def test_ranks_failing_at_once_record_exactly_one_whole_message(term_log):
    start = time.time() + 2.0  # all processes are up by then and write together
    codes = [3, 4, 7, 9, 10, 2]
    env = {**os.environ, c.ENV_TERMINATION_LOG: str(term_log)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(start), str(code)], env={**env, "RANK": str(rank), "WORLD_SIZE": "6"})
             for rank, code in enumerate(codes)]
    assert [p.wait(timeout=60) for p in procs] == codes
    code, rank, reason = parse_failure(term_log.read_text())
    assert codes[rank] == code and reason == f"rank {rank} failed: " + "x" * 3000


@pytest.mark.slow
def test_torchrun_exits_1_but_the_message_keeps_the_data_error(tmp_path, term_log, minilm_path):
    pytest.importorskip("torch")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": {"path": str(tmp_path / "no-model"), "tokenizer_path": minilm_path},
        "dataset": {"path": str(tmp_path / "missing.jsonl")}, "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path / "run")}, "metrics": {"port": 0}, "training": {"threads": 1}}))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "rlhf_trainer", "sft", "--config",
                           str(config)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code: which error, it does not say
    code, rank, reason = parse_failure(term_log.read_text())
    assert code == c.EXIT_DATA_ERROR and rank in (0, 1), term_log.read_text()
    assert reason.startswith(f"data error: dataset.path {tmp_path / 'missing.jsonl'} does not exist"), reason
