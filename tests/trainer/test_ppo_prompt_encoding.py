"""PPO prompts are tokenised once per run (and cached on the claim), never inside an iteration."""

from __future__ import annotations

import pytest
from trainer_support import counting_examples, tiny_gpt2, write_jsonl

torch = pytest.importorskip("torch")

from rlhf_trainer import models, ppo  # noqa: E402
from rlhf_trainer.config import ModelConfig, from_dict  # noqa: E402
from rlhf_trainer.data.encoding import encode_prompt  # noqa: E402
from rlhf_trainer.data.formats import Record  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def ppo_cfg(tmp_path, minilm_path, **ppo_over):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in counting_examples(12)])
    return from_dict({
        "stage": "ppo", "dataset": {"path": str(prompts), "format": "prompt", "eval_fraction": 0.0},
        "training": {"max_steps": 3, "learning_rate": 1e-4, "threads": 1},
        "ppo": {"actor": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
                "reward_fn": "count:two", "rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 4,
                "max_prompt_length": 6, **ppo_over},
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 0}, "metrics": {"port": 0},
    })


def test_prompts_are_encoded_once_as_encode_prompt_does_and_read_back_from_the_cache(tmp_path, minilm_path,
                                                                                      monkeypatch):
    cfg = ppo_cfg(tmp_path, minilm_path)
    tok = models.load_tokenizer(ModelConfig(path=minilm_path))
    records = [Record(prompt=p, responses=()) for p in ("count from one:", "a much longer prompt than six tokens",
                                                          "count from one:", "")]
    want = {r: encode_prompt(tok, r.prompt, 6) for r in records}
    ids = ppo.encode_prompts(cfg, tok, records)
    assert ids == want
    assert len(ids[records[1]]) == 6  # cut from the left
    assert list((tmp_path / "run" / "cache" / "tokens").glob("prompts-*.safetensors"))

    def no_tokenizing(*a, **k):
        raise AssertionError("the tokenizer ran although the cache holds these prompts")

    monkeypatch.setattr(type(tok), "__call__", no_tokenizing)
    assert ppo.encode_prompts(cfg, tok, records) == ids


def test_no_prompt_is_tokenised_inside_the_ppo_iterations(tmp_path, minilm_path, monkeypatch):
    calls = []
    original = ppo.encode_prompt
    monkeypatch.setattr(ppo, "encode_prompt", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    result = ppo.run(ppo_cfg(tmp_path, minilm_path))
    assert result["step"] == 3
    assert calls == [], f"{len(calls)} prompts tokenised inside the iterations"
