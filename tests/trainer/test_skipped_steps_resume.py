"""Consecutive skipped optimizer steps add up across a restart: the counts travel with the checkpoint, so a job
that skips every step and is restarted in between still fails with NonFiniteGradients after
``training.max_skipped_steps`` of them."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import ppo  # noqa: E402
from rlhf_trainer.config import from_dict  # noqa: E402
from rlhf_trainer.runtime import nonfinite  # noqa: E402
from rlhf_trainer.runtime.failure import NonFiniteGradients  # noqa: E402
from rlhf_trainer.runtime.strategy import Strategy  # noqa: E402
from trainer_support import counting_examples, run_cli, tiny_gpt2, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_engine():
    cfg = from_dict({"stage": "sft", "model": {"path": "unused"}, "dataset": {"path": "unused"},
                     "training": {"learning_rate": 1e-2, "threads": 1}, "deepspeed": {"enabled": False},
                     "metrics": {"port": 0}})
    return Strategy(cfg).setup().prepare(torch.nn.Linear(8, 8), 1e-2, total_steps=100)


def test_guard_state_round_trips_and_old_checkpoints_start_from_zero(monkeypatch):
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:2")
    engine, x = linear_engine(), torch.ones(2, 8)
    first = nonfinite.StepGuard("sft", "policy", limit=3)
    for _ in range(3):  # step 1 applied, steps 2 and 3 skipped
        first.backward_step(engine, engine(x).mean())
    state = json.loads(json.dumps(first.state_dict()))  # it goes through JSON in a checkpoint
    assert state == {"model": "policy", "steps": 3, "skipped": 2, "consecutive": 2,
                     "last_finite_loss": first.last_finite_loss}
    resumed = nonfinite.StepGuard("sft", "policy", limit=3).load_state_dict(state)
    with pytest.raises(NonFiniteGradients, match="3 consecutive optimizer steps skipped .* up to policy optimizer "
                                                 "step 4.*3 of 4 policy steps skipped"):
        resumed.backward_step(engine, engine(x).mean())
    fresh = nonfinite.StepGuard("sft", "policy", limit=3).load_state_dict(None)
    assert (fresh.steps, fresh.skipped, fresh.consecutive) == (0, 0, 0)


def sft_config(tmp_path, minilm_path, max_steps: int):
    data = write_jsonl(tmp_path / "sft.jsonl", counting_examples(64))
    path = tmp_path / f"config-{max_steps}.json"
    path.write_text(json.dumps({
        "stage": "sft",
        "model": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
        "dataset": {"path": str(data), "eval_fraction": 0.1},
        "training": {"max_steps": max_steps, "batch_size": 4, "max_length": 32, "threads": 1, "learning_rate": 1e-3,
                     "max_skipped_steps": 4},
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 1},
        "metrics": {"port": 0},
    }))
    return path


def test_sft_consecutive_skips_before_and_after_a_restart_fail_the_job(tmp_path, minilm_path, monkeypatch):
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(tmp_path / "termination-log"))
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:3")  # every optimizer step from the 3rd on
    # First start: steps 3 and 4 skipped (2 of the 4 allowed), checkpoint at step 4, the run ends there.
    assert run_cli(sft_config(tmp_path, minilm_path, max_steps=4)) == 0
    # The restart resumes at step 4: steps 5 and 6 make 4 consecutive skips. Counting from 0 again it would
    # reach only 3 by step 7 and end "successfully" without having learned since step 2.
    assert run_cli(sft_config(tmp_path, minilm_path, max_steps=7)) == c.EXIT_NONFINITE
    message = (tmp_path / "termination-log").read_text()
    assert "4 consecutive optimizer steps skipped" in message and "up to policy optimizer step 6 (training step 6)" \
        in message, message


def test_ppo_checkpoint_carries_the_skipped_step_counts(tmp_path, minilm_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in counting_examples(16)])

    def cfg(max_steps):
        return from_dict({
            "stage": "ppo", "dataset": {"path": str(prompts), "format": "prompt", "eval_fraction": 0.0},
            "training": {"max_steps": max_steps, "learning_rate": 1e-4, "threads": 1, "max_skipped_steps": 3},
            "ppo": {"actor": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
                    "reward_fn": "count:two", "rollout_batch_size": 2, "minibatch_size": 2, "max_new_tokens": 4,
                    "max_prompt_length": 16, "advantage_estimator": "reinforce_plus_plus"},
            "deepspeed": {"enabled": False},
            "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 1}, "metrics": {"port": 0},
        })

    monkeypatch.setenv(nonfinite.ENV_INJECT, "actor:2")  # one actor update per iteration: iterations 2.. skip
    assert ppo.run(cfg(3))["step"] == 3  # iterations 2 and 3 skipped: 2 of the 3 allowed
    state = json.loads(max((tmp_path / "run" / "checkpoints").rglob("meta.json")).read_text())  # (runtime.loop's)
    assert state["skip_guards"]["actor"]["consecutive"] == 2 and state["skip_guards"]["actor"]["steps"] == 3
    with pytest.raises(NonFiniteGradients, match="actor: 3 consecutive optimizer steps skipped .* up to actor "
                                                 "optimizer step 4 \\(PPO iteration 4\\)"):
        ppo.run(cfg(6))
