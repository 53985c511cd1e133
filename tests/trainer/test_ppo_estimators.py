"""Critic-free estimators (GRPO, RLOO, REINFORCE++) end to end on the CPU, with a rule reward.

The tiny GPT-2 and word prompts of ``test_ppo``; the reward is the verifiable format rule "the response
says `good`" (1 or 0), so a group of samples of one prompt usually has both outcomes.

* learning: each estimator raises the mean reward while the KL to the reference stays bounded; the
  learning-rate-0 control (the same rollouts, no update) stays where it started;
* no critic: nothing of a value model is loaded, trained or checkpointed;
* resume: N iterations, stop, resume for N more == 2N straight, for each estimator;
* an endpoint that keeps failing stops the run with a checkpoint to resume from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.reward_server import RewardServer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import ppo  # noqa: E402
from rlhf_trainer.config import ConfigError  # noqa: E402
from rlhf_trainer.reward_endpoint import RewardEndpointError  # noqa: E402
from rlhf_trainer.runtime.failure import Preempted  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_ppo import constant_reward_model, logged_steps, make_world, mean, ppo_config  # noqa: E402

KL_BOUND = 8.0  # nats per response, as in test_ppo
SAYS_GOOD = {"format": {"pattern": r".*\bgood\b.*"}}
ESTIMATORS = {
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_in_loss": True, "kl_estimator": "k3"},
    "dr_grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4, "grpo_normalize_std": False,
                "kl_in_loss": True},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 4},
    "reinforce_plus_plus": {"advantage_estimator": "reinforce_plus_plus"},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # trainer/conftest.py: one torch thread


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("rl-world"))


def rl_config(world: Path, out: Path, estimator: str, **over):
    ppo_over = {"reward_fn": "", "rewards": SAYS_GOOD, **ESTIMATORS[estimator], **over.pop("ppo", {})}
    return ppo_config(world, out, ppo=ppo_over, **over)


@pytest.fixture(scope="module")
def control(world, tmp_path_factory):
    """Learning rate 0: the policy never moves, so every estimator sees these same rollouts."""
    out = tmp_path_factory.mktemp("control")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ppo.run(rl_config(world, out, "grpo", training={"learning_rate": 0.0}))
    return logged_steps(buf.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_estimator_raises_a_rule_reward_with_bounded_kl(world, tmp_path, capsys, control, estimator):
    result = ppo.run(rl_config(world, tmp_path / "learn", estimator))
    learn = logged_steps(capsys.readouterr().out)
    assert [r["step"] for r in learn] == list(range(1, 17))
    rewards = [r[c.M_PPO_REWARD_MEAN] for r in learn]
    frozen = [r[c.M_PPO_REWARD_MEAN] for r in control]
    start, end = mean(rewards[:3]), mean(rewards[-3:])
    print(f"{estimator}: reward {start:.3f} -> {end:.3f} (control {mean(frozen[-3:]):.3f}), max KL {max(r[c.M_PPO_KL] for r in learn):.3f}")
    assert end > start + 0.25 and end > mean(frozen[-3:]) + 0.25, f"{estimator}: {rewards} vs control {frozen}"
    kls = [r[c.M_PPO_KL] for r in learn]
    assert max(kls) < KL_BOUND and kls[-1] > 0.05, kls
    assert abs(mean(frozen[-3:]) - mean(frozen[:3])) < 0.2, frozen
    for r in control:
        assert r[c.M_PPO_KL] == pytest.approx(0.0, abs=1e-6)
    last = learn[-1]
    assert last[c.M_PPO_CRITIC_ENABLED] == 0.0 and c.M_PPO_VALUE_LOSS not in last
    assert last[f"{c.M_PPO_REWARD_SOURCE_MEAN}/format"] == last[c.M_PPO_REWARD_MEAN]
    if ESTIMATORS[estimator].get("samples_per_prompt", 1) > 1:
        assert 0.0 <= last[c.M_PPO_ZERO_VARIANCE_GROUPS] <= 1.0 and last[c.M_PPO_REWARD_GROUP_STD] >= 0.0
    if ESTIMATORS[estimator].get("kl_in_loss"):
        assert last[c.M_PPO_KL_LOSS] > 0.0
    assert result["advantage_estimator"] == ESTIMATORS[estimator]["advantage_estimator"]
    assert result["critic"] is False


def test_critic_free_run_loads_trains_and_saves_no_critic(world, tmp_path, capsys):
    result = ppo.run(rl_config(world, tmp_path / "run", "grpo", training={"max_steps": 2}))
    err = capsys.readouterr().err
    assert "critic: none" in err and "grpo" in err
    ckpt = Path(tmp_path / "run" / "checkpoints")
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert (latest / "actor").is_dir() and not (latest / "critic").exists()
    assert result["critic"] is False
    gae = ppo.run(ppo_config(world, tmp_path / "gae", training={"max_steps": 1}))
    assert gae["critic"] is True and gae["metrics"][c.M_PPO_CRITIC_ENABLED] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
def test_resume_is_exact_for_each_estimator(world, tmp_path, monkeypatch, capsys, estimator):
    def cfg(name):
        return rl_config(world, tmp_path / name, estimator, training={"max_steps": 4},
                         checkpoint={"dir": str(tmp_path / name), "every_steps": 2, "keep_last": 2},
                         ppo={"kl_target": 1.0, "kl_horizon": 200})

    straight = ppo.run(cfg("straight"))
    monkeypatch.setenv("RLHF_STOP_AT_STEP", "2")
    with pytest.raises(Preempted):
        ppo.run(cfg("resumed"))
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    capsys.readouterr()
    resumed = ppo.run(cfg("resumed"))
    assert [r["step"] for r in logged_steps(capsys.readouterr().out)] == [3, 4] and resumed["resumed_from"] == 2
    a = load_file(str(Path(straight["final_dir"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final_dir"]) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for key in (c.M_PPO_REWARD_MEAN, c.M_PPO_KL, c.M_PPO_POLICY_LOSS, c.M_PPO_KL_COEF):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=1e-4, abs=1e-6), key


def test_an_endpoint_that_keeps_failing_stops_with_a_checkpoint_to_resume_from(world, tmp_path, capsys):
    down = {"from": 4}  # one request per iteration: iterations 1-3 scored, the 4th never
    srv = RewardServer(lambda r, _f: float("good" in r.split()), path="/",
                       fail=lambda n, _auth: 503 if down["from"] and n >= down["from"] else None)
    endpoint = {"url": srv.url, "max_retries": 2, "backoff_seconds": 0.01, "max_backoff_seconds": 0.01}

    def cfg():
        return rl_config(world, tmp_path / "run", "rloo", training={"max_steps": 5},
                         ppo={"rewards": {"endpoint": endpoint}})

    with pytest.raises(RewardEndpointError, match=f"reward endpoint {srv.url} failed 3 times in a row; last error: "
                                                  "HTTP 503") as err:
        ppo.run(cfg())
    assert err.value.exit_code == c.EXIT_REWARD_ENDPOINT_ERROR
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    down["from"] = 0  # the endpoint is back
    capsys.readouterr()
    result = ppo.run(cfg())
    assert result["resumed_from"] == 3 and [r["step"] for r in logged_steps(capsys.readouterr().out)] == [4, 5]
    srv.close()


def test_reward_model_and_rules_are_summed_with_weights(world, tmp_path, capsys):
    """A reward model scoring every response 1.5 (saved statistics mean 0.5, std 2: normalised 0.5) with weight
    0.5, plus the rule "says good" with weight 2: reward = 0.25 + 2 * rule, each source logged on its own."""
    constant_reward_model(world, tmp_path / "rm")
    rewards = {"model_weight": 0.5, "format": {**SAYS_GOOD["format"], "weight": 2.0}}
    ppo.run(rl_config(world, tmp_path / "run", "grpo", training={"max_steps": 1, "learning_rate": 0.0},
                      ppo={"reward_model": {"path": str(tmp_path / "rm")}, "rewards": rewards}))
    (row,) = logged_steps(capsys.readouterr().out)
    says_good = row[f"{c.M_PPO_REWARD_SOURCE_MEAN}/format"]
    assert row[f"{c.M_PPO_REWARD_SOURCE_MEAN}/model"] == pytest.approx(0.5, abs=1e-5)
    assert 0.0 < says_good < 1.0
    assert row[c.M_PPO_REWARD_MEAN] == pytest.approx(0.25 + 2.0 * says_good, abs=1e-5)


def test_estimator_config_errors_name_the_field(world, tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.samples_per_prompt: grpo .* at least 2"):
        rl_config(world, tmp_path, "grpo", ppo={"samples_per_prompt": 1})
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size: 16 responses are not whole groups .* \(3\)"):
        rl_config(world, tmp_path, "rloo", ppo={"samples_per_prompt": 3})
    with pytest.raises(ConfigError, match="ppo.critic: advantage_estimator rloo uses no critic"):
        rl_config(world, tmp_path, "rloo", ppo={"critic": {"path": str(world / "actor")}})
    with pytest.raises(ConfigError, match="ppo.critic_learning_rate: advantage_estimator grpo trains no critic"):
        rl_config(world, tmp_path, "grpo", ppo={"critic_learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="ppo.advantage_estimator: 'ppo' is not one of"):
        rl_config(world, tmp_path, "grpo", ppo={"advantage_estimator": "ppo"})
