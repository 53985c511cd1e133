"""Gang creation on the embedded cluster: many multi-node jobs at once, until every pod of every job exists.

A fresh ``localcluster.Cluster`` (one big node), the project's CRDs and a real operator process
(``python -m rlhf_operator``, stand-in trainer command) that talks to the API server through a counting proxy
(bench/_kubeproxy.py). ``--jobs`` SFTJobs with ``spec.resources.nodes = --nodes`` are created at once (16 client
threads); measured from this process's pod watch, on one monotonic clock:

* per job: its creation -> all of its pods exist (p50/p95/max), and creation -> its first pod;
* all jobs: first creation -> the last pod exists;
* operator API requests per job until then (+ 2 s for the status writes that follow), by type; the operator's idle
  request rate is subtracted.

By default the pods are kept Pending (a nodeSelector no node has): the operator's creation path is measured, not
200 stand-in trainers starting on 2 cores. ``--run`` lets them run. An operator that does not know
``spec.resources.nodes`` yet makes one pod per job: the report says how many pods per job it found.

    python bench/gang_creation.py                  # 50 jobs x 4 pods
    python bench/gang_creation.py --quick          # smoke size: 5 jobs x 2 pods
    PYTHONPATH=/tmp/old/operator python bench/gang_creation.py   # another operator tree, same conditions
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402
from _clusterwatch import GROUP, PLURALS, VERSION, OperatorProcess, Recorder, kube_configuration  # noqa: E402
from _kubeproxy import CountingProxy, ca_file, proxied_kubeconfig  # noqa: E402


class GangRecorder(Recorder):
    """Also the first-seen time of every pod of every job."""

    def __init__(self, kubeconfig: str, namespaces: list[str]):
        super().__init__(kubeconfig, namespaces)
        self.job_pods: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)

    def _watch_pods(self, api, ns: str) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(api)
        for ev in watch.Watch().stream(core.list_namespaced_pod, ns, timeout_seconds=5):
            now = time.monotonic()
            pod = ev["object"]
            job = (pod.metadata.labels or {}).get("rlhf.io/job")
            if job:
                self.job_pods[(ns, job)].setdefault(pod.metadata.name, now)
                self.job_pod.setdefault((ns, job), now)
            if pod.status and pod.status.phase:
                self.pod_phase.setdefault((ns, pod.metadata.name, pod.status.phase), now)
            if self._stop.is_set():
                return


def job_body(name: str, nodes: int, gpus: int, run: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"path": "/tmp"}, "dataset": {"path": "/etc/hostname"},
                            "training": {"maxSteps": 3},
                            # every pod of a multi-node job mounts the claim (jobspec: ReadWriteMany)
                            "checkpoint": {"everySteps": 3, "accessMode": "ReadWriteMany" if nodes > 1 else "ReadWriteOnce"},
                            "resources": {"gpus": gpus, "nodes": nodes},
                            "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.05"}]}
    if not run:
        spec["scheduling"] = {"nodeSelector": {"rlhf.io/bench": "nowhere"}}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SFTJob", "metadata": {"name": name}, "spec": spec}


def crd_knows_nodes() -> bool:
    doc = yaml.safe_load((bl.REPO / "crds" / "rlhf.io_sftjobs.yaml").read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return "nodes" in schema["properties"]["spec"]["properties"]["resources"]["properties"]


def measure(cluster, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes import client

    from rlhf_pipeline.kube import apply_crds

    api = client.ApiClient(kube_configuration(cluster.kubeconfig))
    apply_crds(api, bl.REPO / "crds", timeout=60)
    ns = f"bench-gang-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    co = client.CustomObjectsApi(api)
    proxy = CountingProxy(cluster.server, ca_file(cluster.kubeconfig, work))
    kubeconfig = proxied_kubeconfig(cluster.kubeconfig, proxy.start(), work)
    op = OperatorProcess(kubeconfig, [ns], work / "operator.log").start()
    rec = GangRecorder(cluster.kubeconfig, [ns]).start()
    try:
        time.sleep(2.0)  # start-up lists and watches settle
        idle0, t_idle = proxy.snapshot(), time.monotonic()
        time.sleep(3.0)
        idle_rate = sum((proxy.snapshot() - idle0).values()) / (time.monotonic() - t_idle)
        names = [f"gang-{i:03d}" for i in range(args.jobs)]
        starts: dict[str, float] = {}

        def create(name: str) -> None:
            starts[name] = time.monotonic()
            co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS["SFTJob"],
                                               job_body(name, args.nodes, args.gpus, args.run))

        before = proxy.snapshot()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, names))
        first = min(starts.values())

        def count(j: str) -> int:
            return len(rec.job_pods.get((ns, j), {}))

        def settled() -> bool:
            """Every job has --nodes pods, or (an operator making fewer) every job has some and none came for 3 s."""
            if all(count(j) >= args.nodes for j in names):
                return True
            seen = [t for j in names for t in rec.job_pods.get((ns, j), {}).values()]
            return all(count(j) for j in names) and time.monotonic() - max(seen) > 3.0
        deadline = time.monotonic() + max(120.0, 2.0 * args.jobs * args.nodes)
        while not settled():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: pods per job {Counter(count(j) for j in names)}")
            time.sleep(0.05)
        time.sleep(2.0)  # the status writes after the pods
        used = proxy.snapshot() - before
        window = time.monotonic() - first
    finally:
        rec.stop()
        op.stop()
        proxy.stop()
    per_job = Counter(count(j) for j in names)
    all_pods = {j: max(rec.job_pods[(ns, j)].values()) for j in names}
    first_pod = {j: min(rec.job_pods[(ns, j)].values()) for j in names}
    by_type: Counter[str] = Counter()
    for (verb, resource), k in used.items():
        by_type[f"{verb} {resource}"] += k
    total = sum(used.values())
    return {
        "jobs": args.jobs, "nodes_asked": args.nodes, "crd_has_nodes": crd_knows_nodes(),
        "pods_per_job_found": dict(per_job), "pods_ran": args.run,
        "to_all_pods_s": bl.summary([all_pods[j] - starts[j] for j in names]),
        "to_first_pod_s": bl.summary([first_pod[j] - starts[j] for j in names]),
        "all_pods_exist_s": max(all_pods.values()) - first,
        "window_s": window, "idle_requests_per_s": idle_rate, "operator_requests": total,
        "requests_per_job": (total - idle_rate * window) / args.jobs,
        "requests_per_job_by_type": {k: v / args.jobs for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size: 5 jobs x 2 pods")
    p.add_argument("--jobs", type=int, default=None, help="jobs created at once (default 50)")
    p.add_argument("--nodes", type=int, default=None, help="spec.resources.nodes of every job (pods per job; default 4)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per pod")
    p.add_argument("--run", action="store_true", help="let the pods run (default: kept Pending by a nodeSelector)")
    p.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before / after)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gang_creation[-LABEL].json)")
    p.add_argument("--keep", action="store_true", help="keep the state directory (operator log, cluster)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.jobs = args.jobs or (5 if args.quick else 50)
    args.nodes = args.nodes or (2 if args.quick else 4)
    from localcluster import Cluster

    state = Path(tempfile.mkdtemp(prefix="bench-gang-"))
    pods = args.jobs * args.nodes
    node = f"bench-node-0:cpu=512,memory=4Ti,gpu={pods * args.gpus + 16},pods={2 * pods + 64}"
    cluster = Cluster(state / "cluster", name="rlhf-bench-gang", nodes=[node])
    print(f"[gang] starting a fresh cluster in {cluster.state_dir} ...", file=sys.stderr, flush=True)
    up_s = cluster.up(watch_pid=os.getpid(), log=lambda m: print(m, file=sys.stderr))
    try:
        r = measure(cluster, state, args)
    finally:
        cluster.down(purge=not args.keep, log=lambda _m: None)
    ms = lambda s: s * 1000.0  # noqa: E731
    found = ", ".join(f"{n} pods: {k} jobs" for n, k in sorted(r["pods_per_job_found"].items()))
    print(bl.table(["measure", "value"], [
        ["jobs x spec.resources.nodes", f"{args.jobs} x {args.nodes} (CRD has nodes: {r['crd_has_nodes']})"],
        ["pods per job made by the operator", found],
        ["per job: create -> all its pods exist, p50 / p95 / max ms",
         f"{ms(r['to_all_pods_s']['p50']):.1f} / {ms(r['to_all_pods_s']['p95']):.1f} / "
         f"{ms(r['to_all_pods_s']['max']):.1f}"],
        ["per job: create -> first pod, p50 ms", f"{ms(r['to_first_pod_s']['p50']):.1f}"],
        ["all jobs: first create -> last pod exists (s)", f"{r['all_pods_exist_s']:.2f}"],
        ["operator API requests per job (until its pods exist + 2 s)", f"{r['requests_per_job']:.2f}"],
        ["cluster up (s)", f"{up_s:.1f}"],
    ]))
    print("requests per job by type: " + ", ".join(f"{k} {v:.2f}" for k, v in r["requests_per_job_by_type"].items()))
    suffix = f"-{args.label}" if args.label else ""
    out = args.out or bl.RESULTS_DIR / f"gang_creation{suffix}.json"
    path = bl.write_json(out, {"benchmark": "gang_creation", "label": args.label, "machine": bl.machine(),
                               "operator_source": os.environ.get("PYTHONPATH", ""), "results": r})
    print(f"wrote {path}")
    if args.keep:
        print(f"state kept in {state}")
    else:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
