"""The operator checks a spec with the trainer's own cross-field rules (rlhf_trainer.config), named as spec fields."""

from __future__ import annotations

from op_helpers import job
from rlhf_operator import builders, jobspec, ppo_spec
from rlhf_operator.crd_schema import spec_path
from rlhf_operator.settings import Settings
from rlhf_trainer import config as tc


def test_deepspeed_rules_are_the_trainers_named_as_spec_fields():
    spec = {**job("SFTJob")["spec"], "deepspeed": {"offloadParams": True, "zeroStage": 2, "bf16": True, "fp16": True}}
    trainer = tc.deepspeed_errors(tc.DeepSpeedConfig(zero_stage=2, offload_params=True, bf16=True, fp16=True))
    assert trainer == ["deepspeed: bf16 and fp16 are both true; choose one",
                       "deepspeed.offload_params: offload_params needs deepspeed.zero_stage 3, got 2; set zero_stage "
                       "to 3 or turn offload_params off"]
    assert [e for e in jobspec.validate("SFTJob", "j", spec) if e.startswith("spec.deepspeed")] == [
        "spec.deepspeed: bf16 and fp16 are both true; choose one",
        "spec.deepspeed.offloadParams: offloadParams needs spec.deepspeed.zeroStage 3, got 2; set zeroStage to 3 or "
        "turn offloadParams off"]


def test_ppo_rules_use_the_trainers_defaults():
    """No default is repeated in the operator: an unset rolloutBatchSize is the trainer's default."""
    default = tc.PPOConfig().rollout_batch_size
    spec = {**job("PPOJob")["spec"], "ppo": {"minibatchSize": default + 1}}
    assert f"spec.ppo.minibatchSize: {default + 1} is larger than spec.ppo.rolloutBatchSize ({default}); make it " \
           "smaller or equal" in jobspec.validate("PPOJob", "p", spec)
    assert not hasattr(ppo_spec, "DEFAULT_ROLLOUT")
    view = ppo_spec.config_view(spec)
    assert jobspec.validate("PPOJob", "p", spec) == tc.ppo_errors(view, spec_path)


def test_a_spec_of_the_wrong_type_leaves_the_rules_to_the_trainers_parser():
    spec = {**job("PPOJob")["spec"], "ppo": {"minibatchSize": "many"}}
    assert ppo_spec.config_view(spec) is None and jobspec.validate("PPOJob", "p", spec) == []
    try:
        builders.render_config(job("PPOJob", spec=spec), Settings())
    except tc.ConfigError as e:
        assert str(e).startswith("spec.ppo.minibatchSize: expected an integer")
    else:
        raise AssertionError("render_config accepted a string batch size")
