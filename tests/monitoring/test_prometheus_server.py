"""A real Prometheus server scrapes three real trainer runs (reward model, PPO, online DPO: `python -m rlhf_trainer`)
and the real operator (`python -m rlhf_operator`, reconciling jobs on the embedded cluster) the way the
chart's PodMonitor and ServiceMonitor configure it, and loads the chart's alert rules. Every query of
the chart's Grafana dashboard and every alert expression evaluates without error, every per-job panel
has data for a job of its stage, and alerts fire with the labels of the job they are about."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
import tiny_runs
import yaml
from monitoring_helpers import ROOT, Monitoring, render_monitoring
from prometheus_server import Prometheus, PromQLError
from rlhf_operator import names
from support.polling import wait_for
from support.ports import free_port

pytestmark = pytest.mark.slow

JOBS = {"reward": ("team-a", "rm-hh"), "ppo": ("team-b", "ppo-hh"), "dpo": ("team-c", "dpo-hh")}  # -> (namespace, job)
STAGE_KINDS = {"reward": "RewardModelJob", "ppo": "PPOJob", "dpo": "DPOJob"}
PER_JOB_ROWS = {"Job progress", "Reward model", "PPO", "DPO"}
NO_DATA_EXPECTED = ("rlhf_dpo_eval_",)  # held-out DPO metrics: offline runs only (the DPO run here is online)
FLEET_ROW = "Fleet (operator)"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval (4 x interval, rounded up)
KL_THRESHOLD = 1e-6  # any PPO update moves the policy further than this from the reference
ALERT_VALUES = {"prometheusRule": {"alerts": {"klHigh": {"threshold": KL_THRESHOLD, "for": "0m"},
                                              "operatorDown": {"for": "0m"}}}}
STANDIN_TRAINER = ROOT / "tests" / "support" / "standin_trainer.py"


@dataclass
class Scraped:
    prom: Prometheus
    mon: Monitoring
    start: float
    end: float
    operator_namespace: str


def scrape_configs(mon: Monitoring, trainer_ports: dict[str, int], operator_port: int) -> list[dict]:
    """What prometheus-operator generates from the chart's PodMonitor and ServiceMonitor, with static
    targets in place of Kubernetes discovery (same target labels, honor_labels and paths)."""
    pm, svc = mon.pod_monitor, mon.operator_service
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    trainers = {
        "job_name": f"podMonitor/{pm['metadata']['namespace']}/{pm['metadata']['name']}/0",
        "honor_labels": endpoint["honorLabels"],
        "metrics_path": endpoint["path"],
        "static_configs": [
            {"targets": [f"127.0.0.1:{port}"],
             "labels": {"job": f"{pm['metadata']['namespace']}/{pm['metadata']['name']}",
                        "namespace": JOBS[stage][0], "pod": names.pod_name(STAGE_KINDS[stage], JOBS[stage][1], 0)}}
            for stage, port in trainer_ports.items()
        ],
    }
    operator = {
        "job_name": f"serviceMonitor/{svc['metadata']['namespace']}/{svc['metadata']['name']}/0",
        "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"],
                            "labels": {"job": svc["metadata"]["name"], "namespace": svc["metadata"]["namespace"]}}],
    }
    return [trainers, operator]


def _install_crds(k8s) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(k8s)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        try:
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        except client.ApiException as e:
            if e.status != 409:
                raise


def _standin_jobs() -> list[dict]:
    """Jobs for the operator: a chain (hand-off latency), one that fails once (a restart), one that fails."""
    def spec(**extra):
        return {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": 8},
                "checkpoint": {"everySteps": 3}, "backoffLimit": 2,
                "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.05"}, *extra.pop("env", [])], **extra}
    ppo = spec(actor={"fromJob": {"name": "sft"}}, rewardModel={"fromJob": {"name": "rm"}},
               ppo={"rolloutBatchSize": 4, "minibatchSize": 2})
    del ppo["model"]
    return [
        ("SFTJob", "sft", spec()),
        ("RewardModelJob", "rm", spec()),
        ("PPOJob", "ppo", ppo),
        ("SFTJob", "flaky", spec(env=[{"name": "STANDIN_FAIL_AT_STEP", "value": "3"},
                                      {"name": "STANDIN_FAIL_ONCE", "value": "1"}])),
        ("SFTJob", "broken", spec(env=[{"name": "STANDIN_EXIT_AT_START", "value": "3"}])),
    ]


@pytest.fixture(scope="module")
def scraped(cluster, k8s, tmp_path_factory):
    from kubernetes import client

    mon = render_monitoring(ALERT_VALUES)
    work = tmp_path_factory.mktemp("prometheus")
    ports = {stage: free_port() for stage in JOBS}
    configs = tiny_runs.write_configs(work, JOBS, ports)
    core, jobs = client.CoreV1Api(k8s), client.CustomObjectsApi(k8s)
    namespace = f"prom-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"rlhf.io/test": "1"}}})
    _install_crds(k8s)
    procs: list[subprocess.Popen] = []
    prom = None
    try:
        operator_port = free_port()
        env = {**cluster.env, "RLHF_WATCH_NAMESPACES": namespace, "RLHF_METRICS_PORT": str(operator_port),
               "RLHF_HEALTH_PORT": "0", "RLHF_RESYNC_SECONDS": "1", "RLHF_CHECKPOINT_SIZE": "1Gi",
               "RLHF_TRAINER_COMMAND": json.dumps([sys.executable, str(STANDIN_TRAINER)])}
        procs.append(subprocess.Popen([sys.executable, "-m", "rlhf_operator"], env=env, cwd=ROOT,
                                      stdout=open(work / "operator.log", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        prom = Prometheus(work, scrape_configs(mon, ports, operator_port), [mon.write_rules(work / "rules.yaml")]).start()
        start = time.time()
        trainers = {}
        for stage, path in configs.items():
            trainers[stage] = subprocess.Popen(
                [sys.executable, "-m", "rlhf_trainer", stage, "--config", str(path)], cwd=work,
                env={**os.environ, "RLHF_TERMINATION_LOG": str(work / f"{stage}.termination")},
                stdout=open(work / f"{stage}.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
            procs.append(trainers[stage])
        wait_for("the operator's metrics", lambda: prom.query("rlhf_operator_up == 1"), 60, 0.5)
        plurals = {"SFTJob": "sftjobs", "RewardModelJob": "rewardmodeljobs", "PPOJob": "ppojobs"}
        for kind, name, spec in _standin_jobs():
            jobs.create_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, plurals[kind], {
                "apiVersion": "rlhf.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})
        for stage, proc in trainers.items():
            try:
                rc = proc.wait(timeout=400)
            except subprocess.TimeoutExpired:
                rc = None
            assert rc == 0, f"{stage} trainer exited with {rc}:\n{(work / f'{stage}.log').read_text()[-3000:]}"

        def jobs_done():
            phases = [(jobs.get_namespaced_custom_object("rlhf.io", "v1alpha1", namespace, plurals[k], n)
                       .get("status") or {}).get("phase") for k, n, _ in _standin_jobs()]
            return all(p in ("Succeeded", "Failed") for p in phases) and phases
        wait_for("the operator's jobs to finish", jobs_done, 120, 0.5)
        time.sleep(4)  # the last scrapes and rule evaluations
        yield Scraped(prom, mon, start, time.time(), namespace)
    finally:
        if prom:
            prom.stop()
        for p in procs:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        core.delete_namespace(namespace)


def _panels_by_row(dashboard: dict) -> list[tuple[str, dict]]:
    row, out = "", []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        else:
            out.append((row, panel))
    return out


def grafana_expr(expr: str, namespace: str = "", job: str = "") -> str:
    """Grafana's variable interpolation for one selected namespace and job (DNS names: nothing to escape)."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", namespace).replace("$job", job)
    assert "$" not in expr, f"uninterpolated variable in {expr}"
    return expr


