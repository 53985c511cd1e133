"""`python -m rlhf_pipeline run`: the platform's main job.

Brings up the embedded cluster (or uses the one KUBECONFIG points at), installs the CRDs, starts the
operator, seeds the demo inputs, applies examples/pipeline (SFT -> reward model -> PPO) or, with
`--pipeline dpo`, examples/pipeline-dpo (SFT -> reward model -> online iterative DPO), shows a live
table, and ends with a summary, a JSON report and a PNG of the training curves. Exits non-zero when a
stage failed, naming which and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import kube, plots, report, seed, summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"
TERMINAL = ("Succeeded", "Failed")
# --pipeline: which example pipeline runs, and where its summary goes by default.
PIPELINES = {"ppo": ("pipeline", "pipeline"), "dpo": ("pipeline-dpo", "pipeline-dpo")}
INPUTS_CLAIM = "rlhf-demo-inputs"


def machine_cpus() -> int:
    """CPU cores this process may run on (the embedded node offers exactly these to pods)."""
    return len(os.sched_getaffinity(0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlhf_pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the example pipeline end to end")
    r.add_argument("--pipeline", choices=list(PIPELINES), default="ppo",
                   help="ppo: SFT -> reward model -> PPO (examples/pipeline); dpo: SFT -> reward model -> 3 online "
                        "DPO rounds (examples/pipeline-dpo)")
    r.add_argument("--examples", default=None, help="directory of job manifests (default: the --pipeline's)")
    r.add_argument("--data", default=os.environ.get("RLHF_DEMO_DATA", str(DEFAULT_DATA)), help="HH-RLHF pairs JSONL")
    r.add_argument("--namespace", default="rlhf-demo")
    r.add_argument("--out", default=None, help="where the summary, chart and logs go (default out/pipeline, "
                                               "out/pipeline-dpo for --pipeline dpo)")
    r.add_argument("--state-dir", default=str(REPO / ".state" / "demo-cluster"), help="embedded cluster state")
    r.add_argument("--timeout", type=float, default=1800, help="seconds before giving up on the pipeline")
    r.add_argument("--keep-cluster", action="store_true", help="leave the embedded cluster running afterwards")
    r.add_argument("--gpus", type=int, default=2, help="GPUs of the embedded cluster's node")
    r.add_argument("--cpus", type=int, default=machine_cpus(),
                   help="CPUs of the embedded cluster's node (default: this machine's cores); pods are scheduled "
                        "by their spec.resources.cpu request within it and each trainer uses that many threads")
    r.add_argument("--image", default="ghcr.io/rlhf-platform/rlhf-trainer:0.1.0",
                   help="trainer image (recorded locally)")
    r.add_argument("--set", action="append", default=[], metavar="KIND/NAME:PATH=VALUE",
                   help="override a manifest field, e.g. PPOJob/harmless-ppo:spec.training.maxSteps=4")
    args = p.parse_args(argv)
    examples, out = PIPELINES[args.pipeline]
    args.examples = args.examples or str(REPO / "examples" / examples)
    args.out = args.out or str(REPO / "out" / out)
    return args


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
        self.cluster_s = 0.0
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

            # Two GPUs and the machine's real cores: the SFT and reward-model stages run side by side, as
            # they would on a real cluster, each on the CPUs it requests (no oversubscription).
            self.local = Cluster(args.state_dir, name="rlhf-demo",
                                 nodes=[f"local-gpu-0:cpu={args.cpus},memory=64Gi,gpu={args.gpus}"])
            if not self.local.running():
                print(f"starting the embedded cluster in {args.state_dir} ...", flush=True)
                seconds = self.local.up()
                self.started = True
                self.cluster_s = seconds
                print(f"embedded cluster ready in {seconds:.1f} s")
            self.kubeconfig = self.local.kubeconfig

    def close(self, keep: bool) -> None:
        if self.local is not None and self.started and not keep:
            self.local.down(log=lambda _m: None)


def start_operator(kubeconfig: str, namespace: str, log_path: Path, image: str) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RLHF_WATCH_NAMESPACES": namespace,
           "RLHF_TRAINER_IMAGE": image, "RLHF_WEBHOOK_ENABLED": "false", "RLHF_METRICS_PORT": "0",
           "RLHF_HEALTH_PORT": "0",  # no fixed port to collide with: nothing probes this operator
           "RLHF_ALLOWED_ENV": "TORCH_EXTENSIONS_DIR"}  # share_extension_cache sets it in every job
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen([sys.executable, "-m", "rlhf_operator"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def operator_failure(proc: subprocess.Popen, log_path: Path) -> str | None:
    """None while the operator runs; once it has exited, why (its exit code and last error line)."""
    code = proc.poll()
    if code is None:
        return None
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    last = next((ln for ln in reversed(lines) if "Error" in ln or "ERROR" in ln), lines[-1] if lines else "")
    return f"the operator exited with code {code} ({last.strip()[:300]}); its full log is {log_path}"


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
    would ship it prebuilt. Pods here run from this checkout's venv, so the node agent's shared cache (writable
    by every pod whatever its user and read-only root) plays that part.
    """
    for doc in docs:
        env = doc.setdefault("spec", {}).setdefault("env", [])
        if not any(e.get("name") == "TORCH_EXTENSIONS_DIR" for e in env):
            env.append({"name": "TORCH_EXTENSIONS_DIR", "value": cache_dir})


