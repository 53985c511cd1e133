"""Numerics of mixed-precision training: PPO's left-padded forward gives finite gradients even under an
attention kernel that turns query rows without a visible key into NaN gradients (what fused bf16 kernels
do on GPUs), the plain-torch engine keeps fp32 master weights under bf16, and optimizer steps skipped for
non-finite gradients are counted and end the run (exit code 10) instead of passing silently."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer import ppo_rollout  # noqa: E402
from rlhf_trainer.config import from_dict  # noqa: E402
from rlhf_trainer.runtime import nonfinite  # noqa: E402
from rlhf_trainer.runtime.failure import NonFiniteGradients  # noqa: E402
from rlhf_trainer.runtime.strategy import Strategy, resolve_use_deepspeed  # noqa: E402
from trainer_support import counting_examples, run_cli, tiny_gpt2, write_jsonl  # noqa: E402

# --- a strict attention kernel -------------------------------------------------------------------


def strict_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as fused GPU kernels compute it: masked scores are -inf, a query row that sees no key
    outputs 0 (finite), but its softmax is 0/0, so the backward pass carries NaN into every weight."""
    lq, lk = query.shape[-2], key.shape[-2]
    mask = attention_mask
    if mask is None:  # no padding: transformers asks for a plain causal mask
        mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)[None, None]
    scores = (query.float() @ key.float().transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - scores.logsumexp(-1, keepdim=True))
    out = probs.to(value.dtype) @ value
    out = torch.where(~mask.any(-1, keepdim=True), torch.zeros((), dtype=out.dtype), out)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def strict_gpt2():
    from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("rlhf_test_strict", strict_attention)
    AttentionMaskInterface.register("rlhf_test_strict", sdpa_mask)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    model.set_attn_implementation("rlhf_test_strict")
    return model


def rollout_batch():
    """Prompts of 2, 5 and 6 tokens left-padded to 6 (as sample_responses gets them), responses of 4, 4
    and 2 tokens right-padded after EOS."""
    g = torch.Generator().manual_seed(1)
    query = torch.randint(3, 50, (3, 6), generator=g)
    query_mask = torch.ones_like(query)
    query_mask[0, :4] = 0
    query_mask[1, :1] = 0
    query = query.masked_fill(query_mask == 0, 0)
    response = torch.randint(3, 50, (3, 4), generator=g)
    response_mask = torch.ones_like(response)
    response_mask[2, 2:] = 0
    return query, query_mask, response.masked_fill(response_mask == 0, 0), response_mask


def test_left_padded_ppo_forward_has_finite_gradients_under_a_strict_attention_kernel(strict_gpt2):
    query, query_mask, response, response_mask = rollout_batch()
    strict_gpt2.zero_grad(set_to_none=True)
    logp, _ = ppo_rollout.response_logprobs(strict_gpt2, query, query_mask, response, response_mask)
    assert torch.isfinite(logp).all()
    (-(logp * response_mask).sum()).backward()
    bad = [n for n, p in strict_gpt2.named_parameters() if not torch.isfinite(p.grad).all()]
    assert bad == [], f"non-finite gradients in {bad}"


def test_ppo_logprobs_and_values_equal_those_of_each_row_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)).eval()
    query, query_mask, response, response_mask = rollout_batch()
    logp, _ = ppo_rollout.response_logprobs(model, query, query_mask, response, response_mask)
    for i in range(3):
        n, t = int(query_mask[i].sum()), int(response_mask[i].sum())
        ids = torch.cat([query[i, query.shape[1] - n:], response[i, :t]])[None]
        ref = torch.log_softmax(model(input_ids=ids).logits[0, n - 1:n - 1 + t].float(), -1)
        ref = ref.gather(-1, response[i, :t, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :t], ref, atol=1e-5, rtol=1e-5)


# --- fp32 master weights of the plain-torch engine -----------------------------------------------


