"""Reward-model training: our reward stage against TRL's ``RewardTrainer``, side by side in one run.

Same model architecture (``*ForSequenceClassification`` with one label: a 2-layer, 128-wide GPT-2
built from a config, and the pretrained all-MiniLM-L6-v2 encoder), same HH-RLHF pairs, same
train/eval split, same batches in the same order (TRL reads our batch plan with a sequential
sampler and gets the token ids our encoder produced, so every step sees identical tensors), same
batch size, max length, fp32, learning rate, constant schedule, grad clipping, threads and steps.

Ours runs through its real entry point (``python -m rlhf_trainer reward --config cfg.yaml``), with
DeepSpeed on and off; TRL runs in a worker process of this script. Each side is its own child
process, so its peak RSS is its own. Warm-up steps are excluded from the timing on both sides:
ours is timed from the per-step JSON log lines, TRL from a ``TrainerCallback``.

    python bench/reward_throughput.py            # a few minutes on 2 cores
    python bench/reward_throughput.py --quick    # smoke test size
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
             # Dropout off on both sides: TRL disables it by default, and it is no part of the speed question.
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}
SIDES = ("ours", "ours-ds", "trl")
EVAL_ACC = "rlhf_reward_eval_accuracy"
LOSS = "rlhf_trainer_loss"


def model_spec(name: str) -> dict[str, Any]:
    """How each side builds the same model: a fresh tiny GPT-2 or the pretrained MiniLM."""
    tok = str(bl.minilm_path())
    if name == "gpt2-tiny":  # GPT-2 layers over MiniLM's WordPiece vocabulary (no GPT-2 tokenizer offline)
        return {"name": name, "init_from_config": GPT2_TINY, "tokenizer_path": tok}
    if name == "minilm":
        return {"name": name, "path": tok}
    raise SystemExit(f"--models: unknown model {name!r}; use gpt2-tiny and/or minilm")


# --- our side: the real CLI ----------------------------------------------------------------------

def ours_config(spec: dict[str, Any], work: Path, deepspeed: bool) -> dict[str, Any]:
    m = spec["model"]
    model = {"path": m["path"]} if "path" in m else {"init_from_config": m["init_from_config"],
                                                      "tokenizer_path": m["tokenizer_path"]}
    return {
        "stage": "reward",
        "job": {"name": "bench", "namespace": "bench", "kind": "RewardModelJob"},
        "model": model,
        "dataset": spec["dataset"],
        "training": {
            "max_steps": spec["warmup"] + spec["steps"], "batch_size": spec["batch_size"],
            "learning_rate": spec["lr"], "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "max_length": spec["max_length"], "seed": spec["seed"], "log_every": 1,
            "eval_every": 0, "threads": spec["threads"],
        },
        "reward": {"head": spec["head"]},
        "deepspeed": {"enabled": deepspeed},
        "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0},
        "output_dir": str(work / "final"),
    }


def ours_child(spec: dict[str, Any], work: Path, deepspeed: bool, profile: Path | None = None) -> bl.ChildResult:
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(ours_config(spec, work, deepspeed)))
    env = bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(work / "termination-log")})
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return bl.run_child([bl.python(), *prof, "-m", "rlhf_trainer", "reward", "--config", str(cfg)], env, cwd=bl.REPO)


def run_ours(spec: dict[str, Any], deepspeed: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-rm-ours-") as tmp:
        res = ours_child(spec, Path(tmp), deepspeed)
    bl.check_child("ours" + (" (deepspeed)" if deepspeed else ""), res)
    step_marks = [m for m in res.marks if LOSS in m]  # the per-step training log lines
    timing = throughput(spec, step_marks, "step")
    evals = [m for m in res.marks if EVAL_ACC in m]
    return {
        **timing, "peak_rss_mib": res.peak_rss_mib, "wall_s": res.wall_s,
        "final_train_loss": step_marks[-1][LOSS],
        "eval_accuracy": evals[-1][EVAL_ACC] if evals else None,
    }


def throughput(spec: dict[str, Any], marks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Pairs per second over the timed steps: median step (headline; robust to a busy machine) and window mean."""
    w, n, bs = spec["warmup"], spec["steps"], spec["batch_size"]
    seconds, cpu = bl.window(marks, key, w, w + n)
    walls, cpus = bl.step_times(marks, key, w, w + n)
    med_wall, med_cpu = statistics.median(walls), statistics.median(cpus) if cpus else None
    return {"timed_steps": n, "timed_seconds": seconds, "timed_cpu_seconds": cpu,
            "step_s_median": med_wall, "step_cpu_s_median": med_cpu,
            "pairs_per_s": bs / med_wall, "pairs_per_cpu_s": bs / med_cpu if med_cpu else None,
            "pairs_per_s_window_mean": n * bs / seconds}


