"""ZeRO-3 generation: the actor's weights are gathered once per rollout, not layer by layer on every decode step
(DeepSpeed on the CPU with gloo, one process)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from rlhf_trainer.config import from_dict  # noqa: E402
from rlhf_trainer.ppo import left_pad  # noqa: E402
from rlhf_trainer.ppo_rollout import GenerationOptions, sample_responses  # noqa: E402
from rlhf_trainer.runtime.strategy import Strategy  # noqa: E402

VOCAB, PAD, EOS = 24, 0, 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]

pytestmark = pytest.mark.usefixtures("one_thread")


def generate(model):
    query, qmask = left_pad(PROMPTS, PAD)
    return sample_responses(model, query, qmask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                            temperature=1.3, generator=torch.Generator().manual_seed(4),
                            options=GenerationOptions(eos_check_every=4))


def test_zero3_generation_gathers_the_weights_once_and_training_goes_on_after(monkeypatch):
    cfg = from_dict({"stage": "sft", "model": {"path": "m"}, "dataset": {"path": "d"},
                     "training": {"batch_size": 3, "threads": 1, "learning_rate": 1e-3},
                     # partition even this tiny model's weights (small ones stay whole by default)
                     "deepspeed": {"enabled": True, "zero_stage": 3,
                                   "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}})
    strategy = Strategy(cfg).setup()  # the process group stays for later tests, as the stages leave it
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    plain = copy.deepcopy(model).eval()
    engine = strategy.prepare(model, 1e-3, 10)
    module = strategy.unwrap(engine)
    assert all(p.numel() == 0 for p in module.parameters()), "ZeRO-3 keeps only partitions outside generation"

    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    fetches = []
    original = coordinator.fetch_sub_module
    monkeypatch.setattr(coordinator, "fetch_sub_module",
                        lambda *a, **k: (fetches.append(1), original(*a, **k))[1])

    module.eval()
    generate(module)  # the old way: every forward of every decode step fetches every layer
    per_step = len(fetches)
    assert per_step > 0

    fetches.clear()
    with strategy.gathered_for_generation(engine) as actor:
        assert actor is module
        assert all(p.numel() > 0 for p in actor.parameters()), "all weights in place for the whole rollout"
        got = generate(actor)
    assert fetches == [], "no per-layer fetch while generating"
    want = generate(plain)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(p.numel() == 0 for p in module.parameters()), "partitioned again afterwards"

    # The module hooks are back: a training step gathers, updates and re-partitions as before.
    engine.train()
    ids = torch.tensor([[5, 6, 7, 8]] * 3)
    before = [p.ds_tensor.clone() for p in module.parameters()]
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    assert fetches, "training forwards fetch through the hooks again"
    assert any(not torch.equal(b, p.ds_tensor) for b, p in zip(before, module.parameters(), strict=True))
