"""`python -m rlhf_pipeline run`: the platform's main job.

Brings up the embedded cluster (or uses the one KUBECONFIG points at), installs the CRDs, starts the
operator, seeds the demo inputs, applies examples/pipeline (SFT -> reward model -> PPO), shows a live
table, and ends with a summary, a JSON report and a PNG of the training curves. Exits non-zero when a
stage failed, naming which and why.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlhf_trainer import contract as c

from . import kube, report, seed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"
TERMINAL = ("Succeeded", "Failed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlhf_pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the example pipeline end to end")
    r.add_argument("--examples", default=str(REPO / "examples" / "pipeline"), help="directory of job manifests")
    r.add_argument("--data", default=os.environ.get("RLHF_DEMO_DATA", str(DEFAULT_DATA)), help="HH-RLHF pairs JSONL")
    r.add_argument("--namespace", default="rlhf-demo")
    r.add_argument("--out", default=str(REPO / "out" / "pipeline"), help="where the summary, chart and logs go")
    r.add_argument("--state-dir", default=str(REPO / ".state" / "demo-cluster"), help="embedded cluster state")
    r.add_argument("--timeout", type=float, default=1800, help="seconds before giving up on the pipeline")
    r.add_argument("--keep-cluster", action="store_true", help="leave the embedded cluster running afterwards")
    r.add_argument("--gpus", type=int, default=2, help="GPUs of the embedded cluster's node")
    r.add_argument("--image", default="ghcr.io/rlhf-platform/rlhf-trainer:0.1.0", help="trainer image (recorded locally)")
    r.add_argument("--set", action="append", default=[], metavar="KIND/NAME:PATH=VALUE",
                   help="override a manifest field, e.g. PPOJob/harmless-ppo:spec.training.maxSteps=4")
    return p.parse_args(argv)


def apply_overrides(docs: list[dict], overrides: list[str]) -> None:
    """Apply `Kind/name:dotted.path=value` overrides (value parsed as JSON when it can be)."""
    for item in overrides:
        try:
            target, assignment = item.split(":", 1)
            path, raw = assignment.split("=", 1)
            kind, name = target.split("/", 1)
        except ValueError:
            raise SystemExit(f"--set {item!r}: expected KIND/NAME:dotted.path=value") from None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        doc = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
        if doc is None:
            raise SystemExit(f"--set {item!r}: no {kind} named {name} in the manifests")
        node = doc
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value


class Target:
    """The cluster we run on: the user's (KUBECONFIG) or an embedded one we start and stop."""

    def __init__(self, args: argparse.Namespace):
        self.local = None
        self.started = False
        kc = kube.default_kubeconfig()
        if kc:
            why = kube.reachable(kc)
            if why:
                raise SystemExit(f"KUBECONFIG={kc} is set but its API server does not answer ({why}); "
                                 "fix it or unset KUBECONFIG to use the embedded cluster")
            self.kubeconfig = kc
            print(f"using the cluster from KUBECONFIG={kc}")
        else:
            from localcluster import Cluster

            # Two GPUs: the SFT and reward-model stages run side by side, as they would on a real cluster.
            self.local = Cluster(args.state_dir, name="rlhf-demo", nodes=[f"local-gpu-0:cpu=16,memory=64Gi,gpu={args.gpus}"])
            if not self.local.running():
                print(f"starting the embedded cluster in {args.state_dir} ...", flush=True)
                seconds = self.local.up()
                self.started = True
                print(f"embedded cluster ready in {seconds:.1f} s")
            self.kubeconfig = self.local.kubeconfig

    def close(self, keep: bool) -> None:
        if self.local is not None and self.started and not keep:
            self.local.down(log=lambda _m: None)


