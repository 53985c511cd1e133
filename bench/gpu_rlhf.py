"""One GPU benchmark of the whole pipeline: reward model (MiniLM), SFT and PPO of a 355M GPT-2, in bf16.

Each stage runs through the trainer's real entry point (``python -m rlhf_trainer STAGE``) as a child
process and is measured from its JSON step log: training samples/s and tokens/s, PPO generation tokens/s
and time per phase, peak memory (GPU: the trainer's ``cuda_peak_memory_mib``; CPU: the child's peak RSS),
an MFU estimate (model FLOPs / time / the GPU's dense bf16 peak), optimizer steps skipped for NaN/Inf
gradients (must be 0), and the PPO reward and KL per iteration. The default size is the one of the issue
that found every PPO step skipped (GPT-2 24 x 1024 from a config over MiniLM's vocabulary, 60 SFT steps,
rollout 128, minibatch 32, 2 PPO epochs, prompts <= 192 tokens, 128 new tokens, KL coef 0.05, lr 2e-5)
and fits about 8 minutes on one H100/H200. Writes JSON and a markdown table.

    python bench/gpu_rlhf.py                      # GPU size
    python bench/gpu_rlhf.py --zero-stage 3       # the same through DeepSpeed ZeRO-3
    python bench/gpu_rlhf.py --generation-only    # only PPO generation: ZeRO-2 vs ZeRO-3 (about 4 minutes)
    python bench/gpu_rlhf.py --quick              # CPU smoke size (tiny models, fp32)

Generation runs the trainer's sampler as configured for production; on a GPU the decode step is compiled
(``RLHF_GENERATION_COMPILE=1``; ``--no-generation-compile`` turns it off). ``--zero-compare`` (implied by
``--generation-only``) adds two short PPO runs of the same actor through DeepSpeed ZeRO-2 and ZeRO-3 (a rule
reward, no critic) and reports their generation tokens/s and the ratio ZeRO-2 / ZeRO-3 (target <= 1.5).
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

GPT2_355M = {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 512}
GPT2_QUICK = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}
# Dense bf16 peak FLOP/s by device name (tensor cores, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SKIPPED = "rlhf_trainer_skipped_steps_total"
ZERO_COMPARE_ITERATIONS = 2  # timed PPO iterations per ZeRO stage in --zero-compare (after the warm-up)

FULL = {
    "reward": {"steps": 150, "warmup": 10, "batch_size": 64, "max_length": 256, "lr": 5e-5},
    "sft": {"steps": 60, "warmup": 5, "batch_size": 16, "max_length": 512, "lr": 1e-4},
    "ppo": {"iterations": 6, "warmup": 1, "rollout": 128, "minibatch": 32, "epochs": 2, "prompt_length": 192,
            "new_tokens": 128, "kl_coef": 0.05, "lr": 2e-5},
    "actor": GPT2_355M, "bf16": True,
}
QUICK = {
    "reward": {"steps": 6, "warmup": 2, "batch_size": 4, "max_length": 64, "lr": 5e-5},
    "sft": {"steps": 6, "warmup": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3},
    "ppo": {"iterations": 3, "warmup": 1, "rollout": 4, "minibatch": 2, "epochs": 1, "prompt_length": 32,
            "new_tokens": 8, "kl_coef": 0.05, "lr": 2e-5},
    "actor": GPT2_QUICK, "bf16": False,
}


# --- data ----------------------------------------------------------------------------------------

def write_data(src: Path, work: Path, n: int) -> dict[str, Path]:
    """Preference pairs (as given), and from them SFT rows (prompt + chosen) and PPO prompts."""
    from rlhf_trainer.config import DatasetConfig
    from rlhf_trainer.data import load_preference_splits

    pairs = load_preference_splits(DatasetConfig(path=str(src), eval_fraction=0.0, max_samples=n)).train
    out = {"pairs": src, "sft": work / "sft.jsonl", "prompts": work / "prompts.jsonl"}
    out["sft"].write_text("".join(json.dumps({"prompt": p.prompt, "response": p.chosen}) + "\n" for p in pairs))
    out["prompts"].write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in pairs))
    return out


# --- configs -------------------------------------------------------------------------------------

def common(args, work: Path, stage: str, steps: int, batch: int, max_length: int, lr: float,
           name: str | None = None) -> dict[str, Any]:
    name = name or stage
    return {
        "stage": stage,
        "job": {"name": f"gpu-bench-{name}", "namespace": "bench"},
        "training": {"max_steps": steps, "batch_size": batch, "max_length": max_length, "learning_rate": lr,
                     "lr_schedule": "constant", "warmup_steps": 0, "log_every": 1, "eval_every": 0,
                     "threads": args.threads, "seed": args.seed},
        # deepspeed.enabled unset: plain torch for ZeRO 0/1 on one GPU, DeepSpeed for ZeRO 2/3
        "deepspeed": {"zero_stage": args.zero_stage, "bf16": args.bf16},
        "checkpoint": {"dir": str(work / name / "ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0},
        "output_dir": str(work / name / "final"),
    }


def reward_config(args, size, work, data) -> dict[str, Any]:
    r = size["reward"]
    cfg = common(args, work, "reward", r["warmup"] + r["steps"], r["batch_size"], r["max_length"], r["lr"])
    return {**cfg, "model": {"path": str(bl.minilm_path())}, "dataset": {"path": str(data["pairs"]), "eval_fraction": 0.05}}


def sft_config(args, size, work, data) -> dict[str, Any]:
    s = size["sft"]
    cfg = common(args, work, "sft", s["warmup"] + s["steps"], s["batch_size"], s["max_length"], s["lr"])
    model = {"init_from_config": size["actor"], "tokenizer_path": str(bl.minilm_path())}
    return {**cfg, "model": model, "dataset": {"path": str(data["sft"]), "format": "prompt_response", "eval_fraction": 0.0}}


def ppo_config(args, size, work, data) -> dict[str, Any]:
    p = size["ppo"]
    cfg = common(args, work, "ppo", p["warmup"] + p["iterations"], p["minibatch"],
                 p["prompt_length"] + p["new_tokens"], p["lr"])
    return {**cfg, "dataset": {"path": str(data["prompts"]), "format": "prompt", "eval_fraction": 0.0},
            "ppo": {"actor": {"path": str(work / "sft" / "final")}, "reward_model": {"path": str(work / "reward" / "final")},
                    "rollout_batch_size": p["rollout"], "minibatch_size": p["minibatch"], "ppo_epochs": p["epochs"],
                    "max_prompt_length": p["prompt_length"], "max_new_tokens": p["new_tokens"],
                    "kl_coef": p["kl_coef"]}}


def zero_compare_config(args, size, work, data, zero_stage: int) -> dict[str, Any]:
    """PPO of the SFT-sized actor (from its config: only generation speed matters here) through DeepSpeed at
    ``zero_stage``, with a rule reward and no critic, for a warm-up and ZERO_COMPARE_ITERATIONS iterations."""
    p = size["ppo"]
    cfg = common(args, work, "ppo", p["warmup"] + ZERO_COMPARE_ITERATIONS, p["minibatch"],
                 p["prompt_length"] + p["new_tokens"], p["lr"], name=f"ppo-zero{zero_stage}")
    cfg["deepspeed"] = {"enabled": True, "zero_stage": zero_stage, "bf16": args.bf16}
    actor = {"init_from_config": size["actor"], "tokenizer_path": str(bl.minilm_path())}
    return {**cfg, "dataset": {"path": str(data["prompts"]), "format": "prompt", "eval_fraction": 0.0},
            "ppo": {"actor": actor, "reward_fn": "count:the", "advantage_estimator": "reinforce_plus_plus",
                    "rollout_batch_size": p["rollout"], "minibatch_size": p["minibatch"], "ppo_epochs": p["epochs"],
                    "max_prompt_length": p["prompt_length"], "max_new_tokens": p["new_tokens"],
                    "kl_coef": p["kl_coef"]}}


def zero_compare(args, size, work, data, params: int, peak: float | None) -> dict[str, Any]:
    spec = {**size["ppo"], "iterations": ZERO_COMPARE_ITERATIONS}
    out: dict[str, Any] = {}
    for z in (2, 3):
        res = run_stage(args, "ppo", zero_compare_config(args, size, work, data, z), work, name=f"ppo-zero{z}")
        r = ppo_result(res, spec, params, 0, peak)
        out[f"zero{z}"] = {k: r[k] for k in ("generation_tokens_per_s", "phase_s", "response_length",
                                             "peak_memory_mib", "skipped_steps")}
    out["zero2_over_zero3"] = (out["zero2"]["generation_tokens_per_s"] / out["zero3"]["generation_tokens_per_s"])
    return out


# --- running and reading a stage -----------------------------------------------------------------

def run_stage(args, stage: str, cfg: dict[str, Any], work: Path, name: str | None = None) -> bl.ChildResult:
    name = name or stage
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    extra = {"RLHF_TERMINATION_LOG": str(work / f"{name}.termination-log")}
    if args.generation_compile:
        extra["RLHF_GENERATION_COMPILE"] = "1"
    env = bl.thread_env(args.threads, extra)
    res = bl.run_child([bl.python(), "-m", "rlhf_trainer", stage, "--config", str(path)], env, cwd=bl.REPO,
                       timeout=args.timeout)
    bl.check_child(name, res)
    return res


def n_params(model_cfg: dict[str, Any] | None, path: Path | None = None) -> int:
    """Parameters of a model built from a config (on the meta device: no memory) or saved in ``path``."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        if model_cfg is not None:
            cfg = dict(model_cfg)
            config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=30522, bos_token_id=0, eos_token_id=0, **cfg)
        else:
            config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_mib(res: bl.ChildResult) -> float:
    gpu = [m["cuda_peak_memory_mib"] for m in res.marks if m.get("cuda_peak_memory_mib") is not None]
    return max(gpu) if gpu else res.peak_rss_mib