# --- TRL side: a worker process of this script ---------------------------------------------------

def trl_worker(spec: dict[str, Any], result_path: Path) -> None:
    """Train with TRL's RewardTrainer on exactly our batches; write timing and accuracy as JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from rlhf_trainer.config import DatasetConfig, ModelConfig
    from rlhf_trainer.data import load_preference_splits
    from rlhf_trainer.data.encoding import encode_for_scoring, render_full
    from rlhf_trainer.models import load_tokenizer
    from rlhf_trainer.runtime.loop import BatchPlan
    from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    m = spec["model"]
    tok = load_tokenizer(ModelConfig(path=m.get("path", ""), tokenizer_path=m.get("tokenizer_path", "")))
    splits = load_preference_splits(DatasetConfig(**spec["dataset"]))

    def encode(pairs):
        full = lambda p, r: encode_for_scoring(tok, render_full(tok, p.prompt, r, p.messages), spec["max_length"])  # noqa: E731
        return {"chosen_ids": [full(p, p.chosen) for p in pairs], "rejected_ids": [full(p, p.rejected) for p in pairs]}

    bs, total = spec["batch_size"], spec["warmup"] + spec["steps"]
    plan = BatchPlan(len(splits.train), bs, 1, 1, spec["seed"])
    order = [i for s in range(total) for i in plan.indices(s, 0, 0)]
    train = Dataset.from_dict(encode([splits.train[i] for i in order]))

    torch.manual_seed(spec["seed"])
    if "init_from_config" in m:
        init = dict(m["init_from_config"])
        config = AutoConfig.for_model(init.pop("model_type"), **init, vocab_size=len(tok), num_labels=1)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(m["path"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id

    class Clock(TrainerCallback):
        """One progress line per optimizer step; the driver stamps it on arrival, as it does ours."""

        def on_step_end(self, args, state, control, **kwargs):
            print(json.dumps({"trl_step": state.global_step}), flush=True)

    args = RewardConfig(
        output_dir=str(result_path.parent / "trl-out"), per_device_train_batch_size=bs, per_device_eval_batch_size=bs, max_steps=total,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_length=spec["max_length"], bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; ours has none: compare the same compute
        disable_dropout=not spec["dropout"], logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, train_sampling_strategy="sequential", seed=spec["seed"],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=[Clock()])
    out = trainer.train()

    # Held-out accuracy on the same eval pairs, scored by the trained model through TRL's own collator.
    evals = encode(splits.eval)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(splits.eval), bs):
            rows = [{"chosen_ids": c, "rejected_ids": r}
                    for c, r in zip(evals["chosen_ids"][i:i + bs], evals["rejected_ids"][i:i + bs], strict=True)]
            batch = trainer.data_collator(rows)
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits.squeeze(-1)
            chosen, rejected = logits.chunk(2)
            correct += int((chosen > rejected).sum())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    bl.write_json(result_path, {
        "final_train_loss": losses[-1] if losses else out.training_loss,
        "eval_accuracy": correct / max(len(splits.eval), 1),
    })


def trl_child(spec: dict[str, Any], work: Path, profile: Path | None = None) -> bl.ChildResult:
    spec_file, result_file = work / "spec.json", work / "result.json"
    spec_file.write_text(json.dumps(spec))
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return bl.run_child([bl.python(), *prof, __file__, "--worker", "trl", "--spec", str(spec_file),
                         "--result", str(result_file)], bl.thread_env(spec["threads"]), cwd=bl.REPO)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-rm-trl-") as tmp:
        res = trl_child(spec, Path(tmp))
        bl.check_child("TRL RewardTrainer", res)
        out = json.loads((Path(tmp) / "result.json").read_text())
    return {**throughput(spec, res.marks, "trl_step"), **out, "peak_rss_mib": res.peak_rss_mib, "wall_s": res.wall_s}


def profile_model(spec: dict[str, Any], model_name: str) -> dict[str, list[dict[str, Any]]]:
    """Top functions by own time of one whole (untimed) run of ours and of TRL."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-rm-prof-") as tmp:
        for side in ("ours", "trl"):
            work = Path(tmp) / side
            work.mkdir()
            prof = work / "run.prof"
            res = trl_child(spec, work, prof) if side == "trl" else ours_child(spec, work, False, prof)
            bl.check_child(f"profile of {side}", res)
            out[f"{model_name}/{side}"] = bl.top_functions(prof)
    return out