def _stages_of(expr: str) -> list[str]:
    if "rlhf_reward_" in expr:
        return ["reward"]
    if "rlhf_ppo_" in expr:
        return ["ppo"]
    if "rlhf_dpo_" in expr:
        return ["dpo"]
    return list(JOBS)


def _has_data(result: list[dict]) -> bool:
    return any(v != "NaN" for series in result for _, v in series["values"])


def test_the_trainers_and_the_operator_were_scraped_with_the_chart_labels(scraped):
    prom = scraped.prom
    for stage, (namespace, job) in JOBS.items():
        # honorLabels keeps the RLHF job's namespace and name (not exported_namespace / exported_job).
        result = prom.query_range(f'rlhf_trainer_step{{namespace="{namespace}", job="{job}", stage="{stage}"}}',
                                  scraped.start, scraped.end)
        assert _has_data(result), f"no samples of the {stage} trainer"
        steps = [float(v) for _, v in result[0]["values"]]
        assert steps[-1] > steps[0], f"the {stage} step did not advance while scraped: {steps}"
    assert not prom.query_range('{exported_job=~".+"}', scraped.start, scraped.end)
    svc = scraped.mon.operator_service["metadata"]
    assert prom.query(f'up{{job="{svc["name"]}", namespace="{svc["namespace"]}"}} == 1', scraped.end)


