"""The final model of a stage, exported in Hugging Face format at ``cfg.final_dir`` for the next stage.

The export is atomic like a checkpoint (written aside, fsynced, renamed), so the next stage never
reads half a model. ``rlhf_metadata.json`` records what was trained: stage, steps, final metrics and
the inputs used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .config import METADATA_FILE, TrainerConfig
from .runtime.checkpoint import fsync_tree


def build_metadata(cfg: TrainerConfig, steps: int, metrics: dict[str, float],
                   extra: dict[str, Any] | None = None) -> dict:
    """The content of rlhf_metadata.json (pure)."""
    model = {"ppo": cfg.ppo.actor, "dpo": cfg.dpo.policy}.get(cfg.stage, cfg.model)
    return {
        "stage": cfg.stage,
        "steps": steps,
        "metrics": {k: v for k, v in metrics.items()},
        "inputs": {
            "model": model.path or model.hub_id or {"init_from_config": model.init_from_config},
            "dataset": cfg.dataset.path or cfg.dataset.hub_id,
            "jobs": dict(cfg.inputs),
        },
        "job": {"name": cfg.job.name, "namespace": cfg.job.namespace, "kind": cfg.job.kind},
        "trainer_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def tree_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes (the metadata file excluded), in sorted order.

    The next stage records the digest of each model directory it read, so a hand-over can be checked
    end to end: what PPO read is byte for byte what the reward-model job wrote.
    """
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != METADATA_FILE):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def input_model_dirs(cfg: TrainerConfig) -> list[str]:
    """The model directories a stage reads (for the digests in its metadata)."""
    if cfg.stage == "ppo":
        models = [cfg.ppo.actor, cfg.ppo.reward_model, cfg.ppo.critic, cfg.ppo.reference]
    elif cfg.stage == "dpo":
        models = [cfg.dpo.policy, cfg.dpo.reference, cfg.dpo.online.reward_model]
    else:
        models = [cfg.model]
    return sorted({m.path for m in models if m.path and Path(m.path).is_dir()})


def read_metadata(final_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(final_dir) / METADATA_FILE).read_text())


def export_final(cfg: TrainerConfig, write_fn: Callable[[Path], None], metadata: dict[str, Any],
                 is_main: bool = True) -> Path:
    """Main process only: ``write_fn(tmp)`` writes the model and tokenizer, then metadata, rename into place."""
    final = Path(cfg.final_dir)
    if not is_main:
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_fn(tmp)
    metadata = {**metadata, "output_digest": tree_digest(tmp)}
    metadata["inputs"] = {**metadata.get("inputs", {}), "digests": {d: tree_digest(d) for d in input_model_dirs(cfg)}}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    fsync_tree(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
