"""PPO: time per iteration (generate / score / train) of our PPO stage against TRL's PPOTrainer.

TRL 1.16 (the pinned version) has no PPO trainer any more; its last one is
``trl.experimental.ppo.PPOTrainer`` of TRL 0.29.1, which runs on our transformers. This script
installs that single wheel, without dependencies, into a cache directory (bench/requirements-trl-ppo.txt)
and puts it first on the TRL worker's path; nothing else changes.

Both sides get the same models and sizes: a tiny GPT-2 actor (2 layers, 128 wide; saved once, so
both start from the same weights), a tiny GPT-2 reward model trained here by our reward stage
(sequence-classification head, which TRL can load), a critic from the reward model's backbone,
the reference = the starting actor; the same HH-RLHF prompts, each cut to exactly
``--prompt-length`` tokens by our encoder (no padding, so prompt order cannot change the work), the
same rollout size, minibatch size, PPO epochs, response length, sampling temperature, KL coefficient
and estimator, clip ranges, value coefficient, GAE parameters, learning rate (constant) and threads.
Reward normalisation, reward clipping and gradient clipping (which TRL's PPO does not do) are off on
our side.

Timing: each side is a child process that prints one line per iteration; the driver stamps the lines
with its clock and the child's CPU time (warm-up iterations excluded). The phases come from each
side: ours logs ``rlhf_ppo_phase_seconds/<phase>``; TRL's are measured by wrapping its module-level
``batch_generation`` (generate) and ``forward`` (the first training forward ends "score").

Quality: the mean reward-model score of fresh samples on held-out prompts, for the starting actor
and for each side's final actor, all sampled and scored by the same code: the reward gain.

    python bench/ppo_iteration.py            # a few minutes on 2 cores
    python bench/ppo_iteration.py --quick    # smoke test size
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402

TRL_PPO_REQUIREMENTS = bl.BENCH_DIR / "requirements-trl-ppo.txt"
TRL_PPO_DIR = Path.home() / ".cache" / "rlhf-platform" / "trl-ppo-0.29.1"
GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}
SIDES = ("ours", "ours-ds", "trl")
PHASES = ("generate", "score", "train")
PHASE_KEY = "rlhf_ppo_phase_seconds/"
REWARD_MEAN = "rlhf_ppo_reward_mean"


# --- preparation: shared models and prompts ------------------------------------------------------

def ensure_trl_ppo() -> Path:
    """TRL 0.29.1 (the last release with PPOTrainer) in a private directory, installed once."""
    if (TRL_PPO_DIR / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
        return TRL_PPO_DIR
    print(f"[ppo] installing {TRL_PPO_REQUIREMENTS.name} into {TRL_PPO_DIR} (no dependencies)", file=sys.stderr)
    subprocess.run([bl.python(), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_PPO_DIR),
                    "-r", str(TRL_PPO_REQUIREMENTS)], check=True)
    return TRL_PPO_DIR


def prepare(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Actor weights, a trained reward model, and prompt files (train / held-out) in ``work``."""
    from rlhf_trainer.config import DatasetConfig
    from rlhf_trainer.data import load_prompt_records
    from rlhf_trainer.data.encoding import encode_prompt

    actor_dir = work / "actor"
    tok = bl.save_tiny_actor(actor_dir, GPT2_TINY, spec["seed"])

    # Prompts whose encoding fills the whole prompt window: equal work per prompt on both sides.
    records = load_prompt_records(DatasetConfig(path=spec["data"], format="hh_rlhf", eval_fraction=0.0)).train
    full = [r for r in records if len(encode_prompt(tok, r.prompt, spec["prompt_length"] + 1, r.messages))
            > spec["prompt_length"]]
    n_eval = spec["eval_prompts"]
    if len(full) < n_eval + spec["rollout"]:
        raise SystemExit(f"only {len(full)} prompts reach {spec['prompt_length']} tokens; lower --prompt-length")
    train_file, eval_file = work / "prompts-train.jsonl", work / "prompts-eval.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in full[n_eval:]))
    eval_file.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in full[:n_eval]))

    rm_dir = work / "reward-model"
    rm_cfg = {
        "stage": "reward", "model": {"init_from_config": GPT2_TINY, "tokenizer_path": str(actor_dir)},
        "dataset": {"path": spec["data"], "format": "hh_rlhf", "eval_fraction": 0.1, "max_samples": 600},
        "training": {"max_steps": spec["rm_steps"], "batch_size": 8, "learning_rate": 3e-4, "lr_schedule": "constant",
                     "max_length": spec["prompt_length"] + spec["new_tokens"] + 2, "seed": spec["seed"],
                     "threads": spec["threads"], "log_every": 10},
        "reward": {"head": "sequence_classification"}, "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(work / "rm-ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0}, "output_dir": str(rm_dir),
    }
    (work / "rm.yaml").write_text(yaml.safe_dump(rm_cfg))
    res = bl.run_child([bl.python(), "-m", "rlhf_trainer", "reward", "--config", str(work / "rm.yaml")],
                       bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(work / "rm-termination")}),
                       cwd=bl.REPO)
    bl.check_child("reward model training (preparation)", res)
    evals = [m for m in res.marks if "rlhf_reward_eval_accuracy" in m]
    return {"actor": str(actor_dir), "reward_model": str(rm_dir), "train_prompts": str(train_file),
            "eval_prompts": str(eval_file), "n_train_prompts": len(full) - n_eval,
            "reward_model_eval_accuracy": evals[-1]["rlhf_reward_eval_accuracy"] if evals else None}


