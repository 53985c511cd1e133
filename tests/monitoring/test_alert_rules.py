"""The chart's alert rules under promtool: they load (`promtool check rules`), and each alert fires on the
series that should trigger it and stays quiet on healthy ones (`promtool test rules`, synthetic series on
Prometheus's own rule engine). Thresholds and windows come from the rendered values, so changing them
in values.yaml moves the test cases with them."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import yaml
from monitoring_helpers import Monitoring, duration_minutes, render_monitoring

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
JOB = {"namespace": "team-a", "job": "rm-hh", "stage": "reward"}
EXPECTED_ALERTS = {"RLHFJobFailed", "RLHFTrainingStalled", "RLHFLossNotFinite", "RLHFLossExploding",
                   "RLHFOptimizerStepsSkipped", "RLHFKLDivergenceHigh", "RLHFDPORewardAccuracyAtChance",
                   "RLHFOperatorDown"}


def _series(metric: str, labels: dict[str, str]) -> str:
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _go_float(value: float) -> str:
    """How Prometheus's templates print $value (Go's %v of a float64)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value == int(value) else repr(value)


def _expand(template: str, labels: dict[str, str], value: float) -> str:
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)
    return text.replace("{{ $value }}", _go_float(value))


def _expected(mon: Monitoring, alert: str, labels: dict[str, str], value: float) -> dict:
    rule = mon.rule(alert)
    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {k: _expand(v, labels, value) for k, v in rule["annotations"].items()},
    }


def _case(mon, name, alert, series, eval_minutes, fires=None, value=0.0):
    """One promtool test group: input series, one evaluation, the alerts expected then."""
    return {
        "name": name,
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [{
            "eval_time": f"{eval_minutes}m",
            "alertname": alert,
            "exp_alerts": [_expected(mon, alert, labels, value) for labels in (fires or [])],
        }],
    }


