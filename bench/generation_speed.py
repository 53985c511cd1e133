"""Rollout generation speed: generated tokens/s of the PPO/GRPO sampler, the old path against the new in one run.

* ``old``: the sampler before the rework (kept here verbatim as the baseline): the model's growing cache
  (reallocated every step), ``torch.multinomial`` and a host read of "has every row ended?" after every token;
* ``new``: ``ppo_rollout.sample_responses`` as the trainer runs it: a static KV cache written in place, EOS
  checked on the host only every ``--eos-every`` steps, sampling on the device; ``--compile`` (on by default
  on a GPU) adds ``new+compile``: the decode step through ``torch.compile`` with CUDA graphs.

Both draw the same tokens from the same seed (``same_tokens`` in the JSON; exact in fp32, while in bf16 the two
caches' different attention lengths may round a logit differently and change a draw). The model is
a GPT-2 from a config with MiniLM's 30522-token vocabulary and random weights; prompts are random ids of
``--prompt-length/2 .. --prompt-length`` tokens, left padded. Paths are interleaved, ``--repeats`` times each
after one warm-up, and the median is reported (CPU seconds next to wall time on the CPU).

    python bench/generation_speed.py                 # CPU: GPT-2 2x128, batch 16, prompts <= 64, 32 new tokens
    python bench/generation_speed.py --gpu-size      # 355M (24 x 1024), batch 128, prompts <= 192, 128 new, bf16
    python bench/generation_speed.py --quick         # smoke size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bl  # noqa: E402

VOCAB = 30522
SIZES = {
    "cpu": {"model": {"n_layer": 2, "n_embd": 128, "n_head": 4}, "batch": 16, "prompt_length": 64, "new_tokens": 32},
    "gpu": {"model": {"n_layer": 24, "n_embd": 1024, "n_head": 16}, "batch": 128, "prompt_length": 192,
            "new_tokens": 128},
    "quick": {"model": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "batch": 4, "prompt_length": 16, "new_tokens": 8},
}


def old_sampler(model, query, query_mask, *, max_new_tokens, eos_token_id, pad_token_id, temperature, generator):
    """``sample_responses`` as it was before the rework (the baseline)."""
    import torch
    from rlhf_trainer.ppo_rollout import filter_logits, position_ids

    batch, device = query.shape[0], query.device
    attn = query_mask.long()
    pos = position_ids(attn)
    out = model(input_ids=query, attention_mask=attn, position_ids=pos, use_cache=True)
    past, next_logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = pos[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, masks = [], []
    for step in range(max_new_tokens):
        probs = torch.softmax(filter_logits(next_logits.float() / temperature), dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        masks.append(~finished)
        tokens.append(tok)
        if eos_token_id is not None:
            finished = finished | (tok == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past,
                    use_cache=True)
        past, next_logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(masks, dim=1).long()


def build(size: dict[str, Any], bf16: bool, device, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=max(512, size["prompt_length"] + size["new_tokens"]),
                     bos_token_id=101, eos_token_id=102, pad_token_id=0, **size["model"])
    model = GPT2LMHeadModel(cfg).to(device, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(size["prompt_length"] // 2, size["prompt_length"] + 1, (size["batch"],), generator=g)
    query = torch.zeros(size["batch"], size["prompt_length"], dtype=torch.long)
    mask = torch.zeros_like(query)
    for row, n in enumerate(lengths.tolist()):
        query[row, -n:] = torch.randint(1000, VOCAB, (n,), generator=g)
        mask[row, -n:] = 1
    return model, query.to(device), mask.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size")
    p.add_argument("--gpu-size", action="store_true", help="355M, batch 128, prompts <= 192, 128 new tokens, bf16")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (default 5; quick 2)")
    p.add_argument("--eos-every", type=int, default=16, help="decode steps between EOS checks (new path)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time new+compile (default: on with CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from rlhf_trainer.ppo_rollout import GenerationOptions, sample_responses

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = dict(SIZES["quick" if args.quick else "gpu" if args.gpu_size else "cpu"])
    size["batch"] = args.batch or size["batch"]
    size["new_tokens"] = args.new_tokens or size["new_tokens"]
    bf16 = cuda if args.bf16 is None else args.bf16
    compile_too = cuda if args.compile is None else args.compile
    repeats = args.repeats or (2 if args.quick else 5)
    model, query, mask = build(size, bf16, device, args.seed)
    common = {"max_new_tokens": size["new_tokens"], "eos_token_id": 102, "pad_token_id": 0, "temperature": 1.0}
    cache_length = size["prompt_length"] + size["new_tokens"]
    paths = {
        "old": lambda g: old_sampler(model, query, mask, generator=g, **common),
        "new": lambda g: sample_responses(model, query, mask, generator=g, cache_length=cache_length,
                                          options=GenerationOptions(eos_check_every=args.eos_every), **common),
    }
    if compile_too:
        opts = GenerationOptions(eos_check_every=args.eos_every, compile=True,
                                 compile_backend=None if cuda else "eager")
        paths["new+compile"] = lambda g: sample_responses(model, query, mask, generator=g, cache_length=cache_length,
                                                          options=opts, **common)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    outputs: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    tokens: dict[str, int] = {}
    for name, run in paths.items():  # warm-up (and compilation) outside the timed runs
        t0 = time.perf_counter()
        outputs[name] = run(torch.Generator(device=device).manual_seed(args.seed))
        sync()
        print(f"[generation] warm-up {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    for _ in range(repeats):
        for name, run in paths.items():
            g = torch.Generator(device=device).manual_seed(args.seed)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            resp, rmask = run(g)
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            tokens[name] = int(rmask.sum())
    same = all(torch.equal(outputs[k][0], outputs["old"][0]) and torch.equal(outputs[k][1], outputs["old"][1])
               for k in paths)
    results = []
    for name in paths:
        wall = statistics.median(times[name])
        results.append({"path": name, "median_s": wall, "tokens": tokens[name], "tokens_per_s": tokens[name] / wall,
                        "cpu_s": statistics.median(cpu[name]), "runs_s": times[name]})
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_old"] = r["tokens_per_s"] / base
    rows = [(r["path"], r["tokens_per_s"], r["median_s"], r["cpu_s"], r["speedup_vs_old"]) for r in results]
    print(bl.table(["path", "tokens/s", "median s", "CPU s", "x old"], rows))
    print(f"same tokens and masks on every path: {same}")
    suffix = "-quick" if args.quick else "-gpu" if args.gpu_size else ""
    out = Path(args.out or bl.RESULTS_DIR / f"generation_speed{suffix}.json")
    bl.write_json(out, {"benchmark": "generation_speed", "quick": args.quick, "machine": bl.machine(), "size": size,
                        "bf16": bf16, "device": str(device), "threads": args.threads, "eos_check_every": args.eos_every,
                        "repeats": repeats, "same_tokens": same, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
