"""SFT stage on the CPU: the response-only loss falls, packing works, the export generates."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import sft  # noqa: E402
from rlhf_trainer.config import METADATA_FILE  # noqa: E402
from rlhf_trainer.data.encoding import IGNORE_INDEX  # noqa: E402
from trainer_support import counting_examples, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", counting_examples(240))


def logged(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_lm_loss_sum_matches_a_hand_computed_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])  # position 0 is prompt; targets come from the previous logits
    total, n = sft.lm_loss_sum(logits, labels)
    lse0 = torch.logsumexp(logits[0, 0], 0)
    lse1 = torch.logsumexp(logits[0, 1], 0)
    expected = (lse0 - logits[0, 0, 1]) + (lse1 - logits[0, 1, 2])
    assert n == 2 and float(total) == pytest.approx(float(expected))


def test_sft_loss_falls_and_the_export_continues_the_pattern(make_cfg, sft_file, tmp_path, capsys):
    cfg = make_cfg("sft", sft_file, tmp_path / "sft",
                   training=dict(max_steps=60, batch_size=16, learning_rate=3e-3, warmup_steps=5, log_every=1,
                                 max_length=48), model={"init_from_config": {"model_type": "gpt2", "n_layer": 2,
                                                                             "n_head": 2, "n_embd": 64, "n_positions": 64}})
    out = sft.run(cfg)
    losses = [r[c.M_LOSS] for r in logged(capsys.readouterr().out) if c.M_LOSS in r]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    assert out["metrics"]["eval_loss"] < 1.0
    meta = json.loads((tmp_path / "sft" / "final" / METADATA_FILE).read_text())
    assert meta["stage"] == "sft" and meta["steps"] == 60 and meta["packing"] is False

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out["final_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(out["final_dir"])
    assert tok.pad_token_id != tok.eos_token_id
    prompt = [tok.cls_token_id, *tok("count from three:", add_special_tokens=False)["input_ids"]]
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, len(prompt):], skip_special_tokens=True).startswith("three four five six seven")


def test_packing_trains_on_fewer_longer_sequences(make_cfg, sft_file, tmp_path, capsys):
    cfg = make_cfg("sft", sft_file, tmp_path / "packed", sft={"packing": True},
                   training=dict(max_steps=25, batch_size=4, learning_rate=3e-3, log_every=1, max_length=64))
    out = sft.run(cfg)
    records = logged(capsys.readouterr().out)
    losses = [r[c.M_LOSS] for r in records if c.M_LOSS in r]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    # Examples are ~14 tokens: four fit in a 64-token sequence, so a step of 4 sequences covers ~16 examples.
    assert json.loads((tmp_path / "packed" / "final" / METADATA_FILE).read_text())["packing"] is True
    assert out["metrics"]["eval_loss"] < losses[0]