# --- driver --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    p.add_argument("--models", default=None, help="comma list of gpt2-tiny, minilm (default: both; quick: gpt2-tiny)")
    p.add_argument("--sides", default=None, help=f"comma list of {', '.join(SIDES)} (default: all; quick: ours,trl)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps before them")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per sequence")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (default 1: shared machine)")
    p.add_argument("--samples", type=int, default=None, help="preference records used (train + eval)")
    p.add_argument("--head", default="sequence_classification", choices=("sequence_classification", "value_head"),
                   help="our reward head (sequence_classification = the very model TRL trains)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per side, interleaved; the fastest run of each side is reported (busy machines)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile one untimed run of ours and of TRL per model (where the time goes)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=str(bl.HH_PAIRS), help="HH-RLHF pairs JSONL")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/reward_throughput[-quick].json)")
    p.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    pick = lambda v, quick, full: v if v is not None else (quick if q else full)  # noqa: E731
    return {
        "models": pick(args.models, "gpt2-tiny", "gpt2-tiny,minilm").split(","),
        "sides": pick(args.sides, "ours,trl", ",".join(SIDES)).split(","),
        "steps": pick(args.steps, 2, 12), "warmup": pick(args.warmup, 1, 2),
        "batch_size": pick(args.batch_size, 2, 8), "max_length": pick(args.max_length, 64, 256),
        "samples": pick(args.samples, 40, 400),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        trl_worker(json.loads(Path(args.spec).read_text()), Path(args.result))
        return 0
    p = plan(args)
    for side in p["sides"]:
        if side not in SIDES:
            raise SystemExit(f"--sides: unknown side {side!r}; use {', '.join(SIDES)}")
    if p["warmup"] < 1 or p["steps"] < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the timing window starts after a warm-up step)")
    base = {
        "dataset": {"path": args.data, "format": "hh_rlhf", "eval_fraction": 0.25, "split_seed": 0,
                    "max_samples": p["samples"]},
        "steps": p["steps"], "warmup": p["warmup"], "batch_size": p["batch_size"], "max_length": p["max_length"],
        "threads": args.threads, "lr": args.lr, "seed": args.seed, "head": args.head,
    }
    results: list[dict[str, Any]] = []
    profiles: dict[str, list[dict[str, Any]]] = {}
    for model_name in p["models"]:
        spec = {**base, "model": model_spec(model_name), "dropout": model_name == "minilm"}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in p["sides"]}
        for rep in range(args.repeats):  # sides interleaved, so a busy spell hits them alike
            for side in p["sides"]:
                print(f"[reward] {model_name} / {side} (run {rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                runs[side].append(run_trl(spec) if side == "trl" else run_ours(spec, deepspeed=side == "ours-ds"))
        for side, rs in runs.items():
            best = max(rs, key=lambda r: r["pairs_per_s"])  # the least disturbed run
            results.append({"model": model_name, "side": side, **best,
                            "pairs_per_s_all_runs": [r["pairs_per_s"] for r in rs],
                            "pairs_per_cpu_s_all_runs": [r["pairs_per_cpu_s"] for r in rs]})
        if args.profile:
            profiles.update(profile_model(spec, model_name))
    ratios = []
    for model_name in p["models"]:
        by_side = {r["side"]: r for r in results if r["model"] == model_name}
        trl = by_side.get("trl")
        for side in ("ours", "ours-ds"):
            ours = by_side.get(side)
            if ours and trl:
                ratios.append({
                    "model": model_name, "ours": side,
                    "throughput_ratio": bl.ratio(ours["pairs_per_s"], trl["pairs_per_s"]),
                    "cpu_throughput_ratio": bl.ratio(ours["pairs_per_cpu_s"], trl["pairs_per_cpu_s"]),
                    "peak_rss_ratio": bl.ratio(ours["peak_rss_mib"], trl["peak_rss_mib"]),
                    "eval_accuracy_ours": ours["eval_accuracy"], "eval_accuracy_trl": trl["eval_accuracy"],
                })
    print(bl.table(["model", "side", "pairs/s", "pairs/CPU-s", "peak RSS MiB", "eval acc", "train loss", "wall s"],
                   [[r["model"], r["side"], r["pairs_per_s"], r["pairs_per_cpu_s"], r["peak_rss_mib"],
                     r["eval_accuracy"], r["final_train_loss"], r["wall_s"]] for r in results]))
    print()
    print(bl.table(["model", "ours", "pairs/s ours/TRL", "pairs/CPU-s ours/TRL", "peak RSS ours/TRL", "acc ours",
                    "acc TRL"],
                   [[x["model"], x["ours"], x["throughput_ratio"], x["cpu_throughput_ratio"], x["peak_rss_ratio"],
                     x["eval_accuracy_ours"], x["eval_accuracy_trl"]] for x in ratios]))
    bl.print_profiles(profiles)
    out = args.out or bl.RESULTS_DIR / ("reward_throughput-quick.json" if args.quick else "reward_throughput.json")
    path = bl.write_json(out, {"benchmark": "reward_throughput", "quick": args.quick, "machine": bl.machine(),
                               "config": {**base, **p}, "results": results, "ratios": ratios,
                               "profiles": profiles})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
