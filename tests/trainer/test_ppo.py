"""PPO stage end to end on the CPU with a tiny GPT-2 policy (2 layers, 64 wide) and a word tokenizer.

* learning: with the rule scorer ``count:good`` PPO raises the mean reward while the KL to the
  reference stays under a stated bound; the same run with learning rate 0 does not move at all;
* resume: N iterations, stop (as on SIGTERM), resume for N more == 2N straight (DeepSpeed engines);
* reward-model path: the RM's own tokenizer scores the re-encoded text, its statistics normalise the
  score, and the critic starts as a copy of the RM (backbone + value head).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import models, ppo  # noqa: E402
from rlhf_trainer.config import METADATA_FILE, ConfigError, from_dict  # noqa: E402
from rlhf_trainer.runtime.failure import Preempted  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

WORDS = "the a cat dog sat ran on mat big red blue green small fast slow good and then".split()
KL_BOUND = 8.0  # nats per response (sum over its <= 8 tokens); the stated bound of the learning test


pytestmark = pytest.mark.usefixtures("one_thread")  # trainer/conftest.py: one torch thread


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", *WORDS])}
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="the"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def gpt2_config(tok) -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("ppo-world"))


def make_world(root: Path) -> Path:
    """A saved tiny actor with its tokenizer and a JSONL file of 64 word prompts."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    actor = transformers.GPT2LMHeadModel(gpt2_config(tok))
    actor.save_pretrained(root / "actor")
    tok.save_pretrained(root / "actor")
    rnd = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(64):
            words = [rnd.choice(WORDS[:-3]) for _ in range(rnd.randint(2, 5))]  # prompts never say "good"
            f.write(json.dumps({"prompt": " ".join(words)}) + "\n")
    with open(root / "ptx.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(6))}) + "\n")
    return root


def ppo_config(world: Path, out: Path, **over):
    ppo_over = over.pop("ppo", {})
    training = {"max_steps": 16, "learning_rate": 1e-3, "seed": 1, "threads": 1, "batch_size": 8,
                **over.pop("training", {})}
    cfg = {
        "stage": "ppo",
        "dataset": {"path": str(world / "prompts.jsonl"), "eval_fraction": 0.0},
        "training": training,
        "ppo": {"actor": {"path": str(world / "actor")}, "reward_fn": "count:good", "kl_coef": 0.1,
                "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2, "max_new_tokens": 8,
                "max_prompt_length": 16, "reward_clip": 0.0, **ppo_over},
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(out), "every_steps": 0},
        "metrics": {"port": 0},
        **over,
    }
    return from_dict(cfg)


