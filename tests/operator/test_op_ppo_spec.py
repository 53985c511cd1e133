"""PPOJob specifics: the advantage estimator against critic and groups, the reward sources, and the
reward endpoint's token Secret mounted as a file (pure functions: rules, rendered config, pod)."""

from __future__ import annotations

import pytest
from op_helpers import job
from rlhf_operator import builders, grants, jobspec, ppo_spec
from rlhf_operator.settings import Settings

S = Settings()
RULE = {"match": {"field": "answer", "extract": r"(\d+)"}}


def spec_with(**over):
    spec = {"actor": {"fromJob": {"name": "sft"}}, "dataset": {"path": "/data/prompts.jsonl"}}
    spec.update(over)
    return spec


@pytest.mark.parametrize("over, needle", [
    ({"ppo": {"advantageEstimator": "grpo"}, "reward": RULE},
     "spec.ppo.samplesPerPrompt: advantageEstimator grpo compares the responses to one prompt with each other and needs "
     "at least 2 per prompt, got 1"),
    ({"ppo": {"advantageEstimator": "rloo", "samplesPerPrompt": 1}, "reward": RULE}, "spec.ppo.samplesPerPrompt"),
    ({"ppo": {"advantageEstimator": "grpo", "samplesPerPrompt": 3}, "reward": RULE},
     "spec.ppo.rolloutBatchSize: 16 responses are not whole groups of spec.ppo.samplesPerPrompt (3)"),
    ({"ppo": {"samplesPerPrompt": 4, "rolloutBatchSize": 10}, "reward": RULE}, "spec.ppo.rolloutBatchSize: 10"),
    ({"ppo": {"advantageEstimator": "reinforce_plus_plus"}, "reward": RULE, "critic": {"path": "/c"}},
     "spec.critic: advantageEstimator reinforce_plus_plus uses no critic"),
    ({"ppo": {"advantageEstimator": "rloo", "samplesPerPrompt": 4, "criticLearningRate": 1e-5}, "reward": RULE},
     "spec.ppo.criticLearningRate: advantageEstimator rloo trains no critic"),
    ({}, "spec.rewardModel: set a reward model, or a reward source in spec.reward"),
    ({"reward": {"modelWeight": 0.5, **RULE}}, "spec.reward.modelWeight: there is no spec.rewardModel"),
    ({"ppo": {"rewardFn": "count:a"}, "reward": RULE}, "spec.ppo.rewardFn: cannot be combined with spec.reward (match)"),
    ({"reward": {**RULE, "endpoint": {"tokenSecret": {"name": "tok", "key": "t"}}}},
     "spec.reward.endpoint.tokenSecret: there is no spec.reward.endpoint.url"),
])
def test_contradicting_settings_are_refused_naming_the_fields(over, needle):
    errors = jobspec.validate("PPOJob", "p", spec_with(**over))
    assert any(needle in e for e in errors), errors


def test_critic_free_specs_without_a_reward_model_pass():
    spec = spec_with(ppo={"advantageEstimator": "grpo", "samplesPerPrompt": 4, "klInLoss": True}, reward=RULE)
    assert jobspec.validate("PPOJob", "p", spec) == []
    cfg, _ = builders.render_config(job("PPOJob", spec=spec), S)
    assert cfg.ppo.advantage_estimator == "grpo" and cfg.ppo.samples_per_prompt == 4 and cfg.ppo.kl_in_loss
    assert cfg.ppo.rewards.match.field == "answer" and cfg.ppo.rewards.sources() == ["match"]
    assert not cfg.ppo.reward_model.path and not cfg.ppo.critic.path
    # the trainer's parser finds the same contradictions, named as spec fields
    with pytest.raises(Exception, match=r"spec.ppo.samplesPerPrompt"):
        builders.render_config(job("PPOJob", spec={**spec, "ppo": {"advantageEstimator": "rloo"}}), S)


def test_reward_endpoint_token_is_one_secret_key_mounted_read_only_as_a_file():
    spec = spec_with(rewardModel={"fromJob": {"name": "rm"}}, reward={
        "modelWeight": 0.5,
        "endpoint": {"url": "https://judge.example/score", "weight": 2.0, "maxInFlight": 2, "timeoutSeconds": 5,
                     "tokenSecret": {"name": "judge-token", "key": "token"}}})
    assert jobspec.check("PPOJob", "p", spec, S) == []  # no allowSecretEnv needed: the field names its purpose
    assert grants.errors(spec, S) == []
    j = job("PPOJob", spec=spec)
    cfg, mounts = builders.render_config(j, S)
    e = cfg.ppo.rewards.endpoint
    assert (e.url, e.weight, e.max_in_flight, e.timeout_seconds) == ("https://judge.example/score", 2.0, 2, 5.0)
    assert e.token_file == f"{ppo_spec.REWARD_TOKEN_DIR}/token" and cfg.ppo.rewards.model_weight == 0.5
    pod = builders.build_pod(j, S, 0, 0, "h", mounts)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    secret = [v for v in vols.values() if "secret" in v]
    assert secret == [{"name": secret[0]["name"], "secret": {"secretName": "judge-token",
                                                              "items": [{"key": "token", "path": "token"}]}}]
    mount = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == secret[0]["name"]]
    assert mount == [{"name": secret[0]["name"], "mountPath": ppo_spec.REWARD_TOKEN_DIR, "readOnly": True}]
    env = pod["spec"]["containers"][0]["env"]
    assert not any("secretKeyRef" in (v.get("valueFrom") or {}) for v in env)  # never in the environment
    assert "token_file" not in str(spec) and "judge-token" not in cfg.to_yaml()
    bad = spec_with(reward={"endpoint": {"url": "http://x", "tokenSecret": {"name": "Bad_Name", "key": "a/b"}}})
    errors = jobspec.validate("PPOJob", "p", bad)
    assert any("tokenSecret.name: 'Bad_Name'" in x for x in errors) and any("tokenSecret.key: 'a/b'" in x for x in errors)
