"""Reward sources of PPO: the verifiable rules, the HTTP reward endpoint (a real server on 127.0.0.1)
and their weighted sum."""

from __future__ import annotations

import pytest
from support.reward_server import RewardServer, scripted

torch = pytest.importorskip("torch")

from rlhf_trainer import contract  # noqa: E402
from rlhf_trainer.config import ConfigError, RewardEndpointConfig, from_dict  # noqa: E402
from rlhf_trainer.data.formats import Record  # noqa: E402
from rlhf_trainer.ppo_scorers import WeightedScorer  # noqa: E402
from rlhf_trainer.reward_endpoint import EndpointScorer, RewardEndpointError, backoff_delays  # noqa: E402
from rlhf_trainer.reward_rules import FormatRule, LengthRule, MatchRule, RuleScorer  # noqa: E402
from rlhf_trainer.runtime.failure import DataError  # noqa: E402


def rec(prompt="2+3=", **fields) -> Record:
    return Record(prompt, (), fields=tuple((k, str(v)) for k, v in fields.items()), source="prompts.jsonl:7")


# --- rules ---------------------------------------------------------------------------------------


def test_match_rule_exact_with_extract_and_regex_mode():
    exact = MatchRule("answer", "exact", r"(-?\d+)\s*$")
    assert exact(rec(answer="5"), "the sum is 5") == 1.0
    assert exact(rec(answer="5"), "5 or maybe 6") == 0.0  # the last number counts
    assert exact(rec(answer="5"), "no number") == 0.0
    whole = MatchRule("answer")
    assert whole(rec(answer="New  York"), "  New York\n") == 1.0  # whitespace collapsed, nothing else
    assert whole(rec(answer="New York"), "new york") == 0.0
    regex = MatchRule("answer", "regex")
    assert regex(rec(answer=r"^(5|five)\b"), "five apples") == 1.0 and regex(rec(answer=r"^5$"), "15") == 0.0
    assert MatchRule("response")(Record("p", ("yes",)), "yes") == 1.0  # a prompt/response row's response
    with pytest.raises(DataError, match=r"prompts.jsonl:7: field 'answer' is missing.*this row has: solution"):
        whole(rec(solution="5"), "5")
    with pytest.raises(DataError, match="prompts.jsonl:7: field 'answer' is not a valid regular expression"):
        regex(rec(answer="(unclosed"), "x")


