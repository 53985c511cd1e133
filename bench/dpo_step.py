"""DPO: step time and peak memory of our DPO stage against TRL's ``DPOTrainer``, side by side in one run.

Same model (a 2-layer, 128-wide GPT-2 over the MiniLM WordPiece vocabulary, saved once so every side starts from
the same weights), same HH-RLHF preference pairs (only pairs that fit ``--max-length`` untruncated, so both
sides see identical token ids: TRL gets the ids our encoder produced), same batches in the same order (TRL reads
our batch plan with a sequential sampler), same batch size, precision, learning rate (constant), gradient
clipping, beta, sigmoid loss, dropout off and threads.

Sides: ``ours`` (the real CLI, ``python -m rlhf_trainer dpo``: reference log-probs precomputed once before the
first step, then only the policy runs), ``trl`` (TRL's default: a reference forward in every step) and
``trl-precompute`` (TRL with ``precompute_ref_log_probs=True``). Each side is a child process of its own, so its
peak RSS is its own; warm-up steps are excluded from the timing; the one-off reference pass of the precomputing
sides is reported separately (``ref_s``), and "step+ref" adds it, spread over the timed steps, for the
comparison with TRL's default. Peak RSS includes each side's import footprint (TRL imports more libraries), so
the footprint of a bare import of each side is measured too and "working set" = peak - that footprint. On a
GPU the peak allocated CUDA memory is the memory figure.

    python bench/dpo_step.py            # about two minutes on 2 cores
    python bench/dpo_step.py --quick    # smoke test size
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402

GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 1024,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SIDES = ("ours", "trl", "trl-precompute")
LOSS = "rlhf_trainer_loss"


# --- preparation ---------------------------------------------------------------------------------

def prepare(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """The starting policy and a JSONL of pairs that fit ``max_length`` without truncation."""
    from rlhf_trainer.config import DatasetConfig
    from rlhf_trainer.data import load_preference_splits
    from rlhf_trainer.dpo import encode_preference_pairs

    tok = bl.save_tiny_actor(work / "policy", GPT2_TINY, spec["seed"])
    pairs = load_preference_splits(DatasetConfig(path=spec["data"], format="hh_rlhf", eval_fraction=0.0)).train
    keep = []
    for p, (ci, cl, ri, rl) in zip(pairs, encode_preference_pairs(tok, pairs, 10**6), strict=True):
        n_prompt = cl.count(-100)
        fits = max(len(ci), len(ri)) <= spec["max_length"] and ci[:n_prompt] == ri[:rl.count(-100)]
        if fits and n_prompt < len(ci) and rl.count(-100) < len(ri):
            keep.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
        if len(keep) == spec["pairs"]:
            break
    if len(keep) < spec["pairs"]:
        raise SystemExit(f"only {len(keep)} pairs fit --max-length {spec['max_length']}; raise it or lower --pairs")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return {"policy": str(work / "policy"), "data": str(data)}


# --- our side: the real CLI ----------------------------------------------------------------------

def ours_config(spec: dict[str, Any], prep: dict[str, Any], work: Path) -> dict[str, Any]:
    return {
        "stage": "dpo",
        "job": {"name": "bench", "namespace": "bench", "kind": "DPOJob"},
        "dataset": {"path": prep["data"], "format": "prompt_chosen_rejected", "eval_fraction": 0.0},
        "training": {"max_steps": spec["warmup"] + spec["steps"], "batch_size": spec["batch_size"],
                     "learning_rate": spec["lr"], "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "max_grad_norm": 1.0, "max_length": spec["max_length"], "seed": spec["seed"], "log_every": 1,
                     "threads": spec["threads"]},
        "dpo": {"policy": {"path": prep["policy"]}, "beta": spec["beta"], "loss": "sigmoid"},
        "deepspeed": {"enabled": False, "bf16": spec["bf16"]},
        "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0},
        "output_dir": str(work / "final"),
    }


def run_ours(spec: dict[str, Any], prep: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir()
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(ours_config(spec, prep, work)))
    env = bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(work / "termination-log"),
                                          "RLHF_TOKEN_CACHE_DIR": "off"})
    res = bl.run_child([bl.python(), "-m", "rlhf_trainer", "dpo", "--config", str(cfg)], env, cwd=bl.REPO)
    bl.check_child("ours", res)
    steps = [m for m in res.marks if LOSS in m]
    ref = next((m["seconds"] for m in res.marks if m.get("event") == "reference_logps"), None)
    return finish(spec, res, steps, "step", [m[LOSS] for m in steps], ref,
                  max((m.get("cuda_peak_memory_mib") or 0.0 for m in steps), default=None))


# --- TRL side: a worker process of this script ---------------------------------------------------

def trl_worker(spec: dict[str, Any], prep: dict[str, Any], precompute: bool, out_dir: Path) -> None:
    """DPO with TRL's DPOTrainer on exactly our token ids and batches; one JSON line per step."""
    import time
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from rlhf_trainer.config import DatasetConfig, ModelConfig
    from rlhf_trainer.data import load_preference_splits
    from rlhf_trainer.dpo import encode_preference_pairs
    from rlhf_trainer.models import load_tokenizer
    from rlhf_trainer.runtime.loop import BatchPlan
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(ModelConfig(path=prep["policy"]))
    pairs = load_preference_splits(DatasetConfig(path=prep["data"], format="prompt_chosen_rejected",
                                                 eval_fraction=0.0)).train
    items = encode_preference_pairs(tok, pairs, spec["max_length"])
    bs, total = spec["batch_size"], spec["warmup"] + spec["steps"]
    plan = BatchPlan(len(items), bs, 1, 1, spec["seed"])
    order = [i for s in range(total) for i in plan.indices(s, 0, 0)]
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in order:
        ci, cl, ri, rl = items[i]
        n = cl.count(-100)
        rows["prompt_ids"].append(ci[:n])
        rows["chosen_ids"].append(ci[n:])
        rows["rejected_ids"].append(ri[n:])
    train = Dataset.from_dict(rows)

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already our token ids (prompt / chosen / rejected)

    cuda = torch.cuda.is_available()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            print(json.dumps({"trl_step": state.global_step, "cuda_peak_mib": peak}), flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):  # after on_step_end of the same step
            if logs and "loss" in logs:
                print(json.dumps({"trl_logged_step": state.global_step, "loss": logs["loss"]}), flush=True)

    torch.manual_seed(spec["seed"])
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(prep["policy"], dtype=dtype)
    args = DPOConfig(
        output_dir=str(out_dir / "trl-out"), per_device_train_batch_size=bs, max_steps=total,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=None, beta=spec["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
        bf16=spec["bf16"], fp16=False, gradient_checkpointing=False, disable_dropout=True, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        train_sampling_strategy="sequential", seed=spec["seed"], use_cpu=not cuda, disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = Pretokenized(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=[Clock()])
    print(json.dumps({"event": "trl_init", "seconds": time.perf_counter() - t0}), flush=True)
    trainer.train()


def run_trl(spec: dict[str, Any], prep: dict[str, Any], work: Path, precompute: bool) -> dict[str, Any]:
    work.mkdir()
    (work / "spec.json").write_text(json.dumps({"spec": spec, "prep": prep, "precompute": precompute}))
    res = bl.run_child([bl.python(), __file__, "--worker", "trl", "--spec", str(work / "spec.json"), "--result",
                        str(work)], bl.thread_env(spec["threads"], {"HF_DATASETS_CACHE": str(work / "hf")}),
                       cwd=bl.REPO)
    bl.check_child("TRL DPOTrainer" + (" (precompute)" if precompute else ""), res)
    steps = [m for m in res.marks if "trl_step" in m]
    losses = [m["loss"] for m in res.marks if "trl_logged_step" in m]
    # TRL precomputes inside its constructor, which otherwise only wraps the model: that time is the reference pass
    ref = next((m["seconds"] for m in res.marks if m.get("event") == "trl_init"), None) if precompute else None
    return finish(spec, res, steps, "trl_step", losses, ref,
                  max((m.get("cuda_peak_mib") or 0.0 for m in steps), default=None))


# --- shared --------------------------------------------------------------------------------------

def finish(spec, res: bl.ChildResult, marks: list[dict[str, Any]], key: str, losses: list[float | None],
           ref_s: float | None, cuda_peak: float | None) -> dict[str, Any]:
    w, n = spec["warmup"], spec["steps"]
    walls, cpus = bl.step_times(marks, key, w, w + n)
    step_s = statistics.median(walls)
    return {"step_s": step_s, "step_cpu_s": statistics.median(cpus) if cpus else None, "ref_s": ref_s,
            "step_plus_ref_s": step_s + (ref_s or 0.0) / (w + n), "peak_rss_mib": res.peak_rss_mib,
            "cuda_peak_mib": cuda_peak or None, "wall_s": res.wall_s, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "losses": losses}


def import_footprint(side: str, threads: int) -> float:
    """Peak RSS of a process that only imports what the side imports (no model, no data)."""
    code = "import torch, rlhf_trainer.cli, rlhf_trainer.dpo; from transformers import GPT2LMHeadModel"
    if side != "ours":
        code += "; import datasets; from trl import DPOConfig, DPOTrainer"
    res = bl.run_child([bl.python(), "-c", code], bl.thread_env(threads), cwd=bl.REPO)
    bl.check_child(f"import footprint of {side}", res)
    return res.peak_rss_mib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps before them")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step")
    p.add_argument("--max-length", type=int, default=None, help="max tokens of a prompt + response")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (default 1: shared machine)")
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 on both sides (GPU)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; the fastest is reported")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=str(bl.HH_PAIRS), help="HH-RLHF pairs JSONL")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/dpo_step[-quick].json)")
    p.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        payload = json.loads(Path(args.spec).read_text())
        trl_worker(payload["spec"], payload["prep"], payload["precompute"], Path(args.result))
        return 0
    q = args.quick
    pick = lambda v, quick, full: v if v is not None else (quick if q else full)  # noqa: E731
    spec = {"steps": pick(args.steps, 3, 12), "warmup": pick(args.warmup, 1, 2),
            "batch_size": pick(args.batch_size, 4, 8), "max_length": pick(args.max_length, 128, 256),
            "threads": args.threads, "bf16": args.bf16, "lr": args.lr, "beta": args.beta, "seed": args.seed,
            "data": args.data}
    spec["pairs"] = spec["batch_size"] * (spec["steps"] + spec["warmup"])  # one epoch: each pair once
    sides = args.sides.split(",")
    for side in sides:
        if side not in SIDES:
            raise SystemExit(f"--sides: unknown side {side!r}; use {', '.join(SIDES)}")
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        print("[dpo] preparing the policy and pairs ...", file=sys.stderr, flush=True)
        prep = prepare(spec, work)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for rep in range(args.repeats):  # sides interleaved, so a busy spell hits them alike
            for side in sides:
                print(f"[dpo] {side} (run {rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                d = work / f"{side}-{rep}"
                runs[side].append(run_ours(spec, prep, d) if side == "ours"
                                  else run_trl(spec, prep, d, precompute=side == "trl-precompute"))
    footprint = {"ours": import_footprint("ours", args.threads)}
    if any(s != "ours" for s in sides):
        footprint["trl"] = import_footprint("trl", args.threads)
    results = []
    for side, rs in runs.items():
        best = min(rs, key=lambda r: r["step_s"])
        best["working_set_mib"] = best["peak_rss_mib"] - footprint["ours" if side == "ours" else "trl"]
        results.append({"side": side, **best, "step_s_all_runs": [r["step_s"] for r in rs]})
    by = {r["side"]: r for r in results}
    ratios = []
    ours = by.get("ours")
    for other in ("trl", "trl-precompute"):
        t = by.get(other)
        if ours and t:
            ratios.append({
                "against": other,
                "speed (TRL step / ours step)": bl.ratio(t["step_s"], ours["step_s"]),
                "speed incl. reference pass": bl.ratio(t["step_plus_ref_s"], ours["step_plus_ref_s"]),
                "peak RSS (ours / TRL)": bl.ratio(ours["peak_rss_mib"], t["peak_rss_mib"]),
                "working set (ours / TRL)": bl.ratio(ours["working_set_mib"], t["working_set_mib"]),
                "CUDA peak (ours / TRL)": bl.ratio(ours["cuda_peak_mib"], t["cuda_peak_mib"]),
            })
    print(bl.table(["side", "step s", "step CPU s", "ref pass s", "step+ref s", "peak RSS MiB", "working set MiB",
                    "CUDA peak MiB", "loss first", "loss last"],
                   [[r["side"], r["step_s"], r["step_cpu_s"], r["ref_s"], r["step_plus_ref_s"], r["peak_rss_mib"],
                     r["working_set_mib"], r["cuda_peak_mib"], r["loss_first"], r["loss_last"]] for r in results]))
    print()
    if ratios:
        keys = list(ratios[0])
        print(bl.table(keys, [[x[k] for k in keys] for x in ratios]))
    print(f"\nimport footprints (peak RSS MiB of a bare import): {footprint}")
    out = args.out or bl.RESULTS_DIR / ("dpo_step-quick.json" if q else "dpo_step.json")
    path = bl.write_json(out, {"benchmark": "dpo_step", "quick": q, "machine": bl.machine(), "config": spec,
                               "import_footprint_mib": footprint, "results": results, "ratios": ratios})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