# --- our side ------------------------------------------------------------------------------------

def ours_config(spec: dict[str, Any], prep: dict[str, Any], work: Path, deepspeed: bool) -> dict[str, Any]:
    return {
        "stage": "ppo",
        "job": {"name": "bench", "namespace": "bench", "kind": "PPOJob"},
        "dataset": {"path": prep["train_prompts"], "format": "prompt", "eval_fraction": 0.0},
        "training": {"max_steps": spec["warmup"] + spec["iterations"], "learning_rate": spec["lr"],
                     "lr_schedule": "constant", "max_grad_norm": 0.0, "seed": spec["seed"], "log_every": 1,
                     "threads": spec["threads"]},
        "ppo": {
            "actor": {"path": prep["actor"]}, "reward_model": {"path": prep["reward_model"]},
            "rollout_batch_size": spec["rollout"], "minibatch_size": spec["minibatch"], "ppo_epochs": spec["epochs"],
            "max_prompt_length": spec["prompt_length"], "max_new_tokens": spec["new_tokens"], "temperature": 1.0,
            "kl_coef": 0.05, "kl_estimator": "k1", "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
            "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "reward_clip": 0.0, "normalize_reward": False,
        },
        "deepspeed": {"enabled": deepspeed},
        "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0},
        "output_dir": str(work / "final"),
    }


def ours_command(spec, prep, work: Path, deepspeed: bool, profile: Path | None = None) -> list[str]:
    cfg = work / "ppo.yaml"
    cfg.write_text(yaml.safe_dump(ours_config(spec, prep, work, deepspeed)))
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return [bl.python(), *prof, "-m", "rlhf_trainer", "ppo", "--config", str(cfg)]


def run_ours(spec, prep, work: Path, deepspeed: bool, run: int = 0) -> dict[str, Any]:
    name = "ours-ds" if deepspeed else "ours"
    side_dir = work / f"{name}-{run}"
    side_dir.mkdir()
    env = bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(side_dir / "termination-log")})
    res = bl.run_child(ours_command(spec, prep, side_dir, deepspeed), env, cwd=bl.REPO)
    bl.check_child(name, res)
    marks = [m for m in res.marks if REWARD_MEAN in m]
    timed = [m for m in marks if m["step"] > spec["warmup"]]
    phases = {ph: statistics.median([m[PHASE_KEY + ph] for m in timed]) for ph in PHASES}
    return finish_side(spec, res, marks, "step", phases, [m[REWARD_MEAN] for m in marks], str(side_dir / "final"))


# --- TRL side: a worker process of this script ---------------------------------------------------