def skipped(res: bl.ChildResult) -> int:
    return sum(1 for m in res.marks if m.get("event") == "skipped_step")


def training_result(res: bl.ChildResult, spec: dict[str, Any], params: int, peak: float | None) -> dict[str, Any]:
    steps = [m for m in res.marks if "step" in m and "rlhf_trainer_loss" in m]
    timed = [m for m in steps if m["step"] > spec["warmup"]]
    start = next(m for m in steps if m["step"] == spec["warmup"])
    seconds = timed[-1]["_t"] - start["_t"]
    tokens = statistics.fmean(m["rlhf_trainer_tokens_per_second"] for m in timed)
    flops = 6.0 * params * tokens
    return {
        "steps": len(timed), "seconds": seconds, "samples_per_s": len(timed) * spec["batch_size"] / seconds,
        "tokens_per_s": tokens, "params": params, "mfu": flops / peak if peak else None,
        "peak_memory_mib": memory_mib(res), "skipped_steps": skipped(res),
        "loss_first": steps[0]["rlhf_trainer_loss"], "loss_last": steps[-1]["rlhf_trainer_loss"],
    }


def ppo_result(res: bl.ChildResult, spec: dict[str, Any], params: int, critic_params: int,
               peak: float | None) -> dict[str, Any]:
    its = [m for m in res.marks if "step" in m and "rlhf_ppo_reward_mean" in m]
    timed = [m for m in its if m["step"] > spec["warmup"]]
    phase = {k: statistics.fmean(m[f"rlhf_ppo_phase_seconds/{k}"] for m in timed) for k in ("generate", "score", "train")}
    length = statistics.fmean(m["rlhf_ppo_response_length"] for m in timed)
    gen_tokens = spec["rollout"] * length
    seq = spec["prompt_length"] + length  # upper bound of the prompt part: prompts are cut to prompt_length
    train_flops = 6.0 * (params + critic_params) * spec["epochs"] * spec["rollout"] * seq
    return {
        "iterations": len(timed), "iteration_s": sum(phase.values()),
        "phase_s": phase, "generation_tokens_per_s": gen_tokens / phase["generate"],
        "train_mfu": train_flops / phase["train"] / peak if peak else None,
        "response_length": length, "peak_memory_mib": memory_mib(res), "skipped_steps": skipped(res),
        "reward": [m["rlhf_ppo_reward_mean"] for m in its], "kl": [m["rlhf_ppo_kl"] for m in its],
        "approx_kl": [m.get("rlhf_ppo_approx_kl") for m in its],
    }


