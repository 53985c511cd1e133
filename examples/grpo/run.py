"""Run the GRPO arithmetic example (grpo-arithmetic.yaml) through the operator.

    .venv/bin/python examples/grpo/run.py            # embedded cluster, about 2 minutes on 2 cores
    .venv/bin/python examples/grpo/run.py --keep-cluster

Uses the cluster KUBECONFIG points at, or starts the embedded one (as `scripts/main.sh` does); starts an
operator for the namespace, puts prompts.jsonl into the ConfigMap `grpo-arithmetic`, applies the job,
shows the live table and ends with the reward (total, and per rule) at the start and at the end. On the embedded cluster
the tokenizer is read from this checkout (the node shares the machine's filesystem); on a real cluster
copy examples/grpo/tokenizer into the claim `grpo-inputs` first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "trainer_image")]

from rlhf_trainer import contract  # noqa: E402

from rlhf_pipeline import cli, kube  # noqa: E402

NAMESPACE = "rlhf-grpo"
CONFIGMAP = "grpo-arithmetic"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", default=NAMESPACE)
    p.add_argument("--state-dir", default=str(REPO / ".state" / "grpo-cluster"), help="embedded cluster state")
    p.add_argument("--out", default=str(REPO / "out" / "grpo"), help="operator log and summary")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--keep-cluster", action="store_true")
    p.add_argument("--image", default="ghcr.io/rlhf-platform/rlhf-trainer:0.1.0")
    args = p.parse_args(argv)
    args.gpus, args.cpus = 1, cli.machine_cpus()  # what cli.Target needs for an embedded cluster
    return args


def local_tokenizer(docs: list[dict]) -> None:
    """Embedded cluster: read the tokenizer from this checkout instead of the claim."""
    for doc in docs:
        model = doc["spec"].get("actor")
        if model and model.get("claim") == "grpo-inputs":
            model.pop("claim")
            model["tokenizerPath"] = str(HERE / model["tokenizerPath"])


def rewards(log: str) -> dict[str, list[float]]:
    """Reward per iteration: the total and each source (rule) of it."""
    key = contract.M_PPO_REWARD_MEAN
    rows = [json.loads(line) for line in log.splitlines() if line.startswith("{") and key in line]
    out = {"total": [r[key] for r in rows]}
    prefix = contract.M_PPO_REWARD_SOURCE_MEAN + "/"
    for key in sorted({k for r in rows for k in r if k.startswith(prefix)}):
        out[key[len(prefix):]] = [r[key] for r in rows if key in r]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = kube.load_manifests(sorted(HERE.glob("*.yaml")))
    t0 = time.monotonic()
    target = cli.Target(args)
    if target.local is not None:
        local_tokenizer(docs)
    operator = None
    try:
        api = kube.api_client(target.kubeconfig)
        kube.apply_crds(api, REPO / "crds")
        kube.fresh_namespace(api, args.namespace)
        operator = cli.start_operator(target.kubeconfig, args.namespace, out / "operator.log", args.image)
        kube.apply(api, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIGMAP},
                         "data": {"prompts.jsonl": (HERE / "prompts.jsonl").read_text()}}, args.namespace)
        for doc in docs:
            kube.apply(api, doc, args.namespace)
        width = max(shutil.get_terminal_size((100, 24)).columns, 60)
        jobs, _ = cli.watch(api, args.namespace, args.timeout, time.monotonic(), width,
                            lambda: cli.operator_failure(operator, out / "operator.log"))
        logs = kube.log_reader(api, target.local)
        grpo = next(j for j in jobs if j["kind"] == "PPOJob")
        status = grpo.get("status") or {}
        curve = rewards(logs(args.namespace, status.get("trainerPod", "")))
        ok = all((j.get("status") or {}).get("phase") == "Succeeded" for j in jobs)
        summary = {"ok": ok, "seconds": round(time.monotonic() - t0, 1), "rewards": curve,
                   "phases": {j["metadata"]["name"]: (j.get("status") or {}).get("phase") for j in jobs}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        for name, values in curve.items():
            if values:
                head, tail = values[:5], values[-5:]
                print(f"reward {name:>6}: {sum(head) / len(head):.3f} over the first {len(head)} iterations -> "
                      f"{sum(tail) / len(tail):.3f} over the last {len(tail)}")
        print(f"{'done' if ok else 'FAILED'} in {summary['seconds']} s; summary in {out / 'summary.json'}")
        return 0 if ok else 1
    finally:
        if operator is not None:
            cli.stop_process(operator)
        target.close(args.keep_cluster)


if __name__ == "__main__":
    sys.exit(main())
