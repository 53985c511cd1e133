"""Reward stage end to end on the CPU: learning, exact resume, export/reload, heads and critic."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import models, reward  # noqa: E402
from rlhf_trainer.config import METADATA_FILE, ModelConfig  # noqa: E402
from rlhf_trainer.data import load_preference_splits  # noqa: E402
from rlhf_trainer.runtime.failure import Preempted  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer_support import sentiment_pairs, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rm-data") / "pairs.jsonl", sentiment_pairs(600))


def accuracy_by_scoring(final_dir, pairs) -> float:
    model, tok, _ = models.load_reward_model(final_dir)
    chosen = models.score_responses(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = models.score_responses(model, tok, [p.prompt for p in pairs], [p.rejected for p in pairs])
    return float((chosen > rejected).float().mean())


def test_reward_model_learns_a_synthetic_preference_task(make_cfg, pairs_file, tmp_path):
    train = dict(max_steps=40, batch_size=16, learning_rate=1e-3, warmup_steps=5, seed=1)
    cfg = make_cfg("reward", pairs_file, tmp_path / "rm", training=train, deepspeed={"enabled": True})
    out = reward.run(cfg)
    acc = out["metrics"][c.M_RM_EVAL_ACCURACY]
    assert acc >= 0.95, out["metrics"]
    assert out["metrics"]["eval_margin"] > 1.0
    # The exported model, reloaded and scoring re-encoded text, agrees with the training-time eval.
    splits = load_preference_splits(cfg.dataset)
    assert accuracy_by_scoring(out["final_dir"], splits.eval) == pytest.approx(acc)
    meta = json.loads((tmp_path / "rm" / "final" / METADATA_FILE).read_text())
    assert meta["stage"] == "reward" and meta["steps"] == 40 and meta["eval_pairs"] == 120
    assert meta["metrics"][c.M_RM_EVAL_ACCURACY] == acc
    # Normalisation stats: mean/std of the train responses' scores, as a plain re-scoring computes them.
    model, tok, stats = models.load_reward_model(out["final_dir"])
    assert stats == meta["reward_stats"] and stats["n"] == 2 * len(splits.train)
    texts = [p.prompt + r for p in splits.train for r in (p.chosen, p.rejected)]
    scores = models.score(model, tok, texts).double()
    assert stats["mean"] == pytest.approx(float(scores.mean()), abs=1e-4)
    assert stats["std"] == pytest.approx(float(scores.std()), rel=1e-4)
    assert float(models.normalize(scores, stats).mean()) == pytest.approx(0.0, abs=1e-4)

    # The same run with a zero learning rate stays at chance: the accuracy above was learned.
    frozen = make_cfg("reward", pairs_file, tmp_path / "rm0", training={**train, "learning_rate": 0.0, "max_steps": 4})
    assert reward.run(frozen)["metrics"][c.M_RM_EVAL_ACCURACY] < 0.8


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_reward_resume_is_exact_with_deepspeed(make_cfg, pairs_file, tmp_path, monkeypatch, zero_stage):
    # Dropout stays on: the resumed run must also restore the RNG streams to match.
    train = dict(max_steps=16, batch_size=8, learning_rate=5e-4, warmup_steps=3, log_every=4)
    ds = {"enabled": True, "zero_stage": zero_stage}
    straight = make_cfg("reward", pairs_file, tmp_path / "a", training=train, deepspeed=ds)
    stopped = make_cfg("reward", pairs_file, tmp_path / "b", training=train, deepspeed=ds, checkpoint={"every_steps": 5})
    reward.run(straight)
    monkeypatch.setenv("RLHF_STOP_AT_STEP", "8")
    with pytest.raises(Preempted, match="at step 8 of 16"):
        reward.run(stopped)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000005", "step-00000008"]
    assert not (tmp_path / "b" / "final").exists()
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    resumed = reward.run(stopped)
    assert resumed["resumed_from"] == 8 and resumed["step"] == 16
    for name in ("model.safetensors", "value_head.safetensors"):
        a = load_file(str(tmp_path / "a" / "final" / name))
        b = load_file(str(tmp_path / "b" / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    # A fresh start of a finished job re-exports from the last checkpoint instead of training again.
    again = reward.run(stopped)
    assert again["resumed_from"] == 16 and again["step"] == 16


def test_sequence_classification_head_trains_exports_and_scores_the_same(make_cfg, pairs_file, tmp_path):
    cfg = make_cfg("reward", pairs_file, tmp_path / "sc", reward={"head": "sequence_classification", "margin": 0.5},
                   training=dict(max_steps=40, batch_size=16, learning_rate=1e-3, seed=2))
    out = reward.run(cfg)
    model, tok, stats = models.load_reward_model(out["final_dir"])
    assert isinstance(model, models.SeqClassRewardModel) and stats["n"] > 0
    splits = load_preference_splits(cfg.dataset)
    assert accuracy_by_scoring(out["final_dir"], splits.eval) == pytest.approx(out["metrics"][c.M_RM_EVAL_ACCURACY])
    assert out["metrics"][c.M_RM_EVAL_ACCURACY] > 0.8


def test_minilm_backbone_reward_model_round_trips_and_yields_a_critic(minilm_path, tmp_path):
    torch.manual_seed(0)
    tok = models.load_tokenizer(ModelConfig(path=minilm_path))
    rm = models.build_reward_model(ModelConfig(path=minilm_path), tok)
    assert rm.backbone.pooler is None and tok.pad_token_id != tok.eos_token_id
    texts = ["Human: hi Assistant: hello, how can I help?", "Human: hi Assistant: go away", "short"]
    before = models.score(rm, tok, texts, max_length=64)
    models.save_reward_model(rm, tok, tmp_path / "rm", {"mean": 0.5, "std": 2.0, "n": 3}, max_length=64)
    loaded, tok2, stats = models.load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(models.score(loaded, tok2, texts), before, rtol=0, atol=1e-5)
    assert stats == {"mean": 0.5, "std": 2.0, "n": 3}
    # A critic from the reward model: the value at the last real token is the reward score.
    critic, ctok = models.load_critic(tmp_path / "rm")
    batch = tok(texts, padding=True, return_tensors="pt")
    values = critic(batch["input_ids"], batch["attention_mask"])
    assert values.shape == batch["input_ids"].shape
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(values[torch.arange(3), last], before, rtol=0, atol=1e-5)
    fresh, _ = models.load_critic(tmp_path / "rm", init_value_head="fresh")
    assert not torch.equal(fresh.value_head.weight, critic.value_head.weight)


def test_unreadable_reward_model_paths_are_model_errors(tmp_path):
    from rlhf_trainer.runtime.failure import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        models.load_reward_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="is not a reward model"):
        models.load_reward_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="cannot load a tokenizer"):
        models.load_tokenizer(ModelConfig(path=str(tmp_path / "empty")))
