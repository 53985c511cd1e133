"""Operator latency on the embedded cluster, against the API server's own speed in the same run.

A fresh ``localcluster.Cluster`` (own state directory), the project's CRDs, and a real operator
process (``python -m rlhf_operator``, default settings) whose trainer command is the stand-in
trainer (tests/support/standin_trainer.py). Measured, each from this process's watch streams
(pods and the three job kinds), stamped with one monotonic clock:

* floor: the round trip of creating a bare Pod (and its time to Running), one at a time and
  ``--burst`` at once;
* a single job, ``--singles`` times in a row: creation -> its pod created, and -> status Running;
* ``--burst`` jobs created at once (16 client threads): the same per job, p50/p95/p99, and the time
  until all are reconciled; the operator's peak RSS (psutil) while they live;
* stage hand-off, ``--handoffs`` times: a RewardModelJob's status Succeeded -> the dependent PPOJob's
  pod created (plus the operator's own rlhf_operator_stage_handoff_seconds);
* API requests per job over its life (creation to Succeeded): a second operator process talks to the
  API server through a counting proxy in this process; its idle request rate is subtracted. The API
  server's apiserver_request_total over the same window (all clients) is given next to it.

    python bench/operator_latency.py            # a few minutes on 2 cores
    python bench/operator_latency.py --quick    # smoke test size
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402
from _clusterwatch import (  # noqa: E402
    GROUP,
    PLURALS,
    VERSION,
    OperatorProcess,
    Recorder,
    kube_configuration,
    metric_delta,
    metric_samples,
    wait_until,
)
from _kubeproxy import CountingProxy, ca_file, proxied_kubeconfig  # noqa: E402
from rlhf_operator.names import pod_name  # noqa: E402

TARGETS = {"single_p50_vs_floor_max": 3.0, "burst_all_reconciled_s_max": 60.0, "handoff_s_max": 2.0}


# --- objects -------------------------------------------------------------------------------------

GPUS_PER_JOB = {"gpus": 1}  # set from --gpus


def job_body(kind: str, name: str, steps: int, step_seconds: float, **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"training": {"maxSteps": steps}, "checkpoint": {"everySteps": steps},
                         "resources": dict(GPUS_PER_JOB),
                         "dataset": {"path": "/etc/hostname"},
                         "env": [{"name": "STANDIN_STEP_SECONDS", "value": str(step_seconds)}], **spec}
    if kind != "PPOJob":
        s.setdefault("model", {"path": "/tmp"})
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": s}


def bare_pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"bench": "floor"}},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "120"]}]}}


# --- phases --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, cluster, work: Path, args: argparse.Namespace):
        from kubernetes import client

        self.cluster, self.work, self.args = cluster, work, args
        self.api = client.ApiClient(kube_configuration(cluster.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.co = client.CustomObjectsApi(self.api)
        run = uuid.uuid4().hex[:6]
        self.ns = {p: f"bench-{p}-{run}" for p in ("floor", "single", "handoff", "burst", "life")}

    def setup(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        ext = client.ApiextensionsV1Api(self.api)
        names = []
        for path in sorted((bl.REPO / "crds").glob("*.yaml")):
            obj = yaml.safe_load(path.read_text())
            names.append(obj["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(obj)
            except ApiException as e:
                if e.status != 409:
                    raise
        wait_until("CRDs Established", lambda: all(
            any(c.type == "Established" and c.status == "True" for c in (ext.read_custom_resource_definition(n).status.conditions or []))
            for n in names), 60, 0.2)
        for ns in self.ns.values():
            self.core.create_namespace({"metadata": {"name": ns}})
        # The default service account of a new namespace: pods need none (no token controller here).

    def cpu_snapshot(self, op: OperatorProcess) -> dict[str, float]:
        """CPU seconds so far of the operator, each control-plane process (the node agent with its pods)
        and the whole machine."""
        def cpu(p: psutil.Process, children: bool = False) -> float:
            try:
                procs = [p, *p.children(recursive=True)] if children else [p]
                return sum(t.user + t.system for t in (q.cpu_times() for q in procs))
            except psutil.Error:
                return 0.0

        out = {"operator": cpu(op.ps)}
        for rec in self.cluster.records():
            try:
                out[rec.role] = out.get(rec.role, 0.0) + cpu(psutil.Process(rec.pid), rec.role == "node-agent")
            except psutil.Error:
                continue
        total = psutil.cpu_times()
        out["machine"] = total.user + total.system + getattr(total, "nice", 0.0)
        return out

    def teardown(self) -> None:
        """Delete this run's namespaces (on a cluster that outlives the benchmark)."""
        for ns in self.ns.values():
            try:
                self.core.delete_namespace(ns)
            except Exception as e:  # noqa: BLE001 - best effort; report it
                print(f"[operator] could not delete namespace {ns}: {e}", file=sys.stderr)

    def create_job(self, ns: str, body: dict[str, Any]) -> float:
        t0 = time.monotonic()
        self.co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[body["kind"]], body)
        return t0

    # -- floor --

    def floor(self, rec: Recorder, n_seq: int, n_burst: int) -> dict[str, Any]:
        ns = self.ns["floor"]
        rtt, seen, running = [], [], []
        for i in range(n_seq):
            t0 = time.monotonic()
            self.core.create_namespaced_pod(ns, bare_pod(f"floor-{i}"))
            rtt.append(time.monotonic() - t0)
            wait_until(f"bare pod floor-{i} Running", lambda i=i: rec.pod_phase.get((ns, f"floor-{i}", "Running")), 60, 0.01)
            seen.append(rec.pod_added[(ns, f"floor-{i}")] - t0)
            running.append(rec.pod_phase[(ns, f"floor-{i}", "Running")] - t0)
        starts: dict[str, float] = {}
        burst_rtt: list[float] = []

        def create(i: int) -> None:
            name = f"floor-burst-{i}"
            t0 = time.monotonic()
            starts[name] = t0
            self.core.create_namespaced_pod(ns, bare_pod(name))
            burst_rtt.append(time.monotonic() - t0)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(n_burst)))
        wait_until(f"{n_burst} bare pods Running", lambda: all((ns, n, "Running") in rec.pod_phase for n in starts),
                   max(120, n_burst), 0.1)
        first = min(starts.values())
        burst_running = [rec.pod_phase[(ns, n, "Running")] - t for n, t in starts.items()]
        self.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
        return {
            "create_rtt_s": bl.summary(rtt), "create_to_watch_s": bl.summary(seen), "create_to_running_s": bl.summary(running),
            "burst": {"n": n_burst, "create_rtt_s": bl.summary(burst_rtt), "to_running_s": bl.summary(burst_running),
                      "all_running_s": max(rec.pod_phase[(ns, n, "Running")] for n in starts) - first},
        }

    # -- jobs --

    def singles(self, rec: Recorder, n: int) -> dict[str, Any]:
        ns = self.ns["single"]
        starts = {}
        for i in range(n):
            name = f"single-{i}"
            starts[name] = self.create_job(ns, job_body("SFTJob", name, steps=40, step_seconds=0.05))
            wait_until(f"SFTJob {name} Running", lambda name=name: rec.job_phase.get((ns, "SFTJob", name, "Running")), 60, 0.01)
            time.sleep(0.3)
        return {"n": n, **job_latencies(rec, ns, starts)}

    def burst(self, rec: Recorder, op: OperatorProcess, n: int) -> dict[str, Any]:
        ns = self.ns["burst"]
        starts: dict[str, float] = {}
        op.measure_peak(True)
        rss_before = op.rss_mib()

        def create(i: int) -> None:
            name = f"burst-{i:03d}"
            # Long-lived stand-ins that mostly sleep: the jobs stay live while the operator is measured.
            starts[name] = self.create_job(ns, job_body("SFTJob", name, steps=120, step_seconds=1.0))

        cpu0, t_cpu0, metrics0 = self.cpu_snapshot(op), time.monotonic(), op.metrics()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(n)))
        first = min(starts.values())
        timeout = max(180.0, 2.0 * n)
        wait_until(f"{n} trainer pods created", lambda: all(rec.job_pod_added(ns, j) for j in starts), timeout, 0.1)
        cpu1, t_cpu1 = self.cpu_snapshot(op), time.monotonic()
        metrics_text = op.metrics()
        wait_until(f"{n} jobs Running", lambda: all((ns, "SFTJob", j, "Running") in rec.job_phase for j in starts),
                   timeout, 0.1)
        time.sleep(min(15.0, 2.0 + n / 20))  # all jobs live for a while (200 jobs: > 1 resync period of 10 s)
        op.measure_peak(False)
        result = {
            "n": n, **job_latencies(rec, ns, starts),
            "all_pods_created_s": max(rec.job_pod_added(ns, j) for j in starts) - first,
            "all_running_s": max(rec.job_phase[(ns, "SFTJob", j, "Running")] for j in starts) - first,
            "operator_rss_before_mib": rss_before,
            "operator_peak_rss_mib": op.peak_rss_mib,
            # Where the CPU went from the first creation until every pod existed (2 cores: 2 CPU-s per s).
            "cpu_s_until_all_pods_created": {k: cpu1[k] - cpu0[k] for k in cpu0},
            "window_s": t_cpu1 - t_cpu0,
            "operator_reconciles": metric_delta(metrics0, metrics_text, "rlhf_operator_reconcile_total"),
            "operator_reconcile_seconds": metric_delta(metrics0, metrics_text,
                                                       "rlhf_operator_reconcile_duration_seconds_sum"),
        }
        self.co.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, "sftjobs")
        wait_until("burst pods gone", lambda: not self.core.list_namespaced_pod(ns).items, 180, 0.5)
        return result

    def handoffs(self, rec: Recorder, op: OperatorProcess, n: int) -> dict[str, Any]:
        ns = self.ns["handoff"]
        from_status, from_pod = [], []
        for i in range(n):
            rm, ppo = f"rm-{i}", f"ppo-{i}"
            self.create_job(ns, job_body("RewardModelJob", rm, steps=5, step_seconds=0.05))
            self.create_job(ns, job_body("PPOJob", ppo, steps=3, step_seconds=0.05, actor={"path": "/tmp"},
                                         rewardModel={"fromJob": {"name": rm}},
                                         ppo={"rolloutBatchSize": 4, "minibatchSize": 2}))
            wait_until(f"PPOJob {ppo} pod", lambda ppo=ppo: rec.job_pod_added(ns, ppo), 120, 0.01)
            done = rec.job_phase.get((ns, "RewardModelJob", rm, "Succeeded"))
            pod_done = rec.pod_phase.get((ns, pod_name("RewardModelJob", rm, 0), "Succeeded"))
            created = rec.job_pod_added(ns, ppo)
            if done is None:
                raise SystemExit(f"the PPOJob {ppo} got a pod before RewardModelJob {rm} was seen Succeeded")
            from_status.append(created - done)
            if pod_done is not None:
                from_pod.append(created - pod_done)
        samples = metric_samples(op.metrics(), "rlhf_operator_stage_handoff_seconds_sum")
        counts = metric_samples(op.metrics(), "rlhf_operator_stage_handoff_seconds_count")
        total, count = sum(v for _, v in samples), sum(v for _, v in counts)
        return {"n": n, "from_succeeded_status_s": bl.summary(from_status),
                "from_trainer_pod_succeeded_s": bl.summary(from_pod) if from_pod else None,
                "operator_metric_mean_s": total / count if count else None}

    def life(self, n: int, log_dir: Path) -> dict[str, Any]:
        """Requests of a second operator process, through the counting proxy, over the jobs' lives."""
        ns = self.ns["life"]
        proxy = CountingProxy(self.cluster.server, ca_file(self.cluster.kubeconfig, self.work))
        kubeconfig = proxied_kubeconfig(self.cluster.kubeconfig, proxy.start(), self.work)
        op = OperatorProcess(kubeconfig, [ns], log_dir / "operator-proxied.log").start()
        rec = Recorder(self.cluster.kubeconfig, [ns]).start()
        try:
            time.sleep(1.5 if self.args.quick else 3.0)  # start-up lists and watches settle
            idle0, t_idle = proxy.snapshot(), time.monotonic()
            time.sleep(2.0 if self.args.quick else 5.0)
            idle = proxy.snapshot() - idle0
            idle_rate = sum(idle.values()) / (time.monotonic() - t_idle)
            server0 = apiserver_requests(self.cluster)
            before, t0 = proxy.snapshot(), time.monotonic()
            names = [f"life-{i}" for i in range(n)]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda j: self.create_job(ns, job_body("SFTJob", j, steps=10, step_seconds=0.05)), names))
            wait_until(f"{n} jobs Succeeded", lambda: all((ns, "SFTJob", j, "Succeeded") in rec.job_phase for j in names),
                       max(120, 3 * n), 0.1)
            time.sleep(2.0)  # the last status writes and events after Succeeded
            window = time.monotonic() - t0
            used = proxy.snapshot() - before
            server = apiserver_requests(self.cluster) - server0
        finally:
            rec.stop()
            op.stop()
            proxy.stop()
        total = sum(used.values())
        by_kind = Counter()
        for (verb, resource), k in used.items():
            by_kind[f"{verb} {resource}"] += k
        return {
            "n": n, "window_s": window, "operator_requests": total, "idle_requests_per_s": idle_rate,
            "requests_per_job": (total - idle_rate * window) / n,
            "requests_per_job_by_type": {k: v / n for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "apiserver_requests_all_clients": server, "apiserver_requests_per_job_all_clients": server / n,
        }


def job_latencies(rec: Recorder, ns: str, starts: dict[str, float]) -> dict[str, Any]:
    """Per job: creation -> trainer pod created (operator) -> pod Running (scheduler, node agent) ->
    job status Running (operator again)."""
    pod = {j: rec.job_pod_added(ns, j) for j in starts}
    pod_running = {j: rec.pod_phase.get((ns, pod_name("SFTJob", j, 0), "Running")) for j in starts}
    running = {j: rec.job_phase[(ns, "SFTJob", j, "Running")] for j in starts}
    out = {"to_pod_created_s": bl.summary([pod[j] - t for j, t in starts.items()]),
           "to_running_s": bl.summary([running[j] - t for j, t in starts.items()])}
    seen = [j for j in starts if pod_running[j] is not None]
    if seen:
        out["pod_created_to_pod_running_s"] = bl.summary([pod_running[j] - pod[j] for j in seen])
        out["pod_running_to_job_running_s"] = bl.summary([running[j] - pod_running[j] for j in seen])
    return out


def apiserver_requests(cluster) -> float:
    status, body = cluster.get("/metrics", timeout=10)
    if status != 200:
        return float("nan")
    return sum(v for _, v in metric_samples(body, "apiserver_request_total"))


# --- driver --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    p.add_argument("--singles", type=int, default=None, help="single jobs created one after another")
    p.add_argument("--burst", type=int, default=None, help="jobs created at once")
    p.add_argument("--handoffs", type=int, default=None, help="RewardModelJob -> PPOJob chains")
    p.add_argument("--life", type=int, default=None, help="jobs whose API requests are counted")
    p.add_argument("--floor", type=int, default=None, help="bare pods created one after another for the floor")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/operator_latency[-quick].json)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs each job's trainer pod asks for (0: none)")
    p.add_argument("--cluster-dir", default=None,
                   help="use the running cluster in this state directory instead of starting a fresh one "
                        "(its nodes must fit --burst pods asking for --gpus each)")
    p.add_argument("--keep", action="store_true",
                   help="keep the state directory (operator logs, cluster state) afterwards (on failure the operator logs stay there anyway)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    q = args.quick
    pick = lambda v, quick, full: v if v is not None else (quick if q else full)  # noqa: E731
    sizes = {"singles": pick(args.singles, 2, 10), "burst": pick(args.burst, 5, 200),
             "handoffs": pick(args.handoffs, 1, 5), "life": pick(args.life, 3, 20), "floor": pick(args.floor, 3, 20)}
    from localcluster import Cluster

    GPUS_PER_JOB["gpus"] = args.gpus
    state = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    if args.cluster_dir:
        cluster, own = Cluster(args.cluster_dir), False
        if not cluster.running():
            raise SystemExit(f"--cluster-dir {args.cluster_dir}: no running cluster there")
        up_s = 0.0
    else:
        # One node with a GPU per burst job (trainer pods ask for one each) and room for all pods, so the
        # scheduler never queues a job: the latency measured is the operator's, not the node's capacity.
        node = f"bench-node-0:cpu=512,memory=4Ti,gpu={sizes['burst'] + 16},pods={3 * sizes['burst'] + 64}"
        cluster, own = Cluster(state / "cluster", name="rlhf-bench", nodes=[node]), True
        print(f"[operator] starting a fresh cluster in {cluster.state_dir} ...", file=sys.stderr, flush=True)
        up_s = cluster.up(watch_pid=os.getpid(), log=lambda m: print(m, file=sys.stderr))
    results: dict[str, Any] = {}
    bench = Bench(cluster, state, args)
    try:
        bench.setup()
        ns = bench.ns
        rec = Recorder(cluster.kubeconfig, [ns["floor"], ns["single"], ns["handoff"], ns["burst"]]).start()
        op = OperatorProcess(cluster.kubeconfig, [ns["single"], ns["handoff"], ns["burst"]],
                             state / "operator.log").start()
        try:
            print("[operator] floor: bare pods ...", file=sys.stderr, flush=True)
            results["floor"] = bench.floor(rec, sizes["floor"], sizes["burst"])
            print("[operator] single jobs ...", file=sys.stderr, flush=True)
            results["single"] = bench.singles(rec, sizes["singles"])
            print("[operator] stage hand-offs ...", file=sys.stderr, flush=True)
            results["handoff"] = bench.handoffs(rec, op, sizes["handoffs"])
            print(f"[operator] {sizes['burst']} jobs at once ...", file=sys.stderr, flush=True)
            results["burst"] = bench.burst(rec, op, sizes["burst"])
        finally:
            rec.stop()
            op.stop()
        print("[operator] API requests per job (proxied operator) ...", file=sys.stderr, flush=True)
        results["requests"] = bench.life(sizes["life"], state)
    finally:
        if own:
            cluster.down(purge=not args.keep, log=lambda _m: None)
        else:
            bench.teardown()
    report(results, sizes, up_s, args)
    if args.keep:
        print(f"state (operator logs, cluster) kept in {state}")
    else:
        shutil.rmtree(state, ignore_errors=True)
    return 0


def report(r: dict[str, Any], sizes: dict[str, int], up_s: float, args: argparse.Namespace) -> None:
    floor = r["floor"]["create_rtt_s"]["p50"]
    single = r["single"]
    burst = r["burst"]
    checks = {
        "single_p50_to_pod_vs_floor": single["to_pod_created_s"]["p50"] / floor,
        "burst_all_reconciled_s": burst["all_pods_created_s"],
        "handoff_p50_s": r["handoff"]["from_succeeded_status_s"]["p50"],
    }
    verdict = {
        "single_p50_within_3x_floor": checks["single_p50_to_pod_vs_floor"] <= TARGETS["single_p50_vs_floor_max"],
        "burst_within_60s": checks["burst_all_reconciled_s"] <= TARGETS["burst_all_reconciled_s_max"],
        "handoff_under_2s": r["handoff"]["from_succeeded_status_s"]["max"] < TARGETS["handoff_s_max"],
    }
    ms = lambda s: s * 1000.0  # noqa: E731
    rows = []
    for label, summ in (("floor: bare pod create (RTT)", r["floor"]["create_rtt_s"]),
                        ("floor: bare pod create -> seen by watch", r["floor"]["create_to_watch_s"]),
                        ("floor: bare pod create -> Running", r["floor"]["create_to_running_s"]),
                        (f"floor: {sizes['burst']} bare pods -> Running", r["floor"]["burst"]["to_running_s"]),
                        ("1 job: create -> pod created", single["to_pod_created_s"]),
                        ("1 job: create -> status Running", single["to_running_s"]),
                        ("1 job: pod created -> pod Running", single.get("pod_created_to_pod_running_s")),
                        ("1 job: pod Running -> status Running", single.get("pod_running_to_job_running_s")),
                        (f"{sizes['burst']} jobs: create -> pod created", burst["to_pod_created_s"]),
                        (f"{sizes['burst']} jobs: create -> status Running", burst["to_running_s"]),
                        (f"{sizes['burst']} jobs: pod Running -> status Running", burst.get("pod_running_to_job_running_s")),
                        ("hand-off: RM Succeeded -> PPO pod", r["handoff"]["from_succeeded_status_s"])):
        if summ is None:
            continue
        rows.append([label, summ["n"], ms(summ["p50"]), ms(summ["p95"]), ms(summ["p99"]), ms(summ["max"]),
                     summ["p50"] / floor])
    print(bl.table(["measure", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "p50 / floor"], rows))
    req = r["requests"]
    print()
    print(bl.table(["measure", "value"], [
        [f"{sizes['burst']} jobs: all pods created (s)", burst["all_pods_created_s"]],
        [f"{sizes['burst']} jobs: all Running (s)", burst["all_running_s"]],
        [f"{sizes['burst']} bare pods: all Running (s)", r["floor"]["burst"]["all_running_s"]],
        ["operator RSS before burst (MiB)", burst["operator_rss_before_mib"]],
        [f"operator peak RSS, {sizes['burst']} live jobs (MiB)", burst["operator_peak_rss_mib"]],
        ["operator reconciles during the burst", burst["operator_reconciles"]],
        ["operator seconds inside reconciles (sum)", burst["operator_reconcile_seconds"]],
        ["burst window until all pods created (s)", burst["window_s"]],
        *[[f"  CPU s in that window: {k}", v] for k, v in burst["cpu_s_until_all_pods_created"].items()],
        ["operator API requests per job (life)", req["requests_per_job"]],
        ["API server requests per job, all clients", req["apiserver_requests_per_job_all_clients"]],
        ["operator idle requests/s", req["idle_requests_per_s"]],
        ["hand-off, operator metric mean (s)", r["handoff"]["operator_metric_mean_s"]],
        ["cluster up (s)", up_s],
    ]))
    print("\noperator requests per job by type: " + ", ".join(
        f"{k} {v:.2f}" for k, v in req["requests_per_job_by_type"].items()))
    print("targets: " + ", ".join(f"{k}: {'PASS' if v else 'MISS'}" for k, v in verdict.items()))
    out = args.out or bl.RESULTS_DIR / ("operator_latency-quick.json" if args.quick else "operator_latency.json")
    path = bl.write_json(out, {"benchmark": "operator_latency", "quick": args.quick, "machine": bl.machine(),
                               "sizes": sizes, "cluster_up_s": up_s, "targets": TARGETS, "checks": checks,
                               "verdict": verdict, "results": r})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