def start_operator(kubeconfig: str, namespace: str, log_path: Path, image: str) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RLHF_WATCH_NAMESPACES": namespace,
           "RLHF_TRAINER_IMAGE": image, "RLHF_WEBHOOK_ENABLED": "false", "RLHF_METRICS_PORT": "0"}
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen([sys.executable, "-m", "rlhf_operator"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def share_extension_cache(docs: list[dict], cache_dir: str) -> None:
    """Embedded cluster only: let trainer pods share the host's torch extension cache.

    On the CPU, DeepSpeed JIT-compiles a shared-memory comm op (~90 s) on first use; a CPU trainer image
    would ship it prebuilt. Pods here run from this checkout's venv, so the host's cache plays that part.
    """
    for doc in docs:
        env = doc.setdefault("spec", {}).setdefault("env", [])
        if not any(e.get("name") == "TORCH_EXTENSIONS_DIR" for e in env):
            env.append({"name": "TORCH_EXTENSIONS_DIR", "value": cache_dir})


def seed_inputs(api, namespace: str, data: Path, image: str, claim: str) -> None:
    if not data.is_file():
        raise SystemExit(f"dataset {data} not found; pass --data PATH to the HH-RLHF pairs JSONL")
    cms = seed.data_configmaps(claim, namespace, data)
    for cm in cms:
        kube.apply(api, cm, namespace)
    kube.apply(api, seed.inputs_claim(claim, namespace), namespace)
    pod = seed.seed_pod(claim, namespace, image, len(cms), claim)
    kube.apply(api, pod, namespace)
    done = kube.wait_pod_done(api, namespace, pod["metadata"]["name"], timeout=300)
    if done.status.phase != "Succeeded":
        term = (done.status.container_statuses or [None])[0]
        msg = getattr(getattr(getattr(term, "state", None), "terminated", None), "message", "") or ""
        raise SystemExit(f"seeding the inputs failed (pod {namespace}/{pod['metadata']['name']}): {msg}")
    print(f"seeded claim {claim}: {data.name} ({len(cms)} ConfigMap parts) and the MiniLM encoder")


def watch(api, namespace: str, timeout: float, t0: float) -> list[dict]:
    last_print, last_table = 0.0, ""
    while True:
        jobs = kube.list_jobs(api, namespace)
        text = report.table(jobs)
        now = time.monotonic()
        if text != last_table or now - last_print > 30:
            print(f"\n[{now - t0:6.0f} s]\n{text}", flush=True)
            last_print, last_table = now, text
        if jobs and all((j.get("status") or {}).get("phase") in TERMINAL for j in jobs):
            return jobs
        if any((j.get("status") or {}).get("phase") == "Failed" for j in jobs):
            return jobs  # a failed stage ends the pipeline; its dependants fail too
        if now - t0 > timeout:
            print(f"timed out after {timeout:.0f} s", flush=True)
            return jobs
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifests = kube.load_manifests(sorted(Path(args.examples).glob("*.yaml")))
    if not manifests:
        raise SystemExit(f"no manifests in {args.examples}")
    apply_overrides(manifests, args.set)
    target = Target(args)
    operator = None
    try:
        api = kube.api_client(target.kubeconfig)
        if target.local is not None:
            share_extension_cache(manifests, str(Path.home() / ".cache" / "torch_extensions"))
        kube.apply_crds(api, REPO / "crds")
        kube.fresh_namespace(api, args.namespace)
        operator = start_operator(target.kubeconfig, args.namespace, out / "operator.log", args.image)
        seed_inputs(api, args.namespace, Path(args.data), args.image, "rlhf-demo-inputs")
        for doc in manifests:
            kube.apply(api, doc, args.namespace)
        print(f"applied {len(manifests)} jobs in namespace {args.namespace}: "
              + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in manifests), flush=True)
        jobs = watch(api, args.namespace, args.timeout, t0)
        logs = kube.log_reader(api, target.local)
        summary = summarize(jobs, logs, args.namespace, out, time.monotonic() - t0)
    finally:
        if operator is not None:
            stop_process(operator)
        target.close(args.keep_cluster)
    print_summary(summary)
    return 0 if summary["ok"] else 1


def summarize(jobs: list[dict], logs, namespace: str, out: Path, seconds: float) -> dict:
    stages, series = [], {}
    for job in jobs:
        st = job.get("status") or {}
        name = job["metadata"]["name"]
        pod = st.get("trainerPod") or ""
        text = logs(namespace, pod) if pod else ""
        (out / f"{name}.log").write_text(text)
        series[name] = report.parse_log_metrics(text)
        failed = next((cd for cd in st.get("conditions", []) if cd["type"] == "Failed" and cd["status"] == "True"), None)
        stages.append({
            "kind": job["kind"], "name": name, "phase": st.get("phase"), "progress": st.get("progress", {}),
            "output": st.get("output", {}), "checkpoint": st.get("checkpoint", {}),
            "failure": f"{failed.get('reason')}: {failed.get('message')}" if failed else "",
        })
    by_kind = {s["kind"]: s for s in stages}
    rm = by_kind.get("RewardModelJob", {})
    ppo = by_kind.get("PPOJob", {})
    ppo_series = series.get(ppo.get("name", ""), [])
    rm_series = series.get(rm.get("name", ""), [])
    reward_start, reward_end = report.first_last(ppo_series, c.M_PPO_REWARD_MEAN)
    _, kl_end = report.first_last(ppo_series, c.M_PPO_KL)
    _, rm_acc = report.first_last(rm_series, c.M_RM_EVAL_ACCURACY)
    summary = {
        "ok": bool(stages) and all(s["phase"] == "Succeeded" for s in stages),
        "seconds": round(seconds, 1),
        "reward_model_eval_accuracy": rm_acc if rm_acc is not None else rm.get("progress", {}).get("accuracy"),
        "ppo_reward_start": reward_start,
        "ppo_reward_end": reward_end,
        "ppo_final_kl": kl_end,
        "stages": stages,
        "chart": str(out / "training_curves.png"),
    }
    report.plot_curves(series, {s["name"]: s["kind"] for s in stages}, out / "training_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(s: dict) -> None:
    print("\n=== RLHF pipeline summary ===")
    for st in s["stages"]:
        where = st["output"].get("claim", st["checkpoint"].get("claim", "-"))
        path = st["output"].get("path", "")
        line = f"{st['kind']:15} {st['name']:16} {st['phase'] or 'Pending':10} checkpoint: claim {where} {path}"
        print(line)
        if st["failure"]:
            print(f"    FAILED - {st['failure']}")
    print(f"reward model held-out accuracy: {report.fmt(s['reward_model_eval_accuracy'])}")
    print(f"PPO mean reward: start {report.fmt(s['ppo_reward_start'])} -> end {report.fmt(s['ppo_reward_end'])}")
    print(f"PPO final KL: {report.fmt(s['ppo_final_kl'])}")
    print(f"training curves: {s['chart']}")
    print(f"total time: {s['seconds']:.0f} s")
    if not s["ok"]:
        bad = [f"{st['kind']}/{st['name']} ({st['phase'] or 'not finished'})" for st in s["stages"] if st["phase"] != "Succeeded"]
        print("PIPELINE FAILED: " + ", ".join(bad), file=sys.stderr)
