"""PPO runs on the one resumable loop (runtime.loop.run_loop): a real SIGTERM in the middle of an iteration
finishes that iteration, checkpoints at its end (with the skipped-step counters), and the next start resumes
there and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_trainer import ppo  # noqa: E402
from rlhf_trainer.runtime.failure import Preempted  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_ppo import logged_steps, make_world, ppo_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("ppo-loop-world"))


def test_sigterm_mid_iteration_checkpoints_its_end_and_resume_continues(world, tmp_path, monkeypatch, capsys):
    def cfg(name):
        return ppo_config(world, tmp_path / name, training={"max_steps": 4},
                          checkpoint={"dir": str(tmp_path / name), "every_steps": 0})

    straight = ppo.run(cfg("straight"))
    capsys.readouterr()

    real = ppo.run_iteration

    def sigterm_during_second(trainer, records, schedule, iteration):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # GracefulStop's handler only sets a flag
        return real(trainer, records, schedule, iteration)

    monkeypatch.setattr(ppo, "run_iteration", sigterm_during_second)
    with pytest.raises(Preempted, match=r"stop requested \(SIGTERM\) at step 2 of 4; checkpoint saved"):
        ppo.run(cfg("stopped"))
    assert [r["step"] for r in logged_steps(capsys.readouterr().out)] == [1, 2]  # the 2nd iteration completed
    ckpt = tmp_path / "stopped" / "checkpoints" / "step-00000002"
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["stage"] == "ppo" and meta["step"] == 2 and meta["plan"]["rollout_batch_size"] == 16
    assert set(meta["skip_guards"]) == {"actor", "critic"} and meta["skip_guards"]["actor"]["steps"] == 2 * 2 * 2
    assert json.loads((ckpt / ppo.STATE_FILE).read_text())["iteration"] == 2

    monkeypatch.setattr(ppo, "run_iteration", real)
    resumed = ppo.run(cfg("stopped"))
    out = capsys.readouterr().out
    assert f"rlhf-trainer: resumed from {ckpt} (step 2)" in out
    assert [r["step"] for r in logged_steps(out)] == [3, 4] and resumed["resumed_from"] == 2
    a = load_file(str(Path(straight["final_dir"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final_dir"]) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["initial_reward_mean"] == straight["initial_reward_mean"]
