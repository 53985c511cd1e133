"""Faults with the real trainer (tiny models, CPU only): a SIGKILLed trainer resumes from its latest
checkpoint, a checkpoint cut off mid-write is never picked, a deleted upstream job fails the job
waiting for it, suspend/resume keeps progress, and a killed operator neither duplicates pods nor
loses the PPO run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from e2e_helpers import (
    MINILM,
    REAL_TRAINER,
    TINY_GPT2,
    assert_operator_healthy,
    conditions,
    configmap_dataset,
    create_configmap,
    jsonl,
    latest_checkpoint_step,
    logged_steps,
    pair_rows,
    pod_log,
    prompt_rows,
    real_ppo_spec,
    real_spec,
    resumed_step,
    sft_rows,
    trainer_pid,
    wait_for,
    wait_phase,
    wait_status,
)
from rlhf_operator.names import pod_name, pvc_name
from rlhf_trainer import config as tc
from rlhf_trainer.runtime.checkpoint import META_FILE, CheckpointManager


def claim_dir(jobs, claim: str) -> Path | None:
    """Host directory of a bound claim, None until it is bound."""
    try:
        return jobs.claim_dir(claim)
    except Exception:  # not bound yet: no volume name
        return None


def seed_data(jobs) -> dict[str, dict]:
    create_configmap(jobs, "data", {"sft.jsonl": jsonl(sft_rows()), "pairs.jsonl": jsonl(pair_rows()),
                                    "prompts.jsonl": jsonl(prompt_rows())})
    return {key: configmap_dataset("data", f"{key}.jsonl") for key in ("sft", "pairs", "prompts")}


@pytest.mark.slow
def test_sigkilled_trainer_resumes_from_latest_checkpoint(real_operator, jobs, cluster):
    data = seed_data(jobs)
    steps, every = 200, 10
    jobs.create("SFTJob", "crash", real_spec(data["sft"], steps=steps, every=every))
    out = wait_for("the checkpoint claim", lambda: claim_dir(jobs, pvc_name("SFTJob", "crash")), 60)
    wait_status(jobs, "SFTJob", "crash", "a checkpoint at step >= 20", lambda _: latest_checkpoint_step(out) >= 20, 180, 0.1)
    os.kill(wait_for("the trainer process", lambda: trainer_pid(jobs.ns, pod_name("SFTJob", "crash", 0)), 10), signal.SIGKILL)
    at_kill = latest_checkpoint_step(out)  # the dead process can write no more; the new pod has not started

    st = wait_phase(jobs, "SFTJob", "crash", "Succeeded", 240)
    assert st["restartCount"] == 1 and st["trainerPod"] == pod_name("SFTJob", "crash", 1), st
    killed = [e.message for e in jobs.events("crash") if e.reason == "PodFailed"]
    assert len(killed) == 1 and f"{pod_name('SFTJob', 'crash', 0)} failed with exit code 137" in killed[0], killed
    first, second = (pod_log(cluster, jobs.ns, pod_name("SFTJob", "crash", i)) for i in (0, 1))
    before, after = logged_steps(first), logged_steps(second)
    assert before[0] == 1 and at_kill <= max(before) < steps, (at_kill, before[-3:])  # killed mid-run
    assert resumed_step(second) == at_kill, second[:3000]
    assert st["progress"]["resumedFromStep"] == at_kill, st["progress"]  # as the trainer reported it
    resumed = [e.message for e in jobs.events("crash") if e.reason == "ResumedFromCheckpoint"]
    assert resumed == [f"trainer pod {st['trainerPod']} resumed from step {at_kill} (checkpoint restored)"], resumed
    assert after[0] == at_kill + 1 and after[-1] == steps, (at_kill, after[:3])  # not from step 0
    meta = json.loads((out / "final" / tc.METADATA_FILE).read_text())
    assert meta["steps"] == steps and meta["job"]["name"] == "crash"
    assert_operator_healthy(real_operator)


@pytest.mark.slow
def test_deleted_trainer_pod_is_a_disruption_and_resumes_from_its_sigterm_checkpoint(real_operator, jobs, cluster):
    """What a node drain does: the pod is deleted, the trainer checkpoints on SIGTERM, the replacement resumes
    there, and with backoffLimit 0 the job still succeeds (a disruption is not a failure)."""
    data = seed_data(jobs)
    steps = 200
    jobs.create("SFTJob", "drained", real_spec(data["sft"], steps=steps, every=steps, backoffLimit=0))
    first = pod_name("SFTJob", "drained", 0)
    wait_status(jobs, "SFTJob", "drained", "training past step 10",
                lambda st: st.get("phase") == "Running" and st.get("progress", {}).get("step", 0) >= 10, 180, 0.2)
    jobs.core.delete_namespaced_pod(first, jobs.ns)
    st = wait_phase(jobs, "SFTJob", "drained", "Succeeded", 300)
    assert st["restartCount"] == 0 and st["disruptionCount"] == 1 and st["trainerPod"] == pod_name("SFTJob", "drained", 1), st
    disrupted = [e.message for e in jobs.events("drained") if e.reason == "PodDisrupted"]
    assert len(disrupted) == 1 and f"trainer pod {first} was deleted" in disrupted[0], disrupted
    second = pod_log(cluster, jobs.ns, pod_name("SFTJob", "drained", 1))
    restored = resumed_step(second)
    assert restored is not None and restored >= 10, second[:3000]  # the SIGTERM checkpoint (no periodic one)
    assert st["progress"]["resumedFromStep"] == restored and logged_steps(second)[0] == restored + 1
    assert_operator_healthy(real_operator)


# --- a checkpoint cut off mid-write -----------------------------------------------------------------

def _complete(manager: CheckpointManager, step: int) -> Path:
    return manager.save(step, lambda d: (d / "weights.bin").write_bytes(b"w" * 64), {"stage": "sft"})


def _cut_off(ckpt: Path) -> None:
    """What a process killed while checkpointing can leave: a half-written temp dir (even one that got
    its meta.json), step dirs without (or with a truncated) meta.json, a pointer naming one of them."""
    tmp = ckpt / ".tmp-step-00000040"
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"half")
    (tmp / META_FILE).write_text(json.dumps({"step": 40}))
    (ckpt / "step-00000030").mkdir()
    (ckpt / "step-00000030" / "weights.bin").write_bytes(b"half")
    (ckpt / "step-00000035").mkdir()
    (ckpt / "step-00000035" / META_FILE).write_text('{"step": 35, "sta')


@pytest.mark.parametrize("pointer", ["step-00000030", "step-00000035", ".tmp-step-00000040", "step-00000099", None],
                         ids=["names-dir-without-meta", "names-truncated-meta", "names-tmp-dir", "names-missing-dir", "no-pointer"])
def test_checkpoint_cut_off_mid_write_is_never_latest(tmp_path, pointer):
    manager = CheckpointManager(tmp_path, keep_last=3)
    _complete(manager, 10)
    good = _complete(manager, 20)
    _cut_off(manager.dir)
    latest = manager.dir / tc.LATEST_POINTER
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer + "\n")
    assert manager.latest() == good
    assert [p.name for p in manager.complete_checkpoints()] == ["step-00000010", "step-00000020"]
    # The next save clears what the cut-off left behind.
    _complete(manager, 21)
    assert sorted(p.name for p in manager.dir.iterdir()) == ["latest", "step-00000010", "step-00000020", "step-00000021"]


@pytest.mark.slow
def test_real_trainer_resumes_past_a_cut_off_checkpoint(tmp_path):
    """The real trainer (local process) trains to step 10, a later checkpoint is then cut off mid-write,
    and the next run resumes from step 10, not from the broken step 15/20 and not from 0."""
    data = tmp_path / "sft.jsonl"
    data.write_text(jsonl(sft_rows()))
    run = tmp_path / "run"

    def train(max_steps: int) -> str:
        cfg = {"stage": "sft", "model": {"tokenizer_path": MINILM, "init_from_config": TINY_GPT2},
               "dataset": {"path": str(data), "eval_fraction": 0.1},
               "training": {"max_steps": max_steps, "batch_size": 4, "max_length": 32, "threads": 1, "log_every": 1},
               "deepspeed": {"enabled": False}, "checkpoint": {"dir": str(run), "every_steps": 5}, "metrics": {"port": 0}}
        path = tmp_path / f"config-{max_steps}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "RLHF_TERMINATION_LOG": str(tmp_path / "termination.log")}
        done = subprocess.run([sys.executable, "-m", "rlhf_trainer", "sft", "--config", str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    assert logged_steps(train(10))[0] == 1
    ckpt = run / tc.CHECKPOINTS_SUBDIR
    assert latest_checkpoint_step(run) == 10
    (ckpt / "step-00000015" / "model").mkdir(parents=True)  # renamed without its meta.json: cannot be complete
    (ckpt / "step-00000015" / "model" / "partial.bin").write_bytes(b"x" * 10)
    (ckpt / ".tmp-step-00000020" / "model").mkdir(parents=True)
    (ckpt / ".tmp-step-00000020" / META_FILE).write_text(json.dumps({"step": 20, "stage": "sft"}))
    (ckpt / tc.LATEST_POINTER).write_text("step-00000015\n")

    log = train(20)
    assert resumed_step(log) == 10, log[-3000:]
    steps = logged_steps(log)
    assert steps[0] == 11 and steps[-1] == 20, steps
    assert not (ckpt / ".tmp-step-00000020").exists()
    assert json.loads((ckpt / "step-00000015" / META_FILE).read_text())["step"] == 15  # rewritten whole
    assert json.loads((run / "final" / tc.METADATA_FILE).read_text())["steps"] == 20


# --- upstream deleted, suspend/resume, operator killed ------------------------------------------------

@pytest.mark.slow
def test_deleting_the_reward_model_job_fails_the_waiting_ppo_job(real_operator, jobs):
    data = seed_data(jobs)
    jobs.create("RewardModelJob", "rm", real_spec(data["pairs"], steps=5000, every=0))
    jobs.create("PPOJob", "ppo", real_ppo_spec("rm", data["prompts"]))
    wait_phase(jobs, "RewardModelJob", "rm", "Running", 120)
    waiting = wait_for("ppo waiting for rm", lambda: (c := jobs.condition("PPOJob", "ppo", "WaitingForDependencies"))
                       and "RewardModelJob rm (Running)" in c["message"] and c, 30)
    assert waiting["reason"] == "DependenciesNotReady" and jobs.pods("ppo") == []

    jobs.delete("RewardModelJob", "rm")
    st = wait_phase(jobs, "PPOJob", "ppo", "Failed", 60)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "DependencyDeleted", failed
    assert "RewardModelJob rm (rewardModel) was deleted" in failed["message"] and "spec.rewardModel" in failed["message"], failed
    assert jobs.pods("ppo") == [] and st.get("trainerPod") is None
    assert any(e.reason == "DependencyDeleted" and e.type == "Warning" for e in jobs.events("ppo"))
    wait_for("rm's trainer pod garbage-collected", lambda: jobs.pods("rm") == [], 120, 0.5)
    time.sleep(2)  # sticky: no later pass revives the job
    assert jobs.status("PPOJob", "ppo")["phase"] == "Failed" and jobs.pods("ppo") == []
    assert_operator_healthy(real_operator)


@pytest.mark.slow
def test_suspend_and_resume_keep_progress(real_operator, jobs, cluster):
    data = seed_data(jobs)
    steps = 300
    jobs.create("SFTJob", "pause", real_spec(data["sft"], steps=steps, every=100))
    running = wait_status(jobs, "SFTJob", "pause", "step >= 20", lambda s: s.get("phase") == "Running"
                          and s.get("progress", {}).get("step", 0) >= 20, 180)
    jobs.patch("SFTJob", "pause", {"spec": {"suspend": True}})
    at_suspend = running["progress"]["step"]
    wait_phase(jobs, "SFTJob", "pause", "Suspended", 30)
    wait_for("the trainer pod gone", lambda: jobs.pods("pause") == [], 120, 0.5)
    out = jobs.claim_dir(pvc_name("SFTJob", "pause"))
    saved = latest_checkpoint_step(out)  # written on SIGTERM at the step the trainer had reached
    first = pod_log(cluster, jobs.ns, pod_name("SFTJob", "pause", 0))
    assert "SIGTERM received" in first and saved >= at_suspend and saved < steps, (saved, at_suspend)
    assert max(logged_steps(first)) == saved

    jobs.patch("SFTJob", "pause", {"spec": {"suspend": False}})
    st = wait_phase(jobs, "SFTJob", "pause", "Succeeded", 240)
    assert st["restartCount"] == 0 and st["trainerPod"] == pod_name("SFTJob", "pause", 1) and st["progress"]["step"] == steps, st
    second = pod_log(cluster, jobs.ns, pod_name("SFTJob", "pause", 1))
    assert resumed_step(second) == saved, second[:3000]
    after = logged_steps(second)
    assert after[0] == saved + 1 >= at_suspend + 1 and after[-1] == steps, after[:3]
    assert {"JobSuspended", "JobResumed"} <= {e.reason for e in jobs.events("pause")}
    assert_operator_healthy(real_operator)


def test_final_progress_survives_missed_scrapes(operator_factory, jobs):
    """A run shorter than the scrape period is never scraped while running; its final progress must
    still reach the status (the trainer's JSON termination message), or a finished job shows stale steps."""
    data = seed_data(jobs)
    operator_factory(RLHF_RESYNC_SECONDS="30", **REAL_TRAINER)
    jobs.create("SFTJob", "quick", real_spec(data["sft"], steps=12, every=0))
    st = wait_phase(jobs, "SFTJob", "quick", "Succeeded", 120)
    progress = st.get("progress", {})
    assert progress.get("step") == progress.get("totalSteps") == 12 and "loss" in progress, st
    assert st["checkpoint"].get("latestStep") == 12, st


@pytest.mark.slow
def test_operator_killed_mid_ppo_and_restarted(operator_factory, jobs, cluster):
    data = seed_data(jobs)
    first = operator_factory(**REAL_TRAINER)
    steps = 40
    jobs.create("RewardModelJob", "rm", real_spec(data["pairs"], steps=10, every=0))
    jobs.create("PPOJob", "ppo", real_ppo_spec("rm", data["prompts"], steps=steps, every=10))
    wait_status(jobs, "PPOJob", "ppo", "PPO iterations under way", lambda s: s.get("phase") == "Running"
                and 2 <= s.get("progress", {}).get("step", 0) < steps - 20, 300)
    first.kill()
    time.sleep(2)  # the trainer goes on without an operator
    second = operator_factory(**REAL_TRAINER)

    st = wait_phase(jobs, "PPOJob", "ppo", "Succeeded", 300)
    assert [p.metadata.name for p in jobs.pods("ppo")] == [pod_name("PPOJob", "ppo", 0)]  # adopted, no duplicate
    assert [p.metadata.name for p in jobs.pods("rm")] == [pod_name("RewardModelJob", "rm", 0)]
    assert st["restartCount"] == 0 and st["attempt"] == 0 and st["progress"]["step"] == steps, st
    log = pod_log(cluster, jobs.ns, pod_name("PPOJob", "ppo", 0))
    iterations = logged_steps(log)
    assert resumed_step(log) is None and iterations == list(range(1, steps + 1)), iterations  # one uninterrupted run
    assert {"reward", "kl"} <= set(st["progress"]), st["progress"]
    meta = json.loads((jobs.claim_dir(pvc_name("PPOJob", "ppo")) / "final" / tc.METADATA_FILE).read_text())
    assert meta["steps"] == steps and meta["inputs"]["jobs"] == {"rm": "/inputs/rm/final"}
    assert_operator_healthy(second)