def fit_cpu_requests(docs: list[dict], cpus: int) -> list[str]:
    """Embedded cluster only: a job asking for more CPUs than the node has could never be scheduled, so
    its request is lowered to the node's CPUs. Returns what was changed, for the user."""
    changed = []
    for doc in docs:
        res = doc.get("spec", {}).get("resources") or {}
        want = res.get("cpu")
        if want is not None and _cpu_quantity(want) > cpus:
            res["cpu"] = str(cpus)
            changed.append(f"{doc['kind']}/{doc['metadata']['name']}: spec.resources.cpu {want} -> {cpus}")
    return changed


def _cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


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


def watch(api, namespace: str, timeout: float, t0: float, width: int,
          operator_died: Callable[[], str | None] = lambda: None) -> tuple[list[dict], dict]:
    """Print the live table until every job finished (or one failed); returns the jobs and, per job, when
    (seconds after t0) it was first seen running and finished. Stops at once if the operator died."""
    last_print, last_table = 0.0, ""
    spans: dict[str, dict] = {}
    while True:
        why = operator_died()
        if why:
            raise SystemExit(f"PIPELINE FAILED: {why}")
        jobs = kube.list_jobs(api, namespace)
        now = time.monotonic()
        for j in jobs:
            phase = (j.get("status") or {}).get("phase")
            span = spans.setdefault(j["metadata"]["name"], {"start_s": None, "end_s": None})
            if phase in ("Running", *TERMINAL) and span["start_s"] is None:
                span["start_s"] = round(now - t0, 1)
            if phase in TERMINAL and span["end_s"] is None:
                span["end_s"] = round(now - t0, 1)
        text = report.table(jobs, width)
        if text != last_table or now - last_print > 30:
            print(f"\n[{now - t0:6.0f} s]\n{text}", flush=True)
            last_print, last_table = now, text
        if jobs and all((j.get("status") or {}).get("phase") in TERMINAL for j in jobs):
            return jobs, spans
        if any((j.get("status") or {}).get("phase") == "Failed" for j in jobs):
            return jobs, spans  # a failed stage ends the pipeline; its dependants fail too
        if now - t0 > timeout:
            print(f"timed out after {timeout:.0f} s", flush=True)
            return jobs, spans
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
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
            from localcluster.nodeagent import shared_cache_dir  # every pod may write there (read-only root)

            share_extension_cache(manifests, os.path.join(shared_cache_dir(), "torch_extensions"))
            for change in fit_cpu_requests(manifests, args.cpus):
                print(f"the node has {args.cpus} CPUs: {change}")
        kube.apply_crds(api, REPO / "crds")
        kube.fresh_namespace(api, args.namespace)
        operator = start_operator(target.kubeconfig, args.namespace, out / "operator.log", args.image)
        seed_inputs(api, args.namespace, Path(args.data), args.image, INPUTS_CLAIM)
        for doc in manifests:
            kube.apply(api, doc, args.namespace)
        applied = time.monotonic()
        print(f"applied {len(manifests)} jobs in namespace {args.namespace}: "
              + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in manifests), flush=True)
        width = max(shutil.get_terminal_size((100, 24)).columns, 60)
        jobs, spans = watch(api, args.namespace, args.timeout, applied, width,
                            lambda: operator_failure(operator, out / "operator.log"))
        timing = {"cluster_s": round(target.cluster_s, 1), "setup_s": round(applied - t0, 1),
                  "pipeline_s": round(time.monotonic() - applied, 1), "stages": spans,
                  "cpus": machine_cpus(), "load_start": load_start}
        logs = kube.log_reader(api, target.local)
        result = summarize(jobs, logs, args.namespace, out, timing, held_out_pairs(manifests, Path(args.data)))
    finally:
        if operator is not None:
            stop_process(operator)
        target.close(args.keep_cluster)
    result["timing"]["total_s"] = result["seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print("\n".join(summary.lines(result)), flush=True)
    if not result["ok"]:
        bad = [f"{st['kind']}/{st['name']} ({st['phase'] or 'not finished'})" for st in result["stages"]
               if st["phase"] != "Succeeded"]
        print("PIPELINE FAILED: " + ", ".join(bad), file=sys.stderr)
    return 0 if result["ok"] else 1


def held_out_pairs(docs: list[dict], data: Path) -> int | None:
    """How many pairs the reward model is evaluated on: its dataset split computed with the trainer's own
    loader, when it reads the seeded data file; None otherwise (then no standard error is given)."""
    rm = next((d for d in docs if d["kind"] == "RewardModelJob"), None)
    ds = ((rm or {}).get("spec") or {}).get("dataset") or {}
    if ds.get("claim") != INPUTS_CLAIM or ds.get("path") != seed.DATA_PATH or not data.is_file():
        return None
    try:
        from rlhf_trainer.config import DatasetConfig
        from rlhf_trainer.data.loading import load_preference_splits

        cfg = DatasetConfig(path=str(data), format=ds.get("format", "auto"), eval_fraction=ds.get("evalFraction", 0.1),
                            split_seed=ds.get("splitSeed", 0), max_samples=ds.get("maxSamples", 0))
        return len(load_preference_splits(cfg).eval)
    except Exception as e:  # noqa: BLE001 - the trainer reports bad data itself; the summary only loses the error bar
        print(f"note: could not count the reward model's held-out pairs ({type(e).__name__}: {e}); "
              "its accuracy is shown without a standard error", file=sys.stderr)
        return None


def summarize(jobs: list[dict], logs, namespace: str, out: Path, timing: dict, eval_pairs: int | None) -> dict:
    """Save each trainer's log, build the summary and draw the curves."""
    series = {}
    for job in jobs:
        name, pod = job["metadata"]["name"], (job.get("status") or {}).get("trainerPod") or ""
        text = logs(namespace, pod) if pod else ""
        (out / f"{name}.log").write_text(text)
        series[name] = report.parse_log_metrics(text)
    result = summary.build(jobs, series, timing, eval_pairs)
    result["chart"] = str(out / "training_curves.png")
    plots.plot_curves(series, {s["name"]: s["kind"] for s in result["stages"]}, out / "training_curves.png",
                      result["reward_model_eval_accuracy_se"])
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result
