"""A small stand-in trainer that speaks the trainer contract, for fast operator tests.

    python tests/support/standin_trainer.py {sft,reward,ppo,dpo} --config FILE   (or $RLHF_CONFIG)

It does what the operator relies on, without torch: parses the config with the trainer's own
parser (rlhf_trainer.config), serves the contract's Prometheus metrics on $POD_IP:<metrics.port>,
"trains" for training.max_steps steps, writes checkpoints in the contract layout
(<ckpt>/checkpoints/step-XXXXXXXX/ + atomic `latest` pointer, newest keep_last kept), resumes from
the latest one, writes a checkpoint and exits 143 on SIGTERM, and exports <ckpt>/final/ with
rlhf_metadata.json. For the hand-over checks it records, per input model, the sha256 of every file
it read and whether the input was read-only. Final metrics go to the termination log as JSON.

Behaviour for tests, from the environment (the job's spec.env):
  STANDIN_STEP_SECONDS   seconds per step (default 0.05)
  STANDIN_FAIL_AT_STEP   fail when this step is reached ...
  STANDIN_FAIL_EXIT      ... with this exit code (default 1) ...
  STANDIN_FAIL_ONCE      ... only the first time (a marker file in the claim), if "1"
  STANDIN_EXIT_AT_START  exit at once with this code (e.g. 3 = data error) and a message
  STANDIN_REPORT_TOTAL_STEPS  report this (float) as total steps instead of the real number
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from rlhf_trainer import config as tc
from rlhf_trainer import contract

DEFAULT_STEPS = 10


def log(**fields) -> None:
    print(json.dumps(fields), flush=True)


def termination(message: str) -> None:
    path = os.environ.get(contract.ENV_TERMINATION_LOG, contract.DEFAULT_TERMINATION_LOG)
    try:
        with open(path, "w") as f:
            f.write(message)
    except OSError:
        pass


def fail(code: int, message: str) -> None:
    termination(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Checkpoints:
    """The contract layout: complete checkpoints only ever appear by rename; `latest` is replaced
    atomically after the directory is durable."""

    def __init__(self, root: str, keep_last: int):
        self.dir = Path(root) / tc.CHECKPOINTS_SUBDIR
        self.keep_last = keep_last

    def latest_step(self) -> int:
        """Step of the latest checkpoint, -1 when there is none."""
        try:
            name = (self.dir / tc.LATEST_POINTER).read_text().strip()
            return int(json.loads((self.dir / name / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    def save(self, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        write_file(tmp / "state.json", json.dumps({"step": step}).encode())
        fsync_dir(tmp)
        final = self.dir / name
        if final.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        else:
            os.rename(tmp, final)
        pointer = self.dir / f".{tc.LATEST_POINTER}.tmp"
        write_file(pointer, name.encode())
        os.replace(pointer, self.dir / tc.LATEST_POINTER)
        fsync_dir(self.dir)
        steps = sorted(p for p in self.dir.iterdir() if p.name.startswith("step-"))
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def model_inputs(cfg: tc.TrainerConfig) -> dict[str, str]:
    """role -> path of every model the stage loads from a path."""
    if cfg.stage == "ppo":
        roles = {"actor": cfg.ppo.actor, "reward_model": cfg.ppo.reward_model, "critic": cfg.ppo.critic,
                 "reference": cfg.ppo.reference}
    elif cfg.stage == "dpo":
        roles = {"policy": cfg.dpo.policy, "reference": cfg.dpo.reference, "reward_model": cfg.dpo.online.reward_model}
    else:
        roles = {"model": cfg.model}
    return {role: m.path for role, m in roles.items() if m.path}


def checksums(directory: str) -> dict[str, str]:
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def is_read_only(directory: str) -> bool:
    probe = Path(directory) / ".standin-write-probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=tc.STAGES)
    parser.add_argument("--config", default=os.environ.get(contract.ENV_CONFIG, ""))
    args = parser.parse_args(argv)
    try:
        cfg = tc.load_config(args.config)
    except tc.ConfigError as e:
        fail(contract.EXIT_CONFIG_ERROR, f"config error: {e}")
    if cfg.stage != args.stage:
        fail(contract.EXIT_CONFIG_ERROR, f"config error: stage is {cfg.stage!r} but the command says {args.stage!r}")
    if os.environ.get("STANDIN_EXIT_AT_START"):
        fail(int(os.environ["STANDIN_EXIT_AT_START"]), "stand-in told to fail at start (STANDIN_EXIT_AT_START)")
    if cfg.dataset.path and not os.path.exists(cfg.dataset.path):
        fail(contract.EXIT_DATA_ERROR, f"dataset.path: {cfg.dataset.path} does not exist")

    inputs = {}
    for role, path in model_inputs(cfg).items():
        if not os.path.isdir(path):
            fail(contract.EXIT_MODEL_ERROR, f"{role}: model path {path} does not exist or is not a directory")
        if path.startswith(tc.INPUTS_MOUNT + "/"):
            inputs[role] = {"path": path, "sha256": checksums(path), "read_only": is_read_only(path)}

    labels = {"namespace": cfg.job.namespace, "job": cfg.job.name, "stage": cfg.stage}
    registry = CollectorRegistry()
    names = [contract.M_STEP, contract.M_TOTAL_STEPS, contract.M_LOSS, contract.M_LAST_CHECKPOINT_STEP, contract.M_RESUMED_FROM_STEP]
    names += {"sft": [], "reward": [contract.M_RM_EVAL_ACCURACY], "ppo": [contract.M_PPO_REWARD_MEAN, contract.M_PPO_KL],
              "dpo": [contract.M_DPO_REWARD_ACCURACY, contract.M_DPO_ROUND, contract.M_DPO_ROUNDS]}[cfg.stage]
    gauges = {name: Gauge(name, name, list(labels), registry=registry).labels(**labels) for name in names}
    if cfg.metrics.port:
        host = cfg.metrics.host or os.environ.get(contract.ENV_POD_IP) or "0.0.0.0"
        start_http_server(cfg.metrics.port, addr=host, registry=registry)

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    ckpt = Checkpoints(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    total = cfg.training.max_steps or DEFAULT_STEPS
    restored = ckpt.latest_step() if cfg.checkpoint.resume else -1
    start = max(0, restored)
    history = Path(cfg.checkpoint.dir) / "standin-history.jsonl"
    with open(history, "a") as f:
        f.write(json.dumps({"pod": os.environ.get(contract.ENV_POD_NAME, ""), "start_step": start}) + "\n")
    log(event="start", stage=cfg.stage, resumed_from=start, total_steps=total)
    reported_total = float(os.environ.get("STANDIN_REPORT_TOTAL_STEPS") or total)
    gauges[contract.M_TOTAL_STEPS].set(reported_total)
    gauges[contract.M_RESUMED_FROM_STEP].set(restored)
    gauges[contract.M_LAST_CHECKPOINT_STEP].set(start)
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.05"))
    fail_at = int(os.environ.get("STANDIN_FAIL_AT_STEP", "0") or 0)
    marker = Path(cfg.checkpoint.dir) / ".standin-failed-once"
    values: dict[str, float] = {}
    for step in range(start + 1, total + 1):
        time.sleep(step_seconds)
        if stop["flag"]:
            ckpt.save(step - 1)
            log(event="sigterm", checkpoint=step - 1)
            sys.exit(contract.EXIT_PREEMPTED)
        if fail_at and step == fail_at and not (os.environ.get("STANDIN_FAIL_ONCE") == "1" and marker.exists()):
            marker.touch()
            fail(int(os.environ.get("STANDIN_FAIL_EXIT", "1")), f"stand-in told to fail at step {step}")
        values = {contract.M_STEP: step, contract.M_LOSS: 1.0 / step}
        if cfg.stage == "reward":
            values[contract.M_RM_EVAL_ACCURACY] = 0.5 + 0.4 * step / total
        if cfg.stage == "ppo":
            values[contract.M_PPO_REWARD_MEAN] = 0.1 * step
            values[contract.M_PPO_KL] = 0.01 * step
        if cfg.stage == "dpo":  # online: the rounds split the steps evenly
            rounds = cfg.dpo.online.rounds
            values[contract.M_DPO_REWARD_ACCURACY] = 0.5 + 0.4 * step / total
            values[contract.M_DPO_ROUNDS] = rounds
            values[contract.M_DPO_ROUND] = -(-step * rounds // total) if rounds else 0
        for name, value in values.items():
            gauges[name].set(value)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            ckpt.save(step)
            gauges[contract.M_LAST_CHECKPOINT_STEP].set(step)
        log(step=step, **{k: v for k, v in values.items() if k != contract.M_STEP})

    ckpt.save(total)
    final = Path(cfg.final_dir)
    final.mkdir(parents=True, exist_ok=True)
    weights = hashlib.sha256(f"{cfg.job.namespace}/{cfg.job.name}/{cfg.stage}".encode()).digest() * 64
    write_file(final / "model.safetensors", weights)
    write_file(final / "config.json", json.dumps({"model_type": "standin", "stage": cfg.stage}).encode())
    metrics = {**values, contract.M_TOTAL_STEPS: reported_total, contract.M_LAST_CHECKPOINT_STEP: total,
               contract.M_RESUMED_FROM_STEP: restored}
    meta = {"stage": cfg.stage, "job": labels, "steps": total, "final_metrics": metrics, "inputs": inputs,
            "config_inputs": cfg.inputs}
    write_file(final / tc.METADATA_FILE, json.dumps(meta, indent=1).encode())
    termination(json.dumps(metrics))
    log(event="done", steps=total)


if __name__ == "__main__":
    main()