def torch_engine(bf16: bool, lr: float, max_grad_norm: float = 1.0):
    cfg = from_dict({"stage": "sft", "model": {"path": "unused"}, "dataset": {"path": "unused"},
                     "training": {"learning_rate": lr, "max_grad_norm": max_grad_norm, "threads": 1},
                     "deepspeed": {"enabled": False, "bf16": bf16}, "metrics": {"port": 0}})
    strategy = Strategy(cfg).setup()
    model = torch.nn.Linear(8, 8, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    return strategy.prepare(model, lr, total_steps=1000)


def train_steps(engine, n: int) -> None:
    x = torch.ones(4, 8)
    for _ in range(n):
        y = engine(x.to(next(engine.module.parameters()).dtype))
        engine.backward(-y.float().mean())  # constant gradient direction: every weight grows
        engine.step()


def test_bf16_torch_engine_keeps_fp32_master_weights_so_small_updates_add_up():
    """lr 2e-5 moves a weight of 1.0 by 2e-5 per Adam step, far below bf16's spacing there (2**-7): with
    bf16 parameters stepped directly every update rounds away; with fp32 master weights 300 steps add up
    to 0.006 and the bf16 copy the model computes with follows."""
    engine = torch_engine(bf16=True, lr=2e-5)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    train_steps(engine, 300)
    weight = engine.module.weight.detach().float()
    assert (weight > 1.0).all(), weight.flatten()[:4]
    master = engine.state_dict()["master"][0]
    assert master.dtype == torch.float32 and float(master.mean()) == pytest.approx(1.0 + 300 * 2e-5, rel=1e-3)


# --- skipped steps -------------------------------------------------------------------------------


def test_torch_engine_skips_a_step_with_nonfinite_gradients_and_counts_it(monkeypatch):
    engine = torch_engine(bf16=True, lr=1e-2)
    before = engine.module.weight.detach().clone()
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:2:1")
    guard = nonfinite.StepGuard("sft", "policy", limit=3)
    x = torch.ones(4, 8, dtype=torch.bfloat16)
    assert guard.backward_step(engine, -engine(x).float().mean()) is True
    after_first = engine.module.weight.detach().clone()
    lr_before = engine.get_lr()[0]
    assert guard.backward_step(engine, -engine(x).float().mean()) is False  # poisoned: skipped
    assert torch.equal(engine.module.weight.detach(), after_first) and not torch.equal(after_first, before)
    assert engine.skipped_steps == 1 and engine.get_global_grad_norm() == float("inf")
    assert all(p.grad is None for p in engine.module.parameters())
    assert engine.get_lr()[0] == lr_before  # the schedule does not advance on a skipped step
    assert guard.backward_step(engine, -engine(x).float().mean()) is True  # and training goes on
    assert (guard.skipped, guard.consecutive, guard.steps) == (1, 0, 3)


def test_consecutive_skips_end_the_run_naming_stage_model_step_and_last_loss(monkeypatch):
    engine = torch_engine(bf16=False, lr=1e-2)
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:2")
    guard = nonfinite.StepGuard("sft", "policy", limit=3)
    x = torch.ones(4, 8)
    with pytest.raises(NonFiniteGradients) as e:
        for step in range(1, 10):
            guard.backward_step(engine, -engine(x).mean(), where=f"training step {step}")
    assert e.value.exit_code == c.EXIT_NONFINITE == 10
    message = str(e.value)
    assert message.startswith("sft stage, model policy: 3 consecutive optimizer steps skipped because the "
                              "gradients were NaN/Inf, up to policy optimizer step 4 (training step 4); last finite loss -")
    assert "training.max_skipped_steps (now 3)" in message


def test_default_limits_follow_the_stage():
    def cfg(stage, **training):
        extra = {"ppo": {"actor": {"path": "a"}, "reward_fn": "count:x", "rollout_batch_size": 128,
                         "minibatch_size": 32, "ppo_epochs": 2}} if stage == "ppo" else {}
        return from_dict({"stage": stage, "model": {"path": "m"}, "dataset": {"path": "d"},
                          "training": training, **extra})

    assert nonfinite.consecutive_limit(cfg("sft")) == 10
    assert nonfinite.consecutive_limit(cfg("ppo")) == 8  # one iteration: 2 epochs x 4 minibatches
    assert nonfinite.consecutive_limit(cfg("reward", max_skipped_steps=3)) == 3
    with pytest.raises(ValueError, match="MODEL:STEP"):
        nonfinite.parse_injection("policy", "policy")


def test_engine_choice_auto_is_plain_torch_on_one_process_without_zero_partitioning():
    def choose(world_size=1, **ds):
        cfg = from_dict({"stage": "sft", "model": {"path": "m"}, "dataset": {"path": "d"}, "deepspeed": ds})
        return resolve_use_deepspeed(cfg, world_size)

    assert choose() is False and choose(zero_stage=1, bf16=True) is False
    assert choose(zero_stage=2) is True and choose(zero_stage=1, offload_optimizer=True) is True
    assert choose(world_size=2) is True and choose(fp16=True) is True
    assert choose(enabled=True) is True and choose(enabled=False, zero_stage=3) is False


# --- through the command line --------------------------------------------------------------------


@pytest.fixture()
def sft_config(tmp_path, minilm_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", counting_examples(64))
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(tmp_path / "termination-log"))

    def build(**sections):
        config = {
            "stage": "sft",
            "model": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
            "dataset": {"path": str(data), "eval_fraction": 0.1},
            "training": {"max_steps": 8, "batch_size": 4, "max_length": 32, "threads": 1, "learning_rate": 1e-3},
            "deepspeed": {"enabled": False},
            "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 0},
            "metrics": {"port": 0},
        }
        for key, value in sections.items():
            config[key] = {**config[key], **value}
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return path

    return build


def test_skipped_steps_are_logged_and_reported_in_the_final_message(sft_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:3:2")
    assert run_cli(sft_config(training={"max_skipped_steps": 3})) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    skips = [x for x in lines if x.get("event") == "skipped_step"]
    assert [(x["model"], x["optimizer_step"], x["consecutive"]) for x in skips] == [("policy", 3, 1), ("policy", 4, 2)]
    final = json.loads((tmp_path / "termination-log").read_text())
    assert final[c.M_SKIPPED_STEPS] == 2 and final[c.M_STEP] == 8


@pytest.mark.parametrize("deepspeed", [False, True], ids=["torch", "deepspeed-zero2-bf16"])
def test_persistent_nonfinite_gradients_exit_8(sft_config, tmp_path, monkeypatch, deepspeed):
    monkeypatch.setenv(nonfinite.ENV_INJECT, "policy:2")
    ds = {"enabled": True, "zero_stage": 2, "bf16": True} if deepspeed else {"enabled": False, "bf16": True}
    assert run_cli(sft_config(deepspeed=ds, training={"max_skipped_steps": 2})) == c.EXIT_NONFINITE
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("non-finite gradients: sft stage, model policy: 2 consecutive optimizer steps "
                              "skipped because the gradients were NaN/Inf, up to policy optimizer step 3 (training "
                              "step 3); last finite loss "), message


def test_ppo_stops_after_one_iteration_of_skipped_actor_steps(tmp_path, minilm_path, monkeypatch, capsys):
    from rlhf_trainer import ppo

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in counting_examples(16)])
    cfg = from_dict({
        "stage": "ppo", "dataset": {"path": str(prompts), "format": "prompt", "eval_fraction": 0.0},
        "training": {"max_steps": 4, "learning_rate": 1e-4, "threads": 1},
        "ppo": {"actor": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2(dropout=0.0)},
                "reward_fn": "count:two", "rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 4,
                "max_prompt_length": 16},
        "deepspeed": {"enabled": False, "bf16": True},
        "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 0}, "metrics": {"port": 0},
    })
    monkeypatch.setenv(nonfinite.ENV_INJECT, "actor:2")
    with pytest.raises(NonFiniteGradients) as e:
        ppo.run(cfg)
    assert str(e.value).startswith("ppo stage, model actor: 2 consecutive optimizer steps skipped because the "
                                   "gradients were NaN/Inf, up to actor optimizer step 3 (PPO iteration 2)")
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    first = next(x for x in lines if x.get("step") == 1 and c.M_PPO_REWARD_MEAN in x)
    assert first[c.M_SKIPPED_STEPS] == 1  # iteration 1 logged its skipped second update


def test_padding_garbage_never_reaches_the_policy_loss_or_its_gradients():
    """Log-probs of pad tokens drift freely: exp() of a large difference is inf, and inf * 0 = NaN in a
    masked mean and in its gradient. Only real tokens may enter."""
    from rlhf_trainer import ops

    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -200.0]])  # the last (padding) position: exp(197) = inf
    adv = torch.tensor([[0.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = ops.policy_loss(logp, old, adv, mask)
    assert torch.isfinite(out.loss) and torch.isfinite(out.approx_kl)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert ops.masked_mean(torch.tensor([1.0, float("nan")]), torch.tensor([1, 0])) == 1.0