def trl_worker(spec: dict[str, Any], prep: dict[str, Any], out_dir: Path) -> None:
    """PPO with TRL 0.29.1's PPOTrainer on the same models, prompts and sizes; phases on stdout."""
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from rlhf_trainer.config import DatasetConfig, ModelConfig
    from rlhf_trainer.data import load_prompt_records
    from rlhf_trainer.data.encoding import encode_prompt
    from rlhf_trainer.models import load_tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    tok = load_tokenizer(ModelConfig(path=prep["actor"]))
    tok.padding_side = "left"  # TRL's collator pads prompts; all have the same length anyway
    records = load_prompt_records(DatasetConfig(path=prep["train_prompts"], format="prompt", eval_fraction=0.0)).train
    ids = [encode_prompt(tok, r.prompt, spec["prompt_length"], r.messages) for r in records]
    train = Dataset.from_dict({"input_ids": ids})

    torch.manual_seed(spec["seed"])
    policy = AutoModelForCausalLM.from_pretrained(prep["actor"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(prep["actor"], dtype=torch.float32)
    policy.generation_config.pad_token_id = tok.pad_token_id
    rm = AutoModelForSequenceClassification.from_pretrained(prep["reward_model"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(prep["reward_model"], num_labels=1, dtype=torch.float32)

    clock: dict[str, float | None] = {}
    batch_generation, forward = ppo_module.batch_generation, ppo_module.forward

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = batch_generation(*args, **kwargs)
        clock.update(gen_start=t0, gen_end=time.perf_counter(), train_start=None)
        return out

    def timed_forward(model, *args, **kwargs):
        if model is not ref and clock.get("train_start") is None and clock.get("gen_end") is not None:
            clock["train_start"] = time.perf_counter()  # the first forward of the PPO update loop
        return forward(model, *args, **kwargs)

    ppo_module.batch_generation, ppo_module.forward = timed_generation, timed_forward

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            logs = state.log_history[-1] if state.log_history else {}
            print(json.dumps({
                "trl_step": state.global_step,
                "generate": clock["gen_end"] - clock["gen_start"],
                "score": clock["train_start"] - clock["gen_end"],
                "train": now - clock["train_start"],
                "score_mean": logs.get("objective/scores"),
            }), flush=True)

    iterations = spec["warmup"] + spec["iterations"]
    args = PPOConfig(
        output_dir=str(out_dir / "trl-out"), per_device_train_batch_size=spec["rollout"],
        gradient_accumulation_steps=1, num_mini_batches=spec["rollout"] // spec["minibatch"],
        num_ppo_epochs=spec["epochs"], local_rollout_forward_batch_size=spec["rollout"],
        total_episodes=iterations * spec["rollout"], response_length=spec["new_tokens"], temperature=1.0,
        stop_token="eos", kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, whiten_rewards=False, learning_rate=spec["lr"], lr_scheduler_type="constant",
        num_sample_generations=0, logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"],
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=train, eval_dataset=train.select(range(spec["rollout"])), value_model=value,
                         callbacks=[Phases()])
    trainer.train()
    policy.save_pretrained(out_dir / "final")
    tok.save_pretrained(out_dir / "final")


def trl_command(spec, prep, work: Path, profile: Path | None = None) -> list[str]:
    (work / "spec.json").write_text(json.dumps({"spec": spec, "prep": prep}))
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return [bl.python(), *prof, __file__, "--worker", "trl", "--spec", str(work / "spec.json"), "--result", str(work)]


def trl_env(spec) -> dict[str, str]:
    env = bl.thread_env(spec["threads"], {"TRL_EXPERIMENTAL_SILENCE": "1"})
    env["PYTHONPATH"] = ":".join(p for p in (str(ensure_trl_ppo()), env.get("PYTHONPATH", "")) if p)
    return env


def run_trl(spec, prep, work: Path, run: int = 0) -> dict[str, Any]:
    side_dir = work / f"trl-{run}"
    side_dir.mkdir()
    res = bl.run_child(trl_command(spec, prep, side_dir), trl_env(spec), cwd=bl.REPO)
    bl.check_child("TRL PPOTrainer", res)
    marks = [m for m in res.marks if "trl_step" in m]
    timed = [m for m in marks if m["trl_step"] > spec["warmup"]]
    phases = {ph: statistics.median([m[ph] for m in timed]) for ph in PHASES}
    return finish_side(spec, res, marks, "trl_step", phases, [m["score_mean"] for m in marks], str(side_dir / "final"))


# --- shared --------------------------------------------------------------------------------------

def finish_side(spec, res: bl.ChildResult, marks: list[dict[str, Any]], key: str, phases: dict[str, float],
                rollout_scores: list[float], final_dir: str) -> dict[str, Any]:
    """Median seconds per timed iteration (wall and CPU; robust to a busy machine), the window mean, phases."""
    w, n = spec["warmup"], spec["iterations"]
    seconds, _ = bl.window(marks, key, w, w + n)
    walls, cpus = bl.step_times(marks, key, w, w + n)
    return {
        "iteration_s": statistics.median(walls), "iteration_cpu_s": statistics.median(cpus) if cpus else None,
        "iteration_s_window_mean": seconds / n, "phases_s": phases, "peak_rss_mib": res.peak_rss_mib, "wall_s": res.wall_s,
        "rollout_score_first": rollout_scores[0] if rollout_scores else None,
        "rollout_score_last": rollout_scores[-1] if rollout_scores else None,
        "final_dir": final_dir,
    }


def heldout_reward(spec: dict[str, Any], prep: dict[str, Any], policy_dir: str) -> float:
    """Mean raw reward-model score of sampled responses to the held-out prompts (same code for all policies)."""
    import torch
    from rlhf_trainer import models
    from rlhf_trainer.config import DatasetConfig, ModelConfig
    from rlhf_trainer.data import load_prompt_records
    from rlhf_trainer.data.encoding import encode_prompt
    from rlhf_trainer.models import load_tokenizer
    from rlhf_trainer.ppo_rollout import sample_responses
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(ModelConfig(path=policy_dir))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    rm, rm_tok, _ = models.load_reward_model(prep["reward_model"])
    records = load_prompt_records(DatasetConfig(path=prep["eval_prompts"], format="prompt", eval_fraction=0.0)).train
    query = torch.tensor([encode_prompt(tok, r.prompt, spec["prompt_length"], r.messages) for r in records])
    scores = []
    for k in range(spec["eval_samples"]):
        gen = torch.Generator().manual_seed(1000 + k)
        resp, mask = sample_responses(policy, query, torch.ones_like(query), max_new_tokens=spec["new_tokens"],
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen)
        texts = [tok.decode(row[: int(n)].tolist(), skip_special_tokens=True) for row, n in zip(resp, mask.sum(1), strict=True)]
        scores.append(models.score_responses(rm, rm_tok, [r.prompt for r in records], texts))
    return float(torch.cat(scores).mean())


def profile_sides(spec, prep, work: Path, sides: list[str]) -> dict[str, list[dict[str, Any]]]:
    """cProfile of whole runs (untimed, separate from the measured ones): where each side's time goes."""
    out = {}
    for side in sides:
        d = work / f"profile-{side}"
        d.mkdir()
        prof = d / "run.prof"
        if side == "trl":
            cmd, env = trl_command(spec, prep, d, prof), trl_env(spec)
        else:
            cmd = ours_command(spec, prep, d, side == "ours-ds", prof)
            env = bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(d / "termination-log")})
        bl.check_child(f"profile of {side}", bl.run_child(cmd, env, cwd=bl.REPO))
        out[side] = bl.top_functions(prof)
    return out


# --- driver --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    p.add_argument("--sides", default=None, help=f"comma list of {', '.join(SIDES)} (default: all; quick: ours,trl)")
    p.add_argument("--iterations", type=int, default=None, help="timed PPO iterations per side")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations before them")
    p.add_argument("--rollout", type=int, default=None, help="prompts per rollout (per iteration)")
    p.add_argument("--minibatch", type=int, default=None, help="samples per PPO minibatch")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs per rollout")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per response")
    p.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (prompts are cut to exactly this)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (default 1: shared machine)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=str(bl.HH_PAIRS), help="HH-RLHF pairs JSONL (prompts are cut from it)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per side, interleaved; the fastest run of each side is reported (busy machines)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="also cProfile each side (default: on, off with --quick)")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/ppo_iteration[-quick].json)")
    p.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    pick = lambda v, quick, full: v if v is not None else (quick if q else full)  # noqa: E731
    spec = {
        "iterations": pick(args.iterations, 2, 8), "warmup": pick(args.warmup, 1, 2),
        "rollout": pick(args.rollout, 4, 16), "minibatch": pick(args.minibatch, 2, 8), "epochs": args.epochs,
        "new_tokens": pick(args.new_tokens, 8, 32), "prompt_length": pick(args.prompt_length, 32, 64),
        "threads": args.threads, "lr": args.lr, "seed": args.seed, "data": args.data,
        "rm_steps": 2 if q else 40, "eval_prompts": 8 if q else 32, "eval_samples": 1 if q else 2,
    }
    if spec["rollout"] % spec["minibatch"]:
        raise SystemExit("--rollout must be a multiple of --minibatch (TRL splits a rollout into equal minibatches)")
    if spec["warmup"] < 1 or spec["iterations"] < 1:
        raise SystemExit("--warmup and --iterations must be at least 1")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        payload = json.loads(Path(args.spec).read_text())
        trl_worker(payload["spec"], payload["prep"], Path(args.result))
        return 0
    spec = plan(args)
    sides = (args.sides or ("ours,trl" if args.quick else ",".join(SIDES))).split(",")
    for side in sides:
        if side not in SIDES:
            raise SystemExit(f"--sides: unknown side {side!r}; use {', '.join(SIDES)}")
    profile = args.profile if args.profile is not None else not args.quick
    if "trl" in sides:
        ensure_trl_ppo()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        print("[ppo] preparing actor, reward model and prompts ...", file=sys.stderr, flush=True)
        prep = prepare(spec, work)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for rep in range(args.repeats):  # sides interleaved, so a busy spell hits them alike
            for side in sides:
                print(f"[ppo] {side} (run {rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                runs[side].append(run_trl(spec, prep, work, rep) if side == "trl"
                                  else run_ours(spec, prep, work, side == "ours-ds", rep))
        results = []
        for side, rs in runs.items():
            best = min(rs, key=lambda r: r["iteration_s"])  # the least disturbed run (same seed: same work)
            results.append({"side": side, **best, "iteration_s_all_runs": [r["iteration_s"] for r in rs],
                            "iteration_cpu_s_all_runs": [r["iteration_cpu_s"] for r in rs]})
        print("[ppo] held-out reward of the starting and final actors ...", file=sys.stderr, flush=True)
        start_reward = heldout_reward(spec, prep, prep["actor"])
        for r in results:
            r["heldout_reward"] = heldout_reward(spec, prep, r.pop("final_dir"))
            r["heldout_reward_gain"] = r["heldout_reward"] - start_reward
        profiles = profile_sides(spec, prep, work, sides) if profile else {}
    ratios = []
    trl = next((r for r in results if r["side"] == "trl"), None)
    for r in results:
        if r["side"] != "trl" and trl:
            ratios.append({
                "ours": r["side"],
                "speed_ratio": bl.ratio(trl["iteration_s"], r["iteration_s"]),  # > 1: ours is faster
                "cpu_speed_ratio": bl.ratio(trl["iteration_cpu_s"], r["iteration_cpu_s"]),
                **{f"{ph}_speed_ratio": bl.ratio(trl["phases_s"][ph], r["phases_s"][ph]) for ph in PHASES},
                "peak_rss_ratio": bl.ratio(r["peak_rss_mib"], trl["peak_rss_mib"]),
                "reward_gain_ours": r["heldout_reward_gain"], "reward_gain_trl": trl["heldout_reward_gain"],
            })
    print(bl.table(["side", "s/iter", "CPU s/iter", *[f"{ph} s" for ph in PHASES], "peak RSS MiB",
                    "held-out reward", "gain", "wall s"],
                   [[r["side"], r["iteration_s"], r["iteration_cpu_s"], *[r["phases_s"][ph] for ph in PHASES],
                     r["peak_rss_mib"], r["heldout_reward"], r["heldout_reward_gain"], r["wall_s"]] for r in results]))
    print(f"starting actor held-out reward: {start_reward:.4f}; reward model eval accuracy: "
          f"{bl.fmt(prep['reward_model_eval_accuracy'])}")
    print()
    print(bl.table(["ours", "speed TRL/ours (s/iter)", "CPU", *PHASES, "peak RSS ours/TRL", "gain ours", "gain TRL"],
                   [[x["ours"], x["speed_ratio"], x["cpu_speed_ratio"], *[x[f"{ph}_speed_ratio"] for ph in PHASES],
                     x["peak_rss_ratio"], x["reward_gain_ours"], x["reward_gain_trl"]] for x in ratios]))
    bl.print_profiles(profiles)
    out = args.out or bl.RESULTS_DIR / ("ppo_iteration-quick.json" if args.quick else "ppo_iteration.json")
    prep_info = {k: v for k, v in prep.items() if k in ("n_train_prompts", "reward_model_eval_accuracy")}
    path = bl.write_json(out, {"benchmark": "ppo_iteration", "quick": args.quick, "machine": bl.machine(),
                               "config": {**spec, "sides": sides}, "preparation": prep_info,
                               "start_heldout_reward": start_reward, "results": results, "ratios": ratios,
                               "profiles": profiles})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
