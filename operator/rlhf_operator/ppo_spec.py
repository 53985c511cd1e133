"""PPOJob specifics: the rules across fields that the schema cannot express (the advantage estimator
against the critic and the group size; the reward sources) and the rendering of ``spec.reward``.

Pure functions. ``jobspec.validate`` calls :func:`errors`, so the webhook and the reconciler give the
same answer. The rules are the trainer's own (``rlhf_trainer.config.ppo_errors``, applied to the spec read as
the trainer's ``ppo`` section and named as spec fields); only the group-size and reward_fn messages keep an
operator wording here, and the rules about Kubernetes objects (the token Secret) are the operator's.

The reward endpoint's bearer token is one key of a Secret the user names in
``spec.reward.endpoint.tokenSecret``: it is mounted read-only as a file (never an environment variable,
which `spec.env` secretKeyRef would need ``trainer.allowSecretEnv`` for) and the trainer sends it only
to ``spec.reward.endpoint.url``. Naming it there is the user's consent for that one use.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rlhf_trainer import config as tc
from rlhf_trainer.config import GROUP_ESTIMATORS

from rlhf_operator.crd_schema import CONFIGMAP_KEY_PATTERN, OBJECT_NAME_PATTERN, camel, spec_path

REWARD_SOURCES = ("endpoint", "match", "length", "format")
REWARD_TOKEN_DIR = "/var/run/secrets/rlhf.io/reward-endpoint"  # the token Secret's key is the file `token` here
REWARD_TOKEN_FILE = "token"
_SECTIONS = {"endpoint": tc.RewardEndpointConfig, "match": tc.MatchRuleConfig, "length": tc.LengthRuleConfig,
             "format": tc.FormatRuleConfig}


def reward_sources(reward: dict[str, Any]) -> list[str]:
    """The sources of spec.reward that are set (besides the reward model)."""
    on = {
        "endpoint": bool((reward.get("endpoint") or {}).get("url")),
        "match": bool((reward.get("match") or {}).get("field")),
        "length": bool((reward.get("length") or {}).get("minChars") or (reward.get("length") or {}).get("maxChars")),
        "format": bool((reward.get("format") or {}).get("pattern")),
    }
    return [k for k in REWARD_SOURCES if on[k]]


def config_section(cls: type, section: Any) -> Any:
    """A camelCase spec section as the trainer's dataclass (defaults filled in), for the trainer's own cross-field
    rules; None when a value has the wrong type or name (the trainer's parser names it when the config is rendered)."""
    try:
        return tc.parse_section(cls, _snake(cls, section if isinstance(section, dict) else {}), "")
    except tc.ConfigError:
        return None


def config_view(spec: dict[str, Any]) -> tc.PPOConfig | None:
    """spec.ppo, spec.reward and which model roles are set, as the trainer's ``ppo`` section."""
    view = config_section(tc.PPOConfig, spec.get("ppo"))
    rewards = config_section(tc.RewardSourcesConfig, render_reward(spec.get("reward") or {})[0])
    if view is None or rewards is None:
        return None
    view.rewards = rewards
    for role, key in (("critic", "critic"), ("rewardModel", "reward_model")):
        if spec.get(role):  # only whether it is set matters to the rules
            setattr(view, key, tc.ModelConfig(path=f"spec.{role}"))
    return view


def errors(spec: dict[str, Any]) -> list[str]:
    ppo = spec.get("ppo") or {}
    reward = spec.get("reward") or {}
    out: list[str] = []
    view = config_view(spec)
    if view is None:
        return out
    est, k = view.advantage_estimator, view.samples_per_prompt
    if est in GROUP_ESTIMATORS and k < 2:  # worded for the spec; config.validate_ppo has the trainer's wording
        out.append(f"spec.ppo.samplesPerPrompt: advantageEstimator {est} compares the responses to one prompt with "
                   f"each other and needs at least 2 per prompt, got {k}; set samplesPerPrompt >= 2 (e.g. 4)")
    out += tc.ppo_errors(view, spec_path)  # the trainer's rules, named as spec fields
    sources = reward_sources(reward)
    if "modelWeight" in reward and not spec.get("rewardModel"):
        out.append("spec.reward.modelWeight: there is no spec.rewardModel to weigh; remove it or set spec.rewardModel")
    if ppo.get("rewardFn") and sources:
        out.append(f"spec.ppo.rewardFn: cannot be combined with spec.reward ({', '.join(sources)}); use the rules of "
                   "spec.reward instead")
    endpoint = reward.get("endpoint") or {}
    secret = endpoint.get("tokenSecret")
    if isinstance(secret, dict):
        if not endpoint.get("url"):
            out.append("spec.reward.endpoint.tokenSecret: there is no spec.reward.endpoint.url to send it to; set url "
                       "or remove tokenSecret")
        name, key = secret.get("name"), secret.get("key")
        if isinstance(name, str) and not re.match(OBJECT_NAME_PATTERN, name):
            out.append(f"spec.reward.endpoint.tokenSecret.name: {name!r} is not a valid Secret name")
        if isinstance(key, str) and not re.match(CONFIGMAP_KEY_PATTERN, key):
            out.append(f"spec.reward.endpoint.tokenSecret.key: {key!r} is not a Secret key "
                       "(letters, digits, '-', '_', '.')")
    return out


def _snake(cls: type, section: dict[str, Any]) -> dict[str, Any]:
    names = {camel(f.name): f.name for f in dataclasses.fields(cls)}
    return {names.get(k, k): v for k, v in section.items()}  # unknown keys pass: the trainer's parser names them


def render_reward(reward: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[dict[str, Any], str]]]:
    """spec.reward -> (the trainer's ``ppo.rewards`` dict, [(pod volume source, mount path)])."""
    out: dict[str, Any] = {}
    volumes: list[tuple[dict[str, Any], str]] = []
    for key, value in reward.items():
        if key in _SECTIONS and isinstance(value, dict):
            section = _snake(_SECTIONS[key], {k: v for k, v in value.items() if k != "tokenSecret"})
            secret = value.get("tokenSecret") if key == "endpoint" else None
            if isinstance(secret, dict):
                volumes.append(({"secret": {"secretName": secret["name"],
                                            "items": [{"key": secret["key"], "path": REWARD_TOKEN_FILE}]}},
                                REWARD_TOKEN_DIR))
                section["token_file"] = f"{REWARD_TOKEN_DIR}/{REWARD_TOKEN_FILE}"
            out[key] = section
        else:
            out[{"modelWeight": "model_weight"}.get(key, key)] = value
    return out, volumes