def test_dashboard_variables_list_the_jobs(scraped):
    prom, mon = scraped.prom, scraped.mon
    variables = {v["name"]: v for v in mon.dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables.keys()
    for name in ("namespace", "job"):
        definition = variables[name]["definition"]
        assert definition.startswith("label_values(") and definition.endswith(f", {name})"), definition
        selector = definition[len("label_values("):-len(f", {name})")]
        selector = selector.replace("$namespace", "|".join(ns for ns, _ in JOBS.values()))
        values = prom.api(f"label/{name}/values", **{"match[]": selector, "start": scraped.start, "end": scraped.end})
        expected = {ns for ns, _ in JOBS.values()} if name == "namespace" else {j for _, j in JOBS.values()}
        assert set(values) == expected, (name, values)


def test_every_dashboard_query_evaluates_and_per_job_panels_have_data(scraped):
    prom, mon = scraped.prom, scraped.mon
    problems, checked = [], 0
    panels = _panels_by_row(mon.dashboard)
    assert {row for row, _ in panels} == PER_JOB_ROWS | {FLEET_ROW}
    for row, panel in panels:
        for target in panel["targets"]:
            stages = _stages_of(target["expr"]) if row in PER_JOB_ROWS else [None]
            for stage in stages:
                expr = grafana_expr(target["expr"], *(JOBS[stage] if stage else ("", "")))
                try:
                    result = prom.query_range(expr, scraped.start, scraped.end)
                except PromQLError as e:
                    problems.append(f"{panel['title']}: {e}")
                    continue
                checked += 1
                if stage is None:
                    continue
                if not _has_data(result) and not any(m in expr for m in NO_DATA_EXPECTED):
                    problems.append(f"{row} / {panel['title']}: no data for the {stage} job: {expr}")
                leaked = {s["metric"].get("job") for s in result} - {JOBS[stage][1], None}
                if leaked:
                    problems.append(f"{panel['title']}: series of other jobs {leaked} for the {stage} job")
    assert not problems, "\n".join(problems)
    assert checked >= 40


def test_fleet_panels_show_the_operator_at_work(scraped):
    prom, mon = scraped.prom, scraped.mon
    by_title = {p["title"]: p for row, p in _panels_by_row(mon.dashboard) if row == FLEET_ROW}
    for title, panel in by_title.items():
        results = [prom.query_range(grafana_expr(t["expr"]), scraped.start, scraped.end) for t in panel["targets"]]
        assert any(_has_data(r) for r in results), f"{title}: no data from the operator"

    def last(title: str, target: int = 0) -> dict[str, float]:
        result = prom.query(grafana_expr(by_title[title]["targets"][target]["expr"]), scraped.end)
        return {r["metric"].get("kind"): float(r["value"][1]) for r in result}
    # Every kind's series exists from the operator's start, at zero until something happens ...
    assert last("Pod restarts") == {"SFTJob": 1.0, "RewardModelJob": 0.0, "PPOJob": 0.0, "DPOJob": 0.0}  # one failed once
    # ... so increase() over the run sees the first restart (a series born at 1 would show no increase).
    window = f"{int(scraped.end - scraped.start) + 5}s"
    increase = prom.query(f'sum(increase(rlhf_operator_pod_restarts_total{{kind="SFTJob"}}[{window}]))', scraped.end)
    assert increase and float(increase[0]["value"][1]) >= 0.5, increase
    handoff = last("Stage hand-off latency")  # mean: only kinds that had a hand-off (no 0/0)
    assert list(handoff) == ["PPOJob"] and 0 < handoff["PPOJob"] < 30
    phases = prom.query("sum by (kind, phase) (rlhf_operator_jobs) > 0", scraped.end)
    assert {(r["metric"]["kind"], r["metric"]["phase"], r["value"][1]) for r in phases} == {
        ("SFTJob", "Succeeded", "2"), ("SFTJob", "Failed", "1"), ("RewardModelJob", "Succeeded", "1"),
        ("PPOJob", "Succeeded", "1")}


def test_every_alert_expression_evaluates_on_the_server(scraped):
    prom, mon = scraped.prom, scraped.mon
    for rule in mon.rules:
        prom.query_range(rule["expr"], scraped.start, scraped.end)  # raises PromQLError with Prometheus's message
    loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert loaded.keys() == {r["alert"] for r in mon.rules}
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule.get("lastError"))


def _fired(prom, scraped, alert: str) -> list[dict]:
    result = prom.query_range(f'ALERTS{{alertname="{alert}", alertstate="firing"}}', scraped.start, scraped.end)
    return [s["metric"] for s in result]


def test_alerts_fire_for_the_job_they_are_about_and_only_then(scraped):
    prom = scraped.prom
    # The PPO run's KL rose above the (tiny) bound: the alert names that job.
    kl = prom.query_range(f"max(rlhf_ppo_kl) > {KL_THRESHOLD}", scraped.start, scraped.end)
    assert _has_data(kl), "the PPO run never moved away from its reference policy"
    assert {(a["namespace"], a["job"], a["stage"]) for a in _fired(prom, scraped, "RLHFKLDivergenceHigh")} == {
        (*JOBS["ppo"], "ppo")}
    # The job the stand-in failed on purpose (exit code 3) is reported by kind.
    assert {a["kind"] for a in _fired(prom, scraped, "RLHFJobFailed")} == {"SFTJob"}
    # The operator was scraped under the Service's job label all along, so it was never "down" once it
    # had been scraped; real losses stayed finite and did not explode.
    down = prom.query('ALERTS{alertname="RLHFOperatorDown", alertstate="firing"}', scraped.end)
    assert not down, down
    for alert in ("RLHFLossNotFinite", "RLHFLossExploding", "RLHFTrainingStalled"):
        assert not _fired(prom, scraped, alert), alert