def test_length_and_format_rules():
    assert [LengthRule(2, 4)(rec(), s) for s in ("a", " ab ", "abcd", "abcde")] == [0.0, 1.0, 1.0, 0.0]
    assert LengthRule(0, 3)(rec(), "") == 1.0 and LengthRule(3, 0)(rec(), "a" * 1000) == 1.0
    fmt = FormatRule(r"Answer: \d+")
    assert fmt(rec(), " Answer: 42\n") == 1.0 and fmt(rec(), "Answer: 42 because") == 0.0
    assert FormatRule(r"<think>.*</think>.*")(rec(), "<think>a\nb</think> 3") == 1.0  # . spans lines
    out = RuleScorer(LengthRule(1, 2))([rec(), rec()], ["x", "xyz"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0]


def test_weighted_sum_keeps_each_source():
    class Model:
        stats = {"mean": 1.0, "std": 2.0}

        def __call__(self, records, responses):
            return torch.tensor([3.0] * len(responses))

    scorer = WeightedScorer([("model", 0.5, Model()), ("format", 2.0, RuleScorer(FormatRule("ok")))])
    out = scorer([rec(), rec()], ["ok", "no"])
    # the model's score on its saved scale: (3 - 1) / 2 = 1, weighted 0.5; the rule 1 or 0, weighted 2
    assert out.tolist() == pytest.approx([0.5 + 2.0, 0.5])
    assert scorer.last["model"].tolist() == pytest.approx([1.0, 1.0]) and scorer.last["format"].tolist() == [1.0, 0.0]


def test_rule_and_source_config_errors_name_the_field(tmp_path):
    base = {"stage": "ppo", "dataset": {"path": "p.jsonl"}, "ppo": {"actor": {"path": "a"}}}

    def cfg(**rewards):
        return from_dict({**base, "ppo": {**base["ppo"], "rewards": rewards}})

    assert cfg(format={"pattern": "x"}).ppo.rewards.sources() == ["format"]
    with pytest.raises(ConfigError, match=r"ppo.rewards.format.pattern: '\(' is not a valid regular expression"):
        cfg(format={"pattern": "("})
    with pytest.raises(ConfigError, match="ppo.rewards.match.extract"):
        cfg(match={"field": "answer", "extract": "[a"})
    with pytest.raises(ConfigError, match="ppo.rewards.length: min_chars .* max_chars"):
        cfg(length={"min_chars": 10, "max_chars": 5})
    with pytest.raises(ConfigError, match="ppo.rewards.endpoint.url: .* http:// or https://"):
        cfg(endpoint={"url": "ftp://x"})
    with pytest.raises(ConfigError, match="ppo.reward_model: .* or a reward source"):
        from_dict(base)
    with pytest.raises(ConfigError, match="ppo.reward_fn: .* cannot be combined with ppo.rewards"):
        from_dict({**base, "ppo": {**base["ppo"], "reward_fn": "count:a", "rewards": {"format": {"pattern": "a"}}}})


# --- the endpoint --------------------------------------------------------------------------------


@pytest.fixture()
def server_factory():
    made = []

    def make(**kw):
        plan = kw.pop("plan", None)
        made.append(RewardServer(lambda r, _f: float(len(r)), fail=scripted(plan or []), **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def scorer(url, tmp_path=None, token="", **over):
    cfg = RewardEndpointConfig(url=url, backoff_seconds=0.01, max_backoff_seconds=0.02, **over)
    if token:
        (tmp_path / "token").write_text(token + "\n")
        cfg.token_file = str(tmp_path / "token")
    slept: list[float] = []
    s = EndpointScorer(cfg, {"namespace": "ns", "name": "job"}, sleep=slept.append)
    return s, slept


def test_endpoint_batches_in_order_with_a_bound_on_requests_in_flight(server_factory, tmp_path):
    srv = server_factory(delay=0.2)
    s, _ = scorer(srv.url, tmp_path, token="s3cret", batch_size=2, max_in_flight=2)
    responses = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"]
    records = [rec(answer=i) for i in range(7)]
    out = s(records, responses)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0]
    assert len(srv.requests) == 4 and srv.max_in_flight == 2
    first = min(srv.requests, key=lambda r: r["body"]["responses"][0])["body"]
    assert first == {"prompts": ["2+3=", "2+3="], "responses": ["a", "bb"],
                     "fields": [{"answer": "0"}, {"answer": "1"}], "job": {"namespace": "ns", "name": "job"}}
    assert {r["auth"] for r in srv.requests} == {"Bearer s3cret"}


def test_endpoint_retries_with_exponential_backoff(server_factory):
    srv = server_factory(plan=[503, 429, "ok"])
    s, slept = scorer(srv.url, max_retries=3)
    assert s([rec()], ["xyz"]).tolist() == [3.0]
    assert slept == [0.01, 0.02] and s.retries == 2 and len(srv.requests) == 3
    assert backoff_delays(5, 1.0, 5.0) == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_endpoint_that_keeps_failing_is_retryable_and_names_the_endpoint(server_factory):
    srv = server_factory(plan=[500] * 10)
    s, slept = scorer(srv.url, max_retries=2)
    with pytest.raises(RewardEndpointError) as err:
        s([rec()], ["x"])
    assert not err.value.permanent and err.value.exit_code == contract.EXIT_REWARD_ENDPOINT_ERROR
    assert contract.EXIT_REWARD_ENDPOINT_ERROR not in contract.PERMANENT_EXIT_CODES
    assert f"reward endpoint {srv.url} failed 3 times in a row; last error: HTTP 500" in str(err.value)
    assert len(srv.requests) == 3 and len(slept) == 2


def test_endpoint_timeouts_and_refused_connections_are_retried(server_factory):
    srv = server_factory(delay=1.0)
    s, _ = scorer(srv.url, max_retries=1, timeout_seconds=0.2)
    with pytest.raises(RewardEndpointError, match="failed 2 times in a row; last error: .*timed out"):
        s([rec()], ["x"])
    dead = server_factory()
    url = dead.url
    dead.close()
    s, _ = scorer(url, max_retries=1)
    with pytest.raises(RewardEndpointError, match="last error: .*(refused|ConnectionRefused)") as err:
        s([rec()], ["x"])
    assert not err.value.permanent


@pytest.mark.parametrize(("plan", "answer", "why"), [
    ([401], None, "HTTP 401"),
    ([], {"rewards": [1.0]}, "1 rewards for 2 responses"),
    ([], {"scores": [1, 2]}, 'no "rewards" list'),
    ([], {"rewards": [1, "NaN"]}, r"rewards\[1\] is 'NaN'"),
])
def test_endpoint_answers_that_retrying_cannot_fix_are_permanent(server_factory, tmp_path, plan, answer, why):
    srv = server_factory(plan=plan, answer=answer)
    s, slept = scorer(srv.url, tmp_path, token="s3cret", max_retries=3)
    with pytest.raises(RewardEndpointError, match=why) as err:
        s([rec(), rec()], ["a", "b"])
    assert err.value.permanent and err.value.exit_code == contract.EXIT_REWARD_ENDPOINT_REFUSED
    assert contract.EXIT_REWARD_ENDPOINT_REFUSED in contract.PERMANENT_EXIT_CODES
    assert srv.url in str(err.value) and "s3cret" not in str(err.value)
    assert len(srv.requests) == 1 and slept == []
