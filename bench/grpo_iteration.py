"""GRPO: time per iteration and peak memory of our critic-free GRPO against TRL's ``GRPOTrainer``.

TRL is the pinned ``trl`` of the environment (1.16). Both sides get the same work:

* the same tiny GPT-2 actor (2 layers, 128 wide, MiniLM's 30k vocabulary; saved once, so both start from the
  same weights) in float32, and a frozen copy of it as the reference;
* the same HH-RLHF prompts, each cut to exactly ``--prompt-length`` tokens by our encoder and handed to TRL as
  that text (TRL tokenises it again; our encoder adds the tokenizer's start token, so ours reads one token more);
* the same group size (``--group`` samples per prompt), prompts per iteration, response length (EOS is rare in
  a 30k vocabulary, so practically every response is full length on both sides), temperature 1, no top-k/top-p;
* the same reward: a verifiable format rule, 1 when the decoded response contains a digit, else 0 (our
  ``ppo.rewards.format``; the same regular expression as TRL's reward function);
* (a third run, ours with ``advantage_estimator: gae`` and a critic, shows what dropping the critic saves);
* the same update: one generation per optimizer step, one pass (``num_iterations`` 1 / ``ppo_epochs`` 1) over the
  whole rollout as one batch, clip 0.2, rewards normalised by the group's mean and std, the k3 KL to the
  reference in the loss with beta 0.04, constant learning rate, no gradient clipping, the same threads.

Timing as in ``bench/ppo_iteration.py``: each side is a child process printing one line per iteration; the
driver stamps the lines with its clock and the child's CPU time; the median of the iterations after the warm-up
is reported, with the child's peak resident memory (``ru_maxrss``). Ratios > 1 mean ours is faster / smaller.

    python bench/grpo_iteration.py            # about 3 minutes on 2 cores
    python bench/grpo_iteration.py --quick    # smoke test size
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

GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
HAS_DIGIT = r".*[0-9].*"
BETA = 0.04
REWARD_MEAN = "rlhf_ppo_reward_mean"


def prepare(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """The actor's weights and a prompt file of prompts that fill the prompt window exactly."""
    from rlhf_trainer.config import DatasetConfig
    from rlhf_trainer.data import load_prompt_records
    from rlhf_trainer.data.encoding import encode_prompt, start_ids

    actor_dir = work / "actor"
    tok = bl.save_tiny_actor(actor_dir, GPT2_TINY, spec["seed"])
    records = load_prompt_records(DatasetConfig(path=spec["data"], format="hh_rlhf", eval_fraction=0.0)).train
    n_start = len(start_ids(tok))
    prompts = []
    for r in records:
        ids = encode_prompt(tok, r.prompt, spec["prompt_length"] + 1, r.messages)
        if len(ids) > spec["prompt_length"]:
            prompts.append(tok.decode(ids[-(spec["prompt_length"] - n_start):]))
        if len(prompts) == spec["prompts_needed"]:
            break
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"actor": str(actor_dir), "prompts": str(prompt_file)}


# --- our side ------------------------------------------------------------------------------------

def ours_config(spec: dict[str, Any], prep: dict[str, Any], work: Path, estimator: str = "grpo") -> dict[str, Any]:
    rollout = spec["prompts"] * spec["group"]
    cfg = {
        "stage": "ppo",
        "job": {"name": "bench", "namespace": "bench", "kind": "PPOJob"},
        "dataset": {"path": prep["prompts"], "format": "prompt", "eval_fraction": 0.0},
        "training": {"max_steps": spec["warmup"] + spec["iterations"], "learning_rate": spec["lr"],
                     "lr_schedule": "constant", "max_grad_norm": 0.0, "seed": spec["seed"], "log_every": 1,
                     "threads": spec["threads"]},
        "ppo": {
            "actor": {"path": prep["actor"]}, "rewards": {"format": {"pattern": HAS_DIGIT}},
            "advantage_estimator": "grpo", "samples_per_prompt": spec["group"], "kl_in_loss": True,
            "kl_coef": BETA, "kl_estimator": "k3", "cliprange": 0.2, "reward_clip": 0.0,
            "rollout_batch_size": rollout, "minibatch_size": rollout, "ppo_epochs": 1,
            "max_prompt_length": spec["prompt_length"], "max_new_tokens": spec["new_tokens"], "temperature": 1.0,
        },
        "deepspeed": {"enabled": False},
        "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 0, "resume": False},
        "metrics": {"port": 0},
        "output_dir": str(work / "final"),
    }
    if estimator == "gae":  # the same run with a critic (the actor's backbone and a fresh value head) and GAE
        cfg["ppo"].update(advantage_estimator="gae", kl_in_loss=False, vf_coef=0.1)
    return cfg


def run_ours(spec, prep, work: Path, estimator: str = "grpo") -> dict[str, Any]:
    side = work / f"ours-{estimator}"
    side.mkdir()
    cfg = side / "config.yaml"
    cfg.write_text(yaml.safe_dump(ours_config(spec, prep, side, estimator)))
    env = bl.thread_env(spec["threads"], {"RLHF_TERMINATION_LOG": str(side / "termination-log")})
    res = bl.run_child([bl.python(), "-m", "rlhf_trainer", "ppo", "--config", str(cfg)], env, cwd=bl.REPO)
    bl.check_child("ours", res)
    marks = [m for m in res.marks if REWARD_MEAN in m]
    return finish_side(spec, res, marks, "step", [m[REWARD_MEAN] for m in marks])


# --- TRL side: a worker process of this script ---------------------------------------------------

