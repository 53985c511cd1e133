"""Value rules of the trainer configuration: bounds from the fields' metadata, cross-field rules in validate."""

from __future__ import annotations

import pytest
from rlhf_trainer.config import ConfigError, from_dict

PPO = {"stage": "ppo", "dataset": {"path": "/d"}, "ppo": {"actor": {"path": "/a"}, "reward_fn": "count:a"}}


def ppo(**over):
    return from_dict({**PPO, "ppo": {**PPO["ppo"], **over}})


def test_temperature_and_endpoint_timeout_need_only_be_positive():
    """The schema's exclusive minimum of 0 is the rule: the trainer used to want >= 1e-6 and >= 1e-3 and so
    failed at start-up on specs the API server had accepted."""
    cfg = ppo(temperature=1e-7, reward_fn="", rewards={"endpoint": {"url": "http://judge", "timeout_seconds": 1e-4}})
    assert cfg.ppo.temperature == 1e-7 and cfg.ppo.rewards.endpoint.timeout_seconds == 1e-4
    with pytest.raises(ConfigError, match=r"^ppo\.temperature: must be > 0, got 0\.0$"):
        ppo(temperature=0)
    with pytest.raises(ConfigError, match=r"^ppo\.rewards\.endpoint\.timeout_seconds: must be > 0, got 0\.0$"):
        ppo(reward_fn="", rewards={"endpoint": {"url": "http://judge", "timeout_seconds": 0}})


def test_maximums_hold_for_a_config_run_by_hand():
    with pytest.raises(ConfigError, match=r"^training\.max_steps: must be <= 10000000, got 10000001$"):
        from_dict({**PPO, "training": {"max_steps": 10_000_001}})
    with pytest.raises(ConfigError, match=r"^metrics\.port: must be <= 65535, got 70000$"):
        from_dict({**PPO, "metrics": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"^deepspeed\.zero_stage: must be <= 3, got 4$"):
        from_dict({**PPO, "deepspeed": {"zero_stage": 4}})


def test_a_pattern_error_says_what_the_pattern_wants():
    with pytest.raises(ConfigError, match=r"^ppo\.rewards\.endpoint\.url: 'ftp://x' must start with http:// or "):
        ppo(reward_fn="", rewards={"endpoint": {"url": "ftp://x"}})