def zero_markdown(z: dict[str, Any]) -> str:
    head = "| PPO generation (rule reward, no critic) | generation tokens/s | generate s/iteration | peak MiB |"
    lines = [head, "|---|---|---|---|"]
    for stage in (2, 3):
        r = z[f"zero{stage}"]
        lines.append(f"| DeepSpeed ZeRO-{stage} | {r['generation_tokens_per_s']:.0f} | {r['phase_s']['generate']:.2f} "
                     f"| {r['peak_memory_mib']:.0f} |")
    return "\n".join(lines) + f"\n\nZeRO-2 / ZeRO-3 generation speed: {z['zero2_over_zero3']:.2f}x (target <= 1.5)\n"


def markdown(result: dict[str, Any]) -> str:
    if "reward" not in result:  # --generation-only
        return zero_markdown(result["zero_compare"])
    rm, sft, ppo = result["reward"], result["sft"], result["ppo"]
    rows = [
        ("reward model (MiniLM)", f"{rm['samples_per_s']:.1f} pairs/s", f"{rm['tokens_per_s']:.0f}", "-",
         bl.fmt(rm["mfu"]), f"{rm['peak_memory_mib']:.0f}", rm["skipped_steps"]),
        (f"SFT ({sft['params'] / 1e6:.0f}M)", f"{sft['samples_per_s']:.1f} samples/s", f"{sft['tokens_per_s']:.0f}", "-",
         bl.fmt(sft["mfu"]), f"{sft['peak_memory_mib']:.0f}", sft["skipped_steps"]),
        ("PPO iteration", f"{ppo['iteration_s']:.2f} s/iteration", "-", f"{ppo['generation_tokens_per_s']:.0f}",
         bl.fmt(ppo["train_mfu"]), f"{ppo['peak_memory_mib']:.0f}", ppo["skipped_steps"]),
    ]
    head = ["stage", "throughput", "train tokens/s", "generation tokens/s", "MFU (est.)", "peak MiB", "skipped steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    trend = ", ".join(f"{r:.3f}" for r in ppo["reward"])
    kl = ", ".join(f"{k:.4f}" for k in ppo["kl"])
    text = "\n".join(lines) + f"\n\nPPO reward per iteration: {trend}\nPPO KL per iteration: {kl}\n"
    return text + ("\n" + zero_markdown(result["zero_compare"]) if "zero_compare" in result else "")


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke size: tiny models, fp32, a few steps")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage (2 and 3 run DeepSpeed; 0/1 run the plain torch engine on one GPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 (default: on for the GPU size, off for --quick)")
    p.add_argument("--generation-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the PPO decode step with CUDA graphs (default: on with a GPU)")
    p.add_argument("--zero-compare", action="store_true",
                   help="also time PPO generation through ZeRO-2 and ZeRO-3 (two short PPO runs)")
    p.add_argument("--generation-only", action="store_true",
                   help="only the ZeRO-2 vs ZeRO-3 generation comparison (no reward/SFT/PPO pipeline)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=str(bl.HH_PAIRS), help="preference pairs JSONL (HH-RLHF harmless)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per stage")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/gpu_rlhf[-quick].json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    args.bf16 = size["bf16"] if args.bf16 is None else args.bf16
    if args.generation_compile is None:
        import torch

        args.generation_compile = torch.cuda.is_available()
    suffix = ("-quick" if args.quick else "") + ("-generation" if args.generation_only else "")
    out = Path(args.out or bl.RESULTS_DIR / f"gpu_rlhf{suffix}.json")
    peak = peak_flops()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-rlhf-") as tmp:
        work = Path(tmp)
        p = size["ppo"]
        need = max(size["sft"]["batch_size"] * (size["sft"]["warmup"] + size["sft"]["steps"]),
                   p["rollout"] * (p["warmup"] + p["iterations"]), 64)
        data = write_data(Path(args.data), work, need)
        results: dict[str, Any] = {}
        if args.generation_only or args.zero_compare:
            results["zero_compare"] = zero_compare(args, size, work, data, n_params(size["actor"]), peak)
        if args.generation_only:
            return finish(args, size, peak, out, results)
        res = run_stage(args, "reward", reward_config(args, size, work, data), work)
        results["reward"] = training_result(res, size["reward"], n_params(None, bl.minilm_path()), peak)
        res = run_stage(args, "sft", sft_config(args, size, work, data), work)
        results["sft"] = training_result(res, size["sft"], n_params(size["actor"]), peak)
        res = run_stage(args, "ppo", ppo_config(args, size, work, data), work)
        results["ppo"] = ppo_result(res, p, results["sft"]["params"], results["reward"]["params"], peak)
    return finish(args, size, peak, out, results)


def finish(args, size, peak: float | None, out: Path, results: dict[str, Any]) -> int:
    table = markdown(results)
    payload = {"benchmark": "gpu_rlhf", "quick": args.quick, "machine": bl.machine(), "zero_stage": args.zero_stage,
               "bf16": args.bf16, "generation_compile": args.generation_compile, "sizes": size, "peak_flops": peak,
               **results, "markdown": table}
    bl.write_json(out, payload)
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