def logged_steps(text: str) -> list[dict]:
    """The JSON step lines the metrics module printed (one per iteration)."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"stage": "ppo"' in line]
    return [r for r in rows if c.M_PPO_REWARD_MEAN in r]


def mean(xs) -> float:
    return sum(xs) / len(xs)


def constant_reward_model(world: Path, out: Path) -> Path:
    """A reward model on the actor's tokenizer that scores every response 1.5 (zero head weights, bias 1.5),
    saved with the statistics mean 0.5, std 2 (normalised score 0.5)."""
    tok = models.load_tokenizer(models.ModelConfig(path=str(world / "actor")))
    torch.manual_seed(1)
    rm = models.RewardModel(transformers.GPT2Model(gpt2_config(tok)))
    with torch.no_grad():
        rm.value_head.weight.zero_()
        rm.value_head.bias.fill_(1.5)
    models.save_reward_model(rm, tok, out, {"mean": 0.5, "std": 2.0, "n": 10}, max_length=64)
    return out


def test_ppo_raises_reward_with_bounded_kl_and_zero_lr_does_not(world, tmp_path, capsys):
    result = ppo.run(ppo_config(world, tmp_path / "learn"))
    learn = logged_steps(capsys.readouterr().out)
    frozen_result = ppo.run(ppo_config(world, tmp_path / "frozen", training={"learning_rate": 0.0}))
    frozen = logged_steps(capsys.readouterr().out)
    assert [r["step"] for r in learn] == list(range(1, 17)) and len(frozen) == 16

    rewards = [r[c.M_PPO_REWARD_MEAN] for r in learn]
    start, end = mean(rewards[:3]), mean(rewards[-3:])
    assert end > start + 1.0, f"PPO did not raise the reward: {rewards}"
    kls = [r[c.M_PPO_KL] for r in learn]
    assert max(kls) < KL_BOUND, f"KL left the bound {KL_BOUND}: {kls}"
    assert kls[-1] > 0.05, "the policy moved, so its KL to the reference must be positive"

    frozen_rewards = [r[c.M_PPO_REWARD_MEAN] for r in frozen]
    assert abs(mean(frozen_rewards[-3:]) - mean(frozen_rewards[:3])) < 0.5, frozen_rewards
    assert mean(frozen_rewards[-3:]) < end - 1.0
    for r in frozen:  # the policy never leaves the reference: every ratio is exactly 1
        assert r[c.M_PPO_KL] == pytest.approx(0.0, abs=1e-6)
        assert r[c.M_PPO_APPROX_KL] == pytest.approx(0.0, abs=1e-6)
        assert r[c.M_PPO_CLIP_FRACTION] == 0.0

    # Every PPO metric of the contract is logged.
    expected = {c.M_PPO_REWARD_MEAN, c.M_PPO_REWARD_STD, c.M_PPO_KL, c.M_PPO_KL_COEF, c.M_PPO_ENTROPY,
                c.M_PPO_POLICY_LOSS, c.M_PPO_VALUE_LOSS, c.M_PPO_CLIP_FRACTION, c.M_PPO_APPROX_KL,
                c.M_PPO_RESPONSE_LENGTH, c.M_PPO_ADVANTAGES_MEAN, c.M_PPO_RETURNS_MEAN, c.M_PPO_VALUES_MEAN,
                c.M_TOKENS_PER_SECOND, c.M_LOSS, c.M_LEARNING_RATE}
    expected |= {f"{c.M_PPO_PHASE_SECONDS}/{p}" for p in ("generate", "score", "train")}
    assert expected <= set(learn[-1])

    # The final export is a loadable HF model + tokenizer + metadata with the reward trajectory.
    final = Path(result["final_dir"])
    meta = json.loads((final / METADATA_FILE).read_text())
    assert meta["stage"] == "ppo" and meta["steps"] == 16
    assert meta["initial_reward_mean"] == rewards[0] and meta["final_reward_mean"] == rewards[-1]
    assert meta["final_kl"] == kls[-1]
    exported = transformers.AutoModelForCausalLM.from_pretrained(final)
    start_model = transformers.AutoModelForCausalLM.from_pretrained(world / "actor")
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), start_model.state_dict().values(),
                                                     strict=True))
    frozen_model = transformers.AutoModelForCausalLM.from_pretrained(frozen_result["final_dir"])
    for a, b in zip(frozen_model.state_dict().values(), start_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert transformers.AutoTokenizer.from_pretrained(final).eos_token == "</s>"


@pytest.mark.slow
def test_ppo_resume_is_exact_with_deepspeed(world, tmp_path, monkeypatch, capsys):
    over = {
        "training": {"max_steps": 6},
        "ppo": {"kl_target": 1.0, "kl_horizon": 200, "ptx_coef": 0.1, "entropy_coef": 0.01,
                "ptx_dataset": {"path": str(world / "ptx.jsonl"), "eval_fraction": 0.0}},
        "deepspeed": {"enabled": True},
        "checkpoint": {"dir": "", "every_steps": 2, "keep_last": 2},
    }

    def cfg(name):
        o = json.loads(json.dumps(over))
        o["checkpoint"]["dir"] = str(tmp_path / name)
        return ppo_config(world, tmp_path / name, **o)

    straight = ppo.run(cfg("straight"))
    capsys.readouterr()

    monkeypatch.setenv("RLHF_STOP_AT_STEP", "3")
    with pytest.raises(Preempted):
        ppo.run(cfg("resumed"))
    first = logged_steps(capsys.readouterr().out)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    resumed = ppo.run(cfg("resumed"))
    out = capsys.readouterr().out
    second = logged_steps(out)
    assert [r["step"] for r in second] == [4, 5, 6] and resumed["resumed_from"] == 3
    assert '"resumedFromStep": 3, "message": "resumed from checkpoint step 3"' in out
    assert straight["resumed_from"] == -1

    a = load_file(str(Path(straight["final_dir"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final_dir"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["final_kl_coef"] == pytest.approx(straight["final_kl_coef"], rel=1e-9)
    assert straight["final_kl_coef"] != 0.1, "the adaptive controller moved beta"
    for key in (c.M_PPO_REWARD_MEAN, c.M_PPO_KL, c.M_PPO_VALUE_LOSS):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=1e-4, abs=1e-6)
    assert resumed["initial_reward_mean"] == straight["initial_reward_mean"]
    assert "ptx_loss" in straight["metrics"]


def test_ppo_with_reward_model_scorer_and_critic_from_it(world, tmp_path, capsys):
    """An RM whose score is the constant 1.5 (zero head weights, bias 1.5) with saved stats mean 0.5,
    std 2: every response scores 1.5, the critic (a copy of the RM) values every state at 1.5, and
    with no KL the return of every token is the normalised score (1.5 - 0.5) / 2 = 0.5."""
    constant_reward_model(world, tmp_path / "rm")
    cfg = ppo_config(world, tmp_path / "run", training={"max_steps": 1, "learning_rate": 0.0},
                     ppo={"reward_fn": "", "reward_model": {"path": str(tmp_path / "rm")}, "gamma": 1.0, "lam": 1.0})
    ppo.run(cfg)
    (row,) = logged_steps(capsys.readouterr().out)
    assert row[c.M_PPO_REWARD_MEAN] == pytest.approx(1.5, abs=1e-5)
    assert row[c.M_PPO_REWARD_STD] == pytest.approx(0.0, abs=1e-5)
    assert row[c.M_PPO_VALUES_MEAN] == pytest.approx(1.5, abs=1e-5)
    assert row[c.M_PPO_RETURNS_MEAN] == pytest.approx(0.5, abs=1e-5)


def test_ppo_config_errors_name_the_field(world, tmp_path):
    with pytest.raises(ConfigError, match="ppo.reward_fn"):
        ppo_config(world, tmp_path, ppo={"reward_fn": "length"})
    with pytest.raises(ConfigError, match="ppo.reward_model"):
        ppo_config(world, tmp_path, ppo={"reward_fn": ""})
    with pytest.raises(ConfigError, match="minibatch_size"):
        ppo_config(world, tmp_path, ppo={"minibatch_size": 32})
    with pytest.raises(ConfigError, match="max_new_tokens"):  # the tiny actor has 64 positions
        ppo.run(ppo_config(world, tmp_path, ppo={"max_prompt_length": 60, "max_new_tokens": 8}))
