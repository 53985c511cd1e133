"""Critic-free RL through the operator with the real trainer.

* the shipped GRPO example (examples/grpo: exact-match and format rules) runs to the end, its format reward rising;
* a reward endpoint (a stand-in HTTP server on 127.0.0.1, bearer token from a Secret) that fails now and then
  is retried and the run goes on; once it fails for good the trainer checkpoints and exits 8, the operator's
  restarted pod resumes from that checkpoint, fails the same way, and the job ends Failed with a condition
  naming the endpoint and its last error;
* an endpoint that refuses the request (401: wrong token) fails the job at once, reason RewardEndpointRefused.
"""

from __future__ import annotations

import base64
import copy
import json
import time

import pytest
import yaml
from e2e_helpers import (
    REPO,
    TINY_GPT2,
    assert_operator_healthy,
    conditions,
    create_configmap,
    logged_steps,
    pod_log,
    resumed_step,
    wait_phase,
)
from rlhf_operator.names import pod_name
from rlhf_trainer import contract as c
from support.reward_server import RewardServer

EXAMPLE = REPO / "examples" / "grpo"
TOKEN = "s3cret-token"


def example_job() -> dict:
    """The example's job, reading the tokenizer from this checkout (the node shares the filesystem)."""
    doc = yaml.safe_load((EXAMPLE / "grpo-arithmetic.yaml").read_text())
    actor = doc["spec"]["actor"]
    actor.pop("claim")
    actor["tokenizerPath"] = str(EXAMPLE / "tokenizer")
    doc["spec"]["training"]["threads"] = 1
    doc["spec"]["resources"] = {"gpus": 0}
    return doc


def prompts_configmap(jobs) -> None:
    create_configmap(jobs, "grpo-arithmetic", {"prompts.jsonl": (EXAMPLE / "prompts.jsonl").read_text()})