def trl_worker(spec: dict[str, Any], prep: dict[str, Any], out_dir: Path) -> None:
    import re
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from rlhf_trainer.config import ModelConfig
    from rlhf_trainer.models import load_tokenizer
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = load_tokenizer(ModelConfig(path=prep["actor"]))
    prompts = [json.loads(line)["prompt"] for line in Path(prep["prompts"]).read_text().splitlines()]
    train = Dataset.from_dict({"prompt": prompts})
    pattern = re.compile(HAS_DIGIT, re.DOTALL)

    def has_digit(completions, **kwargs) -> list[float]:
        return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]

    torch.manual_seed(spec["seed"])
    policy = AutoModelForCausalLM.from_pretrained(prep["actor"], dtype=torch.float32)
    rewards: list[float] = []

    class Steps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

        def on_step_end(self, args, state, control, **kwargs):
            print(json.dumps({"trl_step": state.global_step, "reward": rewards[-1] if rewards else None}), flush=True)

    rollout = spec["prompts"] * spec["group"]
    args = GRPOConfig(
        output_dir=str(out_dir / "trl-out"), per_device_train_batch_size=rollout, gradient_accumulation_steps=1,
        num_generations=spec["group"], steps_per_generation=1, num_iterations=1,
        max_completion_length=spec["new_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=0.2,
        scale_rewards="group", loss_type="dapo", learning_rate=spec["lr"], lr_scheduler_type="constant",
        max_grad_norm=0.0, max_steps=spec["warmup"] + spec["iterations"], logging_steps=1, save_strategy="no",
        report_to=[], seed=spec["seed"], bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0, disable_dropout=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[has_digit], args=args, train_dataset=train,
                          processing_class=tok, callbacks=[Steps()])
    trainer.train()


def run_trl(spec, prep, work: Path) -> dict[str, Any]:
    side = work / "trl"
    side.mkdir()
    (side / "spec.json").write_text(json.dumps({"spec": spec, "prep": prep}))
    env = bl.thread_env(spec["threads"], {"TRL_EXPERIMENTAL_SILENCE": "1"})
    res = bl.run_child([bl.python(), __file__, "--worker", "--spec", str(side / "spec.json"), "--result", str(side)],
                       env, cwd=bl.REPO)
    bl.check_child("TRL GRPOTrainer", res)
    marks = [m for m in res.marks if "trl_step" in m]
    return finish_side(spec, res, marks, "trl_step", [m["reward"] for m in marks if m["reward"] is not None])


def finish_side(spec, res: bl.ChildResult, marks: list[dict[str, Any]], key: str, rewards: list[float]) -> dict:
    w, n = spec["warmup"], spec["iterations"]
    walls, cpus = bl.step_times(marks, key, w, w + n)
    return {"iteration_s": statistics.median(walls), "iteration_cpu_s": statistics.median(cpus) if cpus else None,
            "peak_rss_mib": res.peak_rss_mib, "wall_s": res.wall_s,
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(bl.RESULTS_DIR / "grpo_iteration.json"))
    args = p.parse_args(argv)
    if args.worker:
        data = json.loads(Path(args.spec).read_text())
        trl_worker(data["spec"], data["prep"], Path(args.result))
        return 0
    spec = {"prompts": 4, "group": 4, "prompt_length": 32, "new_tokens": 32, "lr": 1e-4, "seed": 0,
            "warmup": 2, "iterations": 10, "threads": args.threads, "data": str(bl.HH_PAIRS)}
    if args.quick:
        spec.update(iterations=3, warmup=1, new_tokens=8)
    spec["prompts_needed"] = spec["prompts"] * (spec["warmup"] + spec["iterations"]) + 8
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        work = Path(tmp)
        prep = prepare(spec, work)
        ours = run_ours(spec, prep, work)
        gae = run_ours(spec, prep, work, "gae")  # right after: the least drift in the machine's load between them
        trl = run_trl(spec, prep, work)
    result = {
        "benchmark": "grpo_iteration", "quick": args.quick, "machine": bl.machine(), "spec": spec, "ours": ours,
        "trl": trl,
        "ours_gae_with_critic": gae,
        "critic_free_saving": {"speed_ratio": bl.ratio(gae["iteration_s"], ours["iteration_s"]),
                               "memory_ratio": bl.ratio(gae["peak_rss_mib"], ours["peak_rss_mib"])},
        "speed_ratio": bl.ratio(trl["iteration_s"], ours["iteration_s"]),
        "cpu_ratio": bl.ratio(trl["iteration_cpu_s"], ours["iteration_cpu_s"]),
        "memory_ratio": bl.ratio(trl["peak_rss_mib"], ours["peak_rss_mib"]),
    }
    print(bl.table(["side", "s/iteration", "CPU s/iteration", "peak RSS MiB", "reward first", "reward last"], [
        [name, side["iteration_s"], side["iteration_cpu_s"], side["peak_rss_mib"], side["reward_first"],
         side["reward_last"]] for name, side in (("ours (grpo)", ours), ("TRL GRPOTrainer", trl),
                                                  ("ours (gae + critic)", gae))]))
    print(f"speed: {bl.fmt(result['speed_ratio'])}x (CPU {bl.fmt(result['cpu_ratio'])}x), "
          f"peak memory: {bl.fmt(result['memory_ratio'])}x in our favour (> 1: ours faster / smaller)")
    saving = result["critic_free_saving"]
    print(f"critic-free vs the same run with a critic and GAE: {bl.fmt(saving['speed_ratio'])}x speed, "
          f"{bl.fmt(saving['memory_ratio'])}x peak memory")
    print(f"wrote {bl.write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