def alert_cases(mon: Monitoring) -> list[dict]:
    a = mon.values["prometheusRule"]["alerts"]
    op = {"job": mon.operator_service["metadata"]["name"], "namespace": mon.operator_service["metadata"]["namespace"]}
    step, total, loss = (_series(m, JOB) for m in ("rlhf_trainer_step", "rlhf_trainer_total_steps", "rlhf_trainer_loss"))
    window, wait = duration_minutes(a["trainingStalled"]["window"]), duration_minutes(a["trainingStalled"]["for"])
    at = window + wait + 5  # long enough for a stall to be detected and held for `for`
    n = at + 10
    kl = _series("rlhf_ppo_kl", {**JOB, "stage": "ppo"})
    kl_bound, kl_for = float(a["klHigh"]["threshold"]), duration_minutes(a["klHigh"]["for"])
    factor = float(a["lossExploding"]["factor"])
    ex_for = duration_minutes(a["lossExploding"]["for"])
    ex_window = duration_minutes(a["lossExploding"]["window"])
    ex_floor = float(a["lossExploding"]["minimum"])
    up = _series("up", {**op, "instance": "10.0.0.7:8080"})
    op_up = _series("rlhf_operator_up", {**op, "instance": "10.0.0.7:8080"})
    down_for = duration_minutes(a["operatorDown"]["for"])
    failed = _series("rlhf_operator_jobs", {**op, "kind": "PPOJob", "phase": "Failed"})
    running = _series("rlhf_operator_jobs", {**op, "kind": "PPOJob", "phase": "Running"})
    actor = {**JOB, "stage": "ppo", "model": "actor"}
    skipped = _series("rlhf_trainer_skipped_steps_total", actor)
    skip_window = duration_minutes(a["stepsSkipped"]["window"])
    dpo = {**JOB, "stage": "dpo"}
    dpo_acc, dpo_step = _series("rlhf_dpo_reward_accuracy", dpo), _series("rlhf_trainer_step", dpo)
    min_steps = int(a["dpoAtChance"]["minSteps"])
    dpo_for, dpo_window = duration_minutes(a["dpoAtChance"]["for"]), duration_minutes(a["dpoAtChance"]["window"])
    per_minute = max(min_steps // 10, 1)  # steps per minute: minSteps reached after 10 minutes
    dpo_at = 10 + dpo_for + 2
    dpo_n = dpo_at + dpo_window + 10
    return [
        # Training stalled.
        _case(mon, "flat step fires", "RLHFTrainingStalled", {step: f"5x{n}", total: f"100x{n}"}, at, [JOB]),
        _case(mon, "unknown total still stalls", "RLHFTrainingStalled", {step: f"5x{n}", total: f"0x{n}"}, at, [JOB]),
        _case(mon, "moving step is quiet", "RLHFTrainingStalled", {step: f"0+1x{n}", total: f"1000x{n}"}, at),
        _case(mon, "finished job is quiet", "RLHFTrainingStalled", {step: f"100x{n}", total: f"100x{n}"}, at),
        _case(mon, "younger than the window is quiet", "RLHFTrainingStalled",
              {step: f"_x{window} 5x{n}", total: f"_x{window} 100x{n}"}, window + window // 2),
        _case(mon, "stall detected before the for-duration is quiet", "RLHFTrainingStalled",
              {step: f"0+1x10 10x{n}", total: f"100x{n}"}, 10 + window + wait - 1),
        # NaN / Inf loss.
        _case(mon, "NaN loss fires", "RLHFLossNotFinite", {loss: "1 0.9 NaN NaN NaN"}, 4, [JOB], math.nan),
        _case(mon, "infinite loss fires", "RLHFLossNotFinite", {loss: "1 0.9 Inf Inf Inf"}, 4, [JOB], math.inf),
        _case(mon, "finite loss is quiet", "RLHFLossNotFinite", {loss: "1-0.01x10"}, 8),
        # Exploding loss.
        _case(mon, "loss jump fires", "RLHFLossExploding",
              {loss: f"{ex_floor}x{ex_window} {ex_floor * factor * 5}x{ex_for + 10}"}, ex_window + ex_for + 3, [JOB],
              ex_floor * factor * 5),
        _case(mon, "jump below the factor is quiet", "RLHFLossExploding",
              {loss: f"{ex_floor}x{ex_window} {ex_floor * factor * 0.8}x{ex_for + 10}"}, ex_window + ex_for + 3),
        _case(mon, "falling loss is quiet", "RLHFLossExploding", {loss: f"10-0.05x{ex_window + 20}"}, ex_window + 10),
        _case(mon, "relative jump of a near-zero loss is quiet", "RLHFLossExploding",
              {loss: f"{ex_floor / 100}x{ex_window} {ex_floor / 2}x{ex_for + 10}"}, ex_window + ex_for + 3),
        # Optimizer steps skipped (non-finite gradients).
        _case(mon, "a skipped step fires", "RLHFOptimizerStepsSkipped", {skipped: "0x5 1 2 2x10"}, 8, [actor]),
        _case(mon, "no skipped step is quiet", "RLHFOptimizerStepsSkipped", {skipped: f"0x{skip_window + 10}"},
              skip_window + 5),
        _case(mon, "skips older than the window are quiet", "RLHFOptimizerStepsSkipped",
              {skipped: f"0 1 1x{2 * skip_window + 10}"}, 2 * skip_window + 5),
        # KL above the bound.
        _case(mon, "KL above the bound fires", "RLHFKLDivergenceHigh",
              {kl: f"{kl_bound / 2}x10 {kl_bound * 2}x{kl_for + 10}"}, 10 + kl_for + 2, [{**JOB, "stage": "ppo"}],
              kl_bound * 2),
        _case(mon, "KL briefly above the bound is quiet", "RLHFKLDivergenceHigh",
              {kl: f"{kl_bound / 2}x10 {kl_bound * 2}x{kl_for + 10}"}, 10 + max(kl_for - 2, 0)),
        _case(mon, "KL below the bound is quiet", "RLHFKLDivergenceHigh", {kl: f"{kl_bound * 0.9}x{kl_for + 20}"},
              kl_for + 10),
        # DPO reward accuracy at chance.
        _case(mon, "DPO at chance after minSteps fires", "RLHFDPORewardAccuracyAtChance",
              {dpo_acc: f"0.5x{dpo_n}", dpo_step: f"0+{per_minute}x{dpo_n}"}, dpo_at, [dpo], 0.5),
        _case(mon, "DPO at chance before minSteps is quiet", "RLHFDPORewardAccuracyAtChance",
              {dpo_acc: f"0.5x{dpo_n}", dpo_step: f"{max(min_steps - 1, 0)}x{dpo_n}"}, dpo_at),
        _case(mon, "DPO learning is quiet", "RLHFDPORewardAccuracyAtChance",
              {dpo_acc: f"0.6+0.02x15 0.9x{dpo_n}", dpo_step: f"0+{per_minute}x{dpo_n}"}, dpo_at),
        _case(mon, "DPO that fell back to chance fires once the window forgets", "RLHFDPORewardAccuracyAtChance",
              {dpo_acc: f"0.9x10 0.25x{dpo_n}", dpo_step: f"0+{per_minute}x{dpo_n}"},
              10 + dpo_window + dpo_for + 2, [dpo], 0.25),  # 0.25: a mean of equal samples is exact in binary
        # Failed jobs.
        _case(mon, "a failed job fires", "RLHFJobFailed", {failed: "0x5 2x10", running: "3x15"}, 12, [{"kind": "PPOJob"}], 2),
        _case(mon, "running jobs are quiet", "RLHFJobFailed", {failed: "0x15", running: "3x15"}, 12),
        # Operator down.
        _case(mon, "failed scrape fires", "RLHFOperatorDown", {up: f"1x5 0x{down_for + 10}", op_up: "1x5"},
              5 + down_for + 2, [{**op, "instance": "10.0.0.7:8080"}]),
        _case(mon, "never scraped fires", "RLHFOperatorDown", {}, down_for + 2, [op], 1),
        _case(mon, "operator reporting not up fires", "RLHFOperatorDown",
              {up: f"1x{down_for + 10}", op_up: f"0x{down_for + 10}"}, down_for + 2, [{**op, "instance": "10.0.0.7:8080"}]),
        _case(mon, "healthy operator is quiet", "RLHFOperatorDown",
              {up: f"1x{down_for + 10}", op_up: f"1x{down_for + 10}"}, down_for + 2),
    ]


def _promtool(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_chart_ships_every_alert(monitoring):
    assert {r["alert"] for r in monitoring.rules} == EXPECTED_ALERTS
    for rule in monitoring.rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"prometheusRule": {"alerts": {
            "trainingStalled": {"window": "10m", "for": "2m"},
            "klHigh": {"threshold": 0.2, "for": "3m"},
            "lossExploding": {"factor": 4, "window": "20m", "for": "1m", "minimum": 0.5},
            "operatorDown": {"for": "1m"},
        }}},
    ],
    ids=["defaults", "custom-thresholds"],
)
def test_promtool_checks_and_unit_tests_the_rules(tmp_path, extra):
    mon = render_monitoring(extra)
    mon.write_rules(tmp_path / "rules.yaml")
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in check.stdout
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": alert_cases(mon)}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    run = _promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_rejects_a_broken_rule(tmp_path, monitoring):
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = yaml.safe_load(yaml.safe_dump(monitoring.groups))
    broken[0]["rules"][0]["expr"] = "max by (job (rlhf_trainer_step)"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": broken}))
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode != 0 and "parse error" in (check.stdout + check.stderr)


def test_disabled_alerts_are_left_out():
    mon = render_monitoring({"prometheusRule": {"alerts": {"klHigh": {"enabled": False}, "jobFailed": {"enabled": False}}}})
    assert {r["alert"] for r in mon.rules} == EXPECTED_ALERTS - {"RLHFKLDivergenceHigh", "RLHFJobFailed"}


def test_a_group_without_enabled_alerts_is_left_out(tmp_path):
    off = {name: {"enabled": False}
           for name in ("trainingStalled", "lossNotFinite", "lossExploding", "stepsSkipped", "klHigh", "dpoAtChance")}
    mon = render_monitoring({"prometheusRule": {"alerts": off}})
    assert [g["name"] for g in mon.groups] == ["rlhf-operator"]
    mon.write_rules(tmp_path / "rules.yaml")
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
