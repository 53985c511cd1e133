"""DPO stage end to end on the CPU with tiny GPT-2 policies.

* offline: a learnable synthetic preference reaches held-out reward accuracy >= 0.95; learning rate 0 stays
  at chance (0.5: policy = reference, every pair a tie); every pair format of the data layer trains;
* online: with the rule scorer ``count:good`` the best-of-n reward rises from round to round, each round's
  pairs land in rounds/NN/pairs.jsonl;
* resume: stopped inside round 2 and resumed == uninterrupted (weights and pair files), round 2's pairs are
  read back, not sampled again;
* config errors name the field.
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
from rlhf_trainer import dpo, ops  # noqa: E402
from rlhf_trainer.config import METADATA_FILE, ConfigError, from_dict  # noqa: E402
from rlhf_trainer.runtime.failure import DataError, ModelError, NonFiniteGradients, Preempted  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer_support import sentiment_pairs, tiny_gpt2, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # trainer/conftest.py: one torch thread

WORDS = "the a cat dog sat ran on mat big red blue green small fast slow good and then".split()


# --- log-probs of the policy ----------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [True, False])
def test_head_on_response_tokens_equals_full_logits(recompute):
    """The chunked LM head over response positions only gives the log-probs and gradients of the full logits."""
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2,
                                                              n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                                              attn_pdrop=0.0))
    ids = torch.randint(0, 50, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 7:] = -100  # padding
    mask = (labels != -100) | (torch.arange(10) < 4)
    fast = dpo.SequenceLogProbs(lm, recompute_head=recompute, chunk_elements=50 * 5)  # chunks of 16 rows minimum
    fast.chunk_tokens = 4  # several chunks for 3 x 5 response positions
    assert fast.head_on_labels
    out = fast(ids, mask.long(), labels)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    ref = ops.sequence_logprobs(lm(input_ids=ids, attention_mask=mask.long()).logits, labels)
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for n, p in lm.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


# --- offline -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", sentiment_pairs(400))


def offline_cfg(make_cfg, minilm_path, data: Path, out: Path, training=None, **dpo_over):
    policy = {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)}
    return make_cfg("dpo", data, out, training={"batch_size": 16, "learning_rate": 1e-3, "seed": 1, **(training or {})},
                    dpo={"policy": policy, "beta": 0.1, **dpo_over})


def test_offline_dpo_learns_a_synthetic_preference_and_lr_zero_stays_at_chance(make_cfg, minilm_path, pairs_file,
                                                                                tmp_path):
    out = dpo.run(offline_cfg(make_cfg, minilm_path, pairs_file, tmp_path / "a", {"max_steps": 30, "learning_rate": 3e-3}))
    m = out["metrics"]
    assert m[c.M_DPO_EVAL_REWARD_ACCURACY] >= 0.95, m
    assert m[c.M_DPO_EVAL_MARGIN] > 0 and m[c.M_DPO_REWARDS_CHOSEN] > m[c.M_DPO_REWARDS_REJECTED]
    assert m[c.M_DPO_ROUND] == 0 and m[c.M_DPO_ROUNDS] == 0 and m[c.M_DPO_LOSS] == m[c.M_LOSS]
    meta = json.loads((tmp_path / "a" / "final" / METADATA_FILE).read_text())
    assert meta["stage"] == "dpo" and meta["steps"] == 30 and meta["eval_pairs"] == 80 and meta["loss"] == "sigmoid"
    # The export is a plain causal LM of the policy (the next stage loads it like an SFT output).
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final")
    assert reloaded.config.model_type == "gpt2"

    frozen = dpo.run(offline_cfg(make_cfg, minilm_path, pairs_file, tmp_path / "b",
                                 {"max_steps": 4, "learning_rate": 0.0}))["metrics"]
    assert frozen[c.M_DPO_EVAL_REWARD_ACCURACY] == 0.5 and frozen[c.M_DPO_EVAL_MARGIN] == 0.0


def test_offline_resume_is_exact(make_cfg, minilm_path, pairs_file, tmp_path, monkeypatch):
    """The reference log-probs are recomputed from the starting weights at every start, so a resumed run matches."""
    train = {"max_steps": 6, "batch_size": 8}
    straight = dpo.run(offline_cfg(make_cfg, minilm_path, pairs_file, tmp_path / "a", train))
    cfg = offline_cfg(make_cfg, minilm_path, pairs_file, tmp_path / "b", train)
    monkeypatch.setenv("RLHF_STOP_AT_STEP", "3")
    with pytest.raises(Preempted, match="at step 3 of 6"):
        dpo.run(cfg)
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    resumed = dpo.run(cfg)
    assert resumed["resumed_from"] == 3 and resumed["metrics"] == straight["metrics"]
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_whose_steps_are_all_skipped_fails_instead_of_succeeding(make_cfg, minilm_path, pairs_file, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("RLHF_INJECT_NONFINITE_GRADS", "policy:1")  # every gradient of the policy is NaN
    cfg = offline_cfg(make_cfg, minilm_path, pairs_file, tmp_path / "nan", {"max_steps": 6, "max_skipped_steps": 3})
    with pytest.raises(NonFiniteGradients, match="dpo stage, model policy: 3 consecutive optimizer steps skipped"):
        dpo.run(cfg)
    assert not (tmp_path / "nan" / "final").exists()


def format_rows(fmt: str) -> list[dict]:
    base = sentiment_pairs(24, seed=3)
    if fmt == "prompt_chosen_rejected":
        return base
    if fmt == "hh_rlhf":
        return [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
                 "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"} for r in base]
    if fmt == "ranked":  # 3 responses best first: 3 pairs per row
        return [{"prompt": r["prompt"], "responses": [r["chosen"], " the answer", r["rejected"]]} for r in base]
    return [row for i, r in enumerate(base) for row in (  # scored: grouped by prompt
        {"user_input": f"q{i} {r['prompt']}", "completion": r["chosen"], "score": 1.0},
        {"user_input": f"q{i} {r['prompt']}", "completion": r["rejected"], "score": 0.0})]


@pytest.mark.parametrize("fmt, loss, pairs_per_row", [
    ("prompt_chosen_rejected", "sigmoid", 1), ("hh_rlhf", "ipo", 1), ("ranked", "hinge", 3), ("scored", "sigmoid", 1),
])
def test_every_pair_format_trains(make_cfg, minilm_path, tmp_path, fmt, loss, pairs_per_row):
    data = write_jsonl(tmp_path / "data.jsonl", format_rows(fmt))
    cfg = offline_cfg(make_cfg, minilm_path, data, tmp_path / "run", {"max_steps": 2, "batch_size": 4, "eval_every": 1},
                      loss=loss)
    out = dpo.run(cfg)
    meta = json.loads((tmp_path / "run" / "final" / METADATA_FILE).read_text())
    assert meta["dataset_format"] == fmt and meta["loss"] == loss
    assert meta["train_pairs"] + meta["eval_pairs"] == 24 * pairs_per_row
    assert out["step"] == 2 and c.M_DPO_EVAL_REWARD_ACCURACY in out["metrics"]


# --- online --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A word tokenizer saved to disk and a JSONL file of 64 word prompts that never say "good"."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels

    root = tmp_path_factory.mktemp("dpo-world")
    tk = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(["<pad>", "</s>", *WORDS])}, unk_token="the"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(root / "tok")
    rnd = random.Random(0)
    write_jsonl(root / "prompts.jsonl",
                [{"prompt": " ".join(rnd.choice(WORDS[:-3]) for _ in range(rnd.randint(2, 5)))} for _ in range(64)])
    return root


def online_cfg(world: Path, out: Path, training=None, online=None, **over):
    policy = {"tokenizer_path": str(world / "tok"), "init_from_config": tiny_gpt2(dropout=0.0, n_positions=64)}
    return from_dict({
        "stage": "dpo",
        "dataset": {"path": str(world / "prompts.jsonl"), "eval_fraction": 0.0},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "seed": 1, "threads": 1, "lr_schedule": "constant",
                     **(training or {})},
        "dpo": {"policy": policy, "beta": 0.1,
                "online": {"rounds": 3, "prompts_per_round": 16, "samples_per_prompt": 4, "reward_fn": "count:good",
                           "max_new_tokens": 8, "max_prompt_length": 16, "epochs_per_round": 2.0, **(online or {})},
                **over},
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(out), "every_steps": 0},
        "metrics": {"port": 0},
    })


def round_pairs(out: Path, r: int) -> list[dict]:
    return [json.loads(x) for x in (out / "rounds" / f"{r:02d}" / "pairs.jsonl").read_text().splitlines()]


def test_online_rounds_raise_the_best_of_n_reward(world, tmp_path):
    out = dpo.run(online_cfg(world, tmp_path / "on"))
    best = [out["round_summaries"][r][c.M_DPO_BEST_REWARD_MEAN] for r in (1, 2, 3)]
    worst = [out["round_summaries"][r][c.M_DPO_WORST_REWARD_MEAN] for r in (1, 2, 3)]
    assert best[0] < best[1] < best[2], best
    assert all(b >= w for b, w in zip(best, worst, strict=True))
    assert out["step"] == 12 and out["rounds_generated"] == [1, 2, 3] and out["rounds_loaded"] == []
    assert out["metrics"][c.M_DPO_ROUND] == 3 and out["metrics"][c.M_DPO_ROUNDS] == 3
    # What was trained on is on the claim: chosen beats rejected by its score, counted by the rule itself.
    for r in (1, 2, 3):
        pairs = round_pairs(tmp_path / "on", r)
        summary = json.loads((tmp_path / "on" / "rounds" / f"{r:02d}" / "round.json").read_text())
        assert len(pairs) == summary["pairs"] == 16 - summary["skipped_groups"] > 0
        for p in pairs:
            assert p["chosen_score"] > p["rejected_score"]
            assert p["chosen_reward"] == p["chosen"].count("good") and p["rejected_reward"] == p["rejected"].count("good")
    # learning rate 0: the policy never changes, so the last round samples no better than the first did
    frozen = dpo.run(online_cfg(world, tmp_path / "off", training={"learning_rate": 0.0}))
    assert frozen["round_summaries"][3][c.M_DPO_BEST_REWARD_MEAN] < best[2] - 0.5


def test_online_resume_inside_a_round_is_exact_and_does_not_resample(world, tmp_path, monkeypatch):
    straight = dpo.run(online_cfg(world, tmp_path / "a"))
    cfg = online_cfg(world, tmp_path / "b")
    cfg.checkpoint.every_steps = 3  # online: every 2 steps (the largest divisor of 4), and each round's end
    monkeypatch.setenv("RLHF_STOP_AT_STEP", "7")  # round 2 is steps 5-8: stop after three of them
    with pytest.raises(Preempted, match="at step 7 of 12"):
        dpo.run(cfg)
    assert sorted(p.name for p in (tmp_path / "b" / "rounds").iterdir()) == ["01", "02"]
    pairs2 = tmp_path / "b" / "rounds" / "02" / "pairs.jsonl"
    before = (pairs2.read_bytes(), pairs2.stat().st_mtime_ns)
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    resumed = dpo.run(cfg)
    assert resumed["resumed_from"] == 7 and resumed["step"] == 12
    assert resumed["rounds_loaded"] == [2] and resumed["rounds_generated"] == [3]
    assert (pairs2.read_bytes(), pairs2.stat().st_mtime_ns) == before
    for r in (1, 2, 3):
        assert round_pairs(tmp_path / "a", r) == round_pairs(tmp_path / "b", r)
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["metrics"][c.M_DPO_LOSS] == resumed["metrics"][c.M_DPO_LOSS]


def test_online_scores_with_a_reward_model_on_its_saved_scale(world, tmp_path):
    """A reward-model directory scores the samples as PPO does (its own tokenizer, re-encoded text) and its saved
    statistics put the rewards on the normalised scale: reward = (score - mean) / std."""
    from rlhf_trainer import models
    from rlhf_trainer.config import ModelConfig

    tok = models.load_tokenizer(ModelConfig(path=str(world / "tok")))
    torch.manual_seed(3)
    rm = models.build_reward_model(ModelConfig(tokenizer_path=str(world / "tok"),
                                               init_from_config=tiny_gpt2(dropout=0.0, n_positions=64)), tok)
    stats = {"mean": 0.25, "std": 2.0, "n": 8}
    models.save_reward_model(rm, tok, tmp_path / "rm", stats, max_length=64)
    out = dpo.run(online_cfg(world, tmp_path / "run", online={"rounds": 1, "reward_fn": "",
                                                              "reward_model": {"path": str(tmp_path / "rm")}}))
    assert out["step"] == 4 and out["rounds_generated"] == [1]
    pairs = round_pairs(tmp_path / "run", 1)
    model, rm_tok, saved = models.load_reward_model(tmp_path / "rm")
    assert saved == stats and pairs
    for key in ("chosen", "rejected"):
        raw = models.score_responses(model, rm_tok, [p["prompt"] for p in pairs], [p[key] for p in pairs])
        expected = ((raw - 0.25) / 2.0).tolist()
        assert [p[f"{key}_reward"] for p in pairs] == pytest.approx(expected, abs=1e-4)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, where", [
    ({"online": {"rounds": 2, "reward_fn": ""}}, "dpo.online.reward_model"),
    ({"online": {"rounds": 2, "samples_per_prompt": 1}}, "dpo.online.samples_per_prompt"),
    ({"online": {"rounds": 2, "reward_fn": "length"}}, "dpo.online.reward_fn"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ({"label_smoothing": 0.5}, "dpo.label_smoothing"),
    ({"beta": 0.0}, "dpo.beta"),
    ({"loss": "kto"}, "dpo.loss"),
    ({"reference_mode": "each_round", "online": {"rounds": 0}}, "dpo.reference_mode"),
    ({"policy": {}}, "dpo.policy"),
])
def test_config_errors_name_the_field(world, tmp_path, change, where):
    online = change.pop("online", {})
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        online_cfg(world, tmp_path, online=online, **change)


def test_run_time_errors_name_the_cause(world, tmp_path):
    with pytest.raises(ConfigError, match=r"training\.max_steps: .* not a multiple of dpo\.online\.rounds"):
        dpo.run(online_cfg(world, tmp_path / "a", training={"max_steps": 10}))
    # a reward model path that holds no reward model (here: a tokenizer directory)
    with pytest.raises(ModelError, match="is not a reward model"):
        dpo.run(online_cfg(world, tmp_path / "b", online={"reward_fn": "", "reward_model": {"path": str(world / "tok")}}))
    # a scorer that never separates the samples: no pair to learn from, the run says so instead of "succeeding"
    with pytest.raises(DataError, match="round 1: .* equal scores, so there is no preference pair"):
        dpo.run(online_cfg(world, tmp_path / "c", online={"reward_fn": "count:zebra"}))
