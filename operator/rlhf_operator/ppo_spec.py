"""PPOJob specifics: the rules across fields that the schema cannot express (the advantage estimator
against the critic and the group size; the reward sources) and the rendering of ``spec.reward``.

Pure functions. ``jobspec.validate`` calls :func:`errors`, so the webhook and the reconciler give the
same answer; the trainer's parser checks the same rules again (``rlhf_trainer.config.validate_ppo``).

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
from rlhf_trainer.config import CRITIC_FREE_ESTIMATORS, GROUP_ESTIMATORS

from rlhf_operator.crd_schema import CONFIGMAP_KEY_PATTERN, OBJECT_NAME_PATTERN, camel

DEFAULT_ROLLOUT = 16
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


def errors(spec: dict[str, Any]) -> list[str]:
    ppo = spec.get("ppo") or {}
    reward = spec.get("reward") or {}
    out: list[str] = []
    est = ppo.get("advantageEstimator", "gae")
    k = ppo.get("samplesPerPrompt", 1)
    rollout = ppo.get("rolloutBatchSize", DEFAULT_ROLLOUT)
    if est in GROUP_ESTIMATORS and isinstance(k, int) and k < 2:
        out.append(f"spec.ppo.samplesPerPrompt: advantageEstimator {est} compares the responses to one prompt with "
                   f"each other and needs at least 2 per prompt, got {k}; set samplesPerPrompt >= 2 (e.g. 4)")
    if isinstance(k, int) and isinstance(rollout, int) and k >= 1 and rollout % k:
        out.append(f"spec.ppo.rolloutBatchSize: {rollout} responses are not whole groups of spec.ppo.samplesPerPrompt "
                   f"({k}); use a multiple of {k}")
    if est in CRITIC_FREE_ESTIMATORS:
        if spec.get("critic"):
            out.append(f"spec.critic: advantageEstimator {est} uses no critic (none is loaded or trained); remove "
                       "spec.critic, or use advantageEstimator gae")
        if ppo.get("criticLearningRate"):
            out.append(f"spec.ppo.criticLearningRate: advantageEstimator {est} trains no critic; remove it, or use "
                       "advantageEstimator gae")
    sources = reward_sources(reward)
    if not spec.get("rewardModel") and not sources and not ppo.get("rewardFn"):
        out.append("spec.rewardModel: set a reward model, or a reward source in spec.reward (endpoint, match, length, "
                   "format)")
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