@pytest.mark.slow
def test_grpo_example_runs_through_the_operator(real_operator, jobs, cluster):
    prompts_configmap(jobs)
    doc = example_job()
    jobs.create("PPOJob", doc["metadata"]["name"], doc["spec"])
    st = wait_phase(jobs, "PPOJob", "arith-grpo", "Succeeded", 420)
    log = pod_log(cluster, jobs.ns, st["trainerPod"])
    rows = [json.loads(line) for line in log.splitlines() if line.startswith("{") and c.M_PPO_REWARD_MEAN in line]
    steps = doc["spec"]["training"]["maxSteps"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), log[-3000:]
    assert "critic: none - advantage estimator grpo" in log
    match, fmt = (f"{c.M_PPO_REWARD_SOURCE_MEAN}/{s}" for s in ("match", "format"))
    for r in rows:
        assert r[c.M_PPO_CRITIC_ENABLED] == 0.0 and c.M_PPO_VALUE_LOSS not in r
        assert r[c.M_PPO_REWARD_MEAN] == pytest.approx(r[match] + 0.5 * r[fmt])  # the weighted sum of the rules
        assert 0.0 <= r[c.M_PPO_ZERO_VARIANCE_GROUPS] <= 1.0 and r[c.M_PPO_KL_LOSS] >= 0.0
    first, last = (sum(r[fmt] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    assert last > first + 0.4, [round(r[fmt], 3) for r in rows]  # GRPO taught the answer format
    assert st["progress"]["reward"] == pytest.approx(rows[-1][c.M_PPO_REWARD_MEAN])
    assert_operator_healthy(real_operator)


class StandInReward(RewardServer):
    """A reward service: 1 when the response starts with the row's answer. Needs the bearer token. Fails
    every `flaky_every`-th request (503, once: the retry succeeds) and, once `down` is set, every request."""

    def __init__(self, flaky_every: int = 3):
        self.flaky_every, self.down = flaky_every, False
        self.flaky_failures, self.refused = 0, 0
        super().__init__(lambda response, fields: float(response.strip()[:1] == fields.get("answer")),
                         fail=self.fault, path="/v1/score")

    def fault(self, n: int, auth: str | None) -> int | None:
        if auth != f"Bearer {TOKEN}":
            self.refused += 1
            return 401
        if self.down:
            return 503
        if n % self.flaky_every == 0:
            self.flaky_failures += 1
            return 503
        return None


@pytest.fixture
def reward_server():
    srv = StandInReward()
    yield srv
    srv.close()


def endpoint_job(jobs, name: str, url: str, token: str, steps: int = 200) -> None:
    jobs.core.create_namespaced_secret(jobs.ns, {"metadata": {"name": f"{name}-token"},
                                                 "data": {"token": base64.b64encode(token.encode()).decode()}})
    spec = {
        "actor": {"initFromConfig": {**TINY_GPT2, "n_positions": 16}, "tokenizerPath": str(EXAMPLE / "tokenizer")},
        "dataset": {"configMap": {"name": "grpo-arithmetic", "key": "prompts.jsonl"}, "format": "prompt",
                    "evalFraction": 0.0},
        "reward": {"endpoint": {"url": url, "batchSize": 8, "maxInFlight": 2, "maxRetries": 2, "backoffSeconds": 0.05,
                                "maxBackoffSeconds": 0.1, "timeoutSeconds": 10,
                                "tokenSecret": {"name": f"{name}-token", "key": "token"}}},
        "ppo": {"advantageEstimator": "rloo", "samplesPerPrompt": 4, "rolloutBatchSize": 16, "minibatchSize": 16,
                "maxPromptLength": 8, "maxNewTokens": 2},
        "training": {"maxSteps": steps, "learningRate": 0.001, "threads": 1, "logEvery": 1},
        "deepspeed": {"enabled": False},
        "resources": {"gpus": 0},
        "checkpoint": {"everySteps": 100, "size": "1Gi"},  # only the checkpoint the endpoint failure writes
        "backoffLimit": 1,
    }
    jobs.create("PPOJob", name, copy.deepcopy(spec))


@pytest.mark.slow
def test_reward_endpoint_retried_then_failing_for_good_fails_the_job_naming_it(real_operator, jobs, cluster,
                                                                               reward_server):
    prompts_configmap(jobs)
    endpoint_job(jobs, "judge", reward_server.url, TOKEN)
    first = pod_name("PPOJob", "judge", 0)

    def progressed() -> bool:
        return len(logged_steps(pod_log(cluster, jobs.ns, first))) >= 4

    wait_phase(jobs, "PPOJob", "judge", "Running", 120)
    deadline = time.monotonic() + 240
    while not progressed() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert progressed(), pod_log(cluster, jobs.ns, first)[-3000:]
    assert reward_server.flaky_failures >= 1  # some requests failed and were retried; the run went on
    reward_server.down = True

    st = wait_phase(jobs, "PPOJob", "judge", "Failed", 300)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "BackoffLimitExceeded", failed
    assert f"reward endpoint {reward_server.url} failed 3 times in a row; last error: HTTP 503" in failed["message"]
    assert "exit code 8" in failed["message"] and TOKEN not in failed["message"]
    assert st["restartCount"] == 1
    before = logged_steps(pod_log(cluster, jobs.ns, first))
    second = pod_log(cluster, jobs.ns, pod_name("PPOJob", "judge", 1))
    assert resumed_step(second) == before[-1], second[-3000:]  # nothing lost: it resumed where the first stopped
    assert reward_server.refused == 0  # the token reached the endpoint (a Secret key mounted as a file)
    assert_operator_healthy(real_operator)


def test_reward_endpoint_refusing_the_request_fails_the_job_at_once(real_operator, jobs, cluster, reward_server):
    prompts_configmap(jobs)
    endpoint_job(jobs, "wrong-token", reward_server.url, "not-the-token", steps=4)
    st = wait_phase(jobs, "PPOJob", "wrong-token", "Failed", 180)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "RewardEndpointRefused", failed
    assert f"reward endpoint {reward_server.url} refused the request: HTTP 401" in failed["message"]
    # each of the iteration's two requests (batchSize 8 of 16 responses) was sent once: a refusal is never retried
    assert st.get("restartCount", 0) == 0 and reward_server.refused == 2
